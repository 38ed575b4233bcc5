"""The real `pochta serve mda` process over LMTP (TCP and unix socket), both mailbox formats."""

from __future__ import annotations

import resource
import signal
import threading

import pytest

from tests.support.lmtp_raw import RawLMTP, lmtp_send
from tests.support.stack import Stack, mail_files

MSG = (b"From: Sender <sender@remote.test>\r\nTo: bob@example.com\r\nSubject: caf\xc3\xa9 \xe2\x98\x95\r\n"
       b"Message-ID: <m1@remote.test>\r\n\r\nBody line one\r\n.leading dot\r\n8-bit: \xff\xfe\r\n")


@pytest.fixture
def stack(tmp_path):
    s = Stack(tmp_path)
    s.setup_users("example.com", "bob@example.com", "amy@example.com", "cy@example.com")
    yield s
    s.stop_all()


def expected_copy(rcpt: str, data: bytes = MSG, sender: str = "sender@remote.test") -> bytes:
    return (f"Return-Path: <{sender}>\nDelivered-To: {rcpt}\n".encode()
            + data.replace(b"\r\n", b"\n"))


def test_maildir_multi_recipient_mixed_results_in_order(stack):
    stack.start("mda")
    rcpt, data = lmtp_send(stack.mda_listen, "sender@remote.test",
                           ["bob@example.com", "nobody@example.com", "Amy+News@Example.com",
                            "x@other.test"], MSG)
    assert rcpt[0].startswith("250 2.1.5")
    assert rcpt[1].startswith("550 5.1.1")
    assert rcpt[2].startswith("250 2.1.5")
    assert rcpt[3].startswith("550 5.1.1")
    assert len(data) == 2
    assert data[0].startswith("250 2.0.0") and "bob@example.com" in data[0]
    assert data[1].startswith("250 2.0.0") and "amy+news@example.com" in data[1]
    [bob] = mail_files(stack.mailbox_root, "bob@example.com")
    [amy] = mail_files(stack.mailbox_root, "amy@example.com")
    assert bob.read_bytes() == expected_copy("bob@example.com")
    assert amy.read_bytes() == expected_copy("amy+news@example.com")
    assert bob.name.endswith(f",S={bob.stat().st_size}")
    assert (bob.parent.parent.stat().st_mode & 0o777) == 0o700
    assert not list((bob.parent.parent / "tmp").iterdir())


def test_unix_socket_and_null_sender(stack, tmp_path):
    sock = tmp_path / "lmtp.sock"
    sock.write_bytes(b"")  # a stale non-socket file is not ours to remove...
    sock.unlink()
    stack.settings["mda"]["listen"] = f"unix:{sock}"
    stack.write()
    stack.start("mda")
    assert (sock.stat().st_mode & 0o777) == 0o660
    rcpt, data = lmtp_send(f"unix:{sock}", "", ["cy@example.com"], b"Subject: bounce\r\n\r\nx\r\n")
    assert data[0].startswith("250 2.0.0")
    [f] = mail_files(stack.mailbox_root, "cy@example.com")
    assert f.read_bytes().startswith(b"Return-Path: <>\nDelivered-To: cy@example.com\n")
    # Restart replaces the stale socket left by a killed process.
    stack.stop("mda", signal.SIGKILL)
    stack.start("mda")
    assert lmtp_send(f"unix:{sock}", "a@b.test", ["cy@example.com"], b"\r\nx\r\n")[1][0] \
        .startswith("250")


def test_mbox_format_mboxrd(stack):
    stack.settings["mda"]["format"] = "mbox"
    stack.write()
    stack.start("mda")
    body = b"Subject: quoting\r\n\r\nFrom the start\r\n>From quoted\r\nplain\r\n"
    for _ in range(2):
        _, data = lmtp_send(stack.mda_listen, "s@remote.test", ["bob@example.com"], body)
        assert data == [data[0]] and data[0].startswith("250 2.0.0")
    mbox = (stack.mailbox_root / "example.com" / "bob").read_bytes()
    assert mbox.startswith(b"From s@remote.test ")
    assert mbox.count(b"\nFrom s@remote.test ") == 1  # second separator
    assert b"\n>From the start\n>>From quoted\n" in mbox
    assert mbox.endswith(b"plain\n\n")
    from mda.mbox import split_entries
    entries = split_entries(mbox)
    assert entries == [expected_copy("bob@example.com", body, "s@remote.test")] * 2
    assert not (stack.mailbox_root / "example.com" / "bob.lock").exists()


