"""`pochta status [--json]`: is the stack up and serving, and what needs the admin's eye.

Each listener gets a real protocol probe (its greeting read, then QUIT), not a pid file: a
process that hangs is down. The queue runner, which listens on nothing, is judged by its
heartbeat (mta/queue.py writes it every few seconds). Then the queue, disk space, the
database, the certificate and the DKIM keys.

Exit status: 0 healthy, 1 degraded (something needs attention, mail still flows in),
2 down (no mail can be accepted: no MTA listener answers, or the database is unreachable).
"""

from __future__ import annotations

import datetime
import json
import shutil
import socket
import ssl
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import typer

from admin.context import context
from store import telemetry
from store.config import Config, parse_address

OK, WARN, DOWN = "ok", "warn", "down"
PROBE_TIMEOUT = 5.0
HEARTBEAT_STALE = 30.0  # seconds without a beat (the runner beats every 5)
CERT_WARN_DAYS = 14


@dataclass
class Check:
    name: str
    state: str  # ok, warn, down
    detail: str
    critical: bool = False  # down here means the stack is down, not degraded


def overall(checks: list[Check]) -> tuple[str, int]:
    """("healthy", 0), ("degraded", 1) or ("down", 2)."""
    if any(c.state == DOWN and c.critical for c in checks):
        return "down", 2
    if any(c.state != OK for c in checks):
        return "degraded", 1
    return "healthy", 0


def read_reply(sock: socket.socket) -> str:
    """One SMTP/LMTP reply (its last line), multi-line replies followed to their end."""
    buf = b""
    while True:
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError("closed without a reply")
        buf += chunk
        lines = buf.split(b"\r\n")
        for line in lines[:-1]:
            if len(line) >= 4 and line[3:4] == b" ":
                return line.decode("utf-8", "replace")
            if len(line) < 4 or line[3:4] != b"-":
                raise ConnectionError(f"not an SMTP reply: {line[:60]!r}")
        if len(buf) > 65536:
            raise ConnectionError("reply too long")


def _connect(addr: str) -> socket.socket:
    host, port = parse_address(addr, "listen")
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    return socket.create_connection((host, port), timeout=PROBE_TIMEOUT)


def probe(addr: str, implicit_tls: bool = False) -> tuple[bool, str]:
    """Connect, read the greeting (220), say QUIT; (answered, what happened)."""
    start = time.monotonic()
    try:
        if addr.startswith("unix:"):
            sock = socket.socket(socket.AF_UNIX)
            sock.settimeout(PROBE_TIMEOUT)
            sock.connect(addr[5:])
        else:
            sock = _connect(addr)
        with sock:
            if implicit_tls:
                ctx = ssl.create_default_context()
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE  # probing liveness, not identity
                sock = ctx.wrap_socket(sock)
            greeting = read_reply(sock)
            if not greeting.startswith("220"):
                return False, f"{addr}: greeting {greeting[:80]!r}"
            sock.sendall(b"QUIT\r\n")
            try:
                read_reply(sock)
            except (OSError, ConnectionError):
                pass
    except (OSError, ConnectionError, ValueError) as e:
        return False, f"{addr}: {e or 'timed out'}"
    return True, f"{addr} answered in {1000 * (time.monotonic() - start):.0f} ms"


def probe_managesieve(addr: str) -> tuple[bool, str]:
    """ManageSieve's greeting: capability lines, then ``OK``; then LOGOUT."""
    start = time.monotonic()
    try:
        with _connect(addr) as sock, sock.makefile("rb") as f:
            for _ in range(64):
                line = f.readline(4096)
                if not line:
                    return False, f"{addr}: closed without a greeting"
                if line.startswith((b"OK", b"NO", b"BYE")):
                    break
            else:
                return False, f"{addr}: greeting without end"
            if not line.startswith(b"OK"):
                return False, f"{addr}: greeting {line[:80].decode('utf-8', 'replace')!r}"
            sock.sendall(b"LOGOUT\r\n")
    except (OSError, ValueError) as e:
        return False, f"{addr}: {e or 'timed out'}"
    return True, f"{addr} answered in {1000 * (time.monotonic() - start):.0f} ms"


