"""Relaying on port 25 without AUTH: for clients of `[mta] relay_networks`, and nobody else."""

from __future__ import annotations

import smtplib

import pytest

from tests.support.fakes import FakeDNS, SinkMX
from tests.support.smtp import wait_for
from tests.support.stack import Stack, free_port

RELAY_CLIENT = "127.0.0.5"
STRANGER = "127.0.0.6"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    dns_server = FakeDNS()
    port = free_port("127.0.0.2")
    mx = SinkMX("127.0.0.2", port)
    dns_server.add("remote.test", "MX", "10 mx.remote.test.")
    dns_server.add("mx.remote.test", "A", "127.0.0.2")
    s = Stack(tmp_path_factory.mktemp("relay"),
              mta={"relay_networks": [f"{RELAY_CLIENT}/32"]},
              delivery={"resolver": dns_server.address, "smtp_port": port})
    s.setup_users("example.com", "bob@example.com")
    s.start("up")
    yield s, mx
    s.stop_all()
    mx.stop()
    dns_server.close()


def send_from(s: Stack, source: str, rcpt: str, subject: str) -> None:
    with smtplib.SMTP("127.0.0.1", s.mta_port, timeout=15, source_address=(source, 0)) as c:
        c.sendmail("app@example.com", [rcpt], f"Subject: {subject}\r\n\r\nx\r\n".encode())


def test_a_client_of_relay_networks_relays_without_auth(world):
    s, mx = world
    send_from(s, RELAY_CLIENT, "someone@remote.test", "from-the-lan")
    got = wait_for(lambda: next((m for m in mx.messages if b"from-the-lan" in m.data), None))
    assert got is not None and got.rcpts == ["someone@remote.test"]
    accepted = [ln for ln in s.log("up").splitlines() if f"client={RELAY_CLIENT}" in ln]
    assert accepted and "relay=network" in accepted[-1]


def test_anyone_else_is_refused_and_nothing_leaves(world):
    s, mx = world
    with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
        send_from(s, STRANGER, "someone@remote.test", "from-a-stranger")
    [(code, text)] = refused.value.recipients.values()
    assert code == 554 and b"5.7.1" in text
    send_from(s, RELAY_CLIENT, "someone@remote.test", "sentinel")  # comes after: waits for it
    assert wait_for(lambda: any(b"sentinel" in m.data for m in mx.messages))
    assert not any(b"from-a-stranger" in m.data for m in mx.messages)


@pytest.mark.parametrize("network", ["0.0.0.0/0", "10.0.0.0/7", "::/0", "2001:db8::/31"])
def test_a_relay_network_that_makes_an_open_relay_is_refused_at_start(tmp_path, network):
    s = Stack(tmp_path, mta={"relay_networks": [network]})
    r = s.pochta("serve", "mta", check=False)
    assert r.returncode != 0 and "open relay" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
