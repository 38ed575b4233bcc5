"""Mail that leaves encrypted and authenticated: MTA-STS (RFC 8461), DANE (RFC 7672) and the
administrator's TLS policies, against a DNS stub (with and without the AD bit), an HTTPS policy
server and MX hosts on 127.0.0.x with certificates from a test CA."""

from __future__ import annotations

import hashlib
import json
import smtplib

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from tests.support.fakes import FakeDNS, PolicyServer, SinkMX
from tests.support.smtp import wait_for
from tests.support.stack import Stack, free_port

trustme = pytest.importorskip("trustme")

GOOD, HOSTILE, PLAIN = "127.0.0.41", "127.0.0.42", "127.0.0.43"
# name -> the sink that answers for it (its A record)
MX_HOSTS = {
    "mx1.enforce.test": GOOD, "mx1.badmx.test": GOOD, "mx1.badcert.test": HOSTILE,
    "mx1.testing.test": HOSTILE, "mx1.cached.test": GOOD, "mx2.cached.test": GOOD,
    "mx.dane.test": GOOD, "mx.danebad.test": GOOD, "mx.daneinsecure.test": GOOD,
    "mx.plain.test": PLAIN, "mx.verify.test": HOSTILE,
    # policies that are not policies (RFC 8461 §3.3): delivered as if there were none
    "mx1.wrongtype.test": HOSTILE, "mx1.toolarge.test": HOSTILE, "mx1.redirect.test": HOSTILE,
    "mx1.badhttps.test": HOSTILE, "mx.daneunusable.test": HOSTILE,
}
NOT_POLICIES = ("wrongtype.test", "toolarge.test", "redirect.test", "badhttps.test")
GOOD_NAMES = [n for n, ip in MX_HOSTS.items() if ip == GOOD]


def policy(mode: str, *mx: str) -> str:
    return "version: STSv1\r\nmode: {}\r\n{}max_age: 86400\r\n".format(
        mode, "".join(f"mx: {m}\r\n" for m in mx))


def spki_sha256(pem: bytes) -> str:
    cert = x509.load_pem_x509_certificate(pem)
    spki = cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(spki).hexdigest()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    base = tmp_path_factory.mktemp("outtls")
    ca = trustme.CA()
    ca_file = base / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    port = free_port(GOOD)
    good_cert = ca.issue_cert(*GOOD_NAMES)
    import ssl

    good_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    good_cert.configure_cert(good_ctx)
    hostile_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("evil.test").configure_cert(hostile_ctx)  # valid, for another name
    sinks = {GOOD: SinkMX(GOOD, port, tls_context=good_ctx),
             HOSTILE: SinkMX(HOSTILE, port, tls_context=hostile_ctx),
             PLAIN: SinkMX(PLAIN, port)}
    dns_server = FakeDNS()
    z = dns_server.add
    for name, ip in MX_HOSTS.items():
        domain = name.split(".", 1)[1]
        z(domain, "MX", f"10 {name}.", secure=domain.startswith("dane"))
        z(name, "A", ip, secure=domain.startswith("dane"))
    sts = PolicyServer("127.0.0.39", ca, ["reports.test"] + [
        f"mta-sts.{d}" for d in ("enforce.test", "badmx.test", "badcert.test", "testing.test",
                                 "cached.test", "wrongtype.test", "toolarge.test",
                                 "redirect.test")])  # not badhttps.test
    z("reports.test", "A", "127.0.0.39")
    strict = policy("enforce", "mx.nowhere.test")  # would defer everything, were it taken
    for domain in NOT_POLICIES:
        z(f"_mta-sts.{domain}", "TXT", '"v=STSv1; id=first"')
        z(f"mta-sts.{domain}", "A", "127.0.0.39")
        sts.set(domain, strict)  # badhttps: a valid policy, behind a certificate for others
    sts.set("wrongtype.test", strict, ctype="text/html")
    sts.set("toolarge.test", strict + "# padding\r\n" * 8000)
    sts.set("redirect.test", strict, status=301)
    z("_smtp._tls.enforce.test", "TXT",
      '"v=TLSRPTv1; rua=mailto:bob@example.com,https://reports.test/tlsrpt"')
    for domain, mode, mx in (("enforce.test", "enforce", ["mx1.enforce.test"]),
                             ("badmx.test", "enforce", ["mx.elsewhere.test"]),
                             ("badcert.test", "enforce", ["*.badcert.test"]),
                             ("testing.test", "testing", ["mx1.testing.test"]),
                             ("cached.test", "enforce", ["mx1.cached.test"])):
        z(f"_mta-sts.{domain}", "TXT", '"v=STSv1; id=first"')
        z(f"mta-sts.{domain}", "A", "127.0.0.39")
        sts.set(domain, policy(mode, *mx))
    match = spki_sha256(good_cert.cert_chain_pems[0].bytes())
    z(f"_{port}._tcp.mx.dane.test", "TLSA", f"3 1 1 {match}", secure=True)
    z(f"_{port}._tcp.mx.danebad.test", "TLSA", "3 1 1 " + "00" * 32, "1 1 1 " + match,
      secure=True)  # 1 (PKIX-EE) is unusable for SMTP; the usable one does not match
    z(f"_{port}._tcp.mx.daneinsecure.test", "TLSA", "3 1 1 " + "00" * 32)  # no AD bit
    z(f"_{port}._tcp.mx.daneunusable.test", "TLSA", "0 0 1 " + "00" * 32, "3 4 1 " + "00" * 32,
      secure=True)  # nothing usable: opportunistic TLS
    s = Stack(base / "pochta", delivery={"resolver": dns_server.address, "smtp_port": port,
                                         "ca_file": str(ca_file), "dnssec": True,
                                         "retry_initial": 3600, "retry_max": 3600},
              mta={"relay_networks": ["127.0.0.1/32"]})
    s.setup_users("example.com", "bob@example.com")
    s.pochta("tls-policy", "add", "plain.test", "encrypt")
    s.pochta("tls-policy", "add", "verify.test", "verify")
    s.start("up")
    yield s, sinks, dns_server, sts
    s.stop_all()
    for sink in sinks.values():
        sink.stop()
    sts.stop()
    dns_server.close()


