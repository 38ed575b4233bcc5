"""SPF, DKIM, DMARC, DNSBL, greylisting, rate limits and the pre-greeting test, end to end.

The MTA's client address is 127.0.0.1; these stacks take loopback out of local_networks so
the defences apply to it, and answer DNS from the fake server below.
"""

from __future__ import annotations

import base64
import re
import smtplib
import ssl
import time
from pathlib import Path

import dkim
import pytest

from tests.support.fakes import FakeDNS, SinkMX
from tests.support.smtp import Raw, wait_for, wait_mail
from tests.support.stack import Stack, free_port, mail_files

PW = "pw"


@pytest.fixture(scope="module")
def dns_server():
    d = FakeDNS()
    yield d
    d.close()


def make_key(tmp: Path, domain: str, selector: str) -> tuple[Path, str]:
    from mta import dkimsign
    record = dkimsign.generate(tmp, domain, selector)
    return tmp, record


@pytest.fixture(scope="module")
def checked(tmp_path_factory, dns_server):
    z = dns_server.add
    z("spfpass.test", "TXT", '"v=spf1 ip4:127.0.0.1 -all"')
    z("spffail.test", "TXT", '"v=spf1 ip4:192.0.2.1 -all"')
    z("spfsoft.test", "TXT", '"v=spf1 ~all"')
    z("nospf.test", "A", "192.0.2.7")
    dns_server.servfail.add("spftemp.test.")
    z("_dmarc.spfpass.test", "TXT", '"v=DMARC1; p=reject"')
    z("_dmarc.spffail.test", "TXT", '"v=DMARC1; p=none"')
    z("_dmarc.strict.test", "TXT", '"v=DMARC1; p=reject"')
    z("strict.test", "TXT", '"v=spf1 ip4:192.0.2.1 -all"')
    keys = tmp_path_factory.mktemp("keys")
    _, record = make_key(keys, "signer.test", "sel")
    z("sel._domainkey.signer.test", "TXT", " ".join(
        f'"{record[i:i + 200]}"' for i in range(0, len(record), 200)))
    base = tmp_path_factory.mktemp("checks")
    s = Stack(base, checks={"local_networks": [], "dmarc_enforce": True, "pregreet": False},
              delivery={"resolver": dns_server.address})
    s.setup_users("example.com", "bob@example.com", password=PW)
    s.start("mta")
    s.start("mda")
    yield s, keys
    s.stop_all()


def send(s: Stack, sender: str, body: bytes, helo: str = "client.test") -> None:
    with smtplib.SMTP("127.0.0.1", s.mta_port, timeout=20) as c:
        c.ehlo(helo)
        c.sendmail(sender, ["bob@example.com"], body)


def last_with(s: Stack, marker: bytes) -> bytes:
    found = wait_for(lambda: next((p.read_bytes() for p in mail_files(s.mailbox_root,
                                                                      "bob@example.com")
                                   if marker in p.read_bytes()), None))
    assert found is not None, s.log("mta")
    return found


def ar_header(message: bytes) -> str:
    m = re.search(rb"(?m)^Authentication-Results: mx\.pochta\.test;(.*(?:\n[ \t].*)*)", message)
    assert m, message[:500]
    return m.group(1).decode()


@pytest.mark.parametrize("sender,expected", [
    ("a@spfpass.test", "spf=pass"), ("a@spffail.test", "spf=fail"),
    ("a@spfsoft.test", "spf=softfail"), ("a@nospf.test", "spf=none"),
    ("a@spftemp.test", "spf=temperror"),
])
def test_spf_results(checked, sender, expected):
    s, _ = checked
    marker = f"spf-{sender}".encode()
    send(s, sender, b"From: " + sender.encode() + b"\r\nSubject: " + marker + b"\r\n\r\nx\r\n")
    assert expected in ar_header(last_with(s, marker))


def test_spf_helo_identity(checked, dns_server):
    s, _ = checked
    dns_server.add("helo.spfpass.test", "TXT", '"v=spf1 ip4:127.0.0.1 -all"')
    send(s, "a@spffail.test", b"From: a@spffail.test\r\nSubject: helo-id\r\n\r\nx\r\n",
         helo="helo.spfpass.test")
    got = ar_header(last_with(s, b"helo-id"))
    assert "spf=fail smtp.mailfrom=a@spffail.test" in got
    assert "spf=pass smtp.helo=helo.spfpass.test" in got


