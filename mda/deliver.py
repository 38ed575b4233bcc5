"""One recipient's copy: from LMTP bytes to a durable file, and the LMTP reply that says so.

Errors map to per-recipient replies so the MTA retries exactly the recipients that need it:
over quota 452 4.2.2, disk full 452 4.3.1, any other I/O problem 451 4.3.0.
"""

from __future__ import annotations

import errno
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from mda import maildir
from mda.mbox import MboxWriter
from mda.message import stored_message
from mda.paths import UnsafeAddress, mailbox_path
from store.config import MDAConfig
from store.directory import UserInfo

log = logging.getLogger("pochta.mda")

STORAGE_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


@dataclass(frozen=True)
class Job:
    """One recipient's copy of one message."""

    mailbox: UserInfo
    rcpt: str
    mail_from: str
    data: bytes


class Deliverer:
    def __init__(self, cfg: MDAConfig, hostname: str) -> None:
        self.root = Path(cfg.mailbox_root)
        self.format = cfg.format
        self.names = maildir.UniqueNames(hostname)
        self.mbox = MboxWriter()
        self.known_maildirs: set[Path] = set()  # created already: skip three stat calls
        self.owner: tuple[int, int] | None = None
        if cfg.mail_owner and os.geteuid() == 0:
            import pwd

            pw = pwd.getpwnam(cfg.mail_owner)
            self.owner = (pw.pw_uid, pw.pw_gid)

    def deliver(self, job: Job) -> str:
        """Store one copy; return the LMTP reply line for its recipient."""
        return self.deliver_batch([job])[0]

    def deliver_batch(self, jobs: list[Job]) -> list[str]:
        """Store each copy; one LMTP reply line per job.

        maildir: every file is written, then all are made durable together (``maildir.commit``).
        mbox: one after the other, each under its mailbox's locks.
        """
        replies: list[str] = [""] * len(jobs)
        written: list[tuple[int, maildir.Unsynced, int]] = []  # (job index, file, size)
        for i, job in enumerate(jobs):
            try:
                path = mailbox_path(self.root, job.mailbox.address)
            except UnsafeAddress as e:
                replies[i] = f"550 5.1.3 {e}"
                continue
            message = stored_message(job.data, job.mail_from, job.rcpt)
            quota = job.mailbox.quota_bytes
            if quota is not None and self.usage(path) + len(message) > quota:
                log.info("to=<%s> status=deferred (over quota %d)", job.rcpt, quota)
                replies[i] = f"452 4.2.2 <{job.rcpt}> Mailbox full"
                continue
            try:
                if self.format == "mbox":
                    self.mbox.deliver(path, message, job.mail_from, self.owner)
                    replies[i] = self._delivered(job.rcpt, len(message), str(path))
                else:
                    written.append((i, self._write_maildir(path, message), len(message)))
            except OSError as e:
                replies[i] = self._failed(job.rcpt, path, e)
        errors = maildir.commit([item for _, item, _ in written])
        for (i, item, size), error in zip(written, errors, strict=True):
            rcpt = jobs[i].rcpt
            if error is None:
                self.known_maildirs.add(item.final.parent.parent)
                replies[i] = self._delivered(rcpt, size, item.final.name)
            else:
                replies[i] = self._failed(rcpt, item.final.parent.parent, error)
        return replies

    def _write_maildir(self, path: Path, message: bytes) -> maildir.Unsynced:
        known = path in self.known_maildirs
        if not known:
            maildir.ensure_maildir(path, self.owner)
        try:
            return maildir.write_unsynced(path, message, self.names, self.owner)
        except FileNotFoundError:
            if not known:
                raise
            # Removed since an earlier delivery (an admin deleted the mailbox): create it again.
            self.known_maildirs.discard(path)
            maildir.ensure_maildir(path, self.owner)
            return maildir.write_unsynced(path, message, self.names, self.owner)

    @staticmethod
    def _delivered(rcpt: str, size: int, where: str) -> str:
        log.info("to=<%s> size=%d status=sent (%s)", rcpt, size, where)
        return f"250 2.0.0 <{rcpt}> Delivered"

    @staticmethod
    def _failed(rcpt: str, path: Path, e: OSError) -> str:
        log.error("to=<%s> status=deferred (%s: %s)", rcpt, path, e.strerror or e)
        if e.errno in STORAGE_FULL:
            return f"452 4.3.1 <{rcpt}> Insufficient system storage"
        return f"451 4.3.0 <{rcpt}> Temporary local problem, try again later"

    def usage(self, path: Path) -> int:
        """Bytes stored in a mailbox (maildir: from the S= of file names, no stat per file)."""
        if self.format == "mbox":
            try:
                return path.stat().st_size
            except FileNotFoundError:
                return 0
        total = 0
        for sub in ("new", "cur"):
            try:
                names = os.listdir(path / sub)
            except FileNotFoundError:
                continue
            for name in names:
                size = name.partition(",S=")[2].split(",", 1)[0].split(":", 1)[0]
                if size.isdigit():
                    total += int(size)
                else:
                    try:
                        total += (path / sub / name).stat().st_size
                    except FileNotFoundError:
                        pass
        return total
