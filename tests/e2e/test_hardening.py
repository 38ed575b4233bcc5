"""Issue 16: paths where a 250'd message or its bounce was lost, repeated or forged, through
the real processes and peers that misbehave on purpose."""

from __future__ import annotations

import email
import email.policy
import smtplib
import time

import pytest

from tests.support.fakes import FakeDNS, ScriptedMX, SinkMX
from tests.support.smtp import Raw, client_tls, server_tls, wait_for
from tests.support.stack import Stack, free_port, mail_files

PW = "correct horse"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """DNS, a scripted raw peer (bad.test), a TLS sink (tls.test), and pochta up."""
    pytest.importorskip("trustme")
    sink_ctx = server_tls("mx.tls.test")
    dns_server = FakeDNS()
    port = free_port("127.0.0.6")
    scripted = ScriptedMX("127.0.0.6", port)
    tls_sink = SinkMX("127.0.0.7", port, tls_context=sink_ctx)
    z = dns_server.add
    z("bad.test", "MX", "10 mx.bad.test.")
    z("mx.bad.test", "A", "127.0.0.6")
    z("tls.test", "MX", "10 mx.tls.test.")
    z("mx.tls.test", "A", "127.0.0.7")
    base = tmp_path_factory.mktemp("hardening")
    s = Stack(base, delivery={"resolver": dns_server.address, "smtp_port": port,
                              "retry_initial": 1, "retry_max": 2})
    s.setup_users("example.com", "alice@example.com", "bob@example.com", password=PW)
    s.pochta("alias", "add", "team@example.com", "bob@example.com", "far@tls.test")
    s.start("up", listen=[s.mda_listen, f"127.0.0.1:{s.mta_port}", f"127.0.0.1:{s.msa_port}"])
    yield s, scripted, tls_sink
    s.stop_all()
    scripted.stop()
    tls_sink.stop()
    dns_server.close()


def submit(s: Stack, sender: str, rcpts: list[str], body: bytes, **options) -> dict:
    with smtplib.SMTP("127.0.0.1", s.msa_port, timeout=20) as c:
        c.starttls(context=client_tls())
        c.login(sender, PW)
        return c.sendmail(sender, rcpts, body, **options)


def reports(s: Stack, address: str, marker: str) -> list[email.message.EmailMessage]:
    out = []
    for p in mail_files(s.mailbox_root, address):
        msg = email.message_from_bytes(p.read_bytes(), policy=email.policy.default)
        if msg.get_content_type() == "multipart/report" and marker in str(msg):
            out.append(msg)
    return out


def status_fields(report: email.message.EmailMessage) -> list[dict[str, str]]:
    part = next(p for p in report.walk() if p.get_content_type() == "message/delivery-status")
    return [{k.lower(): str(v) for k, v in b.items()} for b in part.get_payload()[1:]]


# -- item 13: a second EHLO after STARTTLS (RFC 3207 §4.2) ----------------------------------

def test_8bit_smtputf8_and_dsn_pass_through_a_starttls_receiver(world):
    s, _, sink = world
    body = "From: alice@example.com\r\nSubject: eightbit-tls\r\n\r\nGrüße\r\n".encode()
    submit(s, "alice@example.com", ["x@tls.test"], body, mail_options=["BODY=8BITMIME"],
           rcpt_options=["NOTIFY=FAILURE"])
    m = wait_for(lambda: next((m for m in sink.messages if b"eightbit-tls" in m.data), None))
    assert m is not None, s.log("up")
    assert m.tls and "BODY=8BITMIME" in m.mail_options
    utf8 = b"From: alice@example.com\r\nSubject: utf8-tls\r\n\r\nhi\r\n"
    submit(s, "alice@example.com", ["jörg@tls.test"], utf8, mail_options=["SMTPUTF8"])
    m = wait_for(lambda: next((m for m in sink.messages if b"utf8-tls" in m.data), None))
    assert m is not None, s.log("up")
    assert m.rcpts == ["jörg@tls.test"] and "SMTPUTF8" in m.mail_options


