"""Where the processes log (``log_target``), reopening for logrotate, and `pochta log summary`.

One line per event everywhere: ``<time> <role>[<pid>]: <message>`` on stderr or in a file;
to syslog (facility mail) as ``pochta-<role>[<pid>]: <message>``, the daemon adding the time.
A file target is reopened on SIGHUP and SIGUSR1 (logrotate's ``postrotate pochta reload``).
"""

from __future__ import annotations

import datetime
import logging
import logging.handlers
import os
import re
import socket
import sys
import warnings
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import typer

from admin.context import UserError, context, table
from store.config import Config

SYSLOG_SOCKET = "/dev/log"
DATEFMT = "%Y-%m-%dT%H:%M:%S"


def syslog_address(target: str) -> str | None:
    """The socket of a "syslog" or "syslog:/path" target; None for stderr or a file."""
    if target == "syslog":
        return SYSLOG_SOCKET
    if target.startswith("syslog:"):
        return target[len("syslog:"):]
    return None


def log_file(cfg: Config) -> Path | None:
    if cfg.log_target == "stderr" or syslog_address(cfg.log_target) is not None:
        return None
    return Path(cfg.log_target)


def setup_logging(cfg: Config, role: str) -> None:
    handler: logging.Handler
    address = syslog_address(cfg.log_target)
    path = log_file(cfg)
    if address is not None:
        handler = logging.handlers.SysLogHandler(
            address=address, facility=logging.handlers.SysLogHandler.LOG_MAIL,
            socktype=socket.SOCK_DGRAM)
        handler.setFormatter(logging.Formatter(f"pochta-{role}[{os.getpid()}]: %(message)s"))
    else:
        if path is not None:
            handler = logging.FileHandler(path, encoding="utf-8")
        else:
            handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(
            f"%(asctime)s {role}[{os.getpid()}]: %(message)s", datefmt=DATEFMT))
    logging.basicConfig(level=cfg.log_level.upper(), handlers=[handler], force=True)
    # aiosmtpd's per-command chatter; we log sessions and messages ourselves.
    logging.getLogger("mail.log").setLevel(logging.ERROR)
    # aiosmtpd warns about AUTH without STARTTLS; our implicit-TLS listener is all TLS.
    warnings.filterwarnings("ignore", message="Requiring AUTH while not requiring TLS")


