"""Sieve filters in the MDA, vacation replies and forwarding with SRS, through the real
processes (`pochta up`): mail in on port 25, filters set with `pochta sieve`, what leaves
caught by a sink MX on 127.0.0.2, SPF evaluated by pyspf against the test DNS."""

from __future__ import annotations

import re
import smtplib
from concurrent.futures import ThreadPoolExecutor

import dkim
import dns.resolver
import pytest
import spf

from tests.support.fakes import FakeDNS, SinkMX
from tests.support.smtp import wait_for, wait_mail
from tests.support.stack import Stack, free_port

MX_IP = "127.0.0.2"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    dns_server = FakeDNS()
    port = free_port(MX_IP)
    mx = SinkMX(MX_IP, port)
    dns_server.add("remote.test", "MX", "10 mx.remote.test.")
    dns_server.add("mx.remote.test", "A", MX_IP)
    # The original sender's domain allows only its own server; ours allows this host.
    dns_server.add("origin.test", "MX", "10 mx.remote.test.")
    dns_server.add("origin.test", "TXT", '"v=spf1 ip4:192.0.2.1 -all"')
    dns_server.add("example.com", "TXT", '"v=spf1 ip4:127.0.0.0/8 -all"')
    s = Stack(tmp_path_factory.mktemp("sieve"),
              delivery={"resolver": dns_server.address, "smtp_port": port})
    s.setup_users("example.com", "bob@example.com", "amy@example.com", "cat@example.com",
                  "dan@example.com", "eve@example.com", "fay@example.com", "gus@example.com",
                  "hal@example.com", "ivy@example.com", "jay@example.com",
                  "kim@example.com", "lou@example.com")
    s.pochta("dkim", "keygen", "example.com", "--selector", "s1")  # vacation replies: signed
    s.start("up")
    yield s, mx, dns_server
    s.stop_all()
    mx.stop()
    dns_server.close()


def put(s: Stack, user: str, script: str, check: bool = True):
    return s.pochta("sieve", "put", user, "-", "--name", "test", stdin=script, check=check)


def send(s: Stack, sender: str, rcpt: str, subject: str, headers: str = "",
         body: str = "hello\r\n") -> None:
    msg = (f"From: {sender}\r\nTo: {rcpt}\r\nSubject: {subject}\r\n"
           f"Message-ID: <{subject.replace(' ', '.')}@origin.test>\r\n{headers}\r\n{body}")
    with smtplib.SMTP("127.0.0.1", s.mta_port, timeout=15) as c:
        c.sendmail(sender, [rcpt], msg.encode())


def folder_files(s: Stack, address: str, folder: str) -> list[bytes]:
    local, domain = address.split("@")
    base = s.mailbox_root / domain / local / folder
    return [p.read_bytes() for sub in ("new", "cur") if (base / sub).is_dir()
            for p in sorted((base / sub).iterdir())]


def spf_result(ip: str, sender: str, dns_address: str) -> str:
    host, port = dns_address.rsplit(":", 1)
    r = dns.resolver.Resolver(configure=False)
    r.nameservers, r.port = [host], int(port)
    saved, dns.resolver.default_resolver = dns.resolver.default_resolver, r
    try:
        return spf.check2(i=ip, s=sender, h="mx.pochta.test")[0]
    finally:
        dns.resolver.default_resolver = saved


