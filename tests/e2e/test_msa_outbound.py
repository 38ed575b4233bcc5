"""Submission on 587/465, delivery to remote MX hosts found through our fake DNS, and bounces."""

from __future__ import annotations

import email
import email.policy
import shutil
import smtplib
import ssl
import subprocess
import time

import pytest

from tests.support.fakes import FakeDNS, SinkMX
from tests.support.smtp import Raw, client_tls, server_tls, wait_for
from tests.support.stack import Stack, free_port, mail_files

PW = "correct horse"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """DNS on 127.0.0.1, sinks on 127.0.0.2 and 127.0.0.3, and pochta up."""
    pytest.importorskip("trustme")
    sink_ctx = server_tls("mx1.remote.test")
    dns_server = FakeDNS()
    port = free_port("127.0.0.2")
    mx1 = SinkMX("127.0.0.2", port, tls_context=sink_ctx)
    mx2 = SinkMX("127.0.0.3", port)
    z = dns_server.add
    z("remote.test", "MX", "10 mx1.remote.test.", "20 mx2.remote.test.")
    z("mx1.remote.test", "A", "127.0.0.2")
    z("mx2.remote.test", "A", "127.0.0.3")
    z("backup.test", "MX", "10 dead.backup.test.", "20 mx2.remote.test.")
    z("dead.backup.test", "A", "127.0.0.4")  # nothing listens there
    z("nomx.test", "A", "127.0.0.3")  # implicit MX
    z("nullmx.test", "MX", "0 .")
    z("legacy.test", "MX", "10 legacy-mx.test.")
    z("legacy-mx.test", "A", "127.0.0.3")
    base = tmp_path_factory.mktemp("msa")
    s = Stack(base, delivery={"resolver": dns_server.address, "smtp_port": port,
                              "retry_initial": 30, "retry_max": 60})
    s.setup_users("example.com", "alice@example.com", "bob@example.com", password=PW)
    s.pochta("alias", "add", "sales@example.com", "alice@example.com")
    s.pochta("alias", "add", "jörg@example.com", "alice@example.com")  # EAI (RFC 6530)
    s.pochta("alias", "add", "fwd@example.com", "gone@remote.test")
    s.start("up", listen=[s.mda_listen, f"127.0.0.1:{s.mta_port}", f"127.0.0.1:{s.msa_port}",
                          f"127.0.0.1:{s.msa_tls_port}"])
    yield s, dns_server, mx1, mx2
    s.stop_all()
    mx1.stop()
    mx2.stop()
    dns_server.close()


def submit(s: Stack, sender: str, rcpts: list[str], body: bytes, login: str = "alice@example.com",
           password: str = PW, implicit: bool = False) -> dict:
    if implicit:
        c = smtplib.SMTP_SSL("127.0.0.1", s.msa_tls_port, timeout=20, context=client_tls())
    else:
        c = smtplib.SMTP("127.0.0.1", s.msa_port, timeout=20)
        c.starttls(context=client_tls())
    with c:
        c.login(login, password)
        return c.sendmail(sender, rcpts, body)


def stack_with_alice(tmp_path, delivery: dict) -> Stack:
    """`pochta up` with these [delivery] settings and the user alice@example.com."""
    s = Stack(tmp_path, delivery=delivery)
    s.setup_users("example.com", "alice@example.com", password=PW)
    s.start("up", listen=[s.mda_listen, f"127.0.0.1:{s.mta_port}", f"127.0.0.1:{s.msa_port}"])
    return s


def find(sink: SinkMX, marker: bytes, timeout: float = 20):
    return wait_for(lambda: next((m for m in sink.messages if marker in m.data), None), timeout)


def dsns(s: Stack, address: str) -> list[email.message.EmailMessage]:
    out = []
    for p in mail_files(s.mailbox_root, address):
        msg = email.message_from_bytes(p.read_bytes(), policy=email.policy.default)
        if msg.get_content_type() == "multipart/report":
            out.append(msg)
    return out


def delivery_status(report: email.message.EmailMessage) -> list[dict[str, str]]:
    part = next(p for p in report.walk() if p.get_content_type() == "message/delivery-status")
    blocks = part.get_payload()
    return [{k.lower(): str(v) for k, v in b.items()} for b in blocks[1:]]


