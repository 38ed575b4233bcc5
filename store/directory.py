"""The directory: which domains are ours, which mailboxes and aliases exist, who may log in.

Every process asks the same questions through ``Directory``: the MTA (``resolve`` at RCPT,
``vrfy``/``expn``), the MSA (``authenticate``), the MDA (``mailbox_exists``) and the admin CLI
(the add/list/remove verbs). Lookup failures of the database raise ``DirectoryUnavailable`` so
the SMTP layer answers 4xx, never 550 for a real user.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any, TypeVar, cast

from sqlalchemy import CursorResult, Delete, delete, func, select
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session

from store import addresses, passwords
from store.addresses import AddressError
from store.db import Database
from store.models import Alias, Domain, RelayDomain, RelayRecipient, SieveScript, User

log = logging.getLogger("pochta.directory")

MAX_ALIAS_DEPTH = 10  # nested aliases deeper than this are treated as a loop
T = TypeVar("T")


class DirectoryError(Exception):
    """A user mistake in an admin operation (unknown domain, duplicate, ...): one line."""


class DirectoryUnavailable(Exception):
    """The database could not be reached or failed: a temporary condition."""


@dataclass(frozen=True)
class UserInfo:
    address: str
    enabled: bool
    created: datetime
    quota_bytes: int | None
    sieve: str | None = None  # the text of the active Sieve script (store/sieve.py)


@dataclass(frozen=True)
class RelayRoute:
    """How mail for a relay domain (we are its backup MX) is passed on."""

    domain: str
    to: str  # "host[:port]"; empty: the domain's MX hosts better than ours
    hold: bool  # nothing attempted until released (ETRN, queue flush --domain)
    restricted: bool  # only the listed relay recipients are accepted
    odmr_user: str = ""  # held for this user's ATRN (RFC 2645) instead of passed on


def catch_all(domain: str) -> str:
    return f"@{domain}"


def _normalize_source(source: str) -> str:
    """An alias source: a full address, or ``@domain`` for the catch-all."""
    if source.startswith("@"):
        return catch_all(addresses.normalize_domain(source[1:]))
    return addresses.normalize(source)


class Directory:
    def __init__(self, db: Database) -> None:
        self.db = db

    # --- lookups used by the mail processes -------------------------------------------------

    def is_local_domain(self, domain: str) -> bool:
        try:
            name = addresses.normalize_domain(domain)
        except AddressError:
            return False
        with self._read() as s:
            return s.scalar(select(Domain.id).where(Domain.name == name)) is not None

    def mailbox_exists(self, address: str) -> bool:
        """True if ``address`` (subaddress stripped) is an enabled mailbox of ours."""
        try:
            addr = addresses.strip_subaddress(addresses.normalize(address))
        except AddressError:
            return False
        with self._read() as s:
            return self._is_user(s, addr)

    def mailbox(self, address: str) -> UserInfo | None:
        """The enabled mailbox ``address`` (subaddress stripped) names, with its quota."""
        try:
            addr = addresses.strip_subaddress(addresses.normalize(address))
        except AddressError:
            return None
        with self._read() as s:
            u = s.scalar(select(User).where(User.address == addr, User.enabled.is_(True)))
            if u is None:
                return None
            info = UserInfo(u.address, u.enabled, u.created, u.quota_bytes)
        return replace(info, sieve=active_script(self.db, addr))

    def relay_route(self, domain: str) -> RelayRoute | None:
        """The route of a relay domain, or None if ``domain`` is not one."""
        try:
            name = addresses.normalize_domain(domain)
        except AddressError:
            return None
        with self._read() as s:
            d = s.scalar(select(RelayDomain).where(RelayDomain.name == name))
            if d is None:
                return None
            listed = s.scalar(select(RelayRecipient.id)
                              .where(RelayRecipient.relay_domain_id == d.id).limit(1))
            return RelayRoute(d.name, d.to, d.hold, listed is not None, d.odmr_user)

    def odmr_domains(self, login: str) -> list[str]:
        """The relay domains whose mail ``login`` may take with ATRN."""
        try:
            user = addresses.normalize(login)
        except AddressError:
            return []
        with self._read() as s:
            return list(s.scalars(select(RelayDomain.name).where(RelayDomain.odmr_user == user)
                                  .order_by(RelayDomain.name)))

    def is_relay_recipient(self, address: str) -> bool:
        """Whether ``address`` is listed for its relay domain (see RelayRoute.restricted)."""
        try:
            name = addresses.normalize(address)
        except AddressError:
            return False
        with self._read() as s:
            return s.scalar(select(RelayRecipient.id)
                            .where(RelayRecipient.address == name)) is not None

    def resolve(self, address: str) -> list[str]:
        """The final mailboxes and foreign addresses mail to ``address`` goes to.

        Order of look-up for a local address: the exact address (alias before mailbox, as
        Postfix's virtual_alias_maps), then without its ``+tag``, then the domain's catch-all.
        Aliases nest; a loop or a chain deeper than MAX_ALIAS_DEPTH yields nothing for that
        branch. Unknown local addresses resolve to []. Foreign addresses resolve to themselves.
        """
        try:
            addr = addresses.normalize(address)
        except AddressError:
            return []
        with self._read() as s:
            out: list[str] = []
            self._expand(s, addr, (), out)
            return out

    def owns(self, user: str, address: str) -> bool:
        """Whether ``user`` may use ``address`` as its own (a sender on submission, a vacation
        reply's From): the same address, with or without a +detail, or an address of one of
        our domains that delivers to ``user`` (an alias, a catch-all)."""
        try:
            addr = addresses.strip_subaddress(addresses.normalize(address))
        except AddressError:
            return False
        if addr == user.lower():
            return True
        return user.lower() in self.resolve(addr) and self.is_local_domain(
            addresses.domain_of(addr))

    def vrfy(self, address: str) -> str | None:
        """The mailbox ``address`` names, or None (RFC 5321 3.5.1: VRFY names a user)."""
        try:
            addr = addresses.strip_subaddress(addresses.normalize(address))
        except AddressError:
            return None
        with self._read() as s:
            if self._is_user(s, addr):
                return addr
            targets = self._alias_targets(s, addr)
            return addr if targets else None

    def expn(self, address: str) -> list[str] | None:
        """The members of the alias ``address`` (one level), or None if it is no alias."""
        try:
            addr = addresses.normalize(address)
        except AddressError:
            return None
        with self._read() as s:
            targets = self._alias_targets(s, addr)
            return targets or None

    def authenticate(self, address: str, password: str) -> str | None:
        """The normalised login if ``password`` is right for an enabled user, else None.

        Unknown users cost one hash verification too, so timing tells nothing; a hash made with
        older parameters is replaced on a successful login.
        """
        try:
            addr = addresses.normalize(address)
        except AddressError:
            addr = None
        stored: str | None = None
        scram: str | None = None
        if addr is not None:
            with self._read() as s:
                user = s.scalar(select(User).where(User.address == addr))
                if user is not None and user.enabled:
                    stored, scram = user.password_hash, user.scram_sha256
        if not passwords.verify_password(stored, password) or stored is None or addr is None:
            return None
        rehash = passwords.needs_rehash(stored)
        if rehash or scram is None:  # older parameters, or no SCRAM keys yet: make them now
            try:
                with self.db.transaction() as s:
                    user = s.scalar(select(User).where(User.address == addr))
                    if user is not None:
                        if rehash:
                            user.password_hash = passwords.hash_password(password)
                        user.scram_sha256 = passwords.scram_keys(password)
            except SQLAlchemyError:
                log.warning("could not update the stored password of %s", addr)
        return addr

    def scram_keys(self, address: str) -> str | None:
        """An enabled user's SCRAM-SHA-256 keys (None: no such user, or none made yet)."""
        try:
            addr = addresses.normalize(address)
        except AddressError:
            return None
        with self._read() as s:
            user = s.scalar(select(User).where(User.address == addr))
            return user.scram_sha256 if user is not None and user.enabled else None

    # --- admin verbs -------------------------------------------------------------------------

    def add_domain(self, name: str) -> str:
        domain = self.domain_arg(name)
        with self._write() as s:
            self._check_new_domain(s, domain)
            s.add(Domain(name=domain))
        return domain

    def add_relay_domain(self, name: str, to: str = "", hold: bool = False,
                         odmr_user: str = "") -> str:
        domain = self.domain_arg(name)
        user = self._address_arg(odmr_user) if odmr_user else ""
        with self._write() as s:
            self._check_new_domain(s, domain)
            if user and not self._is_user(s, user):
                raise DirectoryError(f"no user {user} (the ODMR user logs in to take the mail: "
                                     f"pochta user add {user})")
            s.add(RelayDomain(name=domain, to=to, hold=hold, odmr_user=user))
        return domain

    @staticmethod
    def _check_new_domain(s: Session, domain: str) -> None:
        if s.scalar(select(Domain.id).where(Domain.name == domain)) is not None:
            raise DirectoryError(f"domain {domain} already exists")
        if s.scalar(select(RelayDomain.id).where(RelayDomain.name == domain)) is not None:
            raise DirectoryError(f"domain {domain} already exists (a relay domain)")

    def list_relay_domains(self) -> list[RelayRoute]:
        with self._read() as s:
            listed = set(s.scalars(select(RelayRecipient.relay_domain_id)))
            return [RelayRoute(d.name, d.to, d.hold, d.id in listed, d.odmr_user)
                    for d in s.scalars(select(RelayDomain).order_by(RelayDomain.name))]

    def add_relay_recipient(self, address: str) -> str:
        addr = self._address_arg(address)
        domain = addresses.domain_of(addr)
        with self._write() as s:
            d = s.scalar(select(RelayDomain).where(RelayDomain.name == domain))
            if d is None:
                raise DirectoryError(f"domain {domain} is not a relay domain "
                                     f"(pochta domain add {domain} --relay)")
            if s.scalar(select(RelayRecipient.id)
                        .where(RelayRecipient.address == addr)) is not None:
                raise DirectoryError(f"relay recipient {addr} already exists")
            s.add(RelayRecipient(address=addr, relay_domain_id=d.id))
        return addr

    def remove_relay_recipient(self, address: str) -> None:
        addr = self._address_arg(address)
        with self._write() as s:
            if _deleted(s, delete(RelayRecipient).where(RelayRecipient.address == addr)) == 0:
                raise DirectoryError(f"no relay recipient {addr}")

    def list_relay_recipients(self, domain: str | None = None) -> list[str]:
        with self._read() as s:
            q = select(RelayRecipient.address).order_by(RelayRecipient.address)
            if domain:
                q = q.join(RelayDomain).where(RelayDomain.name == self.domain_arg(domain))
            return list(s.scalars(q))

    def list_domains(self) -> list[tuple[str, int, int]]:
        """(domain, number of users, number of alias rows), sorted by name."""
        with self._read() as s:
            users = (select(User.domain_id, func.count().label("n"))
                     .group_by(User.domain_id).subquery())
            aliases = (select(Alias.domain_id, func.count().label("n"))
                       .group_by(Alias.domain_id).subquery())
            rows = s.execute(
                select(Domain.name, func.coalesce(users.c.n, 0), func.coalesce(aliases.c.n, 0))
                .outerjoin(users, users.c.domain_id == Domain.id)
                .outerjoin(aliases, aliases.c.domain_id == Domain.id)
                .order_by(Domain.name)
            ).all()
            return [(r[0], int(r[1]), int(r[2])) for r in rows]

    def remove_domain(self, name: str, force: bool = False) -> None:
        domain = self.domain_arg(name)
        with self._write() as s:
            d = s.scalar(select(Domain).where(Domain.name == domain))
            if d is None:
                relay = s.scalar(select(RelayDomain).where(RelayDomain.name == domain))
                if relay is None:
                    raise DirectoryError(f"domain {domain} does not exist")
                n = s.scalar(select(func.count()).where(
                    RelayRecipient.relay_domain_id == relay.id)) or 0
                if n and not force:
                    raise DirectoryError(f"relay domain {domain} still has {n} relay "
                                         "recipient(s); remove them first or use --force")
                s.execute(delete(RelayRecipient).where(RelayRecipient.relay_domain_id == relay.id))
                s.delete(relay)
                return
            n_users = s.scalar(select(func.count()).where(User.domain_id == d.id)) or 0
            n_alias = s.scalar(select(func.count()).where(Alias.domain_id == d.id)) or 0
            if (n_users or n_alias) and not force:
                raise DirectoryError(
                    f"domain {domain} still has {n_users} user(s) and {n_alias} alias(es); "
                    "remove them first or use --force")
            s.execute(delete(User).where(User.domain_id == d.id))
            s.execute(delete(Alias).where(Alias.domain_id == d.id))
            s.delete(d)

    def add_user(self, address: str, password: str, quota_bytes: int | None = None) -> str:
        addr = self._mailbox_arg(address)
        _check_password(password)
        pw_hash = passwords.hash_password(password)
        scram = passwords.scram_keys(password)
        with self._write() as s:
            domain = self._own_domain(s, addr)
            if s.scalar(select(User.id).where(User.address == addr)) is not None:
                raise DirectoryError(f"user {addr} already exists")
            s.add(User(address=addr, domain_id=domain.id, password_hash=pw_hash,
                       scram_sha256=scram, quota_bytes=quota_bytes))
        return addr

    def set_password(self, address: str, password: str) -> str:
        addr = self._mailbox_arg(address)
        _check_password(password)
        pw_hash = passwords.hash_password(password)
        scram = passwords.scram_keys(password)
        with self._write() as s:
            user = s.scalar(select(User).where(User.address == addr))
            if user is None:
                raise DirectoryError(f"user {addr} does not exist")
            user.password_hash = pw_hash
            user.scram_sha256 = scram
        return addr

    def list_users(self, domain: str | None = None) -> list[UserInfo]:
        with self._read() as s:
            q = select(User).order_by(User.address)
            if domain is not None:
                d = s.scalar(select(Domain).where(Domain.name == self.domain_arg(domain)))
                if d is None:
                    raise DirectoryError(f"domain {self.domain_arg(domain)} does not exist")
                q = q.where(User.domain_id == d.id)
            return [UserInfo(u.address, u.enabled, u.created, u.quota_bytes)
                    for u in s.scalars(q)]

    def remove_user(self, address: str) -> None:
        addr = self._mailbox_arg(address)
        with self._write() as s:
            odmr = s.scalar(select(RelayDomain.name).where(RelayDomain.odmr_user == addr))
            if odmr is not None:
                raise DirectoryError(f"user {addr} takes the mail of relay domain {odmr} "
                                     f"with ATRN: remove that domain first")
            if _deleted(s, delete(User).where(User.address == addr)) == 0:
                raise DirectoryError(f"user {addr} does not exist")
            s.execute(delete(SieveScript).where(SieveScript.address == addr))

    def add_alias(self, source: str, targets: list[str]) -> tuple[str, list[str]]:
        try:
            src = _normalize_source(source)
            tgts = [addresses.normalize(t) for t in targets]
        except AddressError as e:
            raise DirectoryError(str(e)) from None
        if not tgts:
            raise DirectoryError("an alias needs at least one target")
        if not src.startswith("@"):
            try:
                src = addresses.normalize_mailbox(src)
            except AddressError as e:
                raise DirectoryError(str(e)) from None
        with self._write() as s:
            domain = self._own_domain(s, src)
            existing = set(s.scalars(select(Alias.target).where(Alias.source == src)))
            dupes = [t for t in tgts if t in existing]
            if dupes:
                raise DirectoryError(f"alias {src} -> {dupes[0]} already exists")
            for t in dict.fromkeys(tgts):
                s.add(Alias(source=src, target=t, domain_id=domain.id))
        return src, tgts

    def list_aliases(self) -> list[tuple[str, list[str]]]:
        with self._read() as s:
            rows = s.execute(select(Alias.source, Alias.target)
                             .order_by(Alias.source, Alias.id)).all()
        grouped: dict[str, list[str]] = {}
        for src, tgt in rows:
            grouped.setdefault(src, []).append(tgt)
        return list(grouped.items())

    def remove_alias(self, source: str, target: str | None = None) -> None:
        try:
            src = _normalize_source(source)
            tgt = addresses.normalize(target) if target else None
        except AddressError as e:
            raise DirectoryError(str(e)) from None
        with self._write() as s:
            q = delete(Alias).where(Alias.source == src)
            if tgt is not None:
                q = q.where(Alias.target == tgt)
            if _deleted(s, q) == 0:
                what = f"{src} -> {tgt}" if tgt else src
                raise DirectoryError(f"alias {what} does not exist")

    # --- internals ---------------------------------------------------------------------------

    def _read(self) -> Guard:
        return Guard(self.db)

    _write = _read  # the same transaction; the two names say what the caller intends

    @staticmethod
    def domain_arg(name: str) -> str:
        """``name`` as a normalised domain, or a DirectoryError saying what is wrong."""
        try:
            return addresses.normalize_domain(name)
        except AddressError as e:
            raise DirectoryError(str(e)) from None

    @staticmethod
    def _address_arg(address: str) -> str:
        try:
            return addresses.normalize(address)
        except AddressError as e:
            raise DirectoryError(str(e)) from None

    @staticmethod
    def _mailbox_arg(address: str) -> str:
        try:
            return addresses.normalize_mailbox(address)
        except AddressError as e:
            raise DirectoryError(str(e)) from None

    @staticmethod
    def _own_domain(s: Session, address: str) -> Domain:
        name = address.rpartition("@")[2]
        domain = s.scalar(select(Domain).where(Domain.name == name))
        if domain is None:
            raise DirectoryError(f"domain {name} is not a domain of ours (pochta domain add {name})")
        return domain

    @staticmethod
    def _is_user(s: Session, addr: str) -> bool:
        return s.scalar(select(User.id).where(User.address == addr, User.enabled.is_(True))) \
            is not None

    @staticmethod
    def _alias_targets(s: Session, source: str) -> list[str]:
        return list(s.scalars(select(Alias.target).where(Alias.source == source)
                              .order_by(Alias.id)))

    def _expand(self, s: Session, addr: str, chain: tuple[str, ...], out: list[str]) -> None:
        domain = addresses.domain_of(addr)
        if s.scalar(select(Domain.id).where(Domain.name == domain)) is None:
            if addr not in out:
                out.append(addr)  # foreign: delivered by SMTP, not ours to expand
            return
        if addr in chain or len(chain) >= MAX_ALIAS_DEPTH:
            # An alias that reaches itself again delivers to the mailbox of that name, if any.
            if self._is_user(s, addr) and addr not in out:
                out.append(addr)
            else:
                log.warning("alias loop or depth limit at %s (chain %s)", addr, " -> ".join(chain))
            return
        base = addresses.strip_subaddress(addr)
        for candidate in dict.fromkeys((addr, base)):
            targets = self._alias_targets(s, candidate)
            if targets:
                for t in targets:
                    self._expand(s, t, (*chain, candidate), out)
                return
            if self._is_user(s, candidate):
                if candidate not in out:
                    out.append(candidate)
                return
        for t in self._alias_targets(s, catch_all(domain)):
            self._expand(s, t, (*chain, addr), out)


_no_sieve_table_until = 0.0  # migration 0006 missing: asked again after this (monotonic)


def active_script(db: Database, address: str) -> str | None:
    """The text of ``address``'s active Sieve script, None without one. A database not yet
    upgraded to migration 0006 has none (mail is delivered without filters; a warning says
    so), and any other failure is DirectoryUnavailable like every look-up."""
    global _no_sieve_table_until
    if time.monotonic() < _no_sieve_table_until:
        return None
    try:
        with db.transaction() as s:
            return s.scalar(select(SieveScript.content).where(
                SieveScript.address == address, SieveScript.active.is_(True)))
    except SQLAlchemyError as e:
        text = _describe(e)
        if "sieve_scripts" in text and ("no such table" in text or "does not exist" in text):
            log.warning("the database has no Sieve scripts table: run `pochta db upgrade`; "
                        "mail is delivered without filters until then")
            _no_sieve_table_until = time.monotonic() + 60.0
            return None
        raise DirectoryUnavailable(text) from e


def _check_password(password: str) -> None:
    if not password:
        raise DirectoryError("the password is empty")
    if "\n" in password or "\r" in password or "\0" in password:
        raise DirectoryError("the password holds a line break or NUL")


class Guard:
    """A transaction that turns database failures into DirectoryUnavailable (and conflicting
    writes into DirectoryError)."""

    def __init__(self, db: Database) -> None:
        self._cm = db.transaction()

    def __enter__(self) -> Session:
        try:
            return self._cm.__enter__()
        except SQLAlchemyError as e:
            raise DirectoryUnavailable(_describe(e)) from e

    def __exit__(self, et: object, ev: BaseException | None, tb: object) -> None:
        try:
            self._cm.__exit__(et, ev, tb)  # type: ignore[arg-type]
        except IntegrityError as e:
            raise DirectoryError(f"conflicting change: {_describe(e)}") from e
        except SQLAlchemyError as e:
            raise DirectoryUnavailable(_describe(e)) from e
        if isinstance(ev, IntegrityError):
            raise DirectoryError(f"conflicting change: {_describe(ev)}") from ev
        if isinstance(ev, SQLAlchemyError):
            raise DirectoryUnavailable(_describe(ev)) from ev


def _deleted(s: Session, statement: Delete) -> int:
    """How many rows a DELETE removed (``Session.execute`` is typed as a plain Result)."""
    return cast("CursorResult[Any]", s.execute(statement)).rowcount


def _describe(e: SQLAlchemyError) -> str:
    orig = getattr(e, "orig", None)
    text = str(orig if orig is not None else e).strip().splitlines()
    return text[0] if text else type(e).__name__


class CachedDirectory(Directory):
    """The mail processes' directory: look-ups remembered for ``ttl`` seconds.

    Every RCPT asks ``is_local_domain`` and ``resolve``; under load that was most of the MTA's
    CPU. Admin changes take effect within ``ttl``. Failures are not cached.
    """

    def __init__(self, db: Database, ttl: float = 5.0, max_entries: int = 50_000) -> None:
        super().__init__(db)
        self.ttl = ttl
        self.max_entries = max_entries
        self._cache: dict[tuple[str, str], tuple[float, object]] = {}

    def peek(self, kind: str, key: str) -> tuple[bool, object]:
        """(True, value) if a fresh answer is cached: callers on an event loop skip the thread."""
        hit = self._cache.get((kind, key))
        if hit is not None and hit[0] > time.monotonic():
            return True, hit[1]
        return False, None

    def _cached(self, kind: str, key: str, compute: Callable[[], T]) -> T:
        now = time.monotonic()
        hit = self._cache.get((kind, key))
        if hit is not None and hit[0] > now:
            return hit[1]  # type: ignore[return-value]
        value = compute()
        if len(self._cache) >= self.max_entries:
            self._cache.clear()  # crude, bounded; a full cache is rebuilt within one TTL
        self._cache[(kind, key)] = (now + self.ttl, value)
        return value

    def is_local_domain(self, domain: str) -> bool:
        return self._cached("domain", domain, lambda: super(
            CachedDirectory, self).is_local_domain(domain))

    def resolve(self, address: str) -> list[str]:
        return list(self._cached("resolve", address, lambda: super(
            CachedDirectory, self).resolve(address)))

    def mailbox(self, address: str) -> UserInfo | None:
        return self._cached("mailbox", address, lambda: super(
            CachedDirectory, self).mailbox(address))

    def relay_route(self, domain: str) -> RelayRoute | None:
        return self._cached("relay", domain, lambda: super(
            CachedDirectory, self).relay_route(domain))

    def is_relay_recipient(self, address: str) -> bool:
        return self._cached("relay_rcpt", address, lambda: super(
            CachedDirectory, self).is_relay_recipient(address))


async def lookup(directory: Directory, kind: str, key: str) -> Any:
    """``directory.<kind>(key)`` from async code: from the cache when fresh, else in a thread.

    kind is one of _CACHE_KIND's keys.
    """
    if isinstance(directory, CachedDirectory):
        hit, value = directory.peek(_CACHE_KIND[kind], key)
        if hit:
            return list(value) if isinstance(value, list) else value
    return await asyncio.to_thread(getattr(directory, kind), key)


_CACHE_KIND = {"is_local_domain": "domain", "resolve": "resolve", "mailbox": "mailbox",
               "relay_route": "relay", "is_relay_recipient": "relay_rcpt"}