def send(s: Stack, rcpt: str, subject: str, extra: str = "") -> None:
    with smtplib.SMTP("127.0.0.1", s.mta_port, timeout=15) as c:
        c.sendmail("app@example.com", [rcpt],
                   f"Subject: {subject}\r\n{extra}\r\nx\r\n".encode())


def received(sinks: dict, ip: str, subject: str) -> list:
    return [m for m in sinks[ip].messages if f"Subject: {subject}".encode() in m.data]


def deferred(s: Stack, sinks: dict, ip: str, rcpt: str, subject: str) -> str:
    """Send, wait for the attempt's reply, check the host at ``ip`` got nothing; the reply."""
    send(s, rcpt, subject)
    reply = wait_for(lambda: last_reply(s, rcpt))
    assert not received(sinks, ip, subject)
    return reply


def last_reply(s: Stack, rcpt: str) -> str:
    """The recipient's last reply once an attempt has been made ("" before)."""
    out = json.loads(s.pochta("queue", "list", "--json").stdout)["messages"]
    for m in out:
        for r in m["recipients"]:
            if r["address"] == rcpt and r["attempts"]:
                return r["last_reply"]
    return ""


def test_enforce_with_a_matching_mx_and_a_valid_certificate_delivers(world):
    s, sinks, _, sts = world
    send(s, "a@enforce.test", "sts-ok")
    got = wait_for(lambda: received(sinks, GOOD, "sts-ok"))
    assert got and got[0].tls
    assert "mta-sts.enforce.test/.well-known/mta-sts.txt" in sts.requests


def test_enforce_refuses_an_mx_the_policy_does_not_name(world):
    s, sinks, _, _ = world
    reply = deferred(s, sinks, GOOD, "a@badmx.test", "sts-badmx")
    assert reply.startswith("451 4.7.5") and "MTA-STS" in reply, reply


def test_enforce_never_gives_the_message_to_a_host_with_a_certificate_for_another_name(world):
    s, sinks, _, _ = world
    reply = deferred(s, sinks, HOSTILE, "a@badcert.test", "sts-badcert")
    assert reply.startswith("451 4.7.5") and "mx1.badcert.test" in reply, reply


