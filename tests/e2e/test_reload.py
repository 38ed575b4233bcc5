"""`pochta reload`: live config changes, a refused broken config, certificates replaced on
disk, and log files reopened for logrotate; `log_target` to a file and to syslog."""

from __future__ import annotations

import json
import os
import signal
import smtplib
import socket

import pytest

from store.tlscert import make_self_signed
from tests.support.smtp import starttls_certificate, wait_for, wait_mail
from tests.support.stack import Stack, wait_listening


@pytest.fixture
def stack(tmp_path):
    s = Stack(tmp_path, top={"log_target": str(tmp_path / "pochta.log")})
    s.setup_users("example.com", "bob@example.com", "amy@example.com")
    s.start("up")
    wait_listening(f"127.0.0.1:{s.msa_port}")
    yield s
    s.stop_all()


def send(s: Stack, subject: str, rcpts=("bob@example.com",)) -> None:
    with smtplib.SMTP("127.0.0.1", s.mta_port, timeout=30) as c:
        c.sendmail("someone@elsewhere.test", list(rcpts),
                   f"Subject: {subject}\r\n\r\nx\r\n".encode())


def logged(s: Stack) -> str:
    return (s.base / "pochta.log").read_text()


def reload(s: Stack, check: bool = True):
    return s.pochta("reload", check=check)


def test_the_log_file_is_reopened_after_logrotate_moves_it(stack, tmp_path):
    s = stack
    log = tmp_path / "pochta.log"
    send(s, "before")
    wait_mail(s, "bob@example.com", 1)
    assert wait_for(lambda: "status=sent" in log.read_text())
    log.rename(tmp_path / "pochta.log.1")  # what logrotate does
    r = reload(s)
    for role in ("mta", "msa", "mda", "queue", "up"):
        assert f"{role} (pid" in r.stdout, r.stdout
    assert wait_for(lambda: log.exists())  # reopened (up's own reload line)
    send(s, "after")
    wait_mail(s, "bob@example.com", 2)
    def complete() -> str | None:
        t = log.read_text()
        return t if "status=sent" in t and " mda[" in t else None

    text = wait_for(complete)
    assert " mta[" in text and " queue[" in text and " mda[" in text
    assert "from=<someone@elsewhere.test>" in text
    old = (tmp_path / "pochta.log.1").read_text()
    assert old.count("from=<someone@elsewhere.test>") == 1  # the first message only

    # `pochta log summary` reads log_target's file by default, or the one it is given.
    for args in ((), (str(tmp_path / "pochta.log.1"),)):
        out = s.pochta("log", "summary", *args).stdout
        row = next(line.split() for line in out.splitlines() if line[:4].isdigit())
        assert row[1] == "1" and row[3] == "1", out  # received, delivered
        assert "someone@elsewhere.test" in out and "example.com" in out
    r = s.pochta("log", "summary", str(tmp_path / "missing.log"), check=False)
    assert r.returncode == 1 and "missing.log" in r.stderr and r.stderr.count("\n") == 1


def test_live_keys_apply_at_once_and_the_others_wait_for_a_restart(stack):
    s = stack
    s.settings["mta"]["max_recipients"] = 1
    old_port = s.mta_port
    s.settings["mta"]["listen"] = ["127.0.0.1:1"]  # needs a restart: not taken live
    s.write()
    r = reload(s)
    assert "changed keys that need a restart: mta.listen" in r.stdout
    assert "max_recipients" not in r.stdout
    assert wait_for(lambda: "config reloaded" in logged(s) and "mta.listen" in logged(s))
    with smtplib.SMTP("127.0.0.1", old_port, timeout=30) as c:  # still on the old port
        c.ehlo("client.test")
        c.mail("someone@elsewhere.test")
        assert c.rcpt("bob@example.com")[0] == 250
        code, text = c.rcpt("amy@example.com")
        assert code == 452 and b"4.5.3" in text


def test_a_broken_config_is_refused_and_the_running_one_stays(stack):
    s = stack
    s.config.write_text(s.config.read_text() + "\n[mta]\nmax_recipients = 'many'\n")
    r = reload(s, check=False)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "pochta:" in r.stderr
    # Sent straight to the process (as systemctl reload would), it is refused there too.
    pid = int(next(line for line in logged(s).splitlines() if "started mta" in line)
              .split("pid ")[1].rstrip(")"))
    os.kill(pid, signal.SIGHUP)
    assert wait_for(lambda: "reload refused, the running config stays" in logged(s))
    send(s, "still serving", rcpts=("bob@example.com", "amy@example.com"))
    wait_mail(s, "amy@example.com", 1)
    # A queue runner that dies now is restarted on the config its MTA runs, not the broken file.
    runner = json.loads((s.base / "run" / "queue.json").read_text())["pid"]
    os.kill(runner, signal.SIGKILL)
    assert wait_for(lambda: logged(s).count("queue ready") == 2, 30), logged(s)
    send(s, "after a restart")
    wait_mail(s, "bob@example.com", 2)


def peer_common_name(port: int) -> str:
    from cryptography.x509.oid import NameOID

    cert = starttls_certificate(port)
    return cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value


def test_a_certificate_replaced_on_disk_is_used_for_new_handshakes(stack, tmp_path):
    s = stack
    assert peer_common_name(s.mta_port) == "mx.pochta.test"
    tls = tmp_path / "tls"
    make_self_signed(tls / "cert.pem", tls / "key.pem", "renewed.pochta.test")
    reload(s)
    assert wait_for(lambda: peer_common_name(s.mta_port) == "renewed.pochta.test")
    assert peer_common_name(s.msa_port) == "renewed.pochta.test"


def test_log_target_syslog_sends_mail_facility_datagrams(tmp_path):
    path = tmp_path / "log.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(10)
    s = Stack(tmp_path, top={"log_target": f"syslog:{path}"})
    s.setup_users("example.com", "bob@example.com")
    try:
        s.start("mda")
        got = []
        while not any(b"mda ready" in g for g in got):
            got.append(sock.recv(65536))
        ready = next(g for g in got if b"mda ready" in g)
        assert ready.startswith(b"<22>pochta-mda[")  # facility mail (2), severity info (6)
        assert b"\n" not in ready.rstrip(b"\x00")
        assert s.log("mda") == ""  # nothing on stderr
    finally:
        s.stop_all()
        sock.close()
