"""The MTA end to end: `pochta up` on loopback, smtplib and raw sockets as clients."""

from __future__ import annotations

import json
import os
import smtplib
import ssl
import time

import pytest

from tests.support.smtp import Raw, mailbox, send, wait_for, wait_mail
from tests.support.stack import Stack

DOMAIN = "example.com"


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = Stack(tmp_path_factory.mktemp("mta"), mta={"max_recipients": 5, "max_message_size": 2000000,
                                                  "max_connections_per_ip": 8},
              checks={"local_networks": ["127.0.0.1/32"], "pregreet": False})  # 127.0.0.2: a stranger
    s.setup_users(DOMAIN, "bob@example.com", "amy@example.com", "ünï@example.com",
                  "postmaster@example.com")
    s.pochta("domain", "add", "catchall.test")
    s.pochta("user", "add", "boss@catchall.test", "--password-stdin", stdin="pw\n")
    s.pochta("alias", "add", "@catchall.test", "boss@catchall.test")
    s.pochta("alias", "add", "team@example.com", "bob@example.com", "amy@example.com")
    s.start("up")
    yield s
    s.stop_all()


def test_banner_and_ehlo(stack):
    r = Raw(stack.mta_port)
    assert r.greeting == "220 mx.pochta.test ESMTP"
    ehlo = r.cmd("EHLO client.test").splitlines()
    keywords = {line[4:].split()[0] for line in ehlo[1:]}
    assert {"SIZE", "PIPELINING", "8BITMIME", "SMTPUTF8", "ENHANCEDSTATUSCODES", "STARTTLS",
            "HELP"} <= keywords
    assert "AUTH" not in keywords  # no AUTH on port 25
    assert "250-SIZE 2000000" in ehlo
    assert r.cmd("HELO client.test").startswith("250 ")
    assert r.cmd("NOOP") == "250 2.0.0 OK"
    assert r.cmd("RSET") == "250 2.0.0 OK"
    assert r.cmd("TURN").startswith("502 5.5.1")
    assert r.cmd("QUIT").startswith("221 2.0.0")


def test_user_alias_subaddress_catchall(stack):
    body = b"Subject: fan-out\r\nMessage-ID: <fan@x>\r\n\r\nhello\r\n"
    assert send(stack, "s@remote.test", ["team@example.com", "Bob+Tag@Example.com",
                                         "anything@catchall.test"], body) == {}
    [amy] = wait_mail(stack, "amy@example.com", 1)
    bob = wait_mail(stack, "bob@example.com", 2)
    [boss] = wait_mail(stack, "boss@catchall.test", 1)
    assert amy.endswith(b"Subject: fan-out\nMessage-ID: <fan@x>\n\nhello\n")
    assert b"Received: from client.test ([127.0.0.1])\n\tby mx.pochta.test (pochta) with ESMTP id" \
        in amy
    assert b"for <" not in amy  # no recipient in the trace header: Bcc stays private
    assert sorted(m.split(b"\n")[1] for m in bob) == \
        [b"Delivered-To: bob+tag@example.com", b"Delivered-To: bob@example.com"]
    assert boss.startswith(b"Return-Path: <s@remote.test>\nDelivered-To: boss@catchall.test\n")


def test_unknown_user_and_relay_tricks(stack):
    r = Raw(stack.mta_port)
    r.cmd("EHLO client.test")
    assert r.cmd("MAIL FROM:<s@remote.test>").startswith("250 2.1.0")
    assert r.cmd("RCPT TO:<nobody@example.com>").startswith("550 5.1.1")
    assert r.cmd("RCPT TO:<victim@foreign.test>").startswith("554 5.7.1")
    for trick in ["<victim%foreign.test@example.com>", "<foreign.test!victim@example.com>",
                  "<@example.com:victim@foreign.test>", "<@example.com,@x.test:bob@example.com>",
                  '<"victim@foreign.test"@example.com>', "<bob@[127.0.0.1]>",
                  "<victim@foreign.test@example.com>"]:
        reply = r.cmd(f"RCPT TO:{trick}")
        assert reply.startswith(("554 5.7.1", "553 5.1.3")), (trick, reply)
    assert r.cmd("DATA").startswith("503 5.5.1")
    r.close()


