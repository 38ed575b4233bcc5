"""`pochta export` and `pochta import FILE`: the directory and the DKIM keys as one JSON file,
for backups and for moving (SQLite to PostgreSQL is the move a growing installation makes).

The format, version 1 (docs/export-format.md)::

    {"format": "pochta-export", "version": 1, "exported": "<ISO 8601 UTC>",
     "domains": [{"name": "example.com", "created": "<ISO 8601>",
                  "dkim": {"active": "s1" | null,
                           "keys": [{"selector": "s1", "private_key": "<PEM>"}]}}],
     "users": [{"address": "a@example.com", "password_hash": "$argon2id$...",
                "scram_sha256": "<iterations>,<salt>,<StoredKey>,<ServerKey>" | null,
                "enabled": true, "quota_bytes": null | int, "created": "<ISO 8601>"}],
     "aliases": [{"source": "x@example.com" | "@example.com", "targets": ["a@..."]}],
     "relay_domains": [{"name": "example.net", "to": "", "hold": false, "odmr_user": "",
                        "recipients": ["b@example.net"]}],
     "tls_policies": [{"domain": "partner.example", "policy": "verify"}],
     "sieve_scripts": [{"user": "a@example.com", "name": "filters", "script": "<Sieve>",
                        "active": true}],
     "greylist": [{"key": "<sha256 hex>", "first_seen": float, "last_seen": float,
                   "passed": bool}]}     # only with `export --greylist`

The file holds password hashes and private keys: keep it as private as the database.
An import checks the whole file before it changes anything, writes the rows in one
transaction, and refuses rows that exist already unless told to ``--overwrite`` them.
"""

from __future__ import annotations

import datetime
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import typer
from sqlalchemy import delete, select, update

from admin.context import UserError, context
from sieve import check as check_script
from store import addresses, passwords
from store.db import Database
from store.fsio import atomic_write, ensure_dir
from store.models import (
    Alias,
    Domain,
    Greylist,
    RelayDomain,
    RelayRecipient,
    SieveScript,
    TLSPolicy,
    User,
)
from store.sieve import SieveStoreError, check_name
from store.tlspolicy import POLICIES

FORMAT = "pochta-export"
VERSION = 1
_SELECTOR = re.compile(r"[a-z0-9][a-z0-9-]{0,62}\Z")
_PEM = re.compile(r"-----BEGIN PRIVATE KEY-----\n[A-Za-z0-9+/=\n]+-----END PRIVATE KEY-----\n?\Z")
_HASH = re.compile(r"\$argon2(id|i|d)\$v=\d+\$m=\d+,t=\d+,p=\d+\$[A-Za-z0-9+/]+\$[A-Za-z0-9+/]+\Z")
_GREY_KEY = re.compile(r"[0-9a-f]{64}\Z")


class ImportError_(ValueError):
    """The file cannot be imported; nothing was changed."""


# -- export ---------------------------------------------------------------------------------


def dkim_keys(keys_root: Path, domain: str) -> dict[str, Any]:
    folder = keys_root / addresses.ascii_domain(domain)
    keys, active = [], None
    if folder.is_dir():
        for path in sorted(folder.glob("*.key")):
            keys.append({"selector": path.stem, "private_key": path.read_text()})
        try:
            active = (folder / "selector").read_text().strip() or None
        except FileNotFoundError:
            pass
    return {"active": active, "keys": keys}


def export_document(db: Database, keys_root: Path, greylist: bool = False) -> dict[str, Any]:
    with db.transaction() as s:
        domains = list(s.scalars(select(Domain).order_by(Domain.name)))
        users = list(s.scalars(select(User).order_by(User.address)))
        aliases: dict[str, list[str]] = {}
        for a in s.scalars(select(Alias).order_by(Alias.source, Alias.id)):
            aliases.setdefault(a.source, []).append(a.target)
        relays = list(s.scalars(select(RelayDomain).order_by(RelayDomain.name)))
        recipients: dict[int, list[str]] = {}
        for r in s.scalars(select(RelayRecipient).order_by(RelayRecipient.address)):
            recipients.setdefault(r.relay_domain_id, []).append(r.address)
        doc: dict[str, Any] = {
            "format": FORMAT, "version": VERSION,
            "exported": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "domains": [{"name": d.name, "created": _iso(d.created),
                         "dkim": dkim_keys(keys_root, d.name)} for d in domains],
            "users": [{"address": u.address, "password_hash": u.password_hash,
                       "scram_sha256": u.scram_sha256, "enabled": u.enabled,
                       "quota_bytes": u.quota_bytes, "created": _iso(u.created)}
                      for u in users],
            "aliases": [{"source": src, "targets": t} for src, t in aliases.items()],
            "relay_domains": [{"name": r.name, "to": r.to, "hold": r.hold,
                               "odmr_user": r.odmr_user, "recipients": recipients.get(r.id, [])}
                              for r in relays],
            "tls_policies": [{"domain": p.domain, "policy": p.policy}
                             for p in s.scalars(select(TLSPolicy).order_by(TLSPolicy.domain))],
            "sieve_scripts": [{"user": x.address, "name": x.name, "script": x.content,
                               "active": x.active}
                              for x in s.scalars(select(SieveScript).order_by(
                                  SieveScript.address, SieveScript.name))],
        }
        if greylist:
            doc["greylist"] = [{"key": g.key, "first_seen": g.first_seen,
                                "last_seen": g.last_seen, "passed": g.passed}
                               for g in s.scalars(select(Greylist).order_by(Greylist.key))]
    return doc


