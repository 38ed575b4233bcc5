"""REQUIRETLS (RFC 8689): offered on TLS sessions only; a message that requires TLS is
delivered locally, and bounced with 5.7.30 (headers only) rather than sent to an MX whose
identity nothing verifies (MTA-STS and DANE are not checked yet)."""

from __future__ import annotations

import smtplib

import pytest

from tests.support.fakes import FakeDNS, SinkMX
from tests.support.smtp import client_tls, mailbox, server_tls, wait_for, wait_mail
from tests.support.stack import Stack, free_port


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    dns = FakeDNS()
    port = free_port("127.0.0.2")
    mx = SinkMX("127.0.0.2", port, tls_context=server_tls("mx.remote.test"))
    dns.add("remote.test", "MX", "10 mx.remote.test.")
    dns.add("mx.remote.test", "A", "127.0.0.2")
    s = Stack(tmp_path_factory.mktemp("requiretls"),
              delivery={"resolver": dns.address, "smtp_port": port})
    s.setup_users("example.com", "alice@example.com", "bob@example.com")
    s.start("up")
    yield s, mx
    s.stop_all()
    mx.stop()
    dns.close()


def tls_session(s: Stack) -> smtplib.SMTP:
    """Alice on submission, which relays for her (REQUIRETLS is the same on port 25)."""
    c = smtplib.SMTP("127.0.0.1", s.msa_port, timeout=30)
    c.ehlo("client.test")
    assert not c.has_extn("requiretls")  # not before TLS
    c.starttls(context=client_tls())
    c.ehlo("client.test")
    assert c.has_extn("requiretls")
    c.login("alice@example.com", "pw")
    return c


def test_requiretls_needs_a_tls_session(world):
    s, _mx = world
    with smtplib.SMTP("127.0.0.1", s.mta_port, timeout=30) as c:
        c.starttls(context=client_tls())
        assert c.ehlo("client.test")[0] == 250 and c.has_extn("requiretls")  # port 25 too
    with smtplib.SMTP("127.0.0.1", s.mta_port, timeout=30) as c:
        c.ehlo("client.test")
        code, text = c.docmd("MAIL", "FROM:<alice@example.com> REQUIRETLS")
        assert (code, text[:6]) == (530, b"5.7.10")


def test_local_delivery_goes_and_an_unverified_mx_gets_nothing_but_a_bounce(world):
    s, mx = world
    with tls_session(s) as c:
        c.sendmail("alice@example.com", ["bob@example.com", "carol@remote.test"],
                   b"Subject: secret\r\n\r\nthe secret body\r\n", mail_options=["REQUIRETLS"])
    [got] = wait_mail(s, "bob@example.com", 1)
    assert b"the secret body" in got
    # The bounce comes back to alice, headers only: the secret stays out of it.
    [bounce] = wait_mail(s, "alice@example.com", 1)
    assert b"5.7.30" in bounce and b"carol@remote.test" in bounce
    assert b"Subject: secret" in bounce and b"the secret body" not in bounce
    # A message without REQUIRETLS to the same MX goes: the MX was reachable all along.
    with tls_session(s) as c:
        c.sendmail("alice@example.com", ["carol@remote.test"], b"Subject: sentinel\r\n\r\nx\r\n")
    assert wait_for(lambda: any(b"sentinel" in m.data for m in mx.messages))
    assert not any(b"secret" in m.data for m in mx.messages)
    assert len(mailbox(s, "alice@example.com")) == 1