# -- item 1: bounces from any peer reply, and never lost -------------------------------------

def test_a_multiline_non_utf8_refusal_bounces_with_a_clean_report(world):
    s, scripted, _ = world
    scripted.replies["RCPT"] = (b"550-5.1.1 first line \xff\xfe not UTF-8\r\n"
                                b"550-second\tline \x1b[31m\r\n"
                                b"550 5.1.1 " + b"x" * 2000 + b"\r\n")
    try:
        submit(s, "alice@example.com", ["gone@bad.test"],
               b"From: alice@example.com\r\nSubject: multiline-bounce\r\n\r\nx\r\n")
        assert wait_for(lambda: reports(s, "alice@example.com", "gone@bad.test")), s.log("up")
    finally:
        scripted.replies.pop("RCPT")
    [report] = reports(s, "alice@example.com", "gone@bad.test")
    [fields] = status_fields(report)
    assert fields["action"] == "failed" and fields["status"] == "5.1.1"
    diag = fields["diagnostic-code"]
    assert diag.isascii() and "\n" not in diag and "\x1b" not in diag
    assert "first line" in diag and "second line" in diag and len(diag) < 600
    # One log line per event: the peer's lines joined, nothing of them on a line of its own.
    assert "\n550" not in s.log("up") and "second line" in s.log("up")


def test_the_original_stays_queued_until_its_bounce_is_spooled(tmp_path):
    """Disk full when the bounce is due: the original is kept and the bounce comes later."""
    import subprocess

    spool = tmp_path / "spool"
    spool.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(spool)]).returncode:
        pytest.skip("cannot mount a tmpfs here")
    dns_server = FakeDNS()
    port = free_port("127.0.0.8")
    peer = ScriptedMX("127.0.0.8", port)
    peer.replies["RCPT"] = b"451 4.3.0 not now\r\n"
    dns_server.add("far.test", "MX", "10 mx.far.test.")
    dns_server.add("mx.far.test", "A", "127.0.0.8")
    # min_free_space 0: the spool is a 3 MB tmpfs, under the 100 MB default.
    s = Stack(tmp_path / "data", top={"spool_dir": str(spool)}, mta={"min_free_space": 0},
              delivery={"resolver": dns_server.address, "smtp_port": port,
                        "retry_initial": 1, "retry_max": 1})
    filler = spool / "filler"
    try:
        s.setup_users("example.com", "alice@example.com", password=PW)
        s.start("up", listen=[s.mda_listen, f"127.0.0.1:{s.mta_port}", f"127.0.0.1:{s.msa_port}"])
        submit(s, "alice@example.com", ["x@far.test"],
               b"From: alice@example.com\r\nSubject: kept\r\n\r\nx\r\n")
        assert wait_for(lambda: "not now" in s.log("up")), s.log("up")
        with open(filler, "wb") as f, pytest.raises(OSError):  # the disk is full from here on
            for _ in range(1000):
                f.write(b"\0" * 65536)
                f.flush()
        peer.replies["RCPT"] = b"550 5.1.1 no such user\r\n"
        assert wait_for(lambda: "cannot queue the sender's report" in s.log("up")), s.log("up")
        queued = [p.name for p in spool.iterdir()]
        assert [n for n in queued if n.endswith(".msg")], queued  # still queued
        filler.unlink()
        assert wait_for(lambda: reports(s, "alice@example.com", "x@far.test")), s.log("up")
        assert wait_for(lambda: not [p for p in spool.iterdir() if p.name.endswith(".msg")])
    finally:
        s.stop_all()
        peer.stop()
        dns_server.close()
        subprocess.run(["umount", "-l", str(spool)])


# -- item 2: parameters checked at the door; a courier's fault defers only its recipients ---