def test_submission_starttls_to_preferred_mx_with_tls(world):
    s, _, mx1, _ = world
    body = b"From: alice@example.com\r\nTo: x@remote.test\r\nSubject: first-mx\r\n\r\nhi\r\n"
    assert submit(s, "alice@example.com", ["x@remote.test"], body) == {}
    m = find(mx1, b"first-mx")
    assert m is not None, s.log("up")
    assert m.tls  # opportunistic STARTTLS at the MX
    assert m.mail_from == "alice@example.com" and m.rcpts == ["x@remote.test"]
    head = m.data.split(b"\r\n\r\n")[0]
    assert b"with ESMTPSA id" in head
    assert b"Message-ID: <" in head and b"Date: " in head  # added by the MSA


def test_implicit_tls_port(world):
    s, _, mx1, _ = world
    body = b"From: alice@example.com\r\nSubject: implicit\r\nMessage-ID: <i@x>\r\n\r\nhi\r\n"
    submit(s, "alice@example.com", ["y@remote.test"], body, implicit=True)
    m = find(mx1, b"implicit")
    assert m is not None and m.data.count(b"Message-ID:") == 1


def test_auth_rules(world):
    s, *_ = world
    r = Raw(s.msa_port)
    ehlo = r.cmd("EHLO client.test")
    assert "AUTH" not in ehlo and "STARTTLS" in ehlo
    c = smtplib.SMTP("127.0.0.1", s.msa_port, timeout=20)
    c.starttls(context=client_tls())
    c.ehlo("client.test")
    assert sorted(c.esmtp_features["auth"].split()) == [
        "LOGIN", "PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-256-PLUS"]  # no other auth_*
    c.close()
    assert r.cmd("AUTH PLAIN AGFsaWNlQGV4YW1wbGUuY29tAGNvcnJlY3QgaG9yc2U=").startswith("538 5.7.11")
    assert r.cmd("MAIL FROM:<alice@example.com>").startswith("530 5.7.0")
    r.close()
    with pytest.raises(smtplib.SMTPAuthenticationError) as e:
        submit(s, "alice@example.com", ["x@remote.test"], b"x", password="wrong")
    assert e.value.smtp_code == 535 and e.value.smtp_error.startswith(b"5.7.8")
    with pytest.raises(smtplib.SMTPAuthenticationError):
        submit(s, "alice@example.com", ["x@remote.test"], b"x", login="nobody@example.com")
    # PLAIN with an authorization identity that is not the login: refused (RFC 4616 §2).
    c = smtplib.SMTP("127.0.0.1", s.msa_port, timeout=20)
    c.starttls(context=client_tls())
    c.ehlo("client.test")
    import base64
    blob = base64.b64encode(b"bob@example.com\0alice@example.com\0" + PW.encode()).decode()
    code, _ = c.docmd("AUTH", f"PLAIN {blob}")
    assert code == 535
    c.close()


def test_an_eai_address_of_ones_own_is_a_valid_sender(world):
    s, _, mx1, _ = world
    c = smtplib.SMTP("127.0.0.1", s.msa_port, timeout=20)
    c.starttls(context=client_tls())
    c.login("alice@example.com", PW)
    c.sendmail("jörg@example.com", ["x@remote.test"],
               "From: Jörg <jörg@example.com>\r\nSubject: eai\r\n\r\nx\r\n".encode(),
               mail_options=["SMTPUTF8"])
    c.close()
    assert wait_for(lambda: find(mx1, b"Subject: eai") is not None, 20)