def test_size_and_recipient_limits(stack):
    r = Raw(stack.mta_port)
    r.cmd("EHLO client.test")
    assert r.cmd("MAIL FROM:<s@remote.test> SIZE=9999999").startswith("552")
    assert r.cmd("MAIL FROM:<s@remote.test>").startswith("250")
    replies = [r.cmd("RCPT TO:<bob@example.com>") for _ in range(6)]
    assert all(x.startswith("250") for x in replies[:5]) and replies[5].startswith("452 4.5.3")
    assert r.cmd("DATA").startswith("354")
    r.send(b"Subject: big\r\n\r\n" + (b"x" * 900 + b"\r\n") * 2300 + b".\r\n")
    assert r.reply().startswith("552 5.3.4")
    assert r.cmd("MAIL FROM:<s@remote.test>").startswith("250")  # session goes on
    r.close()


def test_vrfy_expn_disabled_by_default(stack):
    r = Raw(stack.mta_port)
    r.cmd("EHLO client.test")
    assert r.cmd("VRFY bob@example.com").startswith("252 2.5.0")
    assert r.cmd("EXPN team@example.com").startswith("502 5.5.1")
    r.close()


def test_vrfy_expn_enabled(tmp_path):
    s = Stack(tmp_path, mta={"vrfy": True, "expn": True})
    s.setup_users(DOMAIN, "bob@example.com", "amy@example.com")
    s.pochta("alias", "add", "team@example.com", "bob@example.com", "amy@example.com")
    s.start("mta")
    try:
        r = Raw(s.mta_port)
        r.cmd("EHLO client.test")
        assert r.cmd("VRFY Bob@example.com") == "250 2.1.5 <bob@example.com>"
        assert r.cmd("VRFY nobody@example.com").startswith("550 5.1.1")
        assert r.cmd("EXPN team@example.com") == \
            "250-2.1.5 <bob@example.com>\n250 2.1.5 <amy@example.com>"
        assert r.cmd("EXPN bob@example.com").startswith("550 5.1.1")
    finally:
        s.stop_all()


def test_pipelined_transactions(stack):
    before_bob = len(mailbox(stack, "bob@example.com"))
    before_amy = len(mailbox(stack, "amy@example.com"))
    r = Raw(stack.mta_port)
    r.cmd("EHLO client.test")
    r.send(b"MAIL FROM:<s@remote.test>\r\nRCPT TO:<bob@example.com>\r\n"
           b"RCPT TO:<nobody@example.com>\r\nDATA\r\n")
    assert [r.reply()[:3] for _ in range(4)] == ["250", "250", "550", "354"]
    # The end of DATA and the whole next transaction in one write.
    r.send(b"Subject: p1\r\n\r\none\r\n.\r\nMAIL FROM:<s@remote.test>\r\n"
           b"RCPT TO:<amy@example.com>\r\nDATA\r\n")
    assert [r.reply()[:3] for _ in range(4)] == ["250", "250", "250", "354"]
    r.send(b"Subject: p2\r\n\r\ntwo\r\n.\r\nQUIT\r\n")
    assert r.reply().startswith("250 2.0.0 Ok: queued as ")
    assert r.reply().startswith("221")
    assert wait_mail(stack, "bob@example.com", before_bob + 1)
    assert wait_mail(stack, "amy@example.com", before_amy + 1)


def test_pipelined_group_without_data_gets_every_reply(stack):
    # Replies to pipelined commands wait for the last one of the group (one send): a group
    # that ends without DATA must still get all of them, in order, and errors included.
    r = Raw(stack.mta_port)
    r.cmd("EHLO client.test")
    r.send(b"MAIL FROM:<s@remote.test>\r\nRCPT TO:<nobody@example.com>\r\n"
           b"RCPT TO:<bob@example.com>\r\nBOGUS\r\nRCPT TO:<amy@example.com>\r\n")
    assert [r.reply()[:9] for _ in range(5)] == [
        "250 2.1.0", "550 5.1.1", "250 2.1.5", "500 5.5.2", "250 2.1.5"]
    r.send(b"RSET\r\nQUIT\r\n")
    assert r.reply().startswith("250") and r.reply().startswith("221")