def rspamd_check(cfg: Config) -> Check | None:
    """rspamd's ``/ping`` when ``[spam] rspamd`` is set: while it does not answer, port-25
    mail is accepted unscanned (fail_open) or deferred."""
    if not cfg.spam.rspamd:
        return None
    import urllib.error
    import urllib.request

    url = cfg.spam.rspamd.rstrip("/") + "/ping"
    effect = ("mail is accepted unscanned (fail_open)" if cfg.spam.fail_open
              else "port-25 mail is deferred (451)")
    try:
        with urllib.request.urlopen(url, timeout=PROBE_TIMEOUT) as r:  # noqa: S310 (admin's URL)
            answer = r.read(64).strip()
    except (OSError, ValueError, urllib.error.URLError) as e:
        return Check("rspamd", WARN, f"{url}: {getattr(e, 'reason', e)}; {effect}")
    if answer != b"pong":
        return Check("rspamd", WARN, f"{url} answered {answer[:40]!r}; {effect}")
    return Check("rspamd", OK, f"{url} answered pong")


def process_checks(cfg: Config) -> list[Check]:
    out = []
    listeners = [("mta", a, False) for a in cfg.mta.listen]
    listeners += [("msa", a, False) for a in cfg.msa.listen]
    listeners += [("msa", a, True) for a in cfg.msa.listen_tls]
    listeners += [("odmr", a, False) for a in cfg.odmr.listen]
    listeners += [("mda", cfg.mda.listen, False)] if cfg.mda.listen else []
    for role, addr, tls in listeners:
        up, detail = probe(addr, tls)
        out.append(Check(role, OK if up else DOWN, detail))
    for addr in cfg.managesieve.listen:
        up, detail = probe_managesieve(addr)
        out.append(Check("managesieve", OK if up else DOWN, detail))
    mta = [c for c in out if c.name == "mta"]
    if mta and all(c.state == DOWN for c in mta):
        for c in mta:
            c.critical = True  # nothing accepts mail from the internet
    return out


def runner_check(cfg: Config) -> Check:
    from mta.spool import Spool

    beat = Spool(cfg.spool_dir, False).heartbeat()
    if beat is None:
        return Check("queue runner", DOWN, "no heartbeat ever (is the MTA running?)")
    pid, age = beat
    alive = telemetry.alive(pid)
    if age > HEARTBEAT_STALE or not alive:
        return Check("queue runner", DOWN, f"last heartbeat {age:.0f} s ago (pid {pid}"
                     f"{'' if alive else ', gone'})")
    return Check("queue runner", OK, f"heartbeat {age:.0f} s ago (pid {pid})")


def queue_summary(cfg: Config) -> tuple[Check, dict[str, object]]:
    from mta.spool import Spool, SpoolError

    spool = Spool(cfg.spool_dir, False)
    now = time.time()
    states: Counter[str] = Counter()
    oldest = None
    for qid in spool.ids():
        try:
            env = spool.load(qid)
        except (OSError, SpoolError, ValueError):
            continue
        states[env.state] += 1
        oldest = env.created if oldest is None else min(oldest, env.created)
    damaged = len(spool.damaged())
    age = 0.0 if oldest is None else max(0.0, now - oldest)
    data: dict[str, object] = {"new": states["new"], "deferred": states["deferred"], "held": states["held"],
            "damaged": damaged, "oldest_age_seconds": round(age, 1)}
    total = sum(states.values())
    detail = (f"{total} message(s): new {states['new']}, deferred {states['deferred']}, "
              f"held {states['held']}, damaged {damaged}"
              + (f"; oldest {_duration(age)}" if total else ""))
    # Damaged items need the admin; an old message means something keeps failing.
    late = age > cfg.delivery.delay_warning if cfg.delivery.delay_warning else False
    return Check("queue", WARN if damaged or late else OK, detail), data


def disk_check(cfg: Config) -> Check:
    parts, low = [], False
    for label, path in (("spool", cfg.spool_dir), ("mailboxes", cfg.mda.mailbox_root)):
        p = Path(path)
        while not p.exists() and p != p.parent:
            p = p.parent
        try:
            free = shutil.disk_usage(p).free
        except OSError as e:
            parts.append(f"{label}: {e.strerror}")
            low = True
            continue
        parts.append(f"{label} {free / 1e9:.1f} GB free")
        low = low or free < cfg.mta.min_free_space
    return Check("disk", WARN if low else OK, "; ".join(parts))