def test_fileinto_flags_and_subaddress(world):
    s, _, _ = world
    put(s, "bob@example.com", """require ["fileinto", "imap4flags", "subaddress", "envelope"];
if header :contains "subject" "[list]" {
    fileinto :flags "\\\\Seen" "Lists/pochta";
} elsif envelope :detail "to" "shop" {
    fileinto "Shopping";
}
""")
    send(s, "a@origin.test", "bob@example.com", "[list] one")
    send(s, "a@origin.test", "bob+shop@example.com", "an order")
    send(s, "a@origin.test", "bob@example.com", "plain")
    wait_mail(s, "bob@example.com", 1)  # the plain one, in the INBOX: the others went before
    listed = wait_for(lambda: folder_files(s, "bob@example.com", ".Lists.pochta"))
    assert b"[list] one" in listed[0]
    base = s.mailbox_root / "example.com" / "bob" / ".Lists.pochta"
    [name] = [p.name for p in (base / "cur").iterdir()]
    assert name.endswith(":2,S") and (base / "maildirfolder").exists()
    shop = wait_for(lambda: folder_files(s, "bob@example.com", ".Shopping"))
    assert b"an order" in shop[0]
    inbox = wait_mail(s, "bob@example.com", 1)
    assert len(inbox) == 1 and b"plain" in inbox[0]


def test_redirect_leaves_with_an_srs_sender_that_passes_spf(world):
    s, mx, dns_server = world
    put(s, "amy@example.com", 'require "copy";\nredirect :copy "amy@remote.test";\n')
    send(s, "alice@origin.test", "amy@example.com", "forward me")
    got = wait_for(lambda: next((m for m in mx.messages if b"forward me" in m.data), None))
    assert got.rcpts == ["amy@remote.test"]
    assert got.mail_from.upper().startswith("SRS0=") and got.mail_from.endswith("@example.com")
    assert b"Delivered-To: amy@example.com" in got.data
    # SPF at the destination: our SRS sender passes from our address, the original would not.
    assert spf_result("127.0.0.1", got.mail_from, dns_server.address) == "pass"
    assert spf_result("127.0.0.1", "alice@origin.test", dns_server.address) == "fail"
    assert b"forward me" in wait_mail(s, "amy@example.com", 1)[0]  # :copy kept it too

    # A bounce to that SRS address reaches the original sender.
    with smtplib.SMTP("127.0.0.1", s.mta_port, timeout=15) as c:
        c.sendmail("", [got.mail_from], b"Subject: bounce of forward me\r\n\r\nreturned\r\n")
    back = wait_for(lambda: next((m for m in mx.messages if b"bounce of forward me" in m.data),
                                 None))
    assert back.rcpts == ["alice@origin.test"] and back.mail_from in ("", "<>")


def test_forged_or_tampered_srs_addresses_are_refused_at_rcpt(world):
    s, _, _ = world
    with smtplib.SMTP("127.0.0.1", s.mta_port, timeout=15) as c:
        c.ehlo()
        c.mail("")
        for forged in ("SRS0=AAAA=JY=origin.test=alice@example.com",
                       "SRS0=zz=@example.com"):
            code, text = c.rcpt(forged)
            assert code == 550 and b"5.7.1" in text and b"SRS" in text


def test_alias_to_a_foreign_address_is_forwarded_with_srs(world):
    s, mx, _ = world
    s.pochta("alias", "add", "sales@example.com", "sales@remote.test")
    send(s, "carol@origin.test", "sales@example.com", "alias forward")
    got = wait_for(lambda: next((m for m in mx.messages if b"alias forward" in m.data), None))
    assert got.rcpts == ["sales@remote.test"]
    assert got.mail_from.upper().startswith("SRS0=") and "origin.test" in got.mail_from


