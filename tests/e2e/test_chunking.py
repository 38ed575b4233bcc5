"""CHUNKING and BINARYMIME (RFC 3030) on port 25 and submission: BDAT with DATA's checks,
limits and durability; an error ends the transaction and nothing partial is ever delivered;
a binary message keeps every octet, and goes on only to a host that takes it."""

from __future__ import annotations

import smtplib

import pytest

from tests.support.fakes import FakeDNS, SinkMX
from tests.support.smtp import Raw, client_tls, mailbox, wait_for, wait_mail
from tests.support.stack import Stack, free_port

LIMIT = 2_000_000


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    dns_server = FakeDNS()
    port = free_port("127.0.0.2")
    mx = SinkMX("127.0.0.2", port)  # aiosmtpd: no CHUNKING, no BINARYMIME
    dns_server.add("remote.test", "MX", "10 mx.remote.test.")
    dns_server.add("mx.remote.test", "A", "127.0.0.2")
    s = Stack(tmp_path_factory.mktemp("chunking"), mta={"max_message_size": LIMIT},
              delivery={"resolver": dns_server.address, "smtp_port": port})
    s.setup_users("example.com", "bob@example.com", "amy@example.com", "cid@example.com")
    s.start("up")
    s.remote = mx
    yield s
    s.stop_all()
    mx.stop()
    dns_server.close()


def transaction(s: Stack, rcpt: str) -> Raw:
    c = Raw(s.mta_port)
    assert "CHUNKING" in c.cmd("EHLO client.test")
    assert c.cmd("MAIL FROM:<someone@elsewhere.test>").startswith("250")
    assert c.cmd(f"RCPT TO:<{rcpt}>").startswith("250")
    return c


def bdat(c: Raw, data: bytes, last: bool = False) -> str:
    c.send(f"BDAT {len(data)}{' LAST' if last else ''}\r\n".encode() + data)
    return c.reply()


def delivered(s: Stack, rcpt: str, marker: bytes) -> list[bytes]:
    return [m for m in mailbox(s, rcpt) if marker in m]


def test_a_message_in_chunks_split_anywhere_arrives_whole(stack):
    body = b"Subject: chunked\r\n\r\n" + b"".join(b"line %d\r\n" % i for i in range(2000))
    c = transaction(stack, "bob@example.com")
    cuts = [0, 7, 8, 500, 501, len(body) - 1, len(body)]  # one chunk ends between CR and LF
    for a, b in zip(cuts, cuts[1:-1], strict=False):
        assert bdat(c, body[a:b]) == f"250 2.0.0 {b - a} octets received"
    reply = bdat(c, body[cuts[-2]:], last=True)
    assert reply.startswith("250 2.0.0") and "queued" in reply.lower(), reply
    c.cmd("QUIT")
    [got] = wait_mail(stack, "bob@example.com", 1)
    assert got.endswith(body.replace(b"\r\n", b"\n"))


