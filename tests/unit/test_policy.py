"""Pure policy pieces: relay tricks, rate windows, DNSBL names, DMARC, backoff, Received."""

import random

import pytest

from mta.abuse import RateLimiter, client_network, dnsbl_name, in_networks, triplet_key
from mta.authcheck import aligned, dmarc_result, org_domain, parse_dmarc, strip_forged_results
from mta.policy import (
    count_received,
    protocol_name,
    received_header,
    retry_delay,
    routing_trick,
    tls_optional,
)


@pytest.mark.parametrize("raw,addr,why", [
    ("<a%b@ours.test>", "a%b@ours.test", "percent hack"),
    ("<b!a@ours.test>", "b!a@ours.test", "bang path"),
    ("<@x.test:a@ours.test>", "a@ours.test", "source route"),
    ('<"a@b"@ours.test>', '"a@b"@ours.test', "quoted local part"),
    ("<a@[10.0.0.1]>", "a@[10.0.0.1]", "address literal"),
    ("<a@ours.test>", "a@ours.test", None),
])
def test_routing_tricks(raw, addr, why):
    assert routing_trick(raw, addr) == why


def test_rate_limiter_window_and_recovery():
    r = RateLimiter(limit=3, window=60)
    assert [r.hit("ip", now=t) for t in (0, 1, 2, 3)] == [False, False, False, True]
    assert r.over("ip", now=30)
    assert not r.over("ip", now=62)  # the first events left the window
    assert not r.hit("ip", now=63.5)
    assert not RateLimiter(limit=0, window=60).hit("x")


def test_dnsbl_names_and_networks():
    assert dnsbl_name("192.0.2.1", "zen.example") == "1.2.0.192.zen.example"
    assert dnsbl_name("2001:db8::1", "bl.test").startswith("1.0.0.0.0.0.0.0")
    assert client_network("192.0.2.77") == "192.0.2.0/24"
    assert client_network("2001:db8::1") == "2001:db8::/64"
    assert triplet_key("192.0.2.1", "a@b", "c@d") == triplet_key("192.0.2.200", "a@b", "c@d")
    assert in_networks("127.0.0.5", ["127.0.0.0/8"]) and not in_networks("10.1.1.1", [])


def test_dmarc_evaluation():
    rec = parse_dmarc("v=DMARC1; p=reject; adkim=s")
    assert rec.policy == "reject" and rec.adkim_strict and not rec.aspf_strict
    assert parse_dmarc("v=spf1 -all") is None
    assert org_domain("mail.example.co.uk") == "example.co.uk"
    assert aligned("mail.example.com", "example.com", strict=False)
    assert not aligned("mail.example.com", "example.com", strict=True)
    assert dmarc_result("example.com", rec, "pass", "bounce.example.com", []) == "pass"
    assert dmarc_result("example.com", rec, "fail", "example.com", ["sub.example.com"]) == "fail"
    assert dmarc_result("example.com", None, "fail", "x", []) == "none"


def test_strip_forged_results_keeps_others():
    msg = (b"Authentication-Results: mx.test; spf=pass\r\n\tdkim=pass\r\n"
           b"Authentication-Results: other.test; spf=fail\r\n"
           b"Subject: x\r\n\r\nAuthentication-Results: mx.test; in the body stays\r\n")
    out = strip_forged_results(msg, "mx.test")
    assert out == (b"Authentication-Results: other.test; spf=fail\r\nSubject: x\r\n\r\n"
                   b"Authentication-Results: mx.test; in the body stays\r\n")


def test_backoff_doubles_to_max_with_jitter():
    rng = random.Random(1)
    delays = [retry_delay(n, 300, 3600, rng) for n in range(1, 8)]
    assert 300 <= delays[0] <= 330 and 600 <= delays[1] <= 660
    assert all(3600 <= d <= 3960 for d in delays[4:])


def test_received_and_protocol_names():
    assert protocol_name(esmtp=True, tls=True, auth=True, utf8=False) == "ESMTPSA"
    assert protocol_name(esmtp=True, tls=False, auth=False, utf8=True) == "UTF8SMTP"
    assert protocol_name(esmtp=False, tls=False, auth=False, utf8=False) == "SMTP"
    h = received_header(helo="bad\nhelo", ip="192.0.2.1", hostname="mx.test", protocol="ESMTPS",
                        qid="abc")
    assert h.startswith(b"Received: from bad?helo ([192.0.2.1])\r\n\tby mx.test (pochta) with "
                        b"ESMTPS id abc;")
    assert count_received(h + h + b"Subject: x\r\n\r\nReceived: in body\r\n") == 2


def test_authserv_id_and_pvalue():
    from mta.authcheck import authserv_id_of, pvalue, strip_forged_results

    assert authserv_id_of(b" (a (b) c) MX.Example.org. 1; spf=pass") == b"mx.example.org"
    assert authserv_id_of(b"\r\n\tmx.example.org;\r\n dkim=pass") == b"mx.example.org"
    assert pvalue("mail.example.org") == "mail.example.org"
    assert pvalue("a.b@example.org") == "a.b@example.org"
    assert pvalue("[192.0.2.1]") == "[192.0.2.1]"
    for bad in ["x@y;dkim=pass", "a b", "exa\rmple.org", "", "a;b", '"q"@x.org']:
        assert pvalue(bad) is None, bad
    msg = (b"Authentication-Results: other.org; spf=pass\r\n"
           b"Authentication-Results:\r\n mx.example.org; dkim=pass\r\n\tfolded=1\r\n"
           b"Subject: s\r\n\r\nAuthentication-Results: mx.example.org; body stays\r\n")
    assert strip_forged_results(msg, "mx.example.org") == (
        b"Authentication-Results: other.org; spf=pass\r\nSubject: s\r\n\r\n"
        b"Authentication-Results: mx.example.org; body stays\r\n")


@pytest.mark.parametrize(("message", "optional"), [
    (b"Subject: x\r\nTLS-Required: No\r\n\r\nbody", True),
    (b"tls-required :  no \r\n\r\n", True),
    (b"TLS-Required: Yes\r\n\r\n", False),
    (b"X-TLS-Required: No\r\n\r\n", False),
    (b"Subject: x\r\n\r\nTLS-Required: No\r\n", False),  # in the body: not a header field
    (b"Subject: TLS-Required: No\r\n\r\n", False),
])
def test_tls_required_no_is_a_header_field_of_the_header_section(message, optional):
    assert tls_optional(message) is optional