def test_vacation_once_per_sender_and_never_to_lists(world):
    s, mx, _ = world
    put(s, "cat@example.com", """require "vacation";
vacation :days 7 :subject "Away" "I am away until Monday.";
""")
    for i in range(3):
        send(s, "dora@remote.test", "cat@example.com", f"question {i}")
    send(s, "list@remote.test", "cat@example.com", "digest",
         headers="List-Id: <news.remote.test>\r\nPrecedence: list\r\n")
    send(s, "robot@remote.test", "cat@example.com", "notice",
         headers="Auto-Submitted: auto-generated\r\n")
    send(s, "last@remote.test", "cat@example.com", "sentinel")
    wait_for(lambda: any(m.rcpts == ["last@remote.test"] for m in mx.messages))
    wait_mail(s, "cat@example.com", 6)  # every message was kept too
    replies = [m for m in mx.messages if m.mail_from in ("", "<>") and b"Away" in m.data]
    assert sorted(m.rcpts[0] for m in replies) == ["dora@remote.test", "last@remote.test"]
    reply = next(m for m in replies if m.rcpts == ["dora@remote.test"]).data
    assert b"Auto-Submitted: auto-replied" in reply
    # The queue delivers the three in any order: the first to arrive is the one answered.
    answered = re.search(rb"In-Reply-To: (<question\.[0-2]@origin\.test>)", reply)
    assert answered and b"References: " + answered.group(1) in reply
    assert b"I am away until Monday." in reply
    record = "".join(re.findall(r'"([^"]*)"', s.pochta("dns", "example.com").stdout.split(
        "s1._domainkey.example.com. IN TXT ")[1].splitlines()[0]))
    assert dkim.verify(reply, dnsfunc=lambda name, timeout=5: record.encode())  # signed by us


def test_a_vacation_storm_from_one_sender_sends_one_reply(world):
    s, mx, _ = world
    put(s, "jay@example.com", 'require "vacation";\nvacation :subject "Storm away" "Away.";\n')

    def burst(first: int) -> None:
        with smtplib.SMTP("127.0.0.1", s.mta_port, timeout=30) as c:
            for i in range(first, first + 250):
                c.sendmail("storm@remote.test", ["jay@example.com"],
                           (f"From: storm@remote.test\r\nTo: jay@example.com\r\n"
                            f"Subject: storm {i}\r\n\r\nagain\r\n").encode())

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(burst, range(0, 1000, 250)))
    send(s, "calm@remote.test", "jay@example.com", "after the storm")
    wait_mail(s, "jay@example.com", 1001, timeout=120)  # all kept: every reply decided
    # Every reply the MDA decided on is in the queue now; once the queue is empty, the sink
    # has all of them.
    assert wait_for(lambda: s.pochta("queue", "list").stdout.strip().endswith(
        "0 message(s) in the queue"), 60)
    answered = [m.rcpts[0] for m in mx.messages if b"Storm away" in m.data]
    assert sorted(answered) == ["calm@remote.test", "storm@remote.test"]


def test_vacation_from_only_an_address_of_the_user(world):
    s, mx, _ = world
    s.pochta("alias", "add", "boss@example.com", "kim@example.com")
    script = 'require "vacation";\nvacation :from "{}" :subject "Kim away {}" "Away.";\n'
    put(s, "kim@example.com", script.format("Boss <boss@example.com>", 1))
    send(s, "first@remote.test", "kim@example.com", "to kim")
    reply = wait_for(lambda: next((m for m in mx.messages if b"Kim away 1" in m.data), None))
    assert b"From: Boss <boss@example.com>" in reply.data  # her alias: allowed
    put(s, "lou@example.com", script.format("bob@example.com", 2))  # another user's
    send(s, "second@remote.test", "lou@example.com", "to lou")
    reply = wait_for(lambda: next((m for m in mx.messages if b"Kim away 2" in m.data), None))
    assert b"From: lou@example.com" in reply.data and b"bob@example.com" not in reply.data
    assert "vacation :from bob@example.com is not the user's" in s.log("up")


def test_reject_returns_the_message_with_the_reason(world):
    s, mx, _ = world
    put(s, "dan@example.com", """require "reject";
if header :contains "subject" "buy now" { reject "No adverts, thank you."; }
""")
    send(s, "shop@remote.test", "dan@example.com", "buy now")
    send(s, "friend@remote.test", "dan@example.com", "hello dan")
    dsn = wait_for(lambda: next((m for m in mx.messages if m.rcpts == ["shop@remote.test"]),
                                None))
    assert dsn.mail_from in ("", "<>") and b"No adverts, thank you." in dsn.data
    inbox = wait_mail(s, "dan@example.com", 1)
    assert len(inbox) == 1 and b"hello dan" in inbox[0]