def reopen_logs() -> None:
    """After logrotate moved the file away: write to a new one at the configured path."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            with handler.lock:  # type: ignore[union-attr]
                try:
                    stream = handler._open()
                except OSError as e:  # keep writing where we did rather than lose lines
                    print(f"cannot reopen the log {handler.baseFilename}: {e}", file=sys.stderr)
                    continue
                if handler.stream is not None:
                    handler.stream.close()
                handler.stream = stream


# -- pochta log summary ---------------------------------------------------------------------

# "2026-12-05T14:22:30 mta[18584]: message" (our file or stderr), "2026-12-05T14:22:30.1+00:00
# host pochta-mta[1]: message" (rsyslog, RFC 3339) or "Dec  5 14:22:30 host pochta-mta[1]:
# message" (traditional syslog).
_ISO = re.compile(r"^(\d{4}-\d{2}-\d{2})[T ]\S*\s+(?:\S+\s+)??(?:pochta-)?(\w+)\[\d+\]: (.*)$")
_BSD = re.compile(r"^([A-Z][a-z]{2})\s+(\d{1,2}) [\d:]{8} \S+ pochta-(\w+)\[\d+\]: (.*)$")
_MONTHS = {m: i for i, m in enumerate(
    ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"), 1)}

_RECEIVED = re.compile(r"^\w+: from=<([^>]*)> size=(\d+) nrcpt=(\d+)")
_DELIVERY = re.compile(r"^\w+: to=<([^>]*)>.* relay=(\S+) .*status=(sent|deferred|bounced|"
                       r"expired|held) \((.*)\)$")
_ENHANCED = re.compile(r"\b([45]\.\d{1,3}\.\d{1,3})\b")
_REFUSED = re.compile(r"^(?:\S+: )?(unknown recipient|relay denied|relay attempt|greylisted|"
                      r"listed in|pregreet|"
                      r"connection rate limit|refused by authentication checks|"
                      r"refused connection|too many errors|DATA refused|auth failed|"
                      r"message rate limit)")


@dataclass
class Day:
    received: int = 0
    received_bytes: int = 0
    delivered: int = 0
    bounced: int = 0
    deferred: int = 0
    expired: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    senders: Counter[str] = field(default_factory=Counter)
    recipient_domains: Counter[str] = field(default_factory=Counter)


def parse_line(line: str, year: int) -> tuple[str, str, str] | None:
    """(day "YYYY-MM-DD", role, message) of one log line, None if it is not ours."""
    m = _ISO.match(line)
    if m:
        return m.group(1), m.group(2), m.group(3)
    m = _BSD.match(line)
    if m and m.group(1) in _MONTHS:
        return f"{year:04d}-{_MONTHS[m.group(1)]:02d}-{int(m.group(2)):02d}", m.group(3), m.group(4)
    return None


def summarize(lines: Iterable[str], year: int | None = None) -> dict[str, Day]:
    """Counts per day (pflogsumm's core): received, delivered, bounced, deferred, rejected by
    reason, top senders and recipient domains."""
    year = year or datetime.date.today().year
    days: defaultdict[str, Day] = defaultdict(Day)
    for raw in lines:
        parsed = parse_line(raw.rstrip("\n"), year)
        if parsed is None:
            continue
        day_name, _role, msg = parsed
        day = days[day_name]
        m = _RECEIVED.match(msg)
        if m:
            day.received += 1
            day.received_bytes += int(m.group(2))
            day.senders[m.group(1) or "<>"] += 1
            continue
        m = _DELIVERY.match(msg)
        if m:
            status = m.group(3)
            if status == "sent":
                day.delivered += 1
                day.recipient_domains[m.group(1).rpartition("@")[2].lower()] += 1
            elif status == "bounced":
                day.bounced += 1
            elif status == "deferred":
                day.deferred += 1
            elif status == "expired":
                day.expired += 1
            continue
        m = _REFUSED.match(msg)
        if m:
            reason = m.group(1)
            code = _ENHANCED.search(msg)
            day.rejected[f"{reason} ({code.group(1)})" if code else reason] += 1
    return dict(sorted(days.items()))


def summary(ctx: typer.Context,
            file: Path | None = typer.Argument(None, help="Log file (default: log_target's "
                                                           "file, or stdin)."),
            top: int = typer.Option(5, "--top", min=1, help="How many senders and domains.")
            ) -> None:
    """Counts per day from the log: received, delivered, bounced, deferred, rejected."""
    if file is None:
        configured = log_file(context(ctx).config)
        if configured is None and sys.stdin.isatty():
            raise UserError("no log file: give one, or pipe the log in "
                            "(journalctl -u 'pochta-*' -o cat is not enough: use -o short-iso)")
        file = configured
    try:
        if file is None:
            days = summarize(sys.stdin)
        else:
            with open(file, encoding="utf-8", errors="replace") as f:
                days = summarize(f)
    except OSError as e:
        raise UserError(f"{file}: {e.strerror}") from None
    if not days:
        typer.echo("no pochta log lines found")
        return
    table(["DAY", "RECEIVED", "BYTES", "DELIVERED", "BOUNCED", "DEFERRED", "EXPIRED", "REJECTED"],
          [[d, str(v.received), str(v.received_bytes), str(v.delivered), str(v.bounced),
            str(v.deferred), str(v.expired), str(sum(v.rejected.values()))]
           for d, v in days.items()])
    total = Day()
    for v in days.values():
        total.rejected.update(v.rejected)
        total.senders.update(v.senders)
        total.recipient_domains.update(v.recipient_domains)
    for title, counter in (("rejected by reason", total.rejected),
                           ("top senders", total.senders),
                           ("top recipient domains (delivered)", total.recipient_domains)):
        typer.echo(f"\n{title}:")
        for key, n in counter.most_common(top):
            typer.echo(f"  {n:>7}  {key}")
        if not counter:
            typer.echo("        -")