def _iso(when: datetime.datetime) -> str:
    if when.tzinfo is None:  # SQLite gives back naive datetimes (stored as UTC)
        when = when.replace(tzinfo=datetime.UTC)
    return when.astimezone(datetime.UTC).isoformat()


# -- checking a file ------------------------------------------------------------------------


def _created(value: Any, where: str) -> datetime.datetime | None:
    if value is None:
        return None
    try:
        when = datetime.datetime.fromisoformat(_typed(value, str, where))
    except ValueError:
        raise ImportError_(f"{where}: not an ISO 8601 time: {value!r}") from None
    return when if when.tzinfo else when.replace(tzinfo=datetime.UTC)


@dataclass
class Document:
    domains: list[dict[str, Any]] = field(default_factory=list)
    users: list[dict[str, Any]] = field(default_factory=list)
    aliases: list[dict[str, Any]] = field(default_factory=list)
    relay_domains: list[dict[str, Any]] = field(default_factory=list)
    tls_policies: list[dict[str, Any]] = field(default_factory=list)
    sieve_scripts: list[dict[str, Any]] = field(default_factory=list)
    greylist: list[dict[str, Any]] | None = None


def _typed(value: Any, kind: type | tuple[type, ...], where: str) -> Any:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        raise ImportError_(f"{where}: expected {getattr(kind, '__name__', kind)}, "
                           f"got {type(value).__name__}")
    return value


def _list(doc: dict[str, Any], key: str) -> list[Any]:
    value = doc.get(key, [])
    return list(_typed(value, list, key))


def _domain_name(value: Any, where: str) -> str:
    try:
        return addresses.normalize_domain(_typed(value, str, where))
    except addresses.AddressError as e:
        raise ImportError_(f"{where}: {e}") from None


def _address(value: Any, where: str) -> str:
    try:
        return addresses.normalize(_typed(value, str, where))
    except addresses.AddressError as e:
        raise ImportError_(f"{where}: {e}") from None