def test_unwritable_mailbox_fails_alone(stack):
    stack.start("mda")
    # A regular file where bob's maildir should be: even root cannot create it.
    (stack.mailbox_root / "example.com").mkdir(parents=True)
    (stack.mailbox_root / "example.com" / "bob").write_text("in the way")
    _, data = lmtp_send(stack.mda_listen, "s@remote.test",
                        ["amy@example.com", "bob@example.com", "cy@example.com"], MSG)
    assert data[0].startswith("250 2.0.0")
    assert data[1].startswith("451 4.3.0") and "bob@example.com" in data[1]
    assert data[2].startswith("250 2.0.0")
    assert len(mail_files(stack.mailbox_root, "amy@example.com")) == 1
    assert len(mail_files(stack.mailbox_root, "cy@example.com")) == 1


def _limit_file_size():
    # Writes past 64 KiB fail with EFBIG (SIGXFSZ ignored): a disk filling up mid-message.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536))


@pytest.mark.parametrize("fmt", ["maildir", "mbox"])
def test_failed_write_leaves_nothing_partial(stack, fmt):
    stack.settings["mda"]["format"] = fmt
    stack.write()
    stack.pochta("domain", "list")  # database ready before the MDA runs under the limit
    stack.start("mda", preexec=_limit_file_size)
    small = b"Subject: small\r\n\r\nfits\r\n"
    assert lmtp_send(stack.mda_listen, "s@r.test", ["bob@example.com"], small)[1][0] \
        .startswith("250")
    big = b"Subject: big\r\n\r\n" + b"x" * 998 + b"\r\n" + (b"y" * 998 + b"\r\n") * 80
    _, data = lmtp_send(stack.mda_listen, "s@r.test", ["bob@example.com"], big)
    assert data[0].startswith("452 4.3.1")
    if fmt == "maildir":
        [only] = mail_files(stack.mailbox_root, "bob@example.com")
        assert b"fits" in only.read_bytes()
        assert not list((stack.mailbox_root / "example.com" / "bob" / "tmp").iterdir())
    else:
        mbox = (stack.mailbox_root / "example.com" / "bob").read_bytes()
        assert mbox == b"".join(mbox.partition(b"fits\n\n")[:2])  # nothing after the first
        assert b"yyyy" not in mbox


def test_quota(stack):
    stack.pochta("user", "add", "small@example.com", "--password-stdin", "--quota", "300",
                 stdin="pw\n")
    stack.start("mda")
    msg = b"Subject: q\r\n\r\n" + b"z" * 150 + b"\r\n"
    assert lmtp_send(stack.mda_listen, "s@r.test", ["small@example.com"], msg)[1][0] \
        .startswith("250")
    _, data = lmtp_send(stack.mda_listen, "s@r.test", ["small@example.com", "bob@example.com"], msg)
    assert data[0].startswith("452 4.2.2") and data[1].startswith("250")


def test_concurrent_mbox_deliveries_never_interleave(stack):
    stack.settings["mda"]["format"] = "mbox"
    stack.write()
    stack.start("mda")
    errors = []

    def worker(n):
        try:
            for i in range(5):
                body = f"Subject: {n}-{i}\r\n\r\n".encode() + (f"{n}-{i} ".encode() * 10 + b"\r\n") * 300
                _, data = lmtp_send(stack.mda_listen, "s@r.test", ["amy@example.com"], body)
                assert data[0].startswith("250"), data
        except Exception as e:  # collected: assertion errors in threads would be lost
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    from mda.mbox import split_entries
    entries = split_entries((stack.mailbox_root / "example.com" / "amy").read_bytes())
    assert len(entries) == 30
    for e in entries:
        subject = e.split(b"Subject: ")[1].split(b"\n")[0]
        body = e.split(b"\n\n", 1)[1]
        assert body == ((subject + b" ") * 10 + b"\n") * 300


