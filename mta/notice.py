"""The queue runner's one wake-up channel: datagrams on a unix socket.

Senders are the MTA and MSA (ids of messages they just committed, ``Notifier``) and the CLI
(``pochta queue flush``, ``send_command``). A datagram holds either queue ids separated by
spaces or one command starting with ``!``:

- ``!flush`` / ``!flush DOMAIN`` / ``!flush @DOMAIN``: make every deferred recipient (of
  DOMAIN, and of its subdomains) due now, releasing held relay domains' mail;
- ``!rescan``: list the spool and load what the runner does not know (a sender had to drop ids);
- ``!hold ID|*``, ``!release ID|*``, ``!bounce ID``: the admin's ``pochta queue`` verbs;
- ``!atrn LOGIN CLIENT-IP DOMAIN[,DOMAIN...]`` with one socket passed along (SCM_RIGHTS): an
  ODMR customer's ATRN (RFC 2645), from the MSA process, which holds the customer's TLS
  connection and passes its bytes through that socket (mta/odmr.py). The runner answers the
  ATRN on it, then delivers over it as the SMTP client.
- ``!outbox`` with one socket passed along: a message the MDA makes (a Sieve redirect, a
  vacation reply, mta/outbox.py) comes over that socket; the runner spools it and answers.

Nothing is lost when no runner listens: a message is committed before its notice is sent, and a
runner binds the socket before it scans the spool at start, so whatever was committed before it
listened is found by the scan and whatever after comes as a notice. The kernel tells the runner
each sender's uid (SO_PASSCRED); only root and the runner's own user are heard, since any local
user can reach an abstract socket.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import hashlib
import os
import re
import socket
import struct
from dataclasses import dataclass, field
from pathlib import Path

QUEUE_ID = re.compile(r"[0-9a-f]{20}")
DOMAIN = re.compile(r"[A-Za-z0-9.-]{1,253}")
_UCRED = struct.Struct("iII")  # struct ucred: pid, uid, gid


def notice_address(spool_dir: Path | str) -> str:
    """Linux's abstract namespace (no path length limit, no file to clean up), one name per
    spool directory."""
    digest = hashlib.sha256(os.fsencode(os.path.realpath(spool_dir))).hexdigest()[:24]
    return f"\0pochta-queue-{digest}"


@dataclass(frozen=True)
class AtrnRequest:
    login: str  # the authenticated customer
    client: str  # its IP address, for the log
    domains: tuple[str, ...]


@dataclass
class Notice:
    ids: list[str] = field(default_factory=list)
    flush: bool = False
    flush_domain: str | None = None  # with flush: only this domain's recipients
    subdomains: bool = False  # and those of its subdomains (ETRN "@domain")
    rescan: bool = False
    admin: tuple[str, str] | None = None  # ("hold"|"release"|"bounce", queue id or "*")
    atrn: AtrnRequest | None = None
    channel: socket.socket | None = None  # with atrn: the customer's connection, relayed;
    # with outbox: the MDA's end, a message to queue
    outbox: bool = False


def parse_notice(data: bytes) -> Notice:
    """One datagram; anything malformed is ignored word by word, never raised."""
    words = data.decode("utf-8", "replace").split()
    if words and words[0].startswith("!"):
        command, args = words[0], words[1:]
        if command == "!flush" and not args:
            return Notice(flush=True)
        if command == "!flush" and len(args) == 1:
            sub = args[0].startswith("@")
            name = args[0][1:] if sub else args[0]
            if DOMAIN.fullmatch(name):
                return Notice(flush=True, flush_domain=name.lower().rstrip("."), subdomains=sub)
        if command == "!outbox" and not args:
            return Notice(outbox=True)
        if command == "!rescan" and not args:
            return Notice(rescan=True)
        if command in ("!hold", "!release", "!bounce") and len(args) == 1 and (
                QUEUE_ID.fullmatch(args[0]) or (args[0] == "*" and command != "!bounce")):
            return Notice(admin=(command[1:], args[0]))
        if command == "!atrn" and len(args) == 3 and "@" in args[0]:
            domains = tuple(d.lower() for d in args[2].split(","))
            if all(DOMAIN.fullmatch(d) for d in domains) and len(domains) <= 100:
                return Notice(atrn=AtrnRequest(args[0], args[1], domains))
        return Notice()
    return Notice(ids=[w for w in words if QUEUE_ID.fullmatch(w)])


class NoRunner(Exception):
    """No queue runner listens for this spool."""


def send_command(spool_dir: Path | str, command: str) -> None:
    """One command datagram from the CLI; NoRunner when none listens."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.settimeout(5.0)  # a full queue makes send block: bounded
        try:
            sock.connect(notice_address(spool_dir))
            sock.send(command.encode("ascii"))
        except (ConnectionRefusedError, FileNotFoundError):
            raise NoRunner("the queue runner is not running") from None
        except TimeoutError:
            raise NoRunner("the queue runner does not read its notices") from None


