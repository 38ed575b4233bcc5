"""One recipient's copy: from LMTP bytes to a durable file, and the LMTP reply that says so.

Errors map to per-recipient replies so the MTA retries exactly the recipients that need it:
over quota 452 4.2.2, disk full 452 4.3.1, any other I/O problem 451 4.3.0.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from mda import maildir, subscriptions
from mda.mbox import MboxWriter
from mda.message import stored_message
from mda.paths import UnsafeAddress, mailbox_path
from mta.smtp import replies
from store import metrics
from store.batching import DiskSync
from store.config import MDAConfig
from store.directory import UserInfo
from store.fsio import Unpublished, abandon, commit_files

log = logging.getLogger("pochta.mda")

STORAGE_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


class FolderUnavailable(Exception):
    """A Sieve folder that cannot be created or written (a bad name, permissions)."""


def mbox_folder_path(inbox: Path, folder: str) -> Path:
    """An mbox folder ``A/B``: the file ``<domain>/.<local>/A/B`` beside the INBOX file
    (Dovecot: ``mbox:<root>/%d/.%n:INBOX=<root>/%d/%n``)."""
    parts = folder.split("/")
    if any(not p or p in (".", "..") or p.startswith(".") or "\0" in p for p in parts):
        raise FolderUnavailable(f"bad folder name {folder!r}")
    return inbox.parent.joinpath("." + inbox.name, *parts)


@dataclass(frozen=True)
class Job:
    """One recipient's copy of one message."""

    mailbox: UserInfo
    rcpt: str
    mail_from: str
    data: bytes  # the message with LF line endings (mda.message.to_lf)
    key: str = ""  # delivery_key: the same for every attempt of this copy ("": none given)
    retry: bool = False  # an earlier attempt may have stored this copy: look for it first


def delivery_key(queue_id: str, rcpt: str) -> str:
    """What names one (message, recipient) copy in a maildir file name, for every attempt:
    the MTA's queue id and a digest of the recipient (``bob+1`` and ``bob+2`` are two copies
    in one mailbox). Empty without a queue id."""
    if not queue_id:
        return ""
    return f"{queue_id}-{hashlib.blake2s(rcpt.encode(), digest_size=4).hexdigest()}"


