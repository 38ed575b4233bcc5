"""MTA-STS records, policies and MX patterns (RFC 8461), and DANE matching (RFC 7672)."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from mta.mtasts import PolicyError, mx_matches, parse_policy, parse_record, policy_text
from mta.tlsverify import Tlsa, dane_error, usable

trustme = pytest.importorskip("trustme")


@pytest.mark.parametrize(("texts", "expected"), [
    (["v=STSv1; id=20260101T010101;"], "20260101T010101"),
    (["v=STSv1;id=abc"], "abc"),
    (["v=spf1 -all", "v=STSv1; id=x1"], "x1"),
    (["v=STSv1; id=a", "v=STSv1; id=b"], None),  # two records: none
    (["v=STSv1; id=" + "a" * 33], None),
    (["v=STSv1; id=with-dash"], None),
    (["v=STSv2; id=a"], None),
    (["v=STSv1"], None),
    ([], None),
])
def test_the_txt_record(texts, expected):
    assert parse_record(texts) == expected


def test_a_policy_and_what_is_not_one():
    text = policy_text("enforce", ["mx1.example.com", "*.example.net"], 86400)
    assert parse_policy(text) == ("enforce", ("mx1.example.com", "*.example.net"), 86400)
    assert parse_policy("version: STSv1\nmode: none\nmax_age: 10\n") == ("none", (), 10)
    assert parse_policy("version: STSv1\nmode: testing\nmx: a.b\nmax_age: 99999999\n")[2] \
        == 31_557_600
    for bad in ("", "version: STSv2\nmode: enforce\nmx: a.b\nmax_age: 1\n",
                "version: STSv1\nmode: strict\nmx: a.b\nmax_age: 1\n",
                "version: STSv1\nmode: enforce\nmax_age: 1\n",
                "version: STSv1\nmode: enforce\nmx: a.b\nmax_age: -1\n",
                "version: STSv1\nmode: enforce\nmx: *.*.b\nmax_age: 1\n",
                "<html>not a policy</html>"):
        with pytest.raises(PolicyError):
            parse_policy(bad)


@pytest.mark.parametrize(("pattern", "host", "ok"), [
    ("mx.example.com", "MX.example.com.", True),
    ("*.example.com", "mx1.example.com", True),
    ("*.example.com", "a.b.example.com", False),
    ("*.example.com", "example.com", False),
    ("mx.example.com", "mx.example.com.evil", False),
])
def test_mx_patterns(pattern, host, ok):
    assert mx_matches(pattern, host) is ok


def der(pem: bytes) -> bytes:
    return x509.load_pem_x509_certificate(pem).public_bytes(Encoding.DER)


def spki(der_bytes: bytes) -> bytes:
    return x509.load_der_x509_certificate(der_bytes).public_key().public_bytes(
        Encoding.DER, PublicFormat.SubjectPublicKeyInfo)


@pytest.fixture(scope="module")
def chain():
    root = trustme.CA()
    intermediate = root.create_child_ca()
    leaf = intermediate.issue_cert("mx.example.net")
    pems = [b.bytes() for b in leaf.cert_chain_pems]  # leaf, intermediate
    return [der(p) for p in pems]


def test_dane_ee_matches_the_leaf_whatever_its_name(chain):
    digest = hashlib.sha256(spki(chain[0])).digest()
    assert dane_error(chain, [Tlsa(3, 1, 1, digest)], "other.name") is None
    assert dane_error(chain, [Tlsa(3, 0, 0, chain[0])], "other.name") is None
    sha512 = hashlib.sha512(chain[0]).digest()
    assert dane_error(chain, [Tlsa(3, 0, 2, sha512)], "x") is None
    assert "no TLSA record" in dane_error(chain, [Tlsa(3, 1, 1, b"\0" * 32)], "x")


def test_dane_ta_needs_the_anchor_to_issue_a_leaf_naming_the_host(chain):
    anchor = Tlsa(2, 0, 1, hashlib.sha256(chain[1]).digest())
    assert dane_error(chain, [anchor], "mx.example.net") is None
    assert dane_error(chain, [anchor], "mx.other.net") is not None  # wrong name
    before = datetime(1999, 1, 1, tzinfo=UTC)  # trustme: valid from 2000
    assert dane_error(chain, [anchor], "mx.example.net", now=before) is not None  # not yet
    leaf_as_anchor = Tlsa(2, 0, 1, hashlib.sha256(chain[0]).digest())
    assert dane_error(chain, [leaf_as_anchor], "mx.example.net") is not None


def test_unusable_records_are_ignored():
    records = [Tlsa(0, 0, 1, b"x"), Tlsa(1, 1, 1, b"x"), Tlsa(3, 2, 1, b"x"),
               Tlsa(3, 1, 3, b"x"), Tlsa(3, 1, 1, b"")]
    assert usable(records) == []
    assert usable([Tlsa(2, 1, 2, b"x")]) == [Tlsa(2, 1, 2, b"x")]


@pytest.mark.parametrize(("texts", "expected"), [
    (["v=TLSRPTv1; rua=mailto:tls@example.com"], ["mailto:tls@example.com"]),
    (["v=TLSRPTv1;rua=mailto:a@b.example, https://r.example/x"],
     ["mailto:a@b.example", "https://r.example/x"]),
    (["v=TLSRPTv1; rua=ftp://x"], []),
    (["v=TLSRPTv1; rua=mailto:a@b", "v=TLSRPTv1; rua=mailto:c@d"], []),
    (["v=spf1 -all"], []),
])
def test_the_tlsrpt_record(texts, expected):
    from mta.tlsrpt import parse_rua

    assert parse_rua(texts) == expected
