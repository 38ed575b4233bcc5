"""Relaying on port 25 without AUTH: for clients of `[mta] relay_networks`, and nobody else;
and relay domains (we are their backup MX) with ETRN (RFC 1985)."""

from __future__ import annotations

import json
import smtplib

import pytest

from tests.support.fakes import FakeDNS, SinkMX
from tests.support.smtp import Raw, wait_for
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


def test_large_messages_to_a_remote_host_arrive_whole(world):
    """Over 1 MiB a message stays on disk until it leaves; the runner reads a few at a time
    for remote hosts (LARGE_AT_ONCE). More of them than that at once all arrive, byte for byte."""
    s, mx = world
    bodies = {}
    for i in range(10):
        line = f"large {i} ".encode() + b"y" * 70 + b"\r\n"
        bodies[i] = f"Subject: large-{i}\r\n\r\n".encode() + line * (1_200_000 // len(line))
    for i, body in bodies.items():
        with smtplib.SMTP("127.0.0.1", s.mta_port, timeout=30,
                          source_address=(RELAY_CLIENT, 0)) as c:
            c.sendmail("app@example.com", [f"big{i}@remote.test"], body)

    def arrived() -> dict[int, bytes] | None:
        got = {int(m.rcpts[0][3:].split("@")[0]): m.data for m in list(mx.messages)
               if m.rcpts[0].startswith("big")}
        return got if len(got) == len(bodies) else None

    got = wait_for(arrived, 60)
    assert got is not None
    for i, body in bodies.items():
        assert got[i].endswith(body), i  # after our Received header


def test_a_message_deferred_then_sent_leaves_nothing_in_the_spool(world):
    """Its .json (written at the deferral) and message file both go once it is sent."""
    s, mx = world
    mx.handler.rcpt_replies["later@remote.test"] = ["451 4.3.0 try later", "250 2.1.5 OK"]
    send_from(s, RELAY_CLIENT, "later@remote.test", "deferred-once")
    assert wait_for(lambda: any(b"deferred-once" in m.data for m in mx.messages), 30)
    spool = s.base / "spool"
    assert wait_for(lambda: not list(spool.glob("*.msg")) and not list(spool.glob("*.json")))


@pytest.mark.parametrize("network", ["0.0.0.0/0", "10.0.0.0/7", "::/0", "2001:db8::/31"])
def test_a_relay_network_that_makes_an_open_relay_is_refused_at_start(tmp_path, network):
    s = Stack(tmp_path, mta={"relay_networks": [network]})
    r = s.pochta("serve", "mta", check=False)
    assert r.returncode != 0 and "open relay" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


ETRN_CLIENT = "127.0.0.8"


@pytest.fixture(scope="module")
def backup(tmp_path_factory):
    """We are the backup MX (preference 20) of held.test, down.test and listed.test; their
    primaries are on 127.0.0.7 (up) and 127.0.0.10 (down until a test starts it)."""
    dns_server = FakeDNS()
    port = free_port("127.0.0.7")
    primary = SinkMX("127.0.0.7", port)
    z = dns_server.add
    for domain, ip in (("held.test", "127.0.0.7"), ("down.test", "127.0.0.10"),
                       ("listed.test", "127.0.0.7")):
        z(domain, "MX", f"10 primary.{domain}.", "20 mx.pochta.test.")
        z(f"primary.{domain}", "A", ip)
    z("loop.test", "MX", "10 mx.pochta.test.", "20 other.loop.test.")
    z("other.loop.test", "A", "127.0.0.7")
    s = Stack(tmp_path_factory.mktemp("backup"),
              mta={"etrn_networks": [f"{ETRN_CLIENT}/32"]},
              delivery={"resolver": dns_server.address, "smtp_port": port,
                        "retry_initial": 3600, "retry_max": 3600})  # only ETRN retries
    s.setup_users("example.com", "bob@example.com")
    s.pochta("domain", "add", "held.test", "--relay", "--hold")
    s.pochta("domain", "add", "down.test", "--relay")
    s.pochta("domain", "add", "listed.test", "--relay")
    s.pochta("relay-recipient", "add", "known@listed.test")
    s.pochta("domain", "add", "loop.test", "--relay")
    s.start("up")
    yield s, primary, port
    s.stop_all()
    primary.stop()
    dns_server.close()


def send25(s: Stack, rcpt: str, subject: str) -> None:
    with smtplib.SMTP("127.0.0.1", s.mta_port, timeout=15) as c:
        c.sendmail("someone@example.org", [rcpt], f"Subject: {subject}\r\n\r\nx\r\n".encode())


def etrn(node: str, s: Stack, source: str = ETRN_CLIENT) -> str:
    c = Raw(s.mta_port, source=source)
    try:
        assert "ETRN" in c.cmd("EHLO client.test")
        return c.cmd(f"ETRN {node}")
    finally:
        c.close()


def received(mx: SinkMX, subject: str) -> list:
    return [m for m in mx.messages if f"Subject: {subject}".encode() in m.data]


def log_lines(s: Stack, needle: str) -> list[str]:
    return [ln for ln in s.log("up").splitlines() if needle in ln]


def test_held_mail_waits_for_etrn_and_is_delivered_once(backup):
    s, primary, _ = backup
    send25(s, "user@held.test", "held-1")
    assert wait_for(lambda: any("status=held" in ln for ln in log_lines(s, "to=<user@held.test>")))
    assert "held" in s.pochta("queue", "list").stdout
    held = json.loads(s.pochta("queue", "list", "--json", "--state", "held").stdout)["messages"]
    assert [[r["address"] for r in m["recipients"]] for m in held] == [["user@held.test"]]
    assert held[0]["state"] == "held" and held[0]["recipients"][0]["attempts"] == 0
    for args in (("--domain", "other.test"), ("--older-than", "3600"), ("--state", "new")):
        found = json.loads(s.pochta("queue", "list", "--json", *args).stdout)["messages"]
        assert "user@held.test" not in str(found), args
    r = s.pochta("queue", "list", "--state", "stuck", check=False)
    assert r.returncode == 1 and "--state" in r.stderr and "Traceback" not in r.stderr
    # Nobody else may release it, and ETRN is only for relay domains.
    assert etrn("held.test", s, source="127.0.0.9").startswith("554 5.7.1")
    assert etrn("example.com", s).startswith("459")
    assert etrn("#queue", s).startswith("458")
    assert etrn("not a domain!", s).startswith("501")
    assert received(primary, "held-1") == []
    assert etrn("held.test", s).startswith("250")
    assert wait_for(lambda: received(primary, "held-1"))
    send25(s, "known@listed.test", "sentinel-after-etrn")  # not held: goes at once
    assert wait_for(lambda: received(primary, "sentinel-after-etrn"))
    assert len(received(primary, "held-1")) == 1
    assert [m.rcpts for m in received(primary, "held-1")] == [["user@held.test"]]


def test_mail_kept_while_the_primary_is_down_goes_on_etrn(backup):
    s, _, port = backup
    send25(s, "user@down.test", "while-down")
    assert wait_for(lambda: any("4.4.1" in ln for ln in log_lines(s, "to=<user@down.test>")))
    primary = SinkMX("127.0.0.10", port)
    try:
        assert etrn("@down.test", s).startswith("250")
        assert wait_for(lambda: received(primary, "while-down"))
        assert wait_for(lambda: "user@down.test" not in s.pochta("queue", "list").stdout)
    finally:
        primary.stop()


def test_a_relay_domain_with_listed_recipients_refuses_the_others(backup):
    s, primary, _ = backup
    with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
        send25(s, "unknown@listed.test", "backscatter")
    [(code, _)] = refused.value.recipients.values()
    assert code == 550
    send25(s, "known@listed.test", "listed-ok")
    assert wait_for(lambda: received(primary, "listed-ok"))


def test_mail_for_a_domain_whose_best_mx_is_us_is_never_sent_to_ourselves(backup):
    s, primary, _ = backup
    send25(s, "user@loop.test", "loop")
    assert wait_for(lambda: any("4.4.6" in ln for ln in log_lines(s, "to=<user@loop.test>")))
    assert received(primary, "loop") == []  # other.loop.test is worse than us: not used


def test_relay_domains_from_the_cli(tmp_path):
    s = Stack(tmp_path)
    s.pochta("db", "upgrade")
    s.pochta("domain", "add", "ours.test")
    s.pochta("domain", "add", "backup.test", "--relay", "--to", "[::1]:2525", "--hold")
    listing = s.pochta("domain", "list").stdout.splitlines()
    assert listing[0].split() == ["DOMAIN", "USERS", "ALIASES", "KIND", "ROUTE"]
    assert listing[1].split() == ["backup.test", "-", "-", "relay", "[::1]:2525", "hold"]
    assert listing[2].split() == ["ours.test", "0", "0", "local", "-"]
    for args, error in [
        (("domain", "add", "ours.test", "--relay"), "already exists"),
        (("domain", "add", "x.test", "--relay", "--to", "a:b"), "HOST[:PORT]"),
        (("domain", "add", "x.test", "--hold"), "--relay"),
        (("relay-recipient", "add", "a@ours.test"), "not a relay domain"),
    ]:
        r = s.pochta(*args, check=False)
        assert r.returncode == 1 and error in r.stderr and "Traceback" not in r.stderr, r.stderr
    s.pochta("relay-recipient", "add", "A@Backup.test")
    assert s.pochta("relay-recipient", "list").stdout.split() == ["a@backup.test"]
    r = s.pochta("domain", "remove", "backup.test", check=False)
    assert r.returncode == 1 and "--force" in r.stderr
    s.pochta("domain", "remove", "backup.test", "--force")
    assert "backup.test" not in s.pochta("domain", "list").stdout
