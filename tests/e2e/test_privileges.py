"""Started as root on ports below 1024, every mail process runs as the unprivileged user, for
good; what root's admin verbs create belongs to that user (issue 16 item 12)."""

from __future__ import annotations

import os
import pwd
import shutil
import smtplib
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.support.smtp import wait_for
from tests.support.stack import Stack, mail_files, wait_listening

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (CI runs as root)")


_given: set[int] = set()


def low_port(host: str = "127.0.0.1") -> int:
    """A free port below 1024 (only root may bind it), never the same one twice."""
    for port in range(700, 1000):
        if port in _given:
            continue
        with socket.socket() as s:
            try:
                s.bind((host, port))
                _given.add(port)
                return port
            except OSError:
                continue
    pytest.skip("no free port below 1024")


def status(pid: int) -> dict[str, str]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


def children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += [int(c) for c in (task / "children").read_text().split()]
    return out


def test_root_binds_low_ports_then_every_process_runs_as_pochta_for_good():
    try:
        pw = pwd.getpwnam("pochta")
    except KeyError:
        pytest.skip("no user pochta (scripts/install creates it)")
    # The processes re-execute this Python as pochta: it must be able to (a checkout or a
    # Python under a private home folder, e.g. /root, is not; scripts/install uses Debian's).
    probe = subprocess.run(["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}",
                            "--clear-groups", sys.executable, "-c", "import admin.cli"],
                           capture_output=True, timeout=30)
    if probe.returncode != 0:
        pytest.skip(f"user pochta cannot run {sys.executable} with this checkout")
    base = Path(tempfile.mkdtemp(dir="/var/tmp", prefix="pochta-priv-"))
    os.chmod(base, 0o755)  # the user must reach its data folder inside
    s = Stack(base / "data")
    del s.settings[""]["user"]  # the default: user = "pochta"
    mta, msa, mda = low_port(), low_port(), low_port()
    s.settings["mta"]["listen"] = [f"127.0.0.1:{mta}"]
    s.settings["msa"]["listen"] = [f"127.0.0.1:{msa}"]
    s.settings["msa"]["listen_tls"] = []
    s.settings["mda"]["listen"] = f"127.0.0.1:{mda}"
    s.write()
    try:
        s.setup_users("example.com", "bob@example.com")  # as root
        db = base / "data" / "pochta.db"
        assert db.stat().st_uid == pw.pw_uid and (db.stat().st_mode & 0o077) == 0
        up = s.start("up", listen=[f"127.0.0.1:{mda}", f"127.0.0.1:{msa}"])
        wait_listening(f"127.0.0.1:{mta}", up)

        def processes() -> list[int]:
            direct = children(up.pid)
            return direct + [c for p in direct for c in children(p)]  # + the queue runner

        assert wait_for(lambda: len(processes()) == 4, 10), (processes(), s.log("up"))
        serving = processes()
        # A process drops once it has bound (a just-started queue runner may still be
        # importing): wait for that, then check each for good.
        wait_for(lambda: all(status(p)["Uid"].split()[0] != "0" for p in serving), 20)
        assert status(up.pid)["Uid"].split() == ["0"] * 4  # the supervisor: restarts binders
        for pid in serving:
            st = status(pid)
            assert st["Uid"].split() == [str(pw.pw_uid)] * 4, (pid, st["Name"], st["Uid"])
            assert st["Gid"].split() == [str(pw.pw_gid)] * 4, (pid, st["Gid"])
            assert int(st["CapEff"], 16) == 0 and int(st["CapPrm"], 16) == 0, (pid, st)
            assert st["NoNewPrivs"] == "1"
        with smtplib.SMTP("127.0.0.1", mta, timeout=15) as c:
            c.sendmail("a@remote.test", ["bob@example.com"], b"Subject: low port\r\n\r\nx\r\n")
        assert wait_for(lambda: mail_files(s.mailbox_root, "bob@example.com"), 20), s.log("up")
        [copy] = mail_files(s.mailbox_root, "bob@example.com")
        assert copy.stat().st_uid == pw.pw_uid
        for p in (base / "data" / "spool", base / "data" / "tls" / "key.pem"):
            assert p.stat().st_uid == pw.pw_uid, p
    finally:
        s.stop_all()
        time.sleep(0.2)
        shutil.rmtree(base, ignore_errors=True)


def test_a_missing_user_is_one_clear_line(tmp_path):
    s = Stack(tmp_path)
    s.settings[""]["user"] = "no-such-pochta-user"
    s.write()
    r = s.pochta("serve", "mda", check=False)
    assert r.returncode != 0 and "no user 'no-such-pochta-user'" in r.stderr
    assert "Traceback" not in r.stderr and r.stderr.count("\n") == 1, r.stderr


def test_a_data_folder_the_user_cannot_reach_is_one_clear_line(tmp_path):
    """Started as root with its data inside a root-only folder (pytest's, like /root), a
    process says so and exits, instead of restarting forever on 'Permission denied'."""
    try:
        pwd.getpwnam("pochta")
    except KeyError:
        pytest.skip("no user pochta (scripts/install creates it)")
    s = Stack(tmp_path)
    del s.settings[""]["user"]  # the default: user = "pochta"
    s.write()
    r = s.pochta("serve", "mta", check=False)
    assert r.returncode != 0 and "user 'pochta' cannot enter" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and r.stderr.count("\n") == 1, r.stderr