def test_dkim_pass_and_tampered_body_fail(checked):
    from mta.dkimsign import Signer
    s, keys = checked
    signer = Signer(keys)
    msg = b"From: a@signer.test\r\nTo: bob@example.com\r\nSubject: dkim-good\r\n\r\nhello\r\n"
    send(s, "a@signer.test", signer.sign(msg, "signer.test") + msg)
    got = ar_header(last_with(s, b"dkim-good"))
    assert "dkim=pass" in got and "header.d=signer.test" in got
    msg2 = b"From: a@signer.test\r\nTo: bob@example.com\r\nSubject: dkim-bad\r\n\r\nhello\r\n"
    tampered = signer.sign(msg2, "signer.test") + msg2.replace(b"hello", b"HELLO")
    send(s, "a@signer.test", tampered)
    assert "dkim=fail" in ar_header(last_with(s, b"dkim-bad"))


def test_dmarc_pass_none_and_reject(checked):
    s, _ = checked
    send(s, "a@spfpass.test", b"From: a@spfpass.test\r\nSubject: dmarc-pass\r\n\r\nx\r\n")
    assert "dmarc=pass" in ar_header(last_with(s, b"dmarc-pass"))
    send(s, "a@spffail.test", b"From: a@spffail.test\r\nSubject: dmarc-none\r\n\r\nx\r\n")
    got = ar_header(last_with(s, b"dmarc-none"))
    assert "dmarc=fail" in got and "p=NONE" in got  # recorded, delivered
    with pytest.raises(smtplib.SMTPDataError) as e:
        send(s, "a@strict.test", b"From: boss@strict.test\r\nSubject: dmarc-reject\r\n\r\nx\r\n")
    assert e.value.smtp_code == 550 and e.value.smtp_error.startswith(b"5.7.1")


def test_forged_authentication_results_removed(checked):
    s, _ = checked
    send(s, "a@spffail.test",
         b"Authentication-Results: mx.pochta.test; spf=pass smtp.mailfrom=a@spffail.test;\r\n"
         b"\tdkim=pass header.d=spffail.test\r\n"
         b"Authentication-Results: other.example; spf=pass\r\n"
         b"From: a@spffail.test\r\nSubject: forged-ar\r\n\r\nx\r\n")
    got = last_with(s, b"forged-ar")
    assert got.count(b"Authentication-Results: mx.pochta.test") == 1
    assert b"dkim=pass header.d=spffail.test" not in got
    assert b"Authentication-Results: other.example; spf=pass" in got
    assert "spf=fail" in ar_header(got)


def test_msa_signs_with_the_key_keygen_printed(tmp_path, dns_server):
    port = free_port("127.0.0.2")
    sink = SinkMX("127.0.0.2", port)
    dns_server.add("far.test", "MX", "10 mx.far.test.")
    dns_server.add("mx.far.test", "A", "127.0.0.2")
    s = Stack(tmp_path, delivery={"resolver": dns_server.address, "smtp_port": port})
    s.setup_users("example.com", "alice@example.com", password=PW)
    out = s.pochta("dkim", "keygen", "example.com", "--selector", "s2026").stdout
    name, _, txt = out.partition(" IN TXT ")
    assert name == "s2026._domainkey.example.com."
    record = "".join(re.findall(r'"([^"]*)"', txt))
    assert record.startswith("v=DKIM1; k=rsa; p=")
    key = tmp_path / "dkim" / "example.com" / "s2026.key"
    assert key.stat().st_mode & 0o777 == 0o600
    dns_out = s.pochta("dns", "example.com").stdout
    assert "example.com. IN MX 10 mx.pochta.test." in dns_out
    assert '"v=spf1 mx -all"' in dns_out and "_dmarc.example.com." in dns_out
    assert "s2026._domainkey.example.com." in dns_out
    assert s.pochta("dkim", "keygen", "nope.test", check=False).returncode == 1
    s.start("up", listen=[s.mda_listen, f"127.0.0.1:{s.mta_port}", f"127.0.0.1:{s.msa_port}"])
    try:
        c = smtplib.SMTP("127.0.0.1", s.msa_port, timeout=20)
        ctx = ssl.create_default_context()
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        c.starttls(context=ctx)
        c.login("alice@example.com", PW)
        c.sendmail("alice@example.com", ["x@far.test"],
                   b"From: Alice <alice@example.com>\r\nTo: x@far.test\r\nSubject: signed\r\n"
                   b"\r\nsigned body\r\n")
        c.quit()
        m = wait_for(lambda: next((m for m in sink.messages if b"signed body" in m.data), None))
        assert m is not None, s.log("up")
        # Our Received header sits above the signature; dkimpy verifies what is below it.
        assert dkim.verify(m.data, dnsfunc=lambda name, timeout=5: record.encode())
        sig = re.search(rb"DKIM-Signature:(.*?)\r\n(?! )", m.data, re.S).group(1)
        assert b"c=relaxed/relaxed" in sig and b"s=s2026" in sig and b"d=example.com" in sig
        assert sig.replace(b"\r\n", b"").replace(b" ", b"").count(b"from:") >= 1
    finally:
        s.stop_all()
        sink.stop()


