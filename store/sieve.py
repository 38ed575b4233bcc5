"""Users' Sieve scripts and the vacation replies sent, in the database every host shares.

Used by `pochta sieve`, ManageSieve (mta/managesieve.py) and the MDA (vacation). Checking a
script's syntax is the caller's (the sieve package); this only stores: at most
``MAX_SCRIPTS`` scripts of at most ``MAX_SCRIPT_BYTES`` each per user, one of them active.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import CursorResult, delete, select, update
from sqlalchemy.orm import Session

from store import addresses
from store.addresses import AddressError
from store.db import Database
from store.directory import DirectoryError, Guard
from store.models import SieveScript, User, VacationReply, utcnow

MAX_SCRIPTS = 32
MAX_SCRIPT_BYTES = 256 * 1024
MAX_NAME = 128


class SieveStoreError(ValueError):
    """A request to correct, in one line; ``code`` is ManageSieve's response code for it."""

    def __init__(self, message: str, code: str = "") -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class ScriptInfo:
    name: str
    active: bool
    size: int


def check_name(name: str) -> str:
    """A script name as RFC 5804 §1.6 allows it (no control characters, not empty)."""
    if not name or len(name) > MAX_NAME or any(ord(c) < 0x20 or 0x7f <= ord(c) <= 0x9f
                                               or c in "\u2028\u2029" for c in name):
        raise SieveStoreError(f"bad script name {name!r}")
    return name


class SieveStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    @staticmethod
    def _user(s: Session, address: str) -> str:
        """The normalised address of an existing user (in the verb's own transaction)."""
        try:
            addr = addresses.normalize(address)
        except AddressError as e:
            raise SieveStoreError(str(e)) from None
        if s.scalar(select(User.id).where(User.address == addr)) is None:
            raise SieveStoreError(f"user {addr} does not exist", "NONEXISTENT")
        return addr

    def _tx(self) -> Guard:
        return Guard(self.db)

    def scripts(self, address: str) -> list[ScriptInfo]:
        with self._tx() as s:
            addr = self._user(s, address)
            rows = s.execute(select(SieveScript.name, SieveScript.active, SieveScript.content)
                             .where(SieveScript.address == addr)
                             .order_by(SieveScript.name)).all()
        return [ScriptInfo(n, a, len(c.encode())) for n, a, c in rows]

    def get(self, address: str, name: str | None = None) -> tuple[str, str]:
        """(name, text) of the named script, or of the active one without a name."""
        with self._tx() as s:
            addr = self._user(s, address)
            q = select(SieveScript.name, SieveScript.content).where(SieveScript.address == addr)
            q = q.where(SieveScript.name == name) if name is not None else q.where(
                SieveScript.active.is_(True))
            row = s.execute(q).first()
        if row is None:
            raise SieveStoreError(f"{addr} has no script {name!r}" if name is not None
                                  else f"{addr} has no active script", "NONEXISTENT")
        return row[0], row[1]

    def have_space(self, address: str, name: str, size: int) -> None:
        """SieveStoreError (QUOTA...) unless a script of ``size`` bytes named ``name`` fits."""
        with self._tx() as s:
            self._check_space(s, self._user(s, address), name, size)

    @staticmethod
    def _check_space(s: Session, addr: str, name: str, size: int) -> None:
        if size > MAX_SCRIPT_BYTES:
            raise SieveStoreError(f"a script may hold at most {MAX_SCRIPT_BYTES} bytes",
                                  "QUOTA/MAXSIZE")
        names = set(s.scalars(select(SieveScript.name).where(SieveScript.address == addr)))
        if name not in names and len(names) >= MAX_SCRIPTS:
            raise SieveStoreError(f"a user may keep at most {MAX_SCRIPTS} scripts",
                                  "QUOTA/MAXSCRIPTS")

    def put(self, address: str, name: str, text: str, activate: bool = False) -> str:
        """Store (or replace) a script already checked by the caller, in one transaction;
        the user's address."""
        check_name(name)
        with self._tx() as s:
            addr = self._user(s, address)
            self._check_space(s, addr, name, len(text.encode()))
            row = s.scalar(select(SieveScript).where(SieveScript.address == addr,
                                                     SieveScript.name == name))
            if row is None:
                s.add(SieveScript(address=addr, name=name, content=text, active=False))
            else:
                row.content = text
                row.updated = utcnow()
            if activate:
                s.flush()
                self._activate(s, addr, name)
        return addr

    def activate(self, address: str, name: str | None) -> None:
        """Make ``name`` the active script; None: no script active."""
        with self._tx() as s:
            addr = self._user(s, address)
            if name is not None:
                self._script(s, addr, name)  # NONEXISTENT if it is not there
            self._activate(s, addr, name)

    @staticmethod
    def _activate(s: Session, addr: str, name: str | None) -> None:
        s.execute(update(SieveScript).where(SieveScript.address == addr).values(active=False))
        if name is not None:
            s.execute(update(SieveScript).where(SieveScript.address == addr,
                                                SieveScript.name == name).values(active=True))

    @staticmethod
    def _script(s: Session, addr: str, name: str) -> SieveScript:
        row = s.scalar(select(SieveScript).where(SieveScript.address == addr,
                                                 SieveScript.name == name))
        if row is None:
            raise SieveStoreError(f"{addr} has no script {name!r}", "NONEXISTENT")
        return row

    def delete(self, address: str, name: str) -> None:
        with self._tx() as s:
            addr = self._user(s, address)
            row = self._script(s, addr, name)
            if row.active:
                raise SieveStoreError(f"script {name!r} is active: deactivate it first",
                                      "ACTIVE")
            s.delete(row)

    def rename(self, address: str, old: str, new: str) -> None:
        check_name(new)
        with self._tx() as s:
            addr = self._user(s, address)
            row = self._script(s, addr, old)
            if s.scalar(select(SieveScript.id).where(SieveScript.address == addr,
                                                     SieveScript.name == new)) is not None:
                raise SieveStoreError(f"{addr} has a script {new!r} already", "ALREADYEXISTS")
            row.name = new

    # -- export and import ---------------------------------------------------------------

    def export(self) -> list[dict[str, object]]:
        with self._tx() as s:
            rows = s.execute(select(SieveScript.address, SieveScript.name, SieveScript.content,
                                    SieveScript.active)
                             .order_by(SieveScript.address, SieveScript.name)).all()
        return [{"user": a, "name": n, "script": c, "active": act} for a, n, c, act in rows]

    # -- vacation (RFC 5230 §4.2) ---------------------------------------------------------

    def vacation_due(self, address: str, sender: str, handle: str, period: float,
                     now: float) -> bool:
        """True (and remembered) if ``address`` has not answered ``sender`` for ``handle``
        within ``period`` seconds; False if it has. Of concurrent deliveries (a storm from
        one sender, on any host) exactly one gets True: the insert of a new key and the
        renewal of an old one each succeed for one transaction only."""
        key = hashlib.sha256(f"{address.lower()}\0{sender.lower()}\0{handle}".encode()
                             ).hexdigest()
        for _ in range(2):
            try:
                with self._tx() as s:
                    # A conditional update, not read-then-write: two transactions that both
                    # read an expired row would both answer.
                    renewed = cast("CursorResult[Any]", s.execute(update(VacationReply).where(
                        VacationReply.key == key, VacationReply.sent <= now - period,
                    ).values(sent=now)))
                    if renewed.rowcount:
                        return True
                    if s.get(VacationReply, key) is not None:
                        return False  # answered within the period
                    s.add(VacationReply(key=key, address=address.lower(), sent=now))
                return True
            except DirectoryError:  # a concurrent delivery inserted the key first
                continue
        return False

    def forget_vacations(self, older_than: float) -> int:
        with self._tx() as s:
            return cast("CursorResult[Any]", s.execute(delete(VacationReply).where(
                VacationReply.sent < older_than))).rowcount