def test_lhlo_only_and_shutdown_421(stack):
    stack.start("mda")
    c = RawLMTP(stack.mda_listen)
    assert c.cmd("HELO x").startswith("500 5.5.1")
    assert c.cmd("LHLO x").startswith("250-mx.pochta.test")
    stack.stop("mda")
    assert c.reply().startswith("421 4.3.2")


def test_bdat_pipelined_with_the_envelope_stores_the_message_as_sent(stack):
    # CHUNKING (RFC 3030): no 354 to wait for and no dot-stuffing; one reply per accepted
    # RCPT after BDAT LAST (RFC 2033 §4.2), the envelope's replies first.
    stack.start("mda")
    c = RawLMTP(stack.mda_listen)
    assert "250-CHUNKING" in c.cmd("LHLO client.test").split("\n")
    c.send_data(b"MAIL FROM:<sender@remote.test>\r\nRCPT TO:<bob@example.com>\r\n"
                b"RCPT TO:<nobody@example.com>\r\nRCPT TO:<amy@example.com>\r\n"
                + f"BDAT {len(MSG)} LAST\r\n".encode() + MSG)
    replies = [c.reply() for _ in range(6)]
    assert [r[:9] for r in replies[:4]] == ["250 2.1.0", "250 2.1.5", "550 5.1.1", "250 2.1.5"]
    assert "bob@example.com" in replies[4] and "amy@example.com" in replies[5]
    assert all(r.startswith("250 2.0.0") for r in replies[4:])
    # Two chunks, the first ending inside a line: the same message, once.
    half = len(MSG) // 2 + 3
    assert c.cmd("MAIL FROM:<sender@remote.test>").startswith("250")
    assert c.cmd("RCPT TO:<cy@example.com>").startswith("250")
    c.send_data(f"BDAT {half}\r\n".encode() + MSG[:half])
    assert c.reply().startswith(f"250 2.0.0 {half} octets")
    c.send_data(f"BDAT {len(MSG) - half} LAST\r\n".encode() + MSG[half:])
    assert c.reply().startswith("250 2.0.0")
    c.close()
    for rcpt in ("bob@example.com", "amy@example.com", "cy@example.com"):
        [copy] = mail_files(stack.mailbox_root, rcpt)
        assert copy.read_bytes() == expected_copy(rcpt)  # ".leading dot" kept as it was


def test_bdat_refusals_consume_the_chunk_and_keep_the_session(stack):
    stack.start("mda")
    c = RawLMTP(stack.mda_listen)
    c.cmd("LHLO client.test")
    bare_lf = b"Subject: smuggled\r\n\r\nline\n.\r\nMAIL FROM:<evil@x.test>\r\n"
    c.send_data(b"MAIL FROM:<sender@remote.test>\r\nRCPT TO:<bob@example.com>\r\n"
                + f"BDAT {len(bare_lf)} LAST\r\n".encode() + bare_lf)
    assert [c.reply()[:9] for _ in range(3)] == ["250 2.1.0", "250 2.1.5", "554 5.6.0"]
    # No accepted recipient: the chunk is still read (not taken for commands), then 503.
    c.send_data(f"BDAT {len(MSG)} LAST\r\n".encode() + MSG)
    assert c.reply().startswith("503 5.5.1")
    assert c.cmd("NOOP").startswith("250")
    assert not mail_files(stack.mailbox_root, "bob@example.com")
    assert c.cmd("BDAT lots").startswith("501 5.5.4")  # its size unknown: the session ends
    with pytest.raises(ConnectionError):
        c.reply()


def test_a_refused_message_gets_one_reply_per_recipient(stack):
    """RFC 2033 §4.2: the client waits for one reply per accepted RCPT, refusals included."""
    stack.start("mda")
    for command in ("DATA", "BDAT"):
        c = RawLMTP(stack.mda_listen)
        c.cmd("LHLO client.test")
        c.cmd("MAIL FROM:<sender@remote.test>")
        assert c.cmd("RCPT TO:<bob@example.com>").startswith("250")
        assert c.cmd("RCPT TO:<amy@example.com>").startswith("250")
        long_line = b"Subject: long\r\n\r\n" + b"x" * 999 + b"\r\n"
        if command == "DATA":
            assert c.cmd("DATA").startswith("354")
            c.send_data(long_line + b".\r\n")
        else:
            c.send_data(f"BDAT {len(long_line)} LAST\r\n".encode() + long_line)
        assert [c.reply()[:9] for _ in range(2)] == ["500 5.5.2", "500 5.5.2"], command
        assert c.cmd("NOOP").startswith("250")
        c.close()