def test_sender_must_be_owned(world):
    s, _, mx1, _ = world
    with pytest.raises(smtplib.SMTPSenderRefused) as e:
        submit(s, "bob@example.com", ["x@remote.test"], b"Subject: spoof\r\n\r\nx\r\n")
    assert e.value.smtp_code == 553
    with pytest.raises(smtplib.SMTPDataError) as e:
        submit(s, "alice@example.com", ["x@remote.test"],
               b"From: Boss <bob@example.com>\r\nSubject: spoof2\r\n\r\nx\r\n")
    assert e.value.smtp_code == 553
    # Obsolete syntax that mail readers still show as From: (RFC 5322 4.5.3), folded too.
    for spoof in (b"From : Boss <bob@example.com>", b"from\t:\r\n bob@example.com",
                  b"From: (no address here)"):
        with pytest.raises(smtplib.SMTPDataError) as e:
            submit(s, "alice@example.com", ["x@remote.test"],
                   b"From: alice@example.com\r\n" + spoof + b"\r\nSubject: spoof3\r\n\r\nx\r\n")
        assert e.value.smtp_code == 553, spoof
    # An alias that resolves to the login is hers to send as.
    submit(s, "sales@example.com", ["x@remote.test"],
           b"From: Sales <sales@example.com>\r\nSubject: via-alias\r\n\r\nx\r\n")
    assert find(mx1, b"via-alias") is not None


def test_vrfy_expn_for_authenticated_users_only(world):
    s, *_ = world
    r = Raw(s.msa_port)
    r.cmd("EHLO client.test")
    assert r.cmd("VRFY bob@example.com").startswith("530")  # before AUTH
    r.close()
    c = smtplib.SMTP("127.0.0.1", s.msa_port, timeout=20)
    c.starttls(context=client_tls())
    c.login("alice@example.com", PW)
    assert c.verify("bob@example.com") == (250, b"2.1.5 <bob@example.com>")
    assert c.expn("sales@example.com") == (250, b"2.1.5 <alice@example.com>")
    c.close()


def test_fallback_to_second_mx_when_first_is_down(world):
    s, _, _, mx2 = world
    submit(s, "alice@example.com", ["z@backup.test"],
           b"From: alice@example.com\r\nSubject: backup-route\r\n\r\nx\r\n")
    assert find(mx2, b"backup-route") is not None, s.log("up")


def test_fallback_to_second_mx_on_4xx(world):
    s, _, mx1, mx2 = world
    mx1.handler.rcpt_replies["busy@remote.test"] = ["451 4.3.0 try later"]
    submit(s, "alice@example.com", ["busy@remote.test"],
           b"From: alice@example.com\r\nSubject: after-451\r\n\r\nx\r\n")
    assert find(mx2, b"after-451") is not None
    assert find(mx1, b"after-451", timeout=0.5) is None


def test_implicit_mx_from_a_record(world):
    s, _, _, mx2 = world
    submit(s, "alice@example.com", ["a@nomx.test"],
           b"From: alice@example.com\r\nSubject: implicit-mx\r\n\r\nx\r\n")
    assert find(mx2, b"implicit-mx") is not None


def test_null_mx_bounces_with_5_1_10(world):
    s, *_ = world
    submit(s, "alice@example.com", ["a@nullmx.test"],
           b"From: alice@example.com\r\nSubject: to-null-mx\r\n\r\nx\r\n")
    assert wait_for(lambda: any("a@nullmx.test" in str(r) for r in dsns(s, "alice@example.com")))
    report = next(r for r in dsns(s, "alice@example.com") if "a@nullmx.test" in str(r))
    [st] = [b for b in delivery_status(report) if "a@nullmx.test" in b["final-recipient"]]
    assert st["status"] == "5.1.10" and st["action"] == "failed"


def test_remote_550_gives_a_dsn(world):
    s, _, mx1, _ = world
    mx1.handler.rcpt_replies["nouser@remote.test"] = ["550 5.1.1 no such user"]
    submit(s, "bob@example.com", ["nouser@remote.test", "ok@remote.test"],
           b"From: bob@example.com\r\nSubject: half-bounce\r\n\r\nx\r\n", login="bob@example.com")
    assert find(mx1, b"half-bounce") is not None
    assert wait_for(lambda: dsns(s, "bob@example.com"))
    [report] = dsns(s, "bob@example.com")
    assert report["From"].addresses[0].username == "MAILER-DAEMON"
    assert report.get_param("report-type") == "delivery-status"
    [st] = delivery_status(report)
    assert st["final-recipient"] == "rfc822; nouser@remote.test"
    assert st["status"] == "5.1.1" and st["action"] == "failed"
    assert st["remote-mta"] == "dns; mx1.remote.test"
    assert "550 5.1.1 no such user" in st["diagnostic-code"]
    returned = next(p for p in report.walk() if p.get_content_type() == "message/rfc822")
    assert b"half-bounce" in returned.as_bytes()
    # The DSN itself came from <>.
    raw = mail_files(s.mailbox_root, "bob@example.com")[0].read_bytes()
    assert raw.startswith(b"Return-Path: <>\n")


