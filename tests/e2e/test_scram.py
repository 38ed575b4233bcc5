"""SCRAM-SHA-256 and SCRAM-SHA-256-PLUS (RFC 5802, 7677) on the MSA, driven by scramp's
client: the server proves it knows the keys too, a wrong password or an unknown user fails
alike, and users from before the keys existed get them at their next PLAIN login."""

from __future__ import annotations

import base64
import hashlib
import smtplib
import sqlite3

import pytest
from scramp import ScramClient

from tests.support.smtp import client_tls
from tests.support.stack import Stack

PW = "scram pass wörd"


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = Stack(tmp_path_factory.mktemp("scram"))
    s.setup_users("example.com", "alice@example.com", "bob@example.com", password=PW)
    s.start("msa", listen=[f"127.0.0.1:{s.msa_port}"])
    yield s
    s.stop_all()


def session(s: Stack) -> smtplib.SMTP:
    c = smtplib.SMTP("127.0.0.1", s.msa_port, timeout=30)
    c.starttls(context=client_tls())
    c.ehlo("client.test")
    return c


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def scram_login(c: smtplib.SMTP, user: str, password: str, plus: bool = False
                ) -> tuple[int, bytes, ScramClient]:
    """The whole exchange; (final code, its text, the client that checked the server)."""
    mechanism = "SCRAM-SHA-256-PLUS" if plus else "SCRAM-SHA-256"
    binding = None
    if plus:
        der = c.sock.getpeercert(binary_form=True)
        binding = ("tls-server-end-point", hashlib.sha256(der).digest())  # RFC 5929 §4.1
    client = ScramClient([mechanism], user, password, channel_binding=binding)
    code, text = c.docmd("AUTH", f"{mechanism} {b64(client.get_client_first())}")
    assert code == 334, text
    client.set_server_first(base64.b64decode(text).decode())
    code, text = c.docmd(b64(client.get_client_final()))
    if code != 334:
        return code, text, client
    client.set_server_final(base64.b64decode(text).decode())  # raises if the server lied
    code, text = c.docmd("")
    return code, text, client


def test_scram_is_offered_under_tls_and_a_login_works_both_ways(stack):
    with session(stack) as c:
        mechanisms = c.esmtp_features["auth"].split()
        assert "SCRAM-SHA-256" in mechanisms and "SCRAM-SHA-256-PLUS" in mechanisms
        code, text, _ = scram_login(c, "alice@example.com", PW)
        assert code == 235, text
        assert c.docmd("MAIL", "FROM:<alice@example.com>")[0] == 250


def test_scram_plus_binds_to_the_certificate_the_client_saw(stack):
    with session(stack) as c:
        code, text, _ = scram_login(c, "alice@example.com", PW, plus=True)
        assert code == 235, text
    with session(stack) as c:  # a binding to another certificate (a man in the middle's)
        client = ScramClient(["SCRAM-SHA-256-PLUS"], "alice@example.com", PW,
                             channel_binding=("tls-server-end-point", b"\0" * 32))
        code, text = c.docmd("AUTH", f"SCRAM-SHA-256-PLUS {b64(client.get_client_first())}")
        client.set_server_first(base64.b64decode(text).decode())
        code, text = c.docmd(b64(client.get_client_final()))
        assert code == 535 and b"5.7.8" in text


def test_a_wrong_password_and_an_unknown_user_fail_alike(stack):
    with session(stack) as c:
        code, text, _ = scram_login(c, "alice@example.com", "wrong")
        assert (code, text[:5]) == (535, b"5.7.8")
    with session(stack) as c:
        code, text, _ = scram_login(c, "nobody@example.com", PW)
        assert (code, text[:5]) == (535, b"5.7.8")


def test_a_user_without_keys_gets_them_at_the_next_plain_login(stack):
    db = sqlite3.connect(stack.base / "pochta.db")
    with db:
        db.execute("UPDATE users SET scram_sha256 = NULL WHERE address = 'bob@example.com'")
    db.close()
    with session(stack) as c:
        code, _, _ = scram_login(c, "bob@example.com", PW)
        assert code == 535
    with session(stack) as c:
        plain = base64.b64encode(f"\0bob@example.com\0{PW}".encode()).decode()
        assert c.docmd("AUTH", f"PLAIN {plain}")[0] == 235
    with session(stack) as c:
        code, text, _ = scram_login(c, "bob@example.com", PW)
        assert code == 235, text
