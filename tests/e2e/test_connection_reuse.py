"""Outbound connections are reused for the next message to the same host (as Postfix's
scache), and a reused connection the peer has closed costs nothing but a fresh one."""

from __future__ import annotations

import smtplib

import pytest

from tests.support.fakes import FakeDNS, ScriptedMX
from tests.support.smtp import wait_for
from tests.support.stack import Stack, free_port

MX_IP = "127.0.0.2"


@pytest.fixture
def world(tmp_path):
    dns_server = FakeDNS()
    port = free_port(MX_IP)
    mx = ScriptedMX(MX_IP, port)
    dns_server.add("remote.test", "MX", "10 mx.remote.test.")
    dns_server.add("mx.remote.test", "A", MX_IP)
    s = Stack(tmp_path, delivery={"resolver": dns_server.address, "smtp_port": port})
    s.setup_users("example.com", "bob@example.com")
    s.pochta("alias", "add", "fwd@example.com", "x@remote.test")
    s.start("up")
    yield s, mx
    s.stop_all()
    mx.running = False
    dns_server.close()


def send_and_wait(s: Stack, mx: ScriptedMX, subject: str) -> None:
    with smtplib.SMTP("127.0.0.1", s.mta_port, timeout=15) as c:
        c.sendmail("a@example.com", ["fwd@example.com"],
                   f"Subject: {subject}\r\n\r\nbody\r\n".encode())
    assert wait_for(lambda: any(subject.encode() in m for m in mx.messages))


def test_messages_one_after_another_share_one_connection(world):
    s, mx = world
    for i in range(4):
        send_and_wait(s, mx, f"reuse {i}")
    assert len(mx.messages) == 4 and mx.connections == 1


def test_a_connection_the_peer_closed_is_replaced(world):
    s, mx = world
    mx.plan = ["close-after-message", "close-after-message", "ok"]
    for i in range(3):
        send_and_wait(s, mx, f"closed {i}")
    assert len(mx.messages) == 3 and mx.connections == 3
    assert "status=deferred" not in s.log("up")