def test_a_local_fault_outside_the_write_is_temporary_and_leaks_no_path(stack):
    """The quota's usage cannot be read (here: new/ is a file): 451 for that recipient, the
    other delivered, never aiosmtpd's '500 Error: (NotADirectoryError) /path'."""
    stack.pochta("user", "add", "q@example.com", "--password-stdin", "--quota", "100000",
                 stdin="pw\n")
    box = stack.mailbox_root / "example.com" / "q"
    for sub in ("cur", "tmp"):
        (box / sub).mkdir(parents=True)
    (box / "new").write_text("not a directory")
    stack.start("mda")
    _, data = lmtp_send(stack.mda_listen, "s@r.test", ["q@example.com", "bob@example.com"], MSG)
    assert data[0].startswith("451 4.3.0") and "/" not in data[0], data
    assert data[1].startswith("250 2.0.0")


def test_quota_counts_the_copies_of_the_same_batch(stack):
    stack.pochta("user", "add", "small@example.com", "--password-stdin", "--quota", "700",
                 stdin="pw\n")
    stack.start("mda")
    msg = b"Subject: q\r\n\r\n" + b"z" * 150 + b"\r\n"
    _, data = lmtp_send(stack.mda_listen, "s@r.test",
                        [f"small+{i}@example.com" for i in range(6)], msg)
    delivered = [d for d in data if d.startswith("250")]
    assert 1 <= len(delivered) <= 3 and all(d.startswith(("250", "452 4.2.2")) for d in data)
    stored = sum(p.stat().st_size for p in mail_files(stack.mailbox_root, "small@example.com"))
    assert stored <= 700


def test_a_retried_delivery_finds_its_copy_and_makes_no_second(stack):
    """Exactly once: XQUEUEID names each copy after the queue id and recipient; with XRETRY
    (an attempt whose outcome the MTA never learnt) the MDA answers 250 for a copy it already
    has, in new/ or already moved to cur/ by a reader, and makes one only for the others."""
    stack.start("mda")
    qid = "0661308f8adc01348612"
    c = RawLMTP(stack.mda_listen)
    assert "XQUEUEID" in c.cmd("LHLO client.test")
    assert c.cmd("MAIL FROM:<s@r.test> XQUEUEID=not-an-id").startswith("501 5.5.4")
    c.close()
    _, data = lmtp_send(stack.mda_listen, "s@r.test", ["bob@example.com"], MSG,
                        f" XQUEUEID={qid}")
    assert data[0].startswith("250 2.0.0")
    [first] = mail_files(stack.mailbox_root, "bob@example.com")
    assert f"_{qid}-" in first.name
    rcpts = ["bob@example.com", "bob+2@example.com", "amy@example.com"]
    _, data = lmtp_send(stack.mda_listen, "s@r.test", rcpts, MSG, f" XQUEUEID={qid} XRETRY")
    assert [d[:9] for d in data] == ["250 2.0.0"] * 3
    assert ["already" in d for d in data] == [True, False, False]
    assert len(mail_files(stack.mailbox_root, "bob@example.com")) == 2  # bob's and bob+2's
    # A reader (Dovecot) moved bob's copy to cur/ with flags: still found.
    first.rename(first.parent.parent / "cur" / (first.name + ":2,S"))
    _, data = lmtp_send(stack.mda_listen, "s@r.test", rcpts, MSG, f" XQUEUEID={qid} XRETRY")
    assert ["already" in d for d in data] == [True, True, True], data
    bob = stack.mailbox_root / "example.com" / "bob"
    assert len(list((bob / "new").iterdir())) + len(list((bob / "cur").iterdir())) == 2
    assert len(mail_files(stack.mailbox_root, "amy@example.com")) == 1
    # Without XRETRY nothing is looked up (a first attempt): a copy is made.
    _, data = lmtp_send(stack.mda_listen, "s@r.test", ["amy@example.com"], MSG,
                        f" XQUEUEID={qid}")
    assert "already" not in data[0] and len(mail_files(stack.mailbox_root, "amy@example.com")) == 2
