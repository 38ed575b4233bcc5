"""Started as root, a pochta process binds its ports and then runs as an unprivileged user,
with no way back: nothing that parses the internet's bytes keeps root.

- ``user`` (default ``pochta``; ``scripts/install`` creates it) runs the MTA, the MSA and the
  queue runner, and owns the data folder, the spool, the database and the keys.
- The MDA runs as ``[mda] mail_owner`` when set (the owner of the mailboxes Dovecot reads),
  else as ``user``; as another user it keeps ``user``'s group to read the database.
- ``user = "root"`` keeps root (not recommended: say so explicitly). Started as anyone else,
  a process runs as that user and nothing here applies.

The order in a process: ``prepare`` (as root: give the state folders to their users), bind
the listeners, ``drop`` (setgroups, setresgid, setresuid, no_new_privs; checked).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import pwd
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.engine import make_url

from store.config import Config, ConfigError

log = logging.getLogger("pochta.privileges")

PR_SET_NO_NEW_PRIVS = 38


@dataclass(frozen=True)
class Account:
    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]


def _user(name: str, key: str) -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(name)
    except KeyError:
        raise ConfigError(f"config key {key!r}: no user {name!r} on this system (create it: "
                          f"useradd --system --no-create-home {name}; scripts/install does)"
                          ) from None


def service_account(cfg: Config) -> Account | None:
    """Who owns pochta's state when root starts it; None: no change of user."""
    if os.geteuid() != 0 or cfg.user == "root":
        return None
    pw = _user(cfg.user, "user")
    return Account(pw.pw_name, pw.pw_uid, pw.pw_gid, (pw.pw_gid,))


def account_for(cfg: Config, role: str) -> Account | None:
    """The account ``role`` runs as once its ports are bound; None: stay as started."""
    service = service_account(cfg)
    if service is None:
        return None
    if role != "mda" or not cfg.mda.mail_owner or cfg.mda.mail_owner == service.name:
        return service
    pw = _user(cfg.mda.mail_owner, "mda.mail_owner")
    return Account(pw.pw_name, pw.pw_uid, pw.pw_gid, (pw.pw_gid, service.gid))


def sqlite_files(database_url: str) -> list[Path]:
    url = make_url(database_url)
    if url.get_backend_name() != "sqlite" or not url.database or url.database == ":memory:":
        return []
    db = Path(url.database)
    return [db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")]


def give(paths: list[Path], account: Account, mode: int | None = None) -> None:
    """chown (and chmod) each existing path to ``account`` (as root)."""
    for p in paths:
        with contextlib.suppress(FileNotFoundError):
            os.chown(p, account.uid, account.gid)
            if mode is not None:
                os.chmod(p, mode)


def give_state(cfg: Config) -> None:
    """As root: the data folder, spool, keys and database to ``user`` (nothing if there is
    no change of user). Admin verbs run as root call it for what they create."""
    service = service_account(cfg)
    if service is None:
        return
    data = Path(cfg.data_dir)
    spool = Path(cfg.spool_dir)
    folders = [data, spool, spool / "damaged", data / "tls", data / "acme", Path(cfg.dkim.keys_dir)]
    give([p for p in folders if p.is_dir()], service)
    keys = [p for d in (data / "tls", data / "acme", Path(cfg.dkim.keys_dir)) if d.is_dir()
            for p in d.iterdir()]
    give(keys, service)
    db = sqlite_files(cfg.database_url)
    if db:
        give([db[0].parent], service)
        other_mda = cfg.mda.mail_owner and cfg.mda.mail_owner != service.name
        # An MDA running as another user reads (and, in WAL mode, writes -shm) as our group.
        give(db, service, 0o660 if other_mda else 0o600)


def reachable(path: Path, account: Account) -> Path | None:
    """The first folder above ``path`` that ``account`` may not enter, or None."""
    for folder in reversed(path.parents):
        try:
            st = os.stat(folder)
        except FileNotFoundError:
            return None  # made by us below, for the account
        if st.st_mode & 0o001 or (st.st_uid == account.uid and st.st_mode & 0o100) or (
                st.st_gid in account.groups and st.st_mode & 0o010):
            continue
        return folder
    return None


def prepare(cfg: Config, role: str) -> None:
    """As root, before anything else: the state folders made or given to their users, who
    must be able to reach them (one clear line at start, not a process that restarts in a
    loop on EACCES)."""
    service = service_account(cfg)
    account = account_for(cfg, role)
    if service is None or account is None:
        return
    from store.fsio import ensure_dir

    folders = [(Path(cfg.data_dir), service), (Path(cfg.spool_dir), service)]
    if role == "mda":
        folders.append((Path(cfg.mda.mailbox_root), account))
    for folder, owner in folders:
        blocked = reachable(folder, owner)
        if blocked is not None:
            raise ConfigError(f"user {owner.name!r} cannot enter {blocked}, above {folder}: "
                              "put data_dir (or that path) where it can")
        ensure_dir(folder, 0o700, (owner.uid, owner.gid))
    give_state(cfg)
    if cfg.log_target.startswith("/"):  # a log file: every process appends to it and reopens it
        give([Path(cfg.log_target)], service, 0o660)
    if role == "mda":
        give([Path(cfg.mda.mailbox_root)], account)


def shared_folder(cfg: Config, path: Path) -> Path:
    """A folder every process writes into (metrics, run files): the service user's,
    group-writable (an MDA running as mail_owner keeps that group)."""
    from store.fsio import ensure_dir

    service = service_account(cfg)
    ensure_dir(path, 0o770)
    if service is not None:
        os.chown(path, service.uid, service.gid)
    os.chmod(path, 0o770)
    return path


def drop(cfg: Config, role: str) -> None:
    """Become ``role``'s account for good (after binding); a no-op unless root started us."""
    account = account_for(cfg, role)
    if account is None:
        if os.geteuid() == 0:
            log.warning("%s runs as root (user = \"root\" in the config)", role)
        return
    os.setgroups(list(account.groups))
    os.setresgid(account.gid, account.gid, account.gid)
    os.setresuid(account.uid, account.uid, account.uid)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS) failed")
    try:
        os.setuid(0)
    except PermissionError:
        pass
    else:  # pragma: no cover - the kernel said no above; this is the proof
        raise RuntimeError("could regain root after dropping privileges")
    log.info("%s runs as %s (uid %d)", role, account.name, account.uid)
