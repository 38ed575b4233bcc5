"""Outbound command pipelining (RFC 2920) against a raw peer that advertises PIPELINING and
answers each command on its own (one send per reply, so replies arrive apart or together):
the envelope goes in one write, every reply is matched to its command, and a session whose
recipients were all refused stays in step."""

from __future__ import annotations

import smtplib

import pytest

from tests.e2e.test_hardening import reports, status_fields
from tests.support.fakes import FakeDNS, ScriptedMX
from tests.support.smtp import client_tls, wait_for
from tests.support.stack import Stack, free_port

PW = "correct horse"
MX_IP = "127.0.0.16"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    pytest.importorskip("trustme")
    dns_server = FakeDNS()
    port = free_port(MX_IP)
    peer = ScriptedMX(MX_IP, port, pipelining=True)
    dns_server.add("pipe.test", "MX", "10 mx.pipe.test.")
    dns_server.add("mx.pipe.test", "A", MX_IP)
    dns_server.add("idle.test", "MX", "10 mx.idle.test.")  # its own connections
    dns_server.add("mx.idle.test", "A", MX_IP)
    s = Stack(tmp_path_factory.mktemp("pipelining"),
              delivery={"resolver": dns_server.address, "smtp_port": port,
                        "retry_initial": 600, "retry_max": 600})
    s.setup_users("example.com", "alice@example.com", password=PW)
    s.start("up", listen=[s.mda_listen, f"127.0.0.1:{s.mta_port}", f"127.0.0.1:{s.msa_port}"])
    yield s, peer
    s.stop_all()
    peer.stop()
    dns_server.close()


def submit(s: Stack, rcpts: list[str], subject: str) -> None:
    with smtplib.SMTP("127.0.0.1", s.msa_port, timeout=20) as c:
        c.starttls(context=client_tls())
        c.login("alice@example.com", PW)
        c.sendmail("alice@example.com", rcpts,
                   f"From: alice@example.com\r\nSubject: {subject}\r\n\r\n.\r\nbody\r\n".encode())


def test_the_envelope_goes_in_one_write_and_each_reply_meets_its_command(world):
    s, peer = world
    rcpts = [f"r{i}@pipe.test" for i in range(30)]
    rcpts[7] = "gone@pipe.test"
    rcpts[19] = "later@pipe.test"
    peer.rcpt_replies[b"<gone@"] = (b"550-5.1.1 no such user\r\n550-\xff not UTF-8\r\n"
                                    b"550 5.1.1 gone for good\r\n")
    peer.rcpt_replies[b"<later@"] = b"452 4.2.2 mailbox full, try later\r\n"
    try:
        submit(s, rcpts, "pipelined thirty")
        assert wait_for(lambda: any(b"pipelined thirty" in m for m in peer.messages)), \
            s.log("up")
    finally:
        peer.rcpt_replies.clear()
    [message] = [m for m in peer.messages if b"pipelined thirty" in m]
    assert b"\r\n..\r\nbody" in message  # dot-stuffed as DATA requires
    envelope = next(c for c in peer.chunks if b"MAIL FROM:<alice@example.com>" in c)
    assert envelope.count(b"RCPT TO:") == 30 and envelope.endswith(b"DATA\r\n")
    # Each refusal went to its own recipient: replies were not shifted. (The bounce for
    # gone@ waits for later@, as every DSN waits for its message's last final recipient.)
    log = s.log("up")
    assert "to=<gone@pipe.test>" in log and "status=bounced (550 5.1.1 no such user" in log
    assert "to=<later@pipe.test>" in log and "status=deferred (452 4.2.2" in log
    assert log.count("status=sent (250") == 28
    listing = s.pochta("queue", "list").stdout
    assert "later@pipe.test" in listing and "gone@pipe.test" not in listing
    assert "r0@pipe.test" not in listing


def test_all_recipients_refused_then_the_next_message_still_goes(world):
    s, peer = world
    peer.rcpt_replies[b"<nobody"] = b"550 5.1.1 unknown\r\n"
    try:
        submit(s, ["nobody1@pipe.test", "nobody2@pipe.test"], "refused everywhere")
        assert wait_for(lambda: reports(s, "alice@example.com", "nobody2@pipe.test"))
    finally:
        peer.rcpt_replies.clear()
    [report] = reports(s, "alice@example.com", "nobody2@pipe.test")
    assert [f["final-recipient"].split(";")[-1].strip() for f in status_fields(report)] == [
        "nobody1@pipe.test", "nobody2@pipe.test"]
    assert not any(b"refused everywhere" in m for m in peer.messages)
    # The peer said 354 to DATA anyway; we ended it with an empty message and carried on.
    submit(s, ["next@pipe.test"], "after the refusals")
    assert wait_for(lambda: any(b"after the refusals" in m for m in peer.messages)), \
        s.log("up")
    assert "Traceback" not in s.log("up")


def test_a_reused_connection_the_host_closed_is_replaced_without_a_delay(world):
    """The RSET goes ahead of the envelope on a reused connection; a host that answers it 421
    (its idle timer) costs the message nothing: a fresh connection carries it."""
    s, peer = world
    peer.plan = ["421-after-message"]
    submit(s, ["one@idle.test"], "first on the connection")
    assert wait_for(lambda: any(b"first on the connection" in m for m in peer.messages))
    submit(s, ["two@idle.test"], "second after the 421")  # within the 2 s the connection idles
    assert wait_for(lambda: any(b"second after the 421" in m for m in peer.messages)), \
        s.log("up")
    log = s.log("up")
    assert "RSET answered 421" in log and "on a fresh connection" in log
    assert "to=<two@idle.test>" in log and "attempts=1 status=sent" in log.split(
        "to=<two@idle.test>")[1].splitlines()[0]