def test_smtputf8_and_8bit_byte_for_byte(stack):
    body = ("From: Ünï <ünï@example.com>\r\nSubject: ça marche ☕\r\nMessage-ID: <u8@x>\r\n\r\n"
            "Grüße, 8-bit body ✓\r\n").encode() + b"raw latin-1 \xe9\xff\r\n"
    r = Raw(stack.mta_port)
    r.cmd("EHLO client.test")
    assert r.cmd("MAIL FROM:<sénder@remote.test> SMTPUTF8 BODY=8BITMIME").startswith("250")
    assert r.cmd("RCPT TO:<ÜNÏ@example.com>").startswith("250")
    assert r.cmd("DATA").startswith("354")
    r.send(body + b".\r\n")
    assert r.reply().startswith("250 2.0.0")
    [got] = wait_mail(stack, "ünï@example.com", 1)
    assert got.startswith("Return-Path: <sénder@remote.test>\nDelivered-To: ünï@example.com\n"
                          .encode())
    assert got.endswith(body.replace(b"\r\n", b"\n"))
    assert b"with UTF8SMTP id" in got


@pytest.mark.parametrize("variant", [b"\n.\n", b"\n.\r\n", b"\r.\r", b"\r\n.\n", b"\r.\r\n",
                                     b"\n.\r"])
def test_smuggling_delivers_nothing(stack, variant):
    marker = f"smuggle-{variant.hex()}".encode()
    r = Raw(stack.mta_port)
    r.cmd("EHLO client.test")
    r.cmd("MAIL FROM:<s@remote.test>")
    r.cmd("RCPT TO:<postmaster@example.com>")
    assert r.cmd("DATA").startswith("354")
    r.send(b"Subject: first " + marker + b"\r\n\r\nfirst" + variant
           + b"MAIL FROM:<evil@remote.test>\r\nRCPT TO:<amy@example.com>\r\nDATA\r\n"
           + b"Subject: smuggled " + marker + b"\r\n\r\nsecond\r\n.\r\n")
    assert r.reply().startswith("554 5.6.0")
    assert r.cmd("NOOP").startswith("250")  # no smuggled command was executed
    r.close()
    # A later, honest message proves the queue ran; nothing of the smuggled kind arrived.
    send(stack, "s@remote.test", ["postmaster@example.com"],
         b"Subject: after " + marker + b"\r\n\r\nok\r\n")
    wait_for(lambda: any(b"after " + marker in m for m in mailbox(stack, "postmaster@example.com")))
    everything = b"".join(p.read_bytes() for p in stack.mailbox_root.rglob("*") if p.is_file())
    assert b"first " + marker not in everything
    assert b"smuggled " + marker not in everything


def test_bare_lf_command_line_refused(stack):
    r = Raw(stack.mta_port)
    r.send(b"EHLO client.test\n")
    assert r.reply().startswith("500 5.5.2")
    r.send(b"NOOP\nQUIT\r\n")  # never split into two commands
    assert r.reply().startswith("500 5.5.2")
    assert r.cmd("NOOP").startswith("250")
    r.close()