def check_document(raw: Any) -> Document:
    """The whole file checked before anything is written: a clear ImportError_ otherwise."""
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise ImportError_("not a pochta export (no \"format\": \"pochta-export\")")
    version = raw.get("version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise ImportError_("no format version")
    if version > VERSION:
        raise ImportError_(f"format version {version} is newer than this pochta reads "
                           f"({VERSION}): upgrade pochta first")
    known = {"format", "version", "exported", "domains", "users", "aliases", "relay_domains",
             "tls_policies", "sieve_scripts", "greylist"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ImportError_(f"unknown key {unknown[0]!r}")
    doc = Document()
    names: set[str] = set()
    for i, d in enumerate(_list(raw, "domains")):
        where = f"domains[{i}]"
        _typed(d, dict, where)
        name = _domain_name(d.get("name"), f"{where}.name")
        if name in names:
            raise ImportError_(f"{where}: domain {name} twice")
        names.add(name)
        dkim = _typed(d.get("dkim", {"active": None, "keys": []}), dict, f"{where}.dkim")
        keys = []
        for j, k in enumerate(_typed(dkim.get("keys", []), list, f"{where}.dkim.keys")):
            kw = f"{where}.dkim.keys[{j}]"
            _typed(k, dict, kw)
            selector = _typed(k.get("selector"), str, f"{kw}.selector")
            if not _SELECTOR.match(selector):
                raise ImportError_(f"{kw}.selector: not a selector: {selector!r}")
            pem = _typed(k.get("private_key"), str, f"{kw}.private_key")
            if not _PEM.match(pem):
                raise ImportError_(f"{kw}.private_key: not an unencrypted PKCS#8 PEM key")
            keys.append({"selector": selector, "private_key": pem})
        active = dkim.get("active")
        if active is not None and active not in {k["selector"] for k in keys}:
            raise ImportError_(f"{where}.dkim.active: no key for selector {active!r}")
        doc.domains.append({"name": name, "created": _created(d.get("created"), f"{where}.created"),
                            "dkim": {"active": active, "keys": keys}})
    relay_names: set[str] = set()
    for i, r in enumerate(_list(raw, "relay_domains")):
        where = f"relay_domains[{i}]"
        _typed(r, dict, where)
        name = _domain_name(r.get("name"), f"{where}.name")
        if name in names or name in relay_names:
            raise ImportError_(f"{where}: domain {name} twice")
        relay_names.add(name)
        recipients = [_address(a, f"{where}.recipients[{j}]")
                      for j, a in enumerate(_typed(r.get("recipients", []), list,
                                                   f"{where}.recipients"))]
        for a in recipients:
            if addresses.domain_of(a) != name:
                raise ImportError_(f"{where}.recipients: {a} is not at {name}")
        doc.relay_domains.append({
            "name": name, "to": _typed(r.get("to", ""), str, f"{where}.to"),
            "hold": _typed(r.get("hold", False), bool, f"{where}.hold"),
            "odmr_user": _typed(r.get("odmr_user", ""), str, f"{where}.odmr_user"),
            "recipients": recipients})
    policy_domains: set[str] = set()
    for i, p in enumerate(_list(raw, "tls_policies")):
        where = f"tls_policies[{i}]"
        _typed(p, dict, where)
        name = _domain_name(p.get("domain"), f"{where}.domain")
        level = _typed(p.get("policy"), str, f"{where}.policy")
        if level not in POLICIES:
            raise ImportError_(f"{where}.policy: {level!r} is none of {', '.join(POLICIES)}")
        if name in policy_domains:
            raise ImportError_(f"{where}: domain {name} twice")
        policy_domains.add(name)
        doc.tls_policies.append({"domain": name, "policy": level})
    seen: set[str] = set()
    for i, u in enumerate(_list(raw, "users")):
        where = f"users[{i}]"
        _typed(u, dict, where)
        address = _address(u.get("address"), f"{where}.address")
        if addresses.domain_of(address) not in names:
            raise ImportError_(f"{where}: {address}: its domain is not in the file's domains")
        if address in seen:
            raise ImportError_(f"{where}: user {address} twice")
        seen.add(address)
        pw = _typed(u.get("password_hash"), str, f"{where}.password_hash")
        if not _HASH.match(pw):
            raise ImportError_(f"{where}.password_hash: not an argon2 hash")
        scram = u.get("scram_sha256")
        if scram is not None:
            try:
                passwords.parse_scram_keys(_typed(scram, str, f"{where}.scram_sha256"))
            except ValueError:
                raise ImportError_(f"{where}.scram_sha256: not SCRAM-SHA-256 keys") from None
        quota = u.get("quota_bytes")
        if quota is not None and (not isinstance(quota, int) or isinstance(quota, bool)
                                  or quota < 0):
            raise ImportError_(f"{where}.quota_bytes: expected a non-negative integer or null")
        doc.users.append({"address": address, "password_hash": pw, "scram_sha256": scram,
                          "enabled": _typed(u.get("enabled", True), bool, f"{where}.enabled"),
                          "quota_bytes": quota,
                          "created": _created(u.get("created"), f"{where}.created")})
    sources: set[str] = set()
    for i, a in enumerate(_list(raw, "aliases")):
        where = f"aliases[{i}]"
        _typed(a, dict, where)
        src = _typed(a.get("source"), str, f"{where}.source")
        source = ("@" + _domain_name(src[1:], f"{where}.source") if src.startswith("@")
                  else _address(src, f"{where}.source"))
        if source.rpartition("@")[2] not in names:
            raise ImportError_(f"{where}: {source}: its domain is not in the file's domains")
        if source in sources:
            raise ImportError_(f"{where}: alias {source} twice")
        sources.add(source)
        targets = [_address(t, f"{where}.targets[{j}]")
                   for j, t in enumerate(_typed(a.get("targets"), list, f"{where}.targets"))]
        if not targets:
            raise ImportError_(f"{where}.targets: empty")
        doc.aliases.append({"source": source, "targets": list(dict.fromkeys(targets))})
    scripts: set[tuple[str, str]] = set()
    active_of: set[str] = set()
    for i, x in enumerate(_list(raw, "sieve_scripts")):
        where = f"sieve_scripts[{i}]"
        _typed(x, dict, where)
        user = _address(x.get("user"), f"{where}.user")
        if user not in seen:
            raise ImportError_(f"{where}: {user} is not in the file's users")
        name = _typed(x.get("name"), str, f"{where}.name")
        try:
            check_name(name)
        except SieveStoreError as e:
            raise ImportError_(f"{where}.name: {e}") from None
        text = _typed(x.get("script"), str, f"{where}.script")
        error = check_script(text)
        if error:
            raise ImportError_(f"{where}.script: {error}")
        active = _typed(x.get("active", False), bool, f"{where}.active")
        if (user, name) in scripts or (active and user in active_of):
            raise ImportError_(f"{where}: script {name!r} of {user} twice, or two active")
        scripts.add((user, name))
        if active:
            active_of.add(user)
        doc.sieve_scripts.append({"user": user, "name": name, "script": text, "active": active})
    if "greylist" in raw:
        doc.greylist = []
        for i, g in enumerate(_list(raw, "greylist")):
            where = f"greylist[{i}]"
            _typed(g, dict, where)
            key = _typed(g.get("key"), str, f"{where}.key")
            if not _GREY_KEY.match(key):
                raise ImportError_(f"{where}.key: not a sha256 hex digest")
            doc.greylist.append({
                "key": key, "first_seen": float(_typed(g.get("first_seen"), (int, float),
                                                       f"{where}.first_seen")),
                "last_seen": float(_typed(g.get("last_seen"), (int, float),
                                          f"{where}.last_seen")),
                "passed": _typed(g.get("passed", False), bool, f"{where}.passed")})
    return doc


# -- import ---------------------------------------------------------------------------------


def conflicts(db: Database, keys_root: Path, doc: Document) -> list[str]:
    """What the file would overwrite: rows that exist, key files with other contents."""
    found: list[str] = []
    with db.transaction() as s:
        names = [d["name"] for d in doc.domains] + [r["name"] for r in doc.relay_domains]
        for n in names:
            if s.scalar(select(Domain.id).where(Domain.name == n)) is not None or \
                    s.scalar(select(RelayDomain.id).where(RelayDomain.name == n)) is not None:
                found.append(f"domain {n}")
        for u in doc.users:
            if s.scalar(select(User.id).where(User.address == u["address"])) is not None:
                found.append(f"user {u['address']}")
        for a in doc.aliases:
            if s.scalar(select(Alias.id).where(Alias.source == a["source"]).limit(1)) is not None:
                found.append(f"alias {a['source']}")
        for p in doc.tls_policies:
            existing = s.scalar(select(TLSPolicy.policy).where(TLSPolicy.domain == p["domain"]))
            if existing is not None and existing != p["policy"]:
                found.append(f"TLS policy of {p['domain']}")
        for x in doc.sieve_scripts:
            existing = s.scalar(select(SieveScript.content).where(
                SieveScript.address == x["user"], SieveScript.name == x["name"]))
            if existing is not None and existing != x["script"]:
                found.append(f"Sieve script {x['name']!r} of {x['user']}")
    for d in doc.domains:
        folder = keys_root / addresses.ascii_domain(d["name"])
        for k in d["dkim"]["keys"]:
            path = folder / f"{k['selector']}.key"
            if path.exists() and path.read_text() != k["private_key"]:
                found.append(f"DKIM key {path}")
    return found


def import_document(db: Database, keys_root: Path, doc: Document) -> dict[str, int]:
    """Write the file's rows in one transaction, then its keys; counts of what was written."""
    with db.transaction() as s:
        for d in doc.domains:
            domain = s.scalar(select(Domain).where(Domain.name == d["name"]))
            if domain is None:
                s.execute(delete(RelayDomain).where(RelayDomain.name == d["name"]))
                domain = Domain(name=d["name"])
                s.add(domain)
            if d["created"] is not None:
                domain.created = d["created"]
        s.flush()
        ids = {d.name: d.id for d in s.scalars(select(Domain))}
        for r in doc.relay_domains:
            if r["name"] in ids:  # a local domain becomes a relay domain (overwrite)
                s.execute(delete(Alias).where(Alias.domain_id == ids[r["name"]]))
                s.execute(delete(User).where(User.domain_id == ids[r["name"]]))
                s.execute(delete(Domain).where(Domain.id == ids[r["name"]]))
            relay = s.scalar(select(RelayDomain).where(RelayDomain.name == r["name"]))
            if relay is None:
                relay = RelayDomain(name=r["name"])
                s.add(relay)
            relay.to, relay.hold, relay.odmr_user = r["to"], r["hold"], r["odmr_user"]
            s.flush()
            s.execute(delete(RelayRecipient).where(RelayRecipient.relay_domain_id == relay.id))
            for a in r["recipients"]:
                s.add(RelayRecipient(address=a, relay_domain_id=relay.id))
        for u in doc.users:
            user = s.scalar(select(User).where(User.address == u["address"]))
            if user is None:
                user = User(address=u["address"],
                            domain_id=ids[addresses.domain_of(u["address"])])
                s.add(user)
            user.password_hash, user.enabled = u["password_hash"], u["enabled"]
            user.scram_sha256 = u["scram_sha256"]
            user.quota_bytes = u["quota_bytes"]
            if u["created"] is not None:
                user.created = u["created"]
        for a in doc.aliases:
            s.execute(delete(Alias).where(Alias.source == a["source"]))
            for t in a["targets"]:
                s.add(Alias(source=a["source"], target=t,
                            domain_id=ids[a["source"].rpartition("@")[2]]))
        for p in doc.tls_policies:
            row = s.scalar(select(TLSPolicy).where(TLSPolicy.domain == p["domain"]))
            if row is None:
                s.add(TLSPolicy(domain=p["domain"], policy=p["policy"]))
            else:
                row.policy = p["policy"]
        for x in doc.sieve_scripts:
            if x["active"]:
                s.execute(update(SieveScript).where(SieveScript.address == x["user"])
                          .values(active=False))
            stored = s.scalar(select(SieveScript).where(SieveScript.address == x["user"],
                                                        SieveScript.name == x["name"]))
            if stored is None:
                s.add(SieveScript(address=x["user"], name=x["name"], content=x["script"],
                                  active=x["active"]))
            else:
                stored.content, stored.active = x["script"], x["active"]
        if doc.greylist is not None:
            for g in doc.greylist:
                s.merge(Greylist(**g))
    for d in doc.domains:
        keys = d["dkim"]["keys"]
        if not keys:
            continue
        folder = ensure_dir(keys_root / addresses.ascii_domain(d["name"]), 0o700)
        for k in keys:
            atomic_write(folder / f"{k['selector']}.key", k["private_key"].encode(), mode=0o600)
        if d["dkim"]["active"]:
            atomic_write(folder / "selector", d["dkim"]["active"].encode() + b"\n", mode=0o600)
    return {"domains": len(doc.domains), "relay domains": len(doc.relay_domains),
            "TLS policies": len(doc.tls_policies),
            "Sieve scripts": len(doc.sieve_scripts),
            "users": len(doc.users), "aliases": len(doc.aliases),
            "DKIM keys": sum(len(d["dkim"]["keys"]) for d in doc.domains),
            **({"greylist entries": len(doc.greylist)} if doc.greylist is not None else {})}


# -- the verbs ------------------------------------------------------------------------------


def export(ctx: typer.Context,
           greylist: bool = typer.Option(False, "--greylist", help="Include the greylist.")
           ) -> None:
    """The directory and DKIM keys as JSON on stdout (it holds hashes and keys: keep it safe)."""
    c = context(ctx)
    doc = export_document(c.db, Path(c.config.dkim.keys_dir), greylist)
    sys.stdout.write(json.dumps(doc, ensure_ascii=False, indent=1) + "\n")


def import_(ctx: typer.Context,
            file: Path = typer.Argument(..., help="A file written by `pochta export`."),
            overwrite: bool = typer.Option(False, "--overwrite",
                                           help="Replace domains, users, aliases and keys "
                                                "that exist already.")) -> None:
    """Load a `pochta export` file: all of it, or nothing."""
    from store.migrate import upgrade_to_head

    c = context(ctx)
    try:
        raw = json.loads(file.read_bytes())
    except OSError as e:
        raise UserError(f"{file}: {e.strerror}") from None
    except ValueError as e:
        raise UserError(f"{file}: not JSON: {e}") from None
    try:
        doc = check_document(raw)
    except ImportError_ as e:
        raise UserError(f"{file}: {e}; nothing imported") from None
    upgrade_to_head(c.config.database_url)  # a new database is created, as by db upgrade
    keys_root = Path(c.config.dkim.keys_dir)
    if not overwrite:
        found = conflicts(c.db, keys_root, doc)
        if found:
            more = f" and {len(found) - 1} more" if len(found) > 1 else ""
            raise UserError(f"{file}: {found[0]} exists already{more}; nothing imported "
                            "(--overwrite replaces them)")
    counts = import_document(c.db, keys_root, doc)
    typer.echo("imported " + ", ".join(f"{n} {what}" for what, n in counts.items()))