def test_command_lines_with_bad_bytes_or_orcpt_are_refused_at_the_door(world):
    s, *_ = world
    r = Raw(s.mta_port)
    r.send(b"EHLO caf\xe9.test\r\n")  # Latin-1, not UTF-8
    assert r.reply().startswith("501 5.5.4")
    r.send(b"EHLO a\rb.test\r\n")  # a bare CR inside the line
    assert r.reply().startswith("500 5.5.2")
    assert r.cmd("EHLO client.test").startswith("250")
    assert r.cmd("MAIL FROM:<x@remote.test> SMTPUTF8").startswith("250")
    assert r.cmd("RCPT TO:<bob@example.com> ORCPT=rfc822;jörg@example.com").startswith("501 5.5.4")
    assert r.cmd("RCPT TO:<bob@example.com> ORCPT=rfc822").startswith("501 5.5.4")
    r.send(b"RCPT TO:<bob@example.com> ORCPT=rfc822;\xff@x\r\n")
    assert r.reply().startswith("501 5.5.4")
    assert r.cmd("RCPT TO:<bob@example.com> ORCPT=rfc822;bob+2B1@example.com").startswith("250")
    r.close()


def test_a_command_repeated_past_its_limit_ends_the_session(world):
    """Call limits (mta/smtp/protocol.py CALL_LIMITS): the 101st NOOP gets 421 and the close;
    other verbs have counts of their own."""
    s, *_ = world
    r = Raw(s.mta_port)
    assert r.cmd("EHLO client.test").startswith("250")
    for _ in range(100):
        assert r.cmd("NOOP").startswith("250")
    assert r.cmd("RSET").startswith("250")
    assert r.cmd("NOOP") == "421 4.7.0 NOOP sent too many times"
    with pytest.raises(ConnectionError):
        r.reply()
    r.close()


def test_a_fault_in_remote_delivery_never_redelivers_the_local_copies(tmp_path):
    """An item queued by an earlier version with a non-ASCII ORCPT (aiosmtplib raises on it):
    the local recipient gets one copy, the remote one is deferred, counted and expires."""
    import time as _time

    from mta.envelope import Envelope, Recipient, new_id
    from mta.spool import Spool

    dns_server = FakeDNS()
    port = free_port("127.0.0.9")
    peer = ScriptedMX("127.0.0.9", port)  # advertises DSN: ORCPT would be passed on
    dns_server.add("far.test", "MX", "10 mx.far.test.")
    dns_server.add("mx.far.test", "A", "127.0.0.9")
    s = Stack(tmp_path, delivery={"resolver": dns_server.address, "smtp_port": port,
                                  "retry_initial": 1, "retry_max": 1, "max_queue_lifetime": 10})
    try:
        s.setup_users("example.com", "alice@example.com", "bob@example.com", password=PW)
        now = _time.time()
        env = Envelope(id=new_id(), created=now, mail_from="alice@example.com", recipients=[
            Recipient("bob@example.com", "bob@example.com", next_attempt=now),
            Recipient("x@far.test", "x@far.test", orcpt="rfc822;jörg@far.test",
                      next_attempt=now)])
        Spool(tmp_path / "spool").put(env, b"From: alice@example.com\r\nSubject: old-item"
                                      b"\r\n\r\nx\r\n")
        s.start("up")
        assert wait_for(lambda: reports(s, "alice@example.com", "x@far.test"), 30), s.log("up")
        [report] = reports(s, "alice@example.com", "x@far.test")
        [fields] = status_fields(report)
        assert fields["action"] == "failed" and fields["status"] == "4.4.7"
        copies = [p for p in mail_files(s.mailbox_root, "bob@example.com")
                  if b"old-item" in p.read_bytes()]
        assert len(copies) == 1, s.log("up")
        attempts = [ln for ln in s.log("up").splitlines() if "to=<x@far.test>" in ln]
        assert len(attempts) >= 2 and "status=expired" in attempts[-1], s.log("up")
    finally:
        s.stop_all()
        peer.stop()
        dns_server.close()