def test_deferred_twice_then_delivered_with_flush(world):
    s, _, mx1, mx2 = world
    for mx in (mx1, mx2):
        mx.handler.rcpt_replies["slow@remote.test"] = ["451 4.7.1 greylisted", "451 4.7.1 again",
                                                       "250"]
    submit(s, "alice@example.com", ["slow@remote.test"],
           b"From: alice@example.com\r\nSubject: retried\r\n\r\nx\r\n")
    listing = wait_for(lambda: "slow@remote.test" in s.pochta("queue", "list").stdout
                       and s.pochta("queue", "list").stdout, 15)
    assert listing and "451" in listing
    for _ in range(3):
        if find(mx1, b"retried", timeout=0.1) or find(mx2, b"retried", timeout=0.1):
            break
        s.pochta("queue", "flush")
        wait_for(lambda: find(mx1, b"retried", 0) or find(mx2, b"retried", 0), 5)
    assert find(mx1, b"retried", 1) or find(mx2, b"retried", 1)
    assert wait_for(lambda: "slow@remote.test" not in s.pochta("queue", "list").stdout, 10)


def test_no_bounce_to_null_sender(world):
    s, _, mx1, _ = world
    mx1.handler.rcpt_replies["gone@remote.test"] = ["550 5.1.1 gone"]
    before = len(dsns(s, "alice@example.com")) + len(dsns(s, "bob@example.com"))
    with smtplib.SMTP("127.0.0.1", s.mta_port, timeout=15) as c:
        c.sendmail("<>", ["fwd@example.com"], b"Subject: bounce-of-bounce\r\n\r\nx\r\n")
    assert wait_for(lambda: "sender is <>" in s.log("up"), 15)
    assert len(dsns(s, "alice@example.com")) + len(dsns(s, "bob@example.com")) == before