def test_testing_mode_delivers_and_records_the_failure(world):
    s, sinks, _, _ = world
    send(s, "a@testing.test", "sts-testing")
    assert wait_for(lambda: received(sinks, HOSTILE, "sts-testing"))
    assert wait_for(lambda: "MTA-STS testing" in s.log("up"))


def test_a_cached_policy_holds_when_the_fetch_fails_even_after_a_restart(world):
    s, sinks, dns_server, sts = world
    send(s, "a@cached.test", "cached-1")
    assert wait_for(lambda: received(sinks, GOOD, "cached-1"))
    # The domain moves to mx2 and announces a new policy that cannot be fetched: the cached
    # one (mx1 only) still holds, in a new process too (it is in the database).
    s.stop("up")
    dns_server.replace("cached.test", "MX", "10 mx2.cached.test.")
    dns_server.replace("_mta-sts.cached.test", "TXT", '"v=STSv1; id=second"')
    sts.set("cached.test", "oops", status=500)
    s.start("up")
    send(s, "a@cached.test", "cached-2")
    reply = wait_for(lambda: last_reply(s, "a@cached.test"))
    assert reply.startswith("451 4.7.5") and "MTA-STS" in reply, reply
    assert not received(sinks, GOOD, "cached-2")
    assert "not usable" in s.log("up")  # the failed fetch is logged


def test_dane_ee_match_delivers(world):
    s, sinks, _, _ = world
    send(s, "a@dane.test", "dane-ok")
    got = wait_for(lambda: received(sinks, GOOD, "dane-ok"))
    assert got and got[0].tls


def test_dane_mismatch_defers_and_nothing_is_sent(world):
    s, sinks, _, _ = world
    reply = deferred(s, sinks, GOOD, "a@danebad.test", "dane-bad")
    assert reply.startswith("451 4.7.5") and "TLSA" in reply and "dane" in reply, reply


def test_dane_records_in_an_insecure_answer_are_ignored(world):
    s, sinks, _, _ = world
    send(s, "a@daneinsecure.test", "dane-insecure")
    assert wait_for(lambda: received(sinks, GOOD, "dane-insecure"))


@pytest.mark.parametrize("domain", NOT_POLICIES)
def test_a_policy_of_the_wrong_type_size_redirect_or_certificate_is_no_policy(world, domain):
    s, sinks, _, _ = world
    send(s, f"a@{domain}", f"notpolicy-{domain}")
    assert wait_for(lambda: received(sinks, HOSTILE, f"notpolicy-{domain}")), s.log("up")
    assert f"MTA-STS policy of {domain} not usable" in s.log("up")


def test_tlsa_records_with_unknown_parameters_are_not_fatal(world):
    s, sinks, _, _ = world
    send(s, "a@daneunusable.test", "dane-unusable")
    assert wait_for(lambda: received(sinks, HOSTILE, "dane-unusable"))


def test_tls_policy_encrypt_refuses_a_host_without_starttls(world):
    s, sinks, _, _ = world
    reply = deferred(s, sinks, PLAIN, "a@plain.test", "policy-encrypt")
    assert reply.startswith("451 4.7.4") and "STARTTLS" in reply, reply
    out = s.pochta("tls-policy", "list").stdout
    assert "plain.test" in out and "encrypt" in out


def test_tls_policy_verify_refuses_a_certificate_for_another_name(world):
    s, sinks, _, _ = world
    reply = deferred(s, sinks, HOSTILE, "a@verify.test", "policy-verify")
    assert reply.startswith("451 4.7.5") and "verify" in reply, reply
    # The queue shows why it waits.
    assert "4.7.5" in s.pochta("queue", "list").stdout


def test_tls_required_no_sets_mta_sts_aside(world):
    s, sinks, _, _ = world
    send(s, "b@badcert.test", "lax-badcert", extra="TLS-Required: No\r\n")
    assert wait_for(lambda: received(sinks, HOSTILE, "lax-badcert"))