def database_check(cfg: Config) -> Check:
    from sqlalchemy import text
    from sqlalchemy.exc import SQLAlchemyError

    from store.db import Database
    from store.privileges import sqlite_files

    files = sqlite_files(cfg.database_url)
    if files and not files[0].exists():
        return Check("database", DOWN, f"{files[0]}: no database (pochta db upgrade)",
                     critical=True)
    db = Database(cfg.database_url)
    try:
        with db.engine.connect() as conn:
            domains = conn.execute(text("SELECT count(*) FROM domains")).scalar_one()
        return Check("database", OK, f"{_safe_url(cfg.database_url)}: {domains} domain(s)",
                     critical=True)
    except SQLAlchemyError as e:
        reason = str(getattr(e, "orig", None) or e).splitlines()[0]
        return Check("database", DOWN, f"{_safe_url(cfg.database_url)}: {reason}",
                     critical=True)
    finally:
        db.dispose()


def _safe_url(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def certificate_check(cfg: Config, now: datetime.datetime | None = None) -> Check:
    from cryptography import x509

    now = now or datetime.datetime.now(datetime.UTC)
    path = Path(cfg.tls.cert)
    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except FileNotFoundError:
        return Check("certificate", WARN, f"{path}: missing (made self-signed at first start)")
    except (OSError, ValueError) as e:
        return Check("certificate", WARN, f"{path}: unreadable: {e}")
    expires = cert.not_valid_after_utc
    days = (expires - now).total_seconds() / 86400
    self_signed = cert.issuer == cert.subject
    detail = (f"{path}: expires {expires:%Y-%m-%d} ({days:.0f} days)"
              + (", self-signed" if self_signed else ""))
    state = OK
    if cfg.acme.enabled:
        from admin.acme import state_summary

        healthy, summary = state_summary(cfg)
        detail += f"; {summary}"
        if not healthy:
            state = WARN
    if days < 0:
        return Check("certificate", DOWN, detail.replace("expires", "EXPIRED"))
    return Check("certificate", WARN if days < CERT_WARN_DAYS else state, detail)


def dkim_check(cfg: Config) -> tuple[Check, dict[str, str | None]]:
    from mta.dkimsign import active
    from store.db import Database
    from store.directory import Directory
    from store.privileges import sqlite_files

    keys: dict[str, str | None] = {}
    domains: list[str] = []
    files = sqlite_files(cfg.database_url)
    if not files or files[0].exists():
        db = Database(cfg.database_url)
        try:
            domains = [name for name, _users, _aliases in Directory(db).list_domains()]
        except Exception:  # the database check says what is wrong
            pass
        finally:
            db.dispose()
    for d in domains:
        found = active(Path(cfg.dkim.keys_dir), d)
        keys[d] = found[0] if found else None
    if not cfg.dkim.sign:
        return Check("dkim", OK, "signing off (dkim.sign = false)"), keys
    detail = "; ".join(f"{d}: {s or 'no key (pochta dkim keygen)'}" for d, s in keys.items())
    return Check("dkim", OK, detail or "no domains"), keys


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    if seconds < 172800:
        return f"{seconds // 3600} h {seconds % 3600 // 60} min"
    return f"{seconds // 86400} days"


def status(ctx: typer.Context,
           as_json: bool = typer.Option(False, "--json", help="One JSON document on stdout.")
           ) -> None:
    """Health of every process (a real protocol probe), queue, disk, database, certificate."""
    cfg = context(ctx).config
    checks = process_checks(cfg)
    checks.append(runner_check(cfg))
    queue, queue_data = queue_summary(cfg)
    checks += [queue, disk_check(cfg), database_check(cfg), certificate_check(cfg)]
    spam = rspamd_check(cfg)
    if spam is not None:
        checks.append(spam)
    dkim, keys = dkim_check(cfg)
    checks.append(dkim)
    word, code = overall(checks)
    if as_json:
        typer.echo(json.dumps({"status": word, "exit": code,
                               "checks": [asdict(c) for c in checks],
                               "queue": queue_data, "dkim": keys}, indent=2))
    else:
        for c in checks:
            typer.echo(f"{c.name:<13} {c.state.upper():<5} {c.detail}")
        typer.echo(f"pochta is {word}")
    raise typer.Exit(code)