def test_starttls_discards_pipelined_plaintext(stack, tmp_path):
    r = Raw(stack.mta_port)
    r.cmd("EHLO client.test")
    r.send(b"STARTTLS\r\nMAIL FROM:<injected@evil.test>\r\n")
    assert r.reply().startswith("220")
    ctx = ssl.create_default_context()
    ctx.load_verify_locations(stack.base / "tls" / "cert.pem")
    ctx.check_hostname = False
    tls = ctx.wrap_socket(r.sock, server_hostname="mx.pochta.test")
    assert tls.version() in ("TLSv1.2", "TLSv1.3")
    r.sock, r.buf = tls, b""
    # The injected MAIL was thrown away: the session starts over and needs EHLO again.
    assert r.cmd("MAIL FROM:<x@remote.test>").startswith("503")
    assert "STARTTLS" not in r.cmd("EHLO client.test")
    assert r.cmd("STARTTLS").startswith("503 5.5.1")
    r.close()


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_tls_below_1_2_refused(stack):
    r = Raw(stack.mta_port)
    r.cmd("EHLO client.test")
    assert r.cmd("STARTTLS").startswith("220")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    try:
        ctx.minimum_version = ssl.TLSVersion.TLSv1
    except ValueError:
        pytest.skip("this OpenSSL cannot even offer TLS 1.1")
    with pytest.raises((ssl.SSLError, OSError)):
        ctx.wrap_socket(r.sock, server_hostname="mx.pochta.test")


def test_starttls_with_configured_certificate(tmp_path):
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    cert = ca.issue_cert("mx.pochta.test")
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "both.pem"))
    cert.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    s = Stack(tmp_path / "d", tls={"cert": str(tmp_path / "cert.pem"),
                                   "key": str(tmp_path / "key.pem")})
    s.setup_users(DOMAIN, "bob@example.com")
    s.start("up")
    try:
        ctx = ssl.create_default_context()
        ca.configure_trust(ctx)
        with smtplib.SMTP("127.0.0.1", s.mta_port, timeout=15) as c:
            c._host = "mx.pochta.test"  # verify the certificate against the MX name
            c.starttls(context=ctx)
            c.ehlo("client.test")
            c.sendmail("s@remote.test", ["bob@example.com"], b"Subject: tls\r\n\r\nsecret\r\n")
        [m] = wait_mail(s, "bob@example.com", 1)
        assert b"with ESMTPS id" in m and b"using TLSv1." in m
    finally:
        s.stop_all()


def test_mail_loop_refused(stack):
    body = b"".join(b"Received: from hop%d.test by hop%d.test; Thu, 1 Jan 2026 00:00:00 +0000\r\n"
                    % (i, i + 1) for i in range(51)) + b"Subject: loop\r\n\r\nx\r\n"
    with pytest.raises(smtplib.SMTPDataError) as e:
        send(stack, "s@remote.test", ["bob@example.com"], body)
    assert e.value.smtp_code == 554 and e.value.smtp_error.startswith(b"5.4.6")


def test_too_many_errors_closes(stack):
    r = Raw(stack.mta_port)
    r.cmd("EHLO client.test")
    r.cmd("MAIL FROM:<s@remote.test>")
    replies = [r.cmd(f"RCPT TO:<nobody{i}@example.com>") for i in range(10)]  # max_errors
    assert all(x.startswith("550 5.1.1") for x in replies)
    assert r.reply().startswith("421 4.7.0")
    with pytest.raises(ConnectionError):
        r.reply()


def test_connection_limit_per_ip(stack):
    """8 sessions per address (here; 50 by default), but none for a trusted network: a local
    application may open as many as it needs (Postfix exempts mynetworks too)."""
    stranger = "127.0.0.2"
    conns = [Raw(stack.mta_port, source=stranger) for _ in range(8)]
    try:
        extra = Raw(stack.mta_port, source=stranger)
        assert extra.greeting.startswith("421 4.7.0")
        conns += [Raw(stack.mta_port) for _ in range(12)]  # trusted 127.0.0.1
        assert all(c.greeting.startswith("220") for c in conns)
    finally:
        for c in conns:
            c.close()
    assert wait_for(lambda: Raw(stack.mta_port, source=stranger).greeting.startswith("220"), 5)


