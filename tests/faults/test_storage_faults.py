"""Storage faults: disk full on the spool and on the mailbox root (small tmpfs mounts) is
452 4.3.1, never a 250 that is then lost, nothing half-written is left behind, and mail flows
again once space returns; an unreadable database is 451, never 5xx."""

from __future__ import annotations

import os
import shutil
import smtplib
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.pochta import POSTGRES_URL
from tests.support.smtp import wait_for
from tests.support.stack import Stack, mail_files

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounts a tmpfs: needs root")


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs."""
    mount = tmp_path / "small"
    mount.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs", str(mount)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def fill(disk: Path, leave: int) -> Path:
    """A ballast file that leaves about ``leave`` bytes free."""
    ballast = disk / "ballast"
    st = os.statvfs(disk)
    ballast.write_bytes(b"\0" * max(0, st.f_bavail * st.f_frsize - leave))
    return ballast


def message(tag: str, size: int) -> bytes:
    return (f"Message-ID: <{tag}@test>\r\nSubject: {tag}\r\n\r\n".encode()
            + (b"y" * 76 + b"\r\n") * (size // 78))


def test_a_full_spool_answers_452_and_keeps_nothing_partial(tmp_path, small_disk):
    # min_free_space = 0: the write itself must meet the full disk (the default's early 452
    # at MAIL would answer before it).
    s = Stack(tmp_path / "stack", top={"spool_dir": str(small_disk / "spool")},
              mta={"min_free_space": 0})
    try:
        s.setup_users("example.com", "bob@example.com")
        s.start("up", listen=[s.mda_listen, f"127.0.0.1:{s.mta_port}"])
        ballast = fill(small_disk, 200_000)
        with smtplib.SMTP("127.0.0.1", s.mta_port, timeout=30) as c:
            # Announced with SIZE: refused at MAIL, before any byte is sent.
            with pytest.raises(smtplib.SMTPSenderRefused) as refused:
                c.sendmail("a@remote.test", ["bob@example.com"], message("too-big", 600_000))
            assert (refused.value.smtp_code, refused.value.smtp_error[:5]) == (452, b"4.3.1")
            # Unannounced: the write meets the full disk; 452 after the data, never 250.
            c.ehlo("client.test")
            del c.esmtp_features["size"]
            with pytest.raises(smtplib.SMTPDataError) as e:
                c.sendmail("a@remote.test", ["bob@example.com"], message("too-big", 600_000))
            assert (e.value.smtp_code, e.value.smtp_error[:5]) == (452, b"4.3.1")
            assert c.noop()[0] == 250  # the session goes on
        spool = small_disk / "spool"
        assert [p.name for p in spool.iterdir() if p.is_file()] == []  # nothing half-written
        ballast.unlink()
        with smtplib.SMTP("127.0.0.1", s.mta_port, timeout=30) as c:
            c.sendmail("a@remote.test", ["bob@example.com"], message("after", 600_000))
        assert wait_for(lambda: any(b"Subject: after" in p.read_bytes()
                                    for p in mail_files(s.mailbox_root, "bob@example.com")), 20)
        assert not any(b"too-big" in p.read_bytes()
                       for p in mail_files(s.mailbox_root, "bob@example.com"))
    finally:
        s.stop_all()


def test_a_full_mailbox_disk_defers_and_delivers_once_space_returns(tmp_path, small_disk):
    s = Stack(tmp_path / "stack", mda={"mailbox_root": str(small_disk / "mail")},
              delivery={"retry_initial": 1, "retry_max": 1})
    try:
        s.setup_users("example.com", "bob@example.com")
        s.start("up", listen=[s.mda_listen, f"127.0.0.1:{s.mta_port}"])
        with smtplib.SMTP("127.0.0.1", s.mta_port, timeout=30) as c:  # the maildir exists
            c.sendmail("a@remote.test", ["bob@example.com"], message("first", 1000))
        assert wait_for(lambda: mail_files(s.mailbox_root, "bob@example.com"), 20)
        ballast = fill(small_disk, 100_000)
        with smtplib.SMTP("127.0.0.1", s.mta_port, timeout=30) as c:
            c.sendmail("a@remote.test", ["bob@example.com"], message("waits", 400_000))
        assert wait_for(lambda: "452 4.3.1" in s.pochta("queue", "list").stdout, 20), \
            s.log("up")
        box = small_disk / "mail" / "example.com" / "bob"
        assert list((box / "tmp").iterdir()) == []  # no partial copy left behind
        assert len(mail_files(s.mailbox_root, "bob@example.com")) == 1
        ballast.unlink()
        assert wait_for(lambda: len(mail_files(s.mailbox_root, "bob@example.com")) == 2, 20)
        assert any(b"Subject: waits" in p.read_bytes()
                   for p in mail_files(s.mailbox_root, "bob@example.com"))
    finally:
        s.stop_all()


def test_an_unreadable_database_defers_and_loses_nothing(tmp_path):
    """The SQLite file turns unreadable (here: its header overwritten) while mail flows: new
    recipients get 451 4.3.0 (never 5xx, never 250 for what cannot be routed), and mail is
    accepted and delivered again once the database is back."""
    s = Stack(tmp_path / "stack", top={"directory_cache_ttl": 0.0},
              delivery={"retry_initial": 1, "retry_max": 1})
    try:
        s.setup_users("example.com", "bob@example.com", "amy@example.com")
        s.start("up", listen=[s.mda_listen, f"127.0.0.1:{s.mta_port}"])
        db = tmp_path / "stack" / "pochta.db"
        good = db.read_bytes()
        with open(db, "r+b") as f:
            f.write(b"this is not a database file at all")
        with smtplib.SMTP("127.0.0.1", s.mta_port, timeout=30) as c:
            c.ehlo("client.test")
            c.mail("a@remote.test")
            code, text = c.rcpt("amy@example.com")
            assert (code, text[:5]) == (451, b"4.3.0"), text
        db.write_bytes(good)
        with smtplib.SMTP("127.0.0.1", s.mta_port, timeout=30) as c:
            c.sendmail("a@remote.test", ["amy@example.com"], message("back", 1000))
        assert wait_for(lambda: mail_files(s.mailbox_root, "amy@example.com"), 20), s.log("up")
    finally:
        s.stop_all()


def _cluster() -> list[str] | None:
    """pg_ctlcluster's version and name of the PostgreSQL the tests use, if we may stop it."""
    if os.geteuid() != 0 or not shutil.which("pg_ctlcluster") or not POSTGRES_URL:
        return None
    out = subprocess.run(["pg_lsclusters", "--no-header"], capture_output=True, text=True).stdout
    for line in out.splitlines():
        version, name, port, status, *_ = line.split()
        if port == "5432" and status == "online":
            return [version, name]
    return None