def test_a_large_message_goes_to_disk_as_it_arrives_and_is_delivered(stack):
    line = b"x" * 78 + b"\r\n"
    body = b"Subject: large\r\n\r\n" + line * (1_300_000 // len(line))  # past SPILL_AT (1 MiB)
    c = transaction(stack, "amy@example.com")
    parts = [body[i:i + 65536] for i in range(0, len(body), 65536)]
    for part in parts[:-1]:
        assert bdat(c, part).startswith("250")
    assert bdat(c, parts[-1], last=True).startswith("250")
    c.cmd("QUIT")
    wait_mail(stack, "amy@example.com", 1)
    assert delivered(stack, "amy@example.com", b"Subject: large")


def test_a_chunk_over_size_ends_the_transaction_and_delivers_nothing(stack):
    c = transaction(stack, "bob@example.com")
    assert bdat(c, b"Subject: too-big\r\n\r\n").startswith("250")
    assert bdat(c, b"y" * 100 + b"\r\n" + (b"z" * 998 + b"\r\n") * 2100).startswith("552 5.3.4")
    # The rest of it, and its LAST, find no transaction: refused, and still read as data.
    assert bdat(c, b"tail\r\n", last=True).startswith("503")
    assert c.cmd("NOOP").startswith("250")
    sentinel(stack, c, b"sentinel-size")
    assert not delivered(stack, "bob@example.com", b"too-big")


def test_bare_line_feeds_in_a_chunk_refuse_the_message(stack):
    c = transaction(stack, "bob@example.com")
    assert bdat(c, b"Subject: bare-lf\r\n\r\nsmuggled\n.\nMAIL FROM:<x@y>\r\n",
                last=True).startswith("554 5.6.0")
    sentinel(stack, c, b"sentinel-lf")
    assert not delivered(stack, "bob@example.com", b"bare-lf")


def test_bdat_out_of_order_is_refused_and_skipped_and_data_after_bdat_too(stack):
    c = Raw(stack.mta_port)
    c.cmd("EHLO client.test")
    # No transaction: the chunk is read (not taken for commands) and refused.
    assert bdat(c, b"RSET\r\nQUIT\r\n").startswith("503 5.5.1")
    assert c.cmd("NOOP").startswith("250")
    c.cmd("MAIL FROM:<someone@elsewhere.test>")
    c.cmd("RCPT TO:<bob@example.com>")
    assert bdat(c, b"Subject: mixed\r\n").startswith("250")
    assert c.cmd("DATA").startswith("503 5.5.1")
    assert c.cmd("BDAT x").startswith("501 5.5.4")  # no length: the session must end
    c.close()


def test_submission_offers_chunking_only_after_auth(stack):
    c = Raw(stack.msa_port)
    assert "CHUNKING" in c.cmd("EHLO client.test")
    assert bdat(c, b"Subject: x\r\n\r\ny\r\n", last=True).startswith("530 5.7.0")
    assert c.cmd("NOOP").startswith("250")
    c.close()


# Every octet value, a bare LF and CR, a NUL, a line of 3000 octets, and no CRLF at the end.
PAYLOAD = bytes(range(256)) * 4 + b"\n\r\x00" + b"b" * 3000 + b"\r\n.\r\nend"
BINARY = (b"Subject: binary\r\nMIME-Version: 1.0\r\nContent-Type: application/octet-stream\r\n"
          b"Content-Transfer-Encoding: binary\r\n\r\n" + PAYLOAD)


def test_binarymime_keeps_every_octet_and_needs_bdat(stack):
    c = Raw(stack.mta_port)
    assert "BINARYMIME" in c.cmd("EHLO client.test")
    assert c.cmd("MAIL FROM:<someone@elsewhere.test> BODY=BINARYMIME").startswith("250")
    assert c.cmd("RCPT TO:<cid@example.com>").startswith("250")
    assert c.cmd("DATA").startswith("503 5.5.1")  # RFC 3030 §3: BDAT only
    assert bdat(c, BINARY[:100]).startswith("250")
    assert bdat(c, BINARY[100:], last=True).startswith("250 2.0.0")
    c.cmd("QUIT")
    [got] = wait_mail(stack, "cid@example.com", 1)
    # The header section in the mailbox's LF form, the binary body exactly as sent (and the
    # final LF every mailbox message ends with: mda/message.py).
    assert got.endswith(b"Content-Transfer-Encoding: binary\n\n" + PAYLOAD + b"\n")


def test_binarymime_to_a_host_without_it_bounces_with_5_6_3(stack):
    with smtplib.SMTP("127.0.0.1", stack.msa_port, timeout=15) as c:
        c.starttls(context=client_tls())
        c.login("bob@example.com", "pw")
        assert "binarymime" in c.esmtp_features
        assert c.docmd("MAIL", "FROM:<bob@example.com> BODY=BINARYMIME")[0] == 250
        assert c.docmd("RCPT", "TO:<far@remote.test>")[0] == 250
        message = b"From: bob@example.com\r\n" + BINARY
        c.send(b"BDAT %d LAST\r\n" % len(message) + message)
        assert c.getreply()[0] == 250
    dsn = wait_for(lambda: delivered(stack, "bob@example.com", b"far@remote.test"))
    assert dsn and b"5.6.3" in dsn[0] and b"BINARYMIME" in dsn[0]
    assert not any(b"Subject: binary" in m.data for m in stack.remote.messages)


def sentinel(s: Stack, c: Raw, marker: bytes) -> None:
    """A good message on the same session, then QUIT; once it is delivered, whatever the
    session sent before it has been dealt with."""
    assert c.cmd("MAIL FROM:<someone@elsewhere.test>").startswith("250")
    assert c.cmd("RCPT TO:<bob@example.com>").startswith("250")
    assert bdat(c, b"Subject: " + marker + b"\r\n\r\nok\r\n", last=True).startswith("250")
    c.cmd("QUIT")
    assert wait_mail_with(s, "bob@example.com", marker)


def wait_mail_with(s: Stack, rcpt: str, marker: bytes) -> bool:
    return bool(wait_for(lambda: delivered(s, rcpt, marker)))