# RFC 8460 §4.4 as a JSON schema: the fields, their types, what is required.
REPORT_SCHEMA = {
    "type": "object",
    "required": ["organization-name", "date-range", "contact-info", "report-id", "policies"],
    "properties": {
        "organization-name": {"type": "string"},
        "date-range": {"type": "object", "required": ["start-datetime", "end-datetime"],
                       "properties": {"start-datetime": {"type": "string", "format": "date-time"},
                                      "end-datetime": {"type": "string", "format": "date-time"}}},
        "contact-info": {"type": "string"},
        "report-id": {"type": "string"},
        "policies": {"type": "array", "minItems": 1, "items": {
            "type": "object", "required": ["policy", "summary"],
            "properties": {
                "policy": {"type": "object", "required": ["policy-type", "policy-domain"],
                           "properties": {
                               "policy-type": {"enum": ["tlsa", "sts", "no-policy-found"]},
                               "policy-string": {"type": "array", "items": {"type": "string"}},
                               "policy-domain": {"type": "string"},
                               "mx-host": {"type": "array", "items": {"type": "string"}}}},
                "summary": {"type": "object", "required": ["total-successful-session-count",
                                                           "total-failure-session-count"],
                            "properties": {
                                "total-successful-session-count": {"type": "integer",
                                                                   "minimum": 0},
                                "total-failure-session-count": {"type": "integer",
                                                                "minimum": 0}}},
                "failure-details": {"type": "array", "items": {
                    "type": "object", "required": ["result-type", "failed-session-count"],
                    "properties": {
                        "result-type": {"enum": [
                            "starttls-not-supported", "certificate-host-mismatch",
                            "certificate-expired", "certificate-not-trusted",
                            "validation-failure", "tlsa-invalid", "dnssec-invalid",
                            "dane-required", "sts-policy-fetch-error", "sts-policy-invalid",
                            "sts-webpki-invalid"]},
                        "receiving-mx-hostname": {"type": "string"},
                        "failed-session-count": {"type": "integer", "minimum": 1}}}}}}},
    },
}


def test_tls_sessions_are_counted_and_reported_the_next_day(world):
    import gzip
    import time

    import jsonschema

    from mta.tlsrpt import read_report
    from store.db import Database
    from store.tlspolicy import TLSPolicyStore
    from tests.support.smtp import mailbox

    s, _, _, sts = world
    db = Database(f"sqlite:///{s.base}/pochta.db")
    try:
        store = TLSPolicyStore(db)
        today = store.counts()
        got = {(c.domain, c.result) for c in today}
        assert ("enforce.test", "success") in got  # the deliveries above were counted
        assert ("testing.test", "certificate-host-mismatch") in got
        assert ("danebad.test", "validation-failure") in got
        # Yesterday's counts (as a day ago's deliveries left them) go out at start.
        day = time.strftime("%Y-%m-%d", time.gmtime(time.time() - 86400))
        sts_text = "version: STSv1\nmode: enforce\nmx: mx1.enforce.test\nmax_age: 86400"
        store.count(day, "enforce.test", "sts", sts_text, "success", n=7)
        store.count(day, "enforce.test", "sts", sts_text, "certificate-expired",
                    "mx1.enforce.test", n=2)
    finally:
        db.dispose()
    s.stop("up")
    s.start("up")
    mails = wait_for(lambda: [m for m in mailbox(s, "bob@example.com")
                              if b"TLS-Report-Domain: enforce.test" in m])
    assert mails, s.log("up")
    report = read_report(mails[0])
    assert report is not None
    jsonschema.validate(report, REPORT_SCHEMA, format_checker=jsonschema.FormatChecker())
    [policy] = report["policies"]
    assert policy["policy"]["policy-type"] == "sts"
    assert policy["policy"]["mx-host"] == ["mx1.enforce.test"]
    assert policy["summary"] == {"total-successful-session-count": 7,
                                 "total-failure-session-count": 2}
    assert policy["failure-details"] == [{"result-type": "certificate-expired",
                                          "failed-session-count": 2,
                                          "receiving-mx-hostname": "mx1.enforce.test"}]
    assert report["date-range"]["start-datetime"] == f"{day}T00:00:00Z"
    assert b'report-type="tlsrpt"' in mails[0]
    # What a receiver of such reports reads (here our own, mailed to bob).
    out = s.pochta("tls-reports", "--address", "bob@example.com").stdout
    [row] = [ln for ln in out.splitlines() if "enforce.test" in ln]
    assert row.split()[2:6] == ["enforce.test", "sts", "7", "2"], out
    assert "certificate-expired@mx1.enforce.test x2" in row
    listed = json.loads(s.pochta("tls-reports", "--address", "bob@example.com", "--json").stdout)
    assert listed["reports"][0]["report-id"] == report["report-id"]
    assert "no TLS reports" in s.pochta("tls-reports").stdout  # postmaster@ has none
    [(where, ctype, body)] = wait_for(lambda: sts.posts)
    assert where == "reports.test/tlsrpt" and ctype == "application/tlsrpt+gzip"
    assert json.loads(gzip.decompress(body))["policies"] == report["policies"]
    # Sent once: the counts are gone, today's stay for tomorrow.
    db = Database(f"sqlite:///{s.base}/pochta.db")
    try:
        left = TLSPolicyStore(db).counts()
        assert all(c.day != day for c in left) and any(c.day != day for c in left)
    finally:
        db.dispose()