class Deliverer:
    def __init__(self, cfg: MDAConfig, hostname: str, use_syncfs: bool = True) -> None:
        self.root = Path(cfg.mailbox_root)
        self.format = cfg.format
        self.names = maildir.UniqueNames(hostname)
        self.mbox = MboxWriter()
        self.known_maildirs: set[Path] = set()  # created already: skip three stat calls
        self.disk = DiskSync(os.fspath(self.root), use_syncfs)
        self.mailboxes: dict[str, Path] = {}  # address -> its mailbox path (pathlib is slow)
        self.owner: tuple[int, int] | None = None
        if cfg.mail_owner and os.geteuid() == 0:
            import pwd

            pw = pwd.getpwnam(cfg.mail_owner)
            self.owner = (pw.pw_uid, pw.pw_gid)

    def deliver(self, job: Job) -> str:
        """Store one copy (blocking: mbox, or a maildir outside a batch); its LMTP reply."""
        prepared = self._prepare(job)
        if isinstance(prepared, str):
            return prepared
        path, message = prepared
        # mbox copies carry no name: a retried one may be stored twice (at least once).
        if self.format == "maildir" and job.retry and job.key:
            found = maildir.find_copy(path, job.key)
            if found:
                return self._already(job.rcpt, found)
        if self.format == "mbox":
            try:
                self.mbox.deliver(path, message, job.mail_from, self.owner)
            except OSError as e:
                return self._failed(job.rcpt, path, e)
            return self._delivered(job.rcpt, len(message), str(path))
        try:
            item = self._write_maildir(path, message, job.key)
        except OSError as e:
            return self._failed(job.rcpt, path, e)
        [error] = commit_files([item])
        return self._outcome(job.rcpt, path, item, len(message), error)

    async def deliver_batch(self, jobs: list[Job]) -> list[str]:
        """Store each maildir copy; one LMTP reply line per job.

        Files are written from the loop, fsynced together, renamed into new/ from the loop, and
        each new/ is fsynced once: the fsyncs on the loop while the disk is fast, else in a
        worker thread that does nothing else (store/batching.py says why). Jobs that may be
        slow (a maildir to create, a quota to sum up) are done whole in the thread.
        """
        if len(jobs) == 1 and not self.disk.inline(1):  # one trip to the thread beats two
            return [await self.disk.run(1, 2, self.deliver, jobs[0])]
        replies: list[str] = [""] * len(jobs)
        written: list[tuple[int, Unpublished, int, Path]] = []  # (job index, file, size, maildir)
        slow: list[tuple[int, Path]] = []
        for i, job in enumerate(jobs):
            path = self._mailbox(job)
            if isinstance(path, str):
                replies[i] = path
                continue
            if (job.mailbox.quota_bytes is not None or path not in self.known_maildirs
                    or job.retry):
                slow.append((i, path))  # its copy is made in the thread, one at a time
                continue
            message = stored_message(job.data, job.mail_from, job.rcpt)
            try:
                item = maildir.write_unsynced(path, message, self.names, self.owner, job.key)
            except FileNotFoundError:  # removed since (an admin deleted it): create it again
                self.known_maildirs.discard(path)
                slow.append((i, path))
                continue
            except OSError as e:
                replies[i] = self._failed(job.rcpt, path, e)
                continue
            written.append((i, item, len(message), path))

        def write_slow_and_sync() -> list[OSError | None]:
            batch_bytes: dict[Path, int] = {}  # written to a mailbox by this batch so far
            for i, path in slow:
                job = jobs[i]
                if job.retry and job.key:
                    try:
                        found = maildir.find_copy(path, job.key)
                    except OSError as e:
                        replies[i] = self._failed(job.rcpt, path, e)
                        continue
                    if found:
                        replies[i] = self._already(job.rcpt, found)
                        continue
                # One copy in memory at a time: a 50 MB message to 100 recipients is not 5 GB.
                message = stored_message(job.data, job.mail_from, job.rcpt)
                over = self._over_quota(job, path, len(message) + batch_bytes.get(path, 0))
                if over:
                    replies[i] = over
                    continue
                try:
                    written.append((i, self._write_maildir(path, message, job.key),
                                    len(message), path))
                except OSError as e:
                    replies[i] = self._failed(job.rcpt, path, e)
                    continue
                batch_bytes[path] = batch_bytes.get(path, 0) + len(message)
            return self.disk.fsync_all([item.fd for _, item, _, _ in written])

        synced = None  # the files written here are synced by commit, with the group
        if slow:
            try:
                synced = await asyncio.to_thread(write_slow_and_sync)
            except BaseException:
                abandon([item for _, item, _, _ in written])
                raise
        errors = await self.disk.commit([item for _, item, _, _ in written], len(jobs), synced)
        for (i, item, size, path), error in zip(written, errors, strict=True):
            replies[i] = self._outcome(jobs[i].rcpt, path, item, size, error)
        return replies

    def deliver_to(self, job: Job, folder: str, flags: list[str]) -> str:
        """One copy into ``folder`` ("" the INBOX) with IMAP ``flags`` (a Sieve outcome);
        blocking. ``FolderUnavailable`` when the folder cannot be made (the caller keeps the
        message in the INBOX instead)."""
        prepared = self._prepare(job)
        if isinstance(prepared, str):
            return prepared
        path, message = prepared
        if self.format == "mbox":
            target = mbox_folder_path(path, folder) if folder else path
            new_folder = bool(folder) and not target.exists()
            try:
                self.mbox.deliver(target, message, job.mail_from, self.owner, flags)
            except OSError as e:
                if folder and e.errno not in STORAGE_FULL:
                    raise FolderUnavailable(f"{target}: {e.strerror or e}") from e
                return self._failed(job.rcpt, target, e)
            if new_folder:
                self._subscribe(subscriptions.mbox_file(path), folder)
            return self._delivered(job.rcpt, len(message), str(target))
        key = job.key
        new_folder = False
        if folder:
            try:
                target = maildir.folder_path(path, folder)
                new_folder = maildir.ensure_folder(target, self.owner)
            except (ValueError, OSError) as e:
                if isinstance(e, OSError) and e.errno in STORAGE_FULL:
                    return self._failed(job.rcpt, path, e)
                raise FolderUnavailable(f"{folder!r}: {e}") from e
            if key:
                key += "-" + hashlib.blake2s(folder.encode(), digest_size=4).hexdigest()
        else:
            target = path
            maildir.ensure_maildir(target, self.owner)
        if job.retry and key:
            found = maildir.find_copy(target, key)
            if found:
                return self._already(job.rcpt, found)
        try:
            item = maildir.write_unsynced(target, message, self.names, self.owner, key,
                                          maildir.info_letters(flags))
        except OSError as e:
            return self._failed(job.rcpt, target, e)
        [error] = commit_files([item])
        if new_folder and error is None:
            self._subscribe(subscriptions.maildir_file(path), folder)
        return self._outcome(job.rcpt, target, item, len(message), error)

    def _subscribe(self, path: Path, folder: str) -> None:
        """A folder made for a Sieve fileinto, subscribed so that mail clients show it."""
        try:
            subscriptions.subscribe(path, folder, self.owner)
        except OSError as e:
            log.warning("folder %r not subscribed in %s: %s", folder, path, e)

    def _mailbox(self, job: Job) -> Path | str:
        """The job's mailbox path, or the refusal reply."""
        try:
            path = self.mailboxes.get(job.mailbox.address)
            if path is None:
                if len(self.mailboxes) > 10_000:
                    self.mailboxes.clear()
                path = self.mailboxes[job.mailbox.address] = mailbox_path(
                    self.root, job.mailbox.address)
        except UnsafeAddress as e:
            return replies.UNSAFE_MAILBOX.format(why=e)
        return path

    def _prepare(self, job: Job) -> tuple[Path, bytes] | str:
        """The mailbox and the bytes to store, or the refusal reply."""
        path = self._mailbox(job)
        if isinstance(path, str):
            return path
        message = stored_message(job.data, job.mail_from, job.rcpt)
        over = self._over_quota(job, path, len(message))
        if over:
            return over
        return path, message

    def _over_quota(self, job: Job, path: Path, size: int) -> str:
        """A refusal if ``size`` more bytes would not fit (or the usage cannot be read)."""
        quota = job.mailbox.quota_bytes
        if quota is None:
            return ""
        try:
            used = self.usage(path)
        except OSError as e:  # e.g. permissions: a local problem, temporary
            return self._failed(job.rcpt, path, e)
        if used + size > quota:
            log.info("to=<%s> status=deferred (over quota %d)", job.rcpt, quota)
            metrics.MAILBOX_WRITES.labels("deferred").inc()
            return replies.MAILBOX_FULL.format(addr=job.rcpt)
        return ""

    def _outcome(self, rcpt: str, mailbox: Path, item: Unpublished, size: int,
                 error: OSError | None) -> str:
        if error is not None:
            return self._failed(rcpt, mailbox, error)
        self.known_maildirs.add(mailbox)
        return self._delivered(rcpt, size, os.path.basename(item.final))

    def _write_maildir(self, path: Path, message: bytes, key: str = "") -> Unpublished:
        known = path in self.known_maildirs
        if not known:
            maildir.ensure_maildir(path, self.owner)
        try:
            return maildir.write_unsynced(path, message, self.names, self.owner, key)
        except FileNotFoundError:
            if not known:
                raise
            # Removed since an earlier delivery (an admin deleted the mailbox): create it again.
            self.known_maildirs.discard(path)
            maildir.ensure_maildir(path, self.owner)
            return maildir.write_unsynced(path, message, self.names, self.owner, key)

    @staticmethod
    def _delivered(rcpt: str, size: int, where: str) -> str:
        log.info("to=<%s> size=%d status=sent (%s)", rcpt, size, where)
        metrics.MAILBOX_WRITES.labels("sent").inc()
        return replies.DELIVERED.format(addr=rcpt)

    @staticmethod
    def _already(rcpt: str, where: str) -> str:
        log.info("to=<%s> status=sent (already delivered by an earlier attempt: %s)", rcpt, where)
        return replies.DELIVERED_ALREADY.format(addr=rcpt)

    @staticmethod
    def _failed(rcpt: str, path: Path, e: OSError) -> str:
        log.error("to=<%s> status=deferred (%s: %s)", rcpt, path, e.strerror or e)
        metrics.MAILBOX_WRITES.labels("failed").inc()
        if e.errno in STORAGE_FULL:
            return replies.MAILBOX_STORAGE_FULL.format(addr=rcpt)
        return replies.MAILBOX_LOCAL_ERROR.format(addr=rcpt)

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