def test_a_script_that_fails_at_run_time_keeps_the_message(world):
    s, _, _ = world
    put(s, "eve@example.com", """require ["variables", "fileinto"];
set "t" "x@remote.test";
redirect "a@remote.test"; redirect "b@remote.test"; redirect "c@remote.test";
redirect "d@remote.test"; redirect "e@remote.test";
""")
    send(s, "f@remote.test", "eve@example.com", "too many redirects")
    inbox = wait_mail(s, "eve@example.com", 1)
    assert b"too many redirects" in inbox[0]
    assert "more than 4 redirects" in s.log("up")


def test_a_folder_that_cannot_be_made_keeps_the_message_in_the_inbox(world):
    s, _, _ = world
    mailbox = s.mailbox_root / "example.com" / "fay"
    mailbox.mkdir(parents=True, exist_ok=True)
    (mailbox / ".Blocked").write_text("a file where the folder would go\n")
    put(s, "fay@example.com", 'require "fileinto";\nfileinto "Blocked";\n')
    send(s, "g@remote.test", "fay@example.com", "blocked folder")
    inbox = wait_mail(s, "fay@example.com", 1)
    assert b"blocked folder" in inbox[0]
    assert "folder 'Blocked' unavailable" in s.log("up")


def test_cli_refuses_a_broken_script_with_its_position(world):
    s, _, _ = world
    r = put(s, "bob@example.com", 'require "fileinto";\nif true {\n  fileinto "x"\n}\n',
            check=False)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "line 4, column 1" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert "Lists/pochta" in s.pochta("sieve", "get", "bob@example.com").stdout  # unchanged
    r = s.pochta("sieve", "put", "nobody@example.com", "-", stdin="keep;\n", check=False)
    assert r.returncode != 0 and "does not exist" in r.stderr
    listing = s.pochta("sieve", "list", "bob@example.com").stdout
    assert "test" in listing and "yes" in listing
    assert s.pochta("sieve", "check", "bob@example.com").stdout.strip().endswith("OK")


def test_a_redirected_message_keeps_its_dkim_signature(world, tmp_path):
    s, mx, _ = world
    from mta import dkimsign

    record = dkimsign.generate(tmp_path, "origin.test", "sel")
    key = (tmp_path / "origin.test" / "sel.key").read_bytes()
    put(s, "gus@example.com", 'redirect "gus@remote.test";\n')
    message = (b"From: Alice <alice@origin.test>\r\nTo: gus@example.com\r\n"
               b"Subject: signed and forwarded\r\nMessage-ID: <dkim1@origin.test>\r\n\r\n"
               b"A body that must arrive as it was signed.\r\n\r\nSecond paragraph.\r\n")
    signed = dkim.sign(message, b"sel", b"origin.test", key, canonicalize=(b"relaxed", b"simple"),
                       include_headers=[b"from", b"to", b"subject", b"message-id"]) + message
    with smtplib.SMTP("127.0.0.1", s.mta_port, timeout=15) as c:
        c.sendmail("alice@origin.test", ["gus@example.com"], signed)
    got = wait_for(lambda: next((m for m in mx.messages
                                 if b"signed and forwarded" in m.data), None))
    assert got.rcpts == ["gus@remote.test"]
    txt = record.encode()
    assert dkim.verify(got.data, dnsfunc=lambda name, timeout=5: txt)


def test_a_redirect_loop_between_two_mailboxes_is_cut(world):
    s, _, _ = world
    put(s, "hal@example.com", 'redirect "ivy@example.com";\n')
    put(s, "ivy@example.com", 'redirect "hal@example.com";\n')
    send(s, "j@remote.test", "hal@example.com", "ping pong")
    # hal -> ivy -> hal: hal sees its own Delivered-To and keeps the message.
    inbox = wait_mail(s, "hal@example.com", 1)
    assert b"ping pong" in inbox[0] and inbox[0].count(b"Delivered-To: hal@example.com") >= 2
    assert "not done (already delivered to hal@example.com" in s.log("up")
