"""Submission policy without sockets: the From: fields a reader sees, and the AUTH brake."""

import pytest

from mta.policy import count_received, header_fields
from mta.submission import Brake


def froms(head: bytes) -> list[str]:
    return [v.strip() for n, v in header_fields(head) if n == "from"]


def test_obsolete_and_folded_from_fields_are_from_fields():
    head = (b"Subject: x\r\nFrom : CEO <ceo@example.com>\r\nfrom\t:\r\n boss@example.com\r\n"
            b"X-From: not@this.test\r\nFrom:j\xc3\xb6rg@example.com\r\n")
    assert froms(head) == ["CEO <ceo@example.com>", "boss@example.com", "jörg@example.com"]
    assert froms(b"From: a@b.test\r\n\xff\xfe: x\r\n") == ["a@b.test"]  # junk ignored
    assert count_received(b"Received : from a\r\nreceived: from b\r\n\r\nReceived: body\r\n") == 2


def test_the_brake_keys_on_the_account_and_forgets():
    now = [0.0]
    b = Brake(base=1.0, forget_after=100.0, clock=lambda: now[0])
    for login in ("alice@example.com", "ALICE+x@Example.com", "Alice@EXAMPLE.COM"):
        b.failed(f"192.0.2.{len(login)}", login)  # another address each time
    assert b.delay("198.51.100.1", "alice@example.com") == 8.0  # 3 failures of one account
    now[0] = 500.0
    assert b.delay("198.51.100.1", "alice@example.com") == 1.0
    b.MAX_KEYS = 50
    for i in range(200):  # a client trying many names: bounded
        b.failed("203.0.113.9", f"user{i}@example.com")
    assert len(b.failures) <= 50
    b.succeeded("203.0.113.9", "user199@example.com")
    assert "ip:203.0.113.9" not in b.failures


def test_restarts_back_off_to_thirty_seconds():
    from mta.supervision import restart_delay

    assert [restart_delay(n) for n in range(8)] == [1, 2, 4, 8, 16, 30, 30, 30]


@pytest.mark.parametrize(("arg", "expected"), [
    (None, []), ("  ", []), ("Odmr.TEST", ["odmr.test"]), ("b.test,a.test,b.test", ["a.test", "b.test"]),
    ("a.test,,b.test", None), ("a.test,", None), ("a b", None), ("a..test", None),
])
def test_atrn_arguments(arg, expected):
    from mta.odmr import parse_atrn

    assert parse_atrn(arg) == expected