def test_nothing_went_wrong_on_the_way(world):
    s, _, _, _ = world
    assert "Traceback" not in s.log("up")


def test_our_own_policy_is_served_over_https_as_pochta_dns_prints_it(tmp_path):
    import http.client
    import re

    from tests.support.smtp import client_tls

    port = free_port()
    s = Stack(tmp_path, mta_sts={"listen": [f"127.0.0.1:{port}"]})
    s.setup_users("example.com", "bob@example.com")
    s.start("up", listen=[s.mda_listen, f"127.0.0.1:{s.mta_port}", f"127.0.0.1:{port}"])
    try:
        zone = s.pochta("dns", "example.com").stdout
        published = "".join(ln[4:] + "\r\n" for ln in zone.splitlines() if ln.startswith(";   "))

        def get(host: str, path: str = "/.well-known/mta-sts.txt") -> tuple[int, str, bytes]:
            c = http.client.HTTPSConnection("127.0.0.1", port, timeout=10, context=client_tls())
            try:
                c.request("GET", path, headers={"Host": host})
                r = c.getresponse()
                return r.status, r.getheader("Content-Type") or "", r.read()
            finally:
                c.close()

        status, ctype, body = get("mta-sts.example.com")
        assert status == 200 and ctype.startswith("text/plain")
        assert body.decode() == published and re.search(r"mode: testing\r\n", body.decode())
        assert get("mta-sts.elsewhere.test")[0] == 404  # not a domain of ours
        assert get("mta-sts.example.com", "/other")[0] == 404
    finally:
        s.stop_all()


def test_a_database_not_upgraded_yet_still_delivers_and_says_why(tmp_path):
    """Migration 0005 brings the TLS policy tables: until `pochta db upgrade`, mail goes
    out with opportunistic TLS and a warning, not deferred for a missing table."""
    import sqlite3

    port = free_port("127.0.0.44")
    sink = SinkMX("127.0.0.44", port)
    dns_server = FakeDNS()
    dns_server.add("old.test", "MX", "10 mx.old.test.")
    dns_server.add("mx.old.test", "A", "127.0.0.44")
    s = Stack(tmp_path, delivery={"resolver": dns_server.address, "smtp_port": port},
              mta={"relay_networks": ["127.0.0.1/32"]})
    s.setup_users("example.com", "bob@example.com")
    with sqlite3.connect(tmp_path / "pochta.db") as db:
        for table in ("tls_policies", "mta_sts_policies", "tls_report_counts"):
            db.execute(f"DROP TABLE {table}")
    s.start("up")
    try:
        send(s, "a@old.test", "not-upgraded")
        assert wait_for(lambda: [m for m in sink.messages if b"not-upgraded" in m.data])
        assert "run 'pochta db upgrade'" in s.log("up") and "Traceback" not in s.log("up")
    finally:
        s.stop_all()
        sink.stop()
        dns_server.close()