def test_ed25519_keys(tmp_path):
    from mta import dkimsign
    record = dkimsign.generate(tmp_path, "ed.test", "ed", "ed25519")
    assert record.startswith("v=DKIM1; k=ed25519; p=")
    assert len(base64.b64decode(record.split("p=")[1])) == 32
    msg = b"From: a@ed.test\r\nSubject: x\r\n\r\nbody\r\n"
    signed = dkimsign.Signer(tmp_path).sign(msg, "ed.test") + msg
    assert b"a=ed25519-sha256" in signed
    assert dkim.verify(signed, dnsfunc=lambda name, timeout=5: record.encode())


def test_dnsbl_listed_and_unlisted(tmp_path, dns_server):
    dns_server.add("1.0.0.127.listed.test", "A", "127.0.0.2")
    dns_server.add("anything.unlisted.test", "A", "127.0.0.2")
    s = Stack(tmp_path, checks={"local_networks": [], "pregreet": False,
                                "dnsbl": ["unlisted.test"]},
              delivery={"resolver": dns_server.address})
    s.setup_users("example.com", "bob@example.com")
    s.start("mta")
    assert Raw(s.mta_port).greeting.startswith("220 ")
    s.stop("mta")
    s.settings["checks"]["dnsbl"] = ["unlisted.test", "listed.test"]
    s.write()
    s.start("mta")
    try:
        r = Raw(s.mta_port)
        assert r.greeting.startswith("554 5.7.1") and "listed.test" in r.greeting
    finally:
        s.stop_all()


def test_greylisting_first_second_and_expiry(tmp_path):
    s = Stack(tmp_path, checks={"local_networks": [], "pregreet": False, "greylist": True,
                                "greylist_delay": 2, "greylist_expiry": 4})
    s.setup_users("example.com", "bob@example.com")
    s.start("mta")
    try:
        def rcpt() -> str:
            r = Raw(s.mta_port)
            r.cmd("EHLO client.test")
            r.cmd("MAIL FROM:<g@remote.test>")
            reply = r.cmd("RCPT TO:<bob@example.com>")
            r.close()
            return reply

        assert rcpt().startswith("451 4.7.1")
        assert rcpt().startswith("451 4.7.1")  # too soon
        time.sleep(2.2)
        assert rcpt().startswith("250")
        assert rcpt().startswith("250")  # passed triplets stay passed
        time.sleep(4.5)  # unseen longer than the expiry: greylisted again
        assert rcpt().startswith("451 4.7.1")
    finally:
        s.stop_all()


def test_rate_limits_hit_and_recover(tmp_path):
    s = Stack(tmp_path, checks={"local_networks": [], "pregreet": False},
              limits={"connections_per_ip_per_minute": 3, "messages_per_user_per_hour": 2,
                      "auth_failures_per_ip_per_hour": 2, "window_scale": 0.05})  # 3 s / 180 s
    s.setup_users("example.com", "alice@example.com", password=PW)
    s.start("up", listen=[s.mda_listen, f"127.0.0.1:{s.mta_port}", f"127.0.0.1:{s.msa_port}"])
    try:
        time.sleep(3.2)  # the readiness probes were connections too: let that window pass
        greetings = [Raw(s.mta_port).greeting for _ in range(4)]
        assert all(g.startswith("220") for g in greetings[:3])
        assert greetings[3].startswith("421 4.7.0")
        time.sleep(3.2)
        assert Raw(s.mta_port).greeting.startswith("220")  # recovered

        ctx = ssl.create_default_context()
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE

        def session():
            c = smtplib.SMTP("127.0.0.1", s.msa_port, timeout=20)
            c.starttls(context=ctx)
            return c

        time.sleep(3.2)  # connection budget of the MSA (same limit) starts afresh
        c = session()
        c.login("alice@example.com", PW)
        for i in range(2):
            c.sendmail("alice@example.com", ["alice@example.com"],
                       b"From: alice@example.com\r\nSubject: r%d\r\n\r\nx\r\n" % i)
        code, msg = c.mail("alice@example.com")
        assert code == 451 and msg.startswith(b"4.7.1")
        c.quit()

        for _ in range(2):
            c = session()
            with pytest.raises(smtplib.SMTPAuthenticationError):
                c.login("alice@example.com", "wrong")
            c.close()
        time.sleep(3.2)  # (connections again)
        c = session()
        with pytest.raises(smtplib.SMTPAuthenticationError) as e:
            c.login("alice@example.com", PW)  # right password, but this IP is locked out
        assert e.value.smtp_code == 454
        c.close()
        wait_mail(s, "alice@example.com", 2)
        assert "message rate limit" in s.log("up") and "too many authentication" in s.log("up")
    finally:
        s.stop_all()


