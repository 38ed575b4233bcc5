"""One recipient's copy: from LMTP bytes to a durable file, and the LMTP reply that says so.

Errors map to per-recipient replies so the MTA retries exactly the recipients that need it:
over quota 452 4.2.2, disk full 452 4.3.1, any other I/O problem 451 4.3.0.
"""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path

from mda import maildir
from mda.mbox import MboxWriter
from mda.message import stored_message
from mda.paths import UnsafeAddress, mailbox_path
from store.config import MDAConfig
from store.directory import UserInfo
from store.fsio import GroupDirSync

log = logging.getLogger("pochta.mda")

STORAGE_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


class Deliverer:
    def __init__(self, cfg: MDAConfig, hostname: str) -> None:
        self.root = Path(cfg.mailbox_root)
        self.format = cfg.format
        self.names = maildir.UniqueNames(hostname)
        self.mbox = MboxWriter()
        self.known_maildirs: set[Path] = set()  # created already: skip three stat calls
        self.dirsync = GroupDirSync()
        self.owner: tuple[int, int] | None = None
        if cfg.mail_owner and os.geteuid() == 0:
            import pwd

            pw = pwd.getpwnam(cfg.mail_owner)
            self.owner = (pw.pw_uid, pw.pw_gid)

    def deliver(self, mailbox: UserInfo, rcpt: str, mail_from: str, data: bytes) -> str:
        """Store one copy for ``mailbox``; return the LMTP reply line for this recipient."""
        try:
            path = mailbox_path(self.root, mailbox.address)
        except UnsafeAddress as e:
            return f"550 5.1.3 {e}"
        message = stored_message(data, mail_from, rcpt)
        if mailbox.quota_bytes is not None and \
                self.usage(path) + len(message) > mailbox.quota_bytes:
            log.info("to=<%s> status=deferred (over quota %d)", rcpt, mailbox.quota_bytes)
            return f"452 4.2.2 <{rcpt}> Mailbox full"
        try:
            if self.format == "maildir":
                where = str(maildir.deliver(path, message, self.names, self.owner,
                                            known=path in self.known_maildirs,
                                            dirsync=self.dirsync).name)
                self.known_maildirs.add(path)
            else:
                self.mbox.deliver(path, message, mail_from, self.owner)
                where = str(path)
        except OSError as e:
            log.error("to=<%s> status=deferred (%s: %s)", rcpt, path, e.strerror or e)
            if e.errno in STORAGE_FULL:
                return f"452 4.3.1 <{rcpt}> Insufficient system storage"
            return f"451 4.3.0 <{rcpt}> Temporary local problem, try again later"
        log.info("to=<%s> size=%d status=sent (%s)", rcpt, len(message), where)
        return f"250 2.0.0 <{rcpt}> Delivered"

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