def test_mda_down_mail_waits_then_arrives(tmp_path):
    s = Stack(tmp_path)
    s.setup_users(DOMAIN, "bob@example.com")
    s.start("mta")  # no MDA yet
    try:
        send(s, "s@remote.test", ["bob@example.com"], b"Subject: waits\r\n\r\nx\r\n")
        listing = wait_for(lambda: "4.4.1" in s.pochta("queue", "list").stdout and
                           s.pochta("queue", "list").stdout, 10)
        assert "bob@example.com" in listing
        qid = listing.splitlines()[1].split()[0]
        shown = s.pochta("queue", "show", qid).stdout
        assert "pending" in shown and "MDA not available" in shown
        s.start("mda")
        s.pochta("queue", "flush")
        [m] = wait_mail(s, "bob@example.com", 1)
        assert b"Subject: waits" in m
        assert wait_for(lambda: "0 message(s)" in s.pochta("queue", "list").stdout, 10)
    finally:
        s.stop_all()


def test_queue_delete(tmp_path):
    s = Stack(tmp_path)
    s.setup_users(DOMAIN, "bob@example.com")
    s.start("mta")
    try:
        send(s, "s@remote.test", ["bob@example.com"], b"Subject: doomed\r\n\r\nx\r\n")
        listing = wait_for(lambda: "4.4.1" in s.pochta("queue", "list").stdout and
                           s.pochta("queue", "list").stdout, 10)
        qid = listing.splitlines()[1].split()[0]
        assert s.pochta("queue", "delete", qid).stdout.strip() == f"deleted {qid}"
        r = s.pochta("queue", "delete", qid, check=False)
        assert r.returncode == 1 and "no message" in r.stderr
        r = s.pochta("queue", "show", "../etc", check=False)
        assert r.returncode == 1 and "not a queue id" in r.stderr
        s.start("mda")
        s.pochta("queue", "flush")
        send(s, "s@remote.test", ["bob@example.com"], b"Subject: sentinel\r\n\r\nx\r\n")
        [m] = wait_mail(s, "bob@example.com", 1)  # the flush came first: the sentinel is alone
        assert b"sentinel" in m
    finally:
        s.stop_all()


def test_queue_flush_by_domain(tmp_path):
    """`queue flush --domain` retries that domain's recipients only; without a runner the
    command says so and fails."""
    s = Stack(tmp_path, delivery={"retry_initial": 3600, "retry_max": 3600})  # no retry alone
    s.setup_users(DOMAIN, "bob@example.com")
    s.setup_users("example.org", "carol@example.org")
    r = s.pochta("queue", "flush", check=False)
    assert r.returncode == 1 and "not running" in r.stderr and "Traceback" not in r.stderr
    s.start("mta")  # no MDA: both wait
    try:
        send(s, "s@remote.test", ["bob@example.com"], b"Subject: waits-com\r\n\r\nx\r\n")
        send(s, "s@remote.test", ["carol@example.org"], b"Subject: waits-org\r\n\r\nx\r\n")
        assert wait_for(lambda: s.pochta("queue", "list").stdout.count("4.4.1") == 2, 10)
        r = s.pochta("queue", "flush", "--domain", "exa/mple.org", check=False)
        assert r.returncode == 1 and "not a domain" in r.stderr
        s.start("mda")
        s.pochta("queue", "flush", "--domain", "Example.ORG")
        [m] = wait_mail(s, "carol@example.org", 1)
        assert b"waits-org" in m
        send(s, "s@remote.test", ["bob@example.com"], b"Subject: sentinel\r\n\r\nx\r\n")
        [m] = wait_mail(s, "bob@example.com", 1)
        assert b"sentinel" in m  # example.com's deferred message was not flushed
        s.pochta("queue", "flush")
        got = wait_mail(s, "bob@example.com", 2)
        assert any(b"waits-com" in m for m in got)
    finally:
        s.stop_all()