def test_pregreet_talker_disconnected_polite_client_remembered(tmp_path):
    s = Stack(tmp_path, checks={"local_networks": [], "pregreet": True, "pregreet_delay": 0.5})
    s.setup_users("example.com", "bob@example.com")
    s.start("mta")
    try:
        r = Raw(s.mta_port)  # reads the whole banner: a polite client
        assert r.greeting == "220-mx.pochta.test ESMTP\n220 mx.pochta.test ESMTP"
        assert r.cmd("EHLO client.test").startswith("250")
        r.close()
        r = Raw(s.mta_port)  # remembered: no wait, one line
        assert r.greeting == "220 mx.pochta.test ESMTP"
        r.close()
        s.stop("mta")
        s.start("mta")  # memory is per process: the next client is tested again
        import socket
        sock = socket.create_connection(("127.0.0.1", s.mta_port), timeout=10)
        sock.sendall(b"EHLO hasty.test\r\n")  # before the banner is complete
        data = b""
        while True:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
        assert data.startswith(b"220-mx.pochta.test") and b"554 5.7.1" in data
        assert b"250" not in data
    finally:
        s.stop_all()


def test_a_helo_cannot_write_results_into_our_header(checked):
    s, _ = checked
    helo = "x@y;dkim=pass header.d=paypal.com;dmarc=pass header.from=paypal.com"
    send(s, "a@spffail.test", b"From: a@spffail.test\r\nSubject: helo-forge\r\n\r\nx\r\n",
         helo=helo)
    got = last_with(s, b"helo-forge")
    ar = ar_header(got)
    assert "paypal" not in ar and "dkim=pass" not in ar, ar
    assert "spf=fail" in ar


@pytest.mark.parametrize("forged", [
    b"Authentication-Results:\r\n mx.pochta.test; dkim=pass header.d=bank.test\r\n",
    b"Authentication-Results: (comment (nested)) mx.pochta.test; dkim=pass header.d=bank.test\r\n",
    b"Authentication-Results: MX.pochta.test 1; dkim=pass header.d=bank.test\r\n",
    b"Authentication-Results : mx.pochta.test (c); dkim=pass header.d=bank.test\r\n",
])
def test_forged_results_folded_commented_or_versioned_are_removed(checked, forged):
    s, _ = checked
    marker = f"forged-{abs(hash(forged))}".encode()
    send(s, "a@spffail.test", forged + b"From: a@spffail.test\r\nSubject: " + marker
         + b"\r\n\r\nx\r\n")
    got = last_with(s, marker)
    assert b"bank.test" not in got


def test_forged_results_are_removed_on_the_msa_and_from_trusted_networks(tmp_path):
    s = Stack(tmp_path)  # default local_networks: 127.0.0.1 is trusted on port 25
    s.setup_users("example.com", "bob@example.com", password=PW)
    try:
        s.start("up", listen=[s.mda_listen, f"127.0.0.1:{s.mta_port}", f"127.0.0.1:{s.msa_port}"])
        forged = b"Authentication-Results: mx.pochta.test; dkim=pass header.d=bank.test\r\n"
        with smtplib.SMTP("127.0.0.1", s.mta_port, timeout=20) as c:
            c.sendmail("a@remote.test", ["bob@example.com"],
                       forged + b"Subject: trusted-forge\r\n\r\nx\r\n")
        ctx = ssl.create_default_context()
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        with smtplib.SMTP("127.0.0.1", s.msa_port, timeout=20) as c:
            c.starttls(context=ctx)
            c.login("bob@example.com", PW)
            c.sendmail("bob@example.com", ["bob@example.com"], forged
                       + b"From: bob@example.com\r\nSubject: msa-forge\r\n\r\nx\r\n")
        got = wait_mail(s, "bob@example.com", 2)
        assert all(b"bank.test" not in m for m in got), got
    finally:
        s.stop_all()