def send_channel(spool_dir: Path | str, command: str, channel: socket.socket) -> None:
    """A command with a socket for the runner (``!atrn``, ``!outbox``); NoRunner when none
    listens."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.settimeout(5.0)
        try:
            sock.connect(notice_address(spool_dir))
            socket.send_fds(sock, [command.encode("utf-8")], [channel.fileno()])
        except (ConnectionRefusedError, FileNotFoundError):
            raise NoRunner("the queue runner is not running") from None
        except TimeoutError:
            raise NoRunner("the queue runner does not read its notices") from None


_FD = array.array("i").itemsize


class NoticeSocket:
    """The runner's end: bound before the start-up scan, read without blocking."""

    def __init__(self, spool_dir: Path | str, also_heard: set[int] | None = None) -> None:
        self.address = notice_address(spool_dir)
        self.sock: socket.socket | None = None
        self.heard = {0, os.geteuid(), *(also_heard or ())}  # the MDA may run as mail_owner

    def bind(self) -> bool:
        """False while another runner of this spool still holds the name."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.setblocking(False)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        try:
            sock.bind(self.address)
        except OSError:
            sock.close()
            return False
        self.sock = sock
        return True

    def fileno(self) -> int:
        assert self.sock is not None
        return self.sock.fileno()

    def receive(self, limit: int = 100) -> list[Notice]:
        """Up to ``limit`` datagrams waiting now (bounded: the loop breathes under a flood)."""
        assert self.sock is not None
        got = []
        for _ in range(limit):
            try:
                data, ancillary, _flags, _addr = self.sock.recvmsg(
                    1 << 16, socket.CMSG_SPACE(_UCRED.size) + socket.CMSG_SPACE(4 * _FD))
            except BlockingIOError:
                break
            fds = self._passed_fds(ancillary)
            notice = parse_notice(data) if self._sender_uid(ancillary) in self.heard else None
            wants_channel = notice is not None and (notice.atrn is not None or notice.outbox)
            if notice is not None and wants_channel and fds:
                notice.channel = socket.socket(fileno=fds.pop(0))
                notice.channel.setblocking(False)
            for fd in fds:  # sent with anything else, or by someone not heard
                os.close(fd)
            if notice is not None and (not wants_channel or notice.channel is not None):
                got.append(notice)
        return got

    @staticmethod
    def _passed_fds(ancillary: list[tuple[int, int, bytes]]) -> list[int]:
        fds: list[int] = []
        for level, kind, value in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                got = array.array("i")
                got.frombytes(value[: len(value) - len(value) % _FD])
                fds += got
        return fds

    @staticmethod
    def _sender_uid(ancillary: list[tuple[int, int, bytes]]) -> int | None:
        for level, kind, value in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS \
                    and len(value) >= _UCRED.size:
                return int(_UCRED.unpack_from(value)[1])
        return None

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


class Notifier:
    """Tells the queue runner about messages just committed to the spool (MTA and MSA).

    The ids committed in one loop iteration (a group commit) go in one datagram: Linux queues
    only ``net.unix.max_dgram_qlen`` datagrams per socket (10 by default). When that queue is
    full the ids wait here until the runner's socket is writable again. When there is no runner
    the ids are dropped: the next runner's start-up scan finds them. A runner that stops
    reading for MAX_PENDING ids gets one ``!rescan`` instead of them.
    """

    MAX_IDS = 150  # ids per datagram: 21 bytes each, some 3 KB
    MAX_PENDING = 100_000  # ids held for a runner that stopped reading: then a rescan

    def __init__(self, spool_dir: Path | str) -> None:
        self.address = notice_address(spool_dir)
        self.sock: socket.socket | None = None
        self.pending: list[str] = []
        self.rescan = False  # ids were dropped while a runner was there
        self.scheduled = False  # a flush is due on the loop (call_soon or writer)

    def notify(self, qid: str) -> None:
        if len(self.pending) >= self.MAX_PENDING:
            self.pending.clear()
            self.rescan = True
        self.pending.append(qid)
        if not self.scheduled:
            self.scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self.scheduled = False
        if self.sock is not None:
            asyncio.get_running_loop().remove_writer(self.sock.fileno())
        for fresh in (False, True):
            try:
                self._send_pending()
                return
            except BlockingIOError:  # the runner's queue is full: resume once it has room
                assert self.sock is not None
                self.scheduled = True
                asyncio.get_running_loop().add_writer(self.sock.fileno(), self._flush)
                return
            except OSError:
                if self.sock is not None:
                    self.sock.close()
                    self.sock = None
                if fresh:
                    # No runner (not started yet, restarting): it binds before its start-up
                    # scan, and these were committed before now, so the scan finds them.
                    self.pending.clear()
                    self.rescan = False
                # else: connected to a runner that has exited; a new one may listen already

    def _send_pending(self) -> None:
        if self.sock is None:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self.sock.setblocking(False)
            self.sock.connect(self.address)
        if self.rescan:
            self.sock.send(b"!rescan")
            self.rescan = False
        while self.pending:
            batch = self.pending[: self.MAX_IDS]
            self.sock.send(" ".join(batch).encode("ascii"))
            del self.pending[: len(batch)]

    def close(self) -> None:
        if self.sock is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_writer(self.sock.fileno())
            self.sock.close()
            self.sock = None