def test_spool_leftovers_are_cleaned_and_committed_items_delivered(tmp_path):
    """Put items in the spool before start (chasquid t-03): committed ones are delivered."""
    s = Stack(tmp_path)
    s.setup_users(DOMAIN, "bob@example.com")
    from mta.envelope import Envelope, Recipient
    from mta.spool import Spool
    spool = Spool(tmp_path / "spool")
    env = Envelope(id="00000000000001abcdef", created=time.time(), mail_from="s@remote.test",
                   recipients=[Recipient("bob@example.com", "bob@example.com")])
    spool.put(env, b"Subject: pre-existing\r\n\r\nx\r\n")
    # A second item that an attempt left pending: its .json supersedes the envelope line.
    env.id = "00000000000004abcdef"
    spool.put(env, b"Subject: retried\r\n\r\ny\r\n")
    env.recipients[0].attempts = 1
    spool.update(env)
    spool_dir = tmp_path / "spool"
    leftovers = [spool_dir / ".00000000000005abcdef.tmp",  # never renamed
                 spool_dir / "00000000000006abcdef.json"]  # its message removed, then a crash
    for leftover in leftovers:
        leftover.write_bytes(b"Subject: uncommitted\r\n")
        os.utime(leftover, (time.time() - 7200, time.time() - 7200))  # a crash 2 hours ago
    in_flight = spool_dir / ".00000000000003abcdef.tmp"  # e.g. the MSA writing now
    in_flight.write_bytes(b"Subject: being written\r\n")
    (spool_dir / "00000000000007abcdef.msg").write_bytes(b"")  # committed, then its data lost
    s.start("up")
    try:
        got = wait_mail(s, "bob@example.com", 2)
        assert sorted(b"pre-existing" in m for m in got) == [False, True]
        assert any(b"retried" in m for m in got)
        assert wait_for(lambda: not any(p.exists() for p in leftovers), 10)
        assert in_flight.exists()  # young: maybe still being written by another process
        assert wait_for(lambda: sorted(p.name for p in spool_dir.iterdir()) == [
            in_flight.name, "damaged", "runner.heartbeat"], 10)  # both delivered ones left
        listing = s.pochta("queue", "list").stdout
        assert "00000000000007abcdef" in listing and "DAMAGED" in listing, listing
        assert "0 message(s) in the queue, 1 damaged" in listing
        assert s.log("up").count("00000000000007abcdef: damaged queue item") == 1
    finally:
        s.stop_all()


def test_idle_session_gets_421_and_an_active_one_is_not_cut(tmp_path):
    s = Stack(tmp_path, mta={"idle_timeout": 1.0})
    s.setup_users(DOMAIN, "bob@example.com")
    s.start("mta")
    try:
        busy, idle = Raw(s.mta_port), Raw(s.mta_port)
        idle.cmd("EHLO idle.test")
        t0 = time.monotonic()
        for _ in range(6):  # 2.4 s of commands 0.4 s apart: each one moves the deadline
            assert busy.cmd("NOOP").startswith("250")
            time.sleep(0.4)
        assert idle.reply().startswith("421 4.4.2")  # said before closing, not just gone
        assert time.monotonic() - t0 < 15
        with pytest.raises(ConnectionError):
            idle.reply()
        assert busy.cmd("EHLO busy.test").startswith("250")
        busy.close()
    finally:
        s.stop_all()


def test_spool_nearly_full_refuses_at_mail(tmp_path):
    s = Stack(tmp_path, mta={"min_free_space": 10**18})  # more than any disk has free
    s.setup_users(DOMAIN, "bob@example.com")
    s.start("mta")
    try:
        r = Raw(s.mta_port)
        r.cmd("EHLO client.test")
        assert r.cmd("MAIL FROM:<s@remote.test>").startswith("452 4.3.1")
        r.close()
        assert not list((tmp_path / "spool").glob("*.msg"))
    finally:
        s.stop_all()


def test_directory_unreachable_is_temporary(tmp_path):
    s = Stack(tmp_path)
    s.setup_users(DOMAIN, "bob@example.com")
    s.start("mta")
    try:
        db = tmp_path / "pochta.db"
        db.rename(tmp_path / "pochta.db.away")  # the database vanishes under the running MTA
        r = Raw(s.mta_port)
        r.cmd("EHLO client.test")
        r.cmd("MAIL FROM:<s@remote.test>")
        assert r.cmd("RCPT TO:<bob@example.com>").startswith("451 4.3.0")  # never 550
        r.close()
    finally:
        s.stop_all()


