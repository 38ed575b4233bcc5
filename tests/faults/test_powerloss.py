"""The fault ring's power cut: every 250'd message delivered exactly once, whatever the cut.

The spool, the mailboxes and the SQLite database live on the power-cut file system of
``powerfs.py`` (FUSE: what was not fsynced is gone after a cut; syncfs flushes nothing there,
as on many real file systems). Clients send while the stack runs; at a cut point every pochta
process is frozen (SIGSTOP), the power is cut, the processes are killed, the file system is
mounted again and the stack restarted. Then the ledger: each message answered 250 is in the
mailbox exactly once; each refused one never; one whose answer was lost, at most once.
"""

from __future__ import annotations

import email
import os
import re
import signal
import smtplib
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.support.fakes import FakeDNS, SinkMX
from tests.support.smtp import wait_for
from tests.support.stack import Stack, free_port

POWERFS = Path(__file__).with_name("powerfs.py")


def fuse_usable() -> str:
    if not os.path.exists("/dev/fuse") or os.geteuid() != 0:
        return "needs /dev/fuse and root"
    try:
        import mfusepy  # noqa: F401
    except (ImportError, OSError) as e:
        return f"mfusepy/libfuse not usable: {e}"
    return ""


pytestmark = pytest.mark.skipif(bool(fuse_usable()), reason=fuse_usable() or "ok")


class PowerFS:
    """The file system of powerfs.py mounted at ``mount`` over ``backing``."""

    def __init__(self, backing: Path, mount: Path, log: Path) -> None:
        self.backing, self.mount = backing, mount
        with open(log, "ab") as out:
            self.proc = subprocess.Popen([sys.executable, str(POWERFS), str(backing), str(mount)],
                                         stdout=out, stderr=out, stdin=subprocess.DEVNULL)
        assert wait_for(lambda: self.mounted() or self.proc.poll() is not None, 10)
        assert self.mounted(), log.read_text()

    def cut(self) -> None:
        try:
            open(self.mount / ".powercut", "wb").close()
        except OSError:
            pass  # EIO: the power is off

    def mounted(self) -> bool:
        return f" {self.mount} " in Path("/proc/mounts").read_text()

    def unmount(self) -> None:
        """Unmount (lazily if something still holds it: the mount point is free at once) and
        wait for the daemon."""
        r = subprocess.run(["fusermount3", "-u", str(self.mount)], capture_output=True, text=True)
        if r.returncode != 0 and self.mounted():
            subprocess.run(["fusermount3", "-u", "-z", str(self.mount)], capture_output=True)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        assert not self.mounted(), r.stderr


def descendants(pid: int) -> list[int]:
    out = []
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except FileNotFoundError:
        return out
    for task in tasks:
        try:
            kids = [int(c) for c in (task / "children").read_text().split()]
        except FileNotFoundError:
            continue
        for kid in kids:
            out += [kid, *descendants(kid)]
    return out


def message_ids(maildir: Path) -> dict[str, int]:
    """How many copies of each of our messages the mailbox holds; a bounce counts for the
    message it returns (whose Message-ID it quotes)."""
    counts: dict[str, int] = {}
    for sub in ("new", "cur"):
        d = maildir / sub
        if not d.is_dir():
            continue
        for f in d.iterdir():
            raw = f.read_bytes()
            msg = email.message_from_bytes(raw)
            if msg.get_content_type() == "multipart/report":
                m = re.search(rb"Message-ID: <([^@>]+)@test>", raw)
                mid = m.group(1).decode() if m else "?"
            else:
                mid = (msg.get("Message-ID") or "").strip("<>").split("@")[0]
            counts[mid] = counts.get(mid, 0) + 1
    return counts


class Ledger:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.acked: set[str] = set()
        self.refused: set[str] = set()
        self.unknown: set[str] = set()  # no answer: the connection died (the cut)