# -- item 4: a slow destination holds its own slots only -------------------------------------

def test_a_tarpit_destination_stalls_neither_local_delivery_nor_other_domains(tmp_path):
    """40 messages to a domain whose MX never greets: at most 4 connections to it, and a
    message for a local mailbox and another domain, sent after them, is delivered at once."""
    dns_server = FakeDNS()
    port = free_port("127.0.0.11")
    tarpit = ScriptedMX("127.0.0.11", port)
    tarpit.silent.add("greeting")
    sink = SinkMX("127.0.0.12", port)
    dns_server.add("slow.test", "MX", "10 mx.slow.test.")
    dns_server.add("mx.slow.test", "A", "127.0.0.11")
    dns_server.add("fast.test", "MX", "10 mx.fast.test.")
    dns_server.add("mx.fast.test", "A", "127.0.0.12")
    s = Stack(tmp_path, delivery={"resolver": dns_server.address, "smtp_port": port})
    try:
        s.setup_users("example.com", "alice@example.com", "bob@example.com", password=PW)
        s.start("up", listen=[s.mda_listen, f"127.0.0.1:{s.msa_port}"])
        with smtplib.SMTP("127.0.0.1", s.msa_port, timeout=20) as c:
            c.starttls(context=client_tls())
            c.login("alice@example.com", PW)
            for i in range(40):
                c.sendmail("alice@example.com", [f"u{i}@slow.test"],
                           f"From: alice@example.com\r\nSubject: slow {i}\r\n\r\nx\r\n")
            c.sendmail("alice@example.com", ["bob@example.com", "far@fast.test"],
                       b"From: alice@example.com\r\nSubject: sentinel\r\n\r\nx\r\n")
        assert wait_for(lambda: any(b"sentinel" in p.read_bytes() for p in
                                    mail_files(s.mailbox_root, "bob@example.com")), 20), \
            s.log("up")
        assert wait_for(lambda: any(b"sentinel" in m.data for m in sink.messages), 20)
        assert 1 <= tarpit.connections <= 4
    finally:
        s.stop_all()
        tarpit.stop()
        sink.stop()
        dns_server.close()


def test_many_messages_found_at_start_for_a_local_domain_are_all_delivered(tmp_path):
    """At start the runner does not know yet that example.com is ours: the first attempts
    are limited as for any destination, and once routing says local, every message parked
    behind them goes (none waits for a slot nobody will free)."""
    from mta.envelope import Envelope, Recipient, new_id
    from mta.spool import Spool

    s = Stack(tmp_path)
    try:
        s.setup_users("example.com", "bob@example.com", password=PW)
        spool = Spool(tmp_path / "spool")
        now = time.time()
        for i in range(60):
            spool.put(Envelope(new_id(), now, "a@remote.test", [
                Recipient("bob@example.com", "bob@example.com", next_attempt=now)]),
                f"Subject: found {i}\r\n\r\nx\r\n".encode())
        s.start("up", listen=[s.mda_listen])
        assert wait_for(lambda: len(mail_files(s.mailbox_root, "bob@example.com")) >= 60, 30), \
            s.log("up")
        assert wait_for(lambda: spool.ids() == [], 10)
    finally:
        s.stop_all()


# -- exactly once: a delivery made just before a crash is not made again ---------------------