def test_swaks_submission(world):
    s, _, mx1, _ = world
    swaks = shutil.which("swaks")
    if swaks is None:
        pytest.skip("swaks is not installed (apt install swaks)")
    r = subprocess.run([swaks, "--server", "127.0.0.1", "--port", str(s.msa_port), "--tls",
                        "--auth", "PLAIN", "--auth-user", "alice@example.com",
                        "--auth-password", PW, "--from", "alice@example.com",
                        "--to", "swaks@remote.test", "--header", "Subject: via-swaks",
                        "--header", "From: alice@example.com", "--helo", "client.test"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "250 2.0.0 Ok: queued as" in r.stdout
    assert find(mx1, b"via-swaks") is not None


def test_expiry_bounces(tmp_path):
    dns_server = FakeDNS()
    dns_server.servfail.add("flaky.test.")
    s = stack_with_alice(tmp_path, {"resolver": dns_server.address, "smtp_port": free_port(),
                                    "retry_initial": 1, "retry_max": 1,
                                    "max_queue_lifetime": 2})
    try:
        submit(s, "alice@example.com", ["x@flaky.test"],
               b"From: alice@example.com\r\nSubject: expires\r\n\r\nx\r\n")
        assert wait_for(lambda: dsns(s, "alice@example.com"), 20), s.log("up")
        [report] = dsns(s, "alice@example.com")
        [st] = delivery_status(report)
        assert st["status"] == "4.4.7" and st["action"] == "failed"
    finally:
        s.stop_all()
        dns_server.close()


def raw_send(port: int, lines: list[str], body: bytes) -> None:
    r = Raw(port)
    r.cmd("EHLO client.test")
    for line in lines:
        reply = r.cmd(line)
        assert reply.startswith("250"), (line, reply)
    assert r.cmd("DATA").startswith("354")
    r.send(body + b".\r\n")
    assert r.reply().startswith("250 2.0.0")
    r.close()


def test_dsn_extension_success_and_hdrs(world):
    s, _, mx1, _ = world
    assert "250-DSN" in Raw(s.mta_port).cmd("EHLO client.test")
    raw_send(s.mta_port, ["MAIL FROM:<bob@example.com> RET=HDRS ENVID=Env+2BId-42",
                          "RCPT TO:<alice@example.com> NOTIFY=SUCCESS,FAILURE "
                          "ORCPT=rfc822;Alice@Example.com"],
             b"Subject: dsn-success\r\n\r\nsecret body\r\n")
    report = wait_for(lambda: next((r for r in dsns(s, "bob@example.com")
                                    if "dsn-success" in str(r)), None))
    assert report is not None, s.log("up")
    assert report["Subject"] == "Successful Mail Delivery Report"
    part = next(p for p in report.walk() if p.get_content_type() == "message/delivery-status")
    first = part.get_payload()[0]
    assert first["Original-Envelope-Id"] == "Env+2BId-42"
    [st] = delivery_status(report)
    assert st["action"] == "delivered" and st["status"] == "2.0.0"
    assert st["original-recipient"] == "rfc822;Alice@Example.com"
    assert not any(p.get_content_type() == "message/rfc822" for p in report.walk())
    assert "secret body" not in str(report)  # success reports carry headers only


def test_dsn_notify_never_and_ret_hdrs_failure(world):
    s, _, mx1, _ = world
    mx1.handler.rcpt_replies["never@remote.test"] = ["550 5.1.1 gone"]
    mx1.handler.rcpt_replies["hdrs@remote.test"] = ["550 5.1.1 gone"]
    c = smtplib.SMTP("127.0.0.1", s.msa_port, timeout=20)
    c.starttls(context=client_tls())
    c.login("bob@example.com", PW)
    c.sendmail("bob@example.com", ["never@remote.test"],
               b"From: bob@example.com\r\nSubject: notify-never\r\n\r\nx\r\n",
               rcpt_options=["NOTIFY=NEVER"])
    c.quit()
    c = smtplib.SMTP("127.0.0.1", s.msa_port, timeout=20)
    c.starttls(context=client_tls())
    c.login("bob@example.com", PW)
    c.mail("bob@example.com", ["RET=HDRS"])
    c.rcpt("hdrs@remote.test", ["NOTIFY=FAILURE"])
    c.data(b"From: bob@example.com\r\nSubject: ret-hdrs\r\n\r\nbody not returned\r\n")
    c.quit()
    report = wait_for(lambda: next((r for r in dsns(s, "bob@example.com")
                                    if "ret-hdrs" in str(r)), None))
    assert report is not None
    assert any(p.get_content_type() == "text/rfc822-headers" for p in report.walk())
    assert "body not returned" not in str(report)
    assert wait_for(lambda: "to=<never@remote.test> relay=mx1" in s.log("up"), 10)
    time.sleep(1)
    assert not any("notify-never" in str(r) for r in dsns(s, "bob@example.com"))
    c = smtplib.SMTP("127.0.0.1", s.msa_port, timeout=20)
    c.starttls(context=client_tls())
    c.login("bob@example.com", PW)
    assert c.docmd("MAIL", "FROM:<bob@example.com> RET=SOME")[0] == 501
    assert c.docmd("RSET")[0] == 250
    c.mail("bob@example.com")
    assert c.docmd("RCPT", "TO:<x@remote.test> NOTIFY=NEVER,SUCCESS")[0] == 501
    c.quit()


def test_delay_dsn(tmp_path):
    dns_server = FakeDNS()
    dns_server.servfail.add("slowdns.test.")
    s = stack_with_alice(tmp_path, {"resolver": dns_server.address, "smtp_port": free_port(),
                                    "retry_initial": 1, "retry_max": 1, "delay_warning": 1,
                                    "max_queue_lifetime": 600})
    try:
        submit(s, "alice@example.com", ["x@slowdns.test"],
               b"From: alice@example.com\r\nSubject: slow\r\n\r\nx\r\n")
        report = wait_for(lambda: next(iter(dsns(s, "alice@example.com")), None), 20)
        assert report is not None, s.log("up")
        [st] = delivery_status(report)
        assert st["action"] == "delayed" and st["status"].startswith("4.")
        time.sleep(2.5)
        assert len(dsns(s, "alice@example.com")) == 1  # one warning, not one per retry
        assert "x@slowdns.test" in s.pochta("queue", "list").stdout
    finally:
        s.stop_all()
        dns_server.close()


@pytest.mark.parametrize("trusted", [True, False])
def test_smarthost_gets_verified_tls_before_credentials(tmp_path, trusted):
    """TLS to the smarthost is verified by default (its certificate against ca_file and its
    name): with the CA known, mail goes with AUTH; without it, nothing is sent, not even the
    login, and the message waits with a 4.7.5 reason."""
    trustme = pytest.importorskip("trustme")
    from aiosmtpd.smtp import AuthResult, LoginPassword

    ca = trustme.CA()
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.5").configure_cert(ctx)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    logins = []

    def authenticator(server, session, envelope, mechanism, data):
        ok = isinstance(data, LoginPassword) and (data.login, data.password) == \
            (b"relayuser", b"relay secret")
        logins.append((mechanism, ok))
        return AuthResult(success=ok)

    port = free_port("127.0.0.5")
    sink = SinkMX("127.0.0.5", port, tls_context=ctx, authenticator=authenticator)
    delivery = {"smarthost": f"127.0.0.5:{port}", "smarthost_user": "relayuser",
                "smarthost_password": "relay secret",
                "resolver": "127.0.0.1:9"}  # DNS unused with a smarthost
    if trusted:
        delivery["ca_file"] = str(ca_file)
    s = stack_with_alice(tmp_path, delivery)
    try:
        submit(s, "alice@example.com", ["anyone@anywhere.test"],
               b"From: alice@example.com\r\nSubject: via-smarthost\r\n\r\nx\r\n")
        if trusted:
            m = find(sink, b"via-smarthost")
            assert m is not None, s.log("up")
            assert m.tls and m.rcpts == ["anyone@anywhere.test"]
            assert logins and all(ok for _, ok in logins)
        else:
            assert wait_for(lambda: "4.7.5" in s.pochta("queue", "list").stdout, 20), \
                s.log("up")
            assert logins == [] and sink.messages == []
    finally:
        s.stop_all()
        sink.stop()


@pytest.mark.parametrize("password", [False, True])
def test_tls_required_no_accepts_an_unverified_smarthost_only_without_a_password(tmp_path,
                                                                                  password):
    """RFC 8689 §5: "TLS-Required: No" lowers the TLS we require for the message's sake; the
    smarthost's verification still guards a password, and mail without the field."""
    trustme = pytest.importorskip("trustme")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    trustme.CA().issue_cert("127.0.0.5").configure_cert(ctx)  # a CA we do not trust
    port = free_port("127.0.0.5")
    sink = SinkMX("127.0.0.5", port, tls_context=ctx)
    delivery = {"smarthost": f"127.0.0.5:{port}", "resolver": "127.0.0.1:9"}
    if password:
        delivery |= {"smarthost_user": "relayuser", "smarthost_password": "relay secret"}
    s = stack_with_alice(tmp_path, delivery)
    try:
        submit(s, "alice@example.com", ["a@anywhere.test"],
               b"From: alice@example.com\r\nSubject: strict\r\n\r\nx\r\n")
        submit(s, "alice@example.com", ["b@anywhere.test"],
               b"From: alice@example.com\r\nTLS-Required: No\r\nSubject: lax\r\n\r\nx\r\n")
        waiting = lambda: s.pochta("queue", "list").stdout  # noqa: E731
        if password:
            assert wait_for(lambda: waiting().count("4.7.5") == 2, 20), s.log("up")
            assert sink.messages == []
        else:
            m = find(sink, b"Subject: lax")
            assert m is not None and m.tls, s.log("up")  # still encrypted, just not verified
            assert "4.7.5" in waiting() and "a@anywhere.test" in waiting()
            assert find(sink, b"Subject: strict", timeout=0) is None
    finally:
        s.stop_all()
        sink.stop()


def test_help_is_answered_before_auth(world):
    s, _, _, _ = world
    r = Raw(s.msa_port)
    try:
        r.cmd("EHLO client.test")
        listing = r.cmd("HELP")
        assert listing.startswith("250 2.0.0 Supported commands") and "ETRN" not in listing
        assert r.cmd("ETRN example.com").startswith("502 5.5.1")  # port 25 only
        assert r.cmd("MAIL FROM:<alice@example.com>").startswith("530")  # AUTH still needed
    finally:
        r.close()