def send_until(stop: threading.Event, port: int, ledger: Ledger, size: int, prefix: str,
               deadline: float, rcpt: str = "bob@example.com", sender: str = "s@remote.test"
               ) -> None:
    n = 0
    while not stop.is_set() and time.monotonic() < deadline:
        n += 1
        mid = f"{prefix}-{n}"
        body = (f"Message-ID: <{mid}@test>\r\nSubject: {mid}\r\n\r\n".encode()
                + (b"z" * 76 + b"\r\n") * max(1, size // 78))
        try:
            with smtplib.SMTP("127.0.0.1", port, timeout=5) as c:
                c.sendmail(sender, [rcpt], body)
            with ledger.lock:
                ledger.acked.add(mid)
        except smtplib.SMTPResponseException:
            with ledger.lock:
                ledger.refused.add(mid)
        except (OSError, smtplib.SMTPException):
            with ledger.lock:
                ledger.unknown.add(mid)
            return


def power_cut_run(tmp_path: Path, size: int, cut_after: int, clients: int = 4,
                  bounce: bool = False) -> None:
    """``bounce``: each message goes to an alias whose remote target refuses it, so what
    the cut catches in flight is a bounce to bob (his mailbox counts the bounces)."""
    backing, mount = tmp_path / "backing", tmp_path / "disk"
    backing.mkdir()
    mount.mkdir()
    fs = PowerFS(backing, mount, tmp_path / "powerfs.log")
    dns_server, sink, delivery = None, None, {}
    if bounce:
        dns_server = FakeDNS()
        port = free_port("127.0.0.15")
        sink = SinkMX("127.0.0.15", port)
        sink.handler.rcpt_replies["gone@remote.test"] = ["550 5.1.1 no such user"]
        dns_server.add("remote.test", "MX", "10 mx.remote.test.")
        dns_server.add("mx.remote.test", "A", "127.0.0.15")
        delivery = {"resolver": dns_server.address, "smtp_port": port}
    s = Stack(tmp_path / "stack", top={"data_dir": str(mount)},
              mda={"mailbox_root": str(mount / "mail")}, delivery=delivery)
    route = {"rcpt": "gone@example.com", "sender": "bob@example.com"} if bounce else {}
    try:
        s.setup_users("example.com", "bob@example.com")
        if bounce:
            s.pochta("alias", "add", "gone@example.com", "gone@remote.test")
        listen = [s.mda_listen, f"127.0.0.1:{s.mta_port}"]
        up = s.start("up", listen=listen)
        ledger, stop = Ledger(), threading.Event()
        threads = [threading.Thread(target=send_until, args=(
            stop, s.mta_port, ledger, size, f"c{i}", time.monotonic() + 60), kwargs=route)
            for i in range(clients)]
        for t in threads:
            t.start()
        assert wait_for(lambda: len(ledger.acked) >= cut_after, 60), s.log("up")
        pids = [up.pid, *descendants(up.pid)]
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        fs.cut()
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        stop.set()
        for t in threads:
            t.join(20)
        s.procs.pop("up").wait(10)
        fs.unmount()
        fs = PowerFS(backing, mount, tmp_path / "powerfs.log")
        s.start("up", listen=listen)
        with smtplib.SMTP("127.0.0.1", s.mta_port, timeout=15) as c:
            c.sendmail("s@remote.test", ["bob@example.com"],
                       b"Message-ID: <sentinel@test>\r\nSubject: sentinel\r\n\r\nx\r\n")
        maildir = mount / "mail" / "example.com" / "bob"
        assert wait_for(lambda: "sentinel" in message_ids(maildir)
                        and ledger.acked <= set(message_ids(maildir)), 60), (
            f"lost: {sorted(ledger.acked - set(message_ids(maildir)))[:10]}\n{s.log('up')}")
        got = message_ids(maildir)
        twice = {m: n for m, n in got.items() if n > 1}
        assert not twice, f"delivered more than once: {twice}"
        assert not (ledger.refused & set(got)), "a refused message was delivered"
        print(f"\npower cut ({size} bytes, after {cut_after} acks): {len(ledger.acked)} "
              f"acknowledged, {len(ledger.unknown)} unanswered "
              f"({len(ledger.unknown & set(got))} of them delivered), all delivered once")
    finally:
        s.stop_all()
        if sink is not None and dns_server is not None:
            sink.stop()
            dns_server.close()
        for pid in descendants(os.getpid()):
            if pid != fs.proc.pid:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        fs.unmount()


@pytest.mark.parametrize("size,cut_after", [(4096, 25), (200_000, 8)])
def test_a_power_cut_loses_and_repeats_nothing(tmp_path, size, cut_after):
    power_cut_run(tmp_path, size, cut_after)


def test_a_power_cut_with_bounces_in_flight_bounces_each_message_once(tmp_path):
    power_cut_run(tmp_path, 4096, 15, bounce=True)


@pytest.mark.slow
@pytest.mark.parametrize("size,cut_after", [
    (4096, 1), (4096, 5), (4096, 60), (4096, 150), (200_000, 1), (200_000, 20),
    (2_000_000, 2), (2_000_000, 5)])
def test_a_power_cut_sweep(tmp_path, size, cut_after):
    power_cut_run(tmp_path, size, cut_after)


@pytest.mark.slow
@pytest.mark.parametrize("cut_after", [1, 5, 30, 60])
def test_a_power_cut_sweep_with_bounces(tmp_path, cut_after):
    power_cut_run(tmp_path, 4096, cut_after, bounce=True)