def test_a_copy_delivered_just_before_a_crash_is_not_delivered_again(tmp_path):
    """The runner died after the MDA stored bob's copy and before it recorded that: after the
    restart the message is found in the spool and retried; the MDA recognises bob's copy
    (same queue id and recipient) and makes amy's only."""
    from mta.envelope import Envelope, Recipient, new_id
    from mta.spool import Spool
    from tests.support.lmtp_raw import RawLMTP
    from tests.support.smtp import send

    s = Stack(tmp_path)
    try:
        s.setup_users("example.com", "bob@example.com", "amy@example.com", password=PW)
        qid = new_id()
        body = b"From: alice@remote.test\r\nSubject: once\r\n\r\nx\r\n"
        s.start("mda")
        c = RawLMTP(s.mda_listen)  # the attempt of the runner that then died
        c.cmd("LHLO mx.pochta.test")
        assert c.cmd(f"MAIL FROM:<alice@remote.test> XQUEUEID={qid}").startswith("250")
        assert c.cmd("RCPT TO:<bob@example.com>").startswith("250")
        c.send_data(f"BDAT {len(body)} LAST\r\n".encode() + body)
        assert c.reply().startswith("250 2.0.0")
        c.close()
        s.stop("mda")
        now = time.time()
        Spool(tmp_path / "spool").put(Envelope(qid, now, "alice@remote.test", [
            Recipient("bob@example.com", "bob@example.com", next_attempt=now),
            Recipient("amy@example.com", "amy@example.com", next_attempt=now)]), body)
        s.start("up", listen=[s.mda_listen, f"127.0.0.1:{s.mta_port}"])
        send(s, "x@remote.test", ["bob@example.com"], b"Subject: sentinel\r\n\r\ny\r\n")
        assert wait_for(lambda: any(b"sentinel" in p.read_bytes() for p in
                                    mail_files(s.mailbox_root, "bob@example.com")), 20)
        assert wait_for(lambda: Spool(tmp_path / "spool").ids() == [], 10)
        copies = {a: [p for p in mail_files(s.mailbox_root, a) if b"Subject: once" in p.read_bytes()]
                  for a in ("bob@example.com", "amy@example.com")}
        assert {a: len(c) for a, c in copies.items()} == {"bob@example.com": 1,
                                                          "amy@example.com": 1}, s.log("up")
        assert "already delivered" in s.log("up")
    finally:
        s.stop_all()


# -- item 9: implicit TLS is limited before its handshake -------------------------------------

def test_implicit_tls_connections_count_before_their_handshake(tmp_path):
    """Connections to 465 that never send a ClientHello count against the per-address limit
    (they used to wait uncounted for asyncio's 60 s handshake timeout): beyond it a stranger's
    next one is closed at once, while others still get their TLS session."""
    import socket

    s = Stack(tmp_path, msa={"max_connections_per_ip": 5},
              checks={"local_networks": ["127.0.0.1/32"]})
    try:
        s.setup_users("example.com", "alice@example.com", password=PW)
        s.start("msa", listen=[f"127.0.0.1:{s.msa_tls_port}"])
        silent = [socket.create_connection(("127.0.0.1", s.msa_tls_port), timeout=10,
                                           source_address=("127.0.0.2", 0)) for _ in range(5)]
        extra = socket.create_connection(("127.0.0.1", s.msa_tls_port), timeout=10,
                                         source_address=("127.0.0.2", 0))
        assert extra.recv(100) == b""  # closed without a handshake
        extra.close()
        with smtplib.SMTP_SSL("127.0.0.1", s.msa_tls_port, timeout=10,
                              context=client_tls()) as c:
            assert c.noop()[0] == 250
        for sock in silent:
            sock.close()
        assert wait_for(lambda: _tls_greeting(s.msa_tls_port, "127.0.0.2"), 10)
    finally:
        s.stop_all()


def _tls_greeting(port: int, source: str) -> bool:
    import socket

    try:
        raw = socket.create_connection(("127.0.0.1", port), timeout=5,
                                       source_address=(source, 0))
        with client_tls().wrap_socket(raw) as tls:
            return tls.recv(100).startswith(b"220")
    except OSError:
        return False


# -- peers that misbehave: a 421 mid-transaction, a reset mid-DATA ---------------------------