def test_large_message_streams_through_the_spool(stack):
    """Over 1 MiB the MTA spills DATA to a file: delivered byte for byte, no leftovers."""
    line = b"0123456789abcdef" * 4 + b"\r\n"
    body = b"Subject: big-one\r\nMessage-ID: <big@x>\r\n\r\n" + line * 18000 + b".dot\r\n"
    assert len(body) > 1 << 20
    size_before = len(mailbox(stack, "amy@example.com"))
    r = Raw(stack.mta_port)
    r.cmd("EHLO client.test")
    r.cmd("MAIL FROM:<s@remote.test>")
    r.cmd("RCPT TO:<amy@example.com>")
    assert r.cmd("DATA").startswith("354")
    r.send(body.replace(b"\r\n.", b"\r\n..") + b".\r\n")
    assert r.reply().startswith("250 2.0.0")
    r.close()
    got = wait_mail(stack, "amy@example.com", size_before + 1)
    big = next(m for m in got if b"big-one" in m)
    assert big.endswith(body.replace(b"\r\n", b"\n"))
    assert not list((stack.base / "spool").glob(".data-*"))


def test_help_per_command_and_the_obsolete_verbs(stack):
    r = Raw(stack.mta_port)
    try:
        r.cmd("EHLO client.test")
        listing = r.cmd("HELP")
        assert listing.startswith("250") and "ETRN" in listing and "SEND" not in listing
        assert r.cmd("HELP ETRN").startswith("250 2.0.0 Syntax: ETRN")
        assert r.cmd("HELP FROB").startswith("501")
        for verb in ("SEND", "SOML", "SAML"):
            assert r.cmd(f"{verb} FROM:<a@b.test>").startswith("502 5.5.1")
        assert r.cmd("NOOP").startswith("250")  # still talking: none counted as unknown
    finally:
        r.close()


def test_queue_hold_release_and_bounce(tmp_path):
    """A held message stays through a flush (a later sentinel arrives, it does not) until
    released; a bounced one comes back to its sender as a DSN at once."""
    s = Stack(tmp_path, delivery={"retry_initial": 3600, "retry_max": 3600})  # no retry alone
    s.setup_users(DOMAIN, "bob@example.com", "alice@example.com")
    s.start("mta")  # no MDA yet: everything waits
    try:
        send(s, "alice@example.com", ["bob@example.com"], b"Subject: kept\r\n\r\nx\r\n")
        send(s, "alice@example.com", ["bob@example.com"], b"Subject: returned\r\n\r\nx\r\n")
        assert wait_for(lambda: s.pochta("queue", "list").stdout.count("4.4.1") == 2, 10)
        listed = json.loads(s.pochta("queue", "list", "--json").stdout)["messages"]
        ids = {m["id"]: m for m in listed}
        shown = {i: (tmp_path / "spool" / f"{i}.msg").read_bytes() for i in ids}
        kept = next(i for i, data in shown.items() if b"Subject: kept" in data)
        returned = next(i for i in ids if i != kept)
        r = s.pochta("queue", "hold", check=False)
        assert r.returncode == 1 and "--all" in r.stderr
        assert s.pochta("queue", "hold", kept).stdout.strip() == f"held {kept}"
        assert wait_for(lambda: [m["id"] for m in json.loads(s.pochta(
            "queue", "list", "--json", "--state", "held").stdout)["messages"]] == [kept], 10)
        s.start("mda")
        s.pochta("queue", "bounce", returned)
        [dsn] = wait_mail(s, "alice@example.com", 1)
        assert b"returned to the sender by the postmaster" in dsn and b"5.0.0" in dsn
        s.pochta("queue", "flush")
        send(s, "alice@example.com", ["bob@example.com"], b"Subject: sentinel\r\n\r\nx\r\n")
        [m] = wait_mail(s, "bob@example.com", 1)
        assert b"sentinel" in m  # the held one did not go with the flush
        s.pochta("queue", "release", "--all")
        got = wait_mail(s, "bob@example.com", 2)
        assert any(b"Subject: kept" in m for m in got)
        assert not any(b"Subject: returned" in m for m in got)
    finally:
        s.stop_all()