def test_postgresql_down_defers_and_loses_nothing(tmp_path, database_url):
    """The database server stops under a running stack (a deployment on several hosts): RCPT
    gets 451 4.3.0, never a 5xx nor a 250 it cannot route; once PostgreSQL is back the same
    processes accept and deliver again."""
    cluster = _cluster()
    if not database_url.startswith("postgresql") or cluster is None:
        pytest.skip("needs the test PostgreSQL (POCHTA_TEST_POSTGRES) and root to stop it")
    s = Stack(tmp_path / "stack", top={"database_url": database_url, "directory_cache_ttl": 0.0},
              delivery={"retry_initial": 1, "retry_max": 1})
    stopped = False
    try:
        s.setup_users("example.com", "bob@example.com", "amy@example.com")
        s.start("up", listen=[s.mda_listen, f"127.0.0.1:{s.mta_port}"])
        subprocess.run(["pg_ctlcluster", *cluster, "stop", "-m", "fast"], check=True)
        stopped = True
        with smtplib.SMTP("127.0.0.1", s.mta_port, timeout=30) as c:
            c.ehlo("client.test")
            c.mail("a@remote.test")
            code, text = c.rcpt("amy@example.com")
            assert (code, text[:5]) == (451, b"4.3.0"), text
        subprocess.run(["pg_ctlcluster", *cluster, "start"], check=True)
        stopped = False
        assert wait_for(lambda: _accepts(s.mta_port), 30)
        assert wait_for(lambda: mail_files(s.mailbox_root, "amy@example.com"), 30), s.log("up")
    finally:
        if stopped:
            subprocess.run(["pg_ctlcluster", *cluster, "start"], capture_output=True)
        s.stop_all()


def _accepts(port: int) -> bool:
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as c:
            c.sendmail("a@remote.test", ["amy@example.com"], message("pg-back", 1000))
        return True
    except smtplib.SMTPException:
        return False