def test_a_peer_that_says_421_or_resets_mid_data_gets_the_message_once_later(tmp_path):
    """Temporary, both: no bounce, retried, and the peer ends up with exactly one copy."""
    dns_server = FakeDNS()
    port = free_port("127.0.0.13")
    peer = ScriptedMX("127.0.0.13", port)
    peer.plan = ["421-at-rcpt", "reset-in-data"]
    dns_server.add("flaky.test", "MX", "10 mx.flaky.test.")
    dns_server.add("mx.flaky.test", "A", "127.0.0.13")
    s = Stack(tmp_path, delivery={"resolver": dns_server.address, "smtp_port": port,
                                  "retry_initial": 1, "retry_max": 1})
    try:
        s.setup_users("example.com", "alice@example.com", password=PW)
        s.start("up", listen=[s.mda_listen, f"127.0.0.1:{s.msa_port}"])
        submit(s, "alice@example.com", ["x@flaky.test"],
               b"From: alice@example.com\r\nSubject: flaky-peer\r\n\r\n" + (b"y" * 70 + b"\r\n") * 80)
        assert wait_for(lambda: any(b"flaky-peer" in m for m in peer.messages), 30), s.log("up")
        assert peer.connections == 3 and len(peer.messages) == 1
        log = s.log("up")
        assert "421 4.3.2" in log and log.count("status=deferred") == 2, log
        assert not reports(s, "alice@example.com", "x@flaky.test")  # no bounce
    finally:
        s.stop_all()
        peer.stop()
        dns_server.close()


def test_a_tls_handshake_that_never_finishes_is_given_up_and_the_message_goes_plain(tmp_path):
    """The peer says 220 to STARTTLS and then nothing: the attempt ends at the STARTTLS time
    limit (scaled down here: delivery.timeout_scale), and the message goes in clear text,
    once, as opportunistic TLS allows."""
    dns_server = FakeDNS()
    port = free_port("127.0.0.14")
    peer = ScriptedMX("127.0.0.14", port)
    peer.plan = ["tls-silent"]
    dns_server.add("stall.test", "MX", "10 mx.stall.test.")
    dns_server.add("mx.stall.test", "A", "127.0.0.14")
    s = Stack(tmp_path, delivery={"resolver": dns_server.address, "smtp_port": port,
                                  "timeout_scale": 0.01})  # STARTTLS: 3 s instead of 5 min
    try:
        s.setup_users("example.com", "alice@example.com", password=PW)
        s.start("up", listen=[s.mda_listen, f"127.0.0.1:{s.msa_port}"])
        submit(s, "alice@example.com", ["x@stall.test"],
               b"From: alice@example.com\r\nSubject: tls-stall\r\n\r\nx\r\n")
        assert wait_for(lambda: any(b"tls-stall" in m for m in peer.messages), 30), s.log("up")
        assert len(peer.messages) == 1 and peer.connections == 2
        assert "STARTTLS failed" in s.log("up")
    finally:
        s.stop_all()
        peer.stop()
        dns_server.close()


# -- item 5: what the MTA accepts, the MDA accepts --------------------------------------------

def test_a_message_at_the_size_limit_is_delivered_with_the_headers_we_add(tmp_path):
    """The MTA takes a message just under its limit and adds Received: the MDA, whose own
    limit is the same number, must still take it (it allows for what we prepend) rather
    than refuse it after we said 250 (a bounce of mail we accepted)."""
    from tests.support.smtp import send

    s = Stack(tmp_path, mta={"max_message_size": 100_000}, mda={"max_message_size": 100_000})
    try:
        s.setup_users("example.com", "bob@example.com", password=PW)
        s.start("up", listen=[s.mda_listen, f"127.0.0.1:{s.mta_port}"])
        body = b"Subject: at-the-limit\r\n\r\n" + (b"q" * 98 + b"\r\n") * 995
        assert 99_000 < len(body) < 100_000
        send(s, "a@remote.test", ["bob@example.com"], body)
        assert wait_for(lambda: any(b"at-the-limit" in p.read_bytes() for p in
                                    mail_files(s.mailbox_root, "bob@example.com")), 20), \
            s.log("up")
    finally:
        s.stop_all()
