"""Spam filtering with a real rspamd started by the test: GTUBE refused at the end of DATA
(550, nothing delivered), a clean message delivered with X-Spam-Flag: NO, a spammy one filed
into Junk by the MDA's default rule, and with rspamd stopped mail still comes in (fail-open)."""

from __future__ import annotations

import json
import shutil
import smtplib
import tempfile
from pathlib import Path

import pytest

from tests.support.fakes import FakeDNS
from tests.support.rspamd import RSPAMD, Rspamd
from tests.support.smtp import wait_for, wait_mail
from tests.support.stack import Stack

pytestmark = pytest.mark.skipif(not RSPAMD, reason="no rspamd (apt install rspamd)")

GTUBE = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"


def clean(subject: str) -> bytes:
    return (f"From: Alice <alice@origin.test>\r\nTo: Bob <bob@example.com>\r\n"
            f"Subject: {subject}\r\nDate: Sat, 05 Dec 2026 19:50:00 +0000\r\n"
            f"Message-ID: <{subject.replace(' ', '.')}@origin.test>\r\nMIME-Version: 1.0\r\n"
            f"Content-Type: text/plain; charset=us-ascii\r\n\r\n"
            f"Shall we meet at noon for lunch tomorrow?\r\n").encode()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    dns_server = FakeDNS()
    folder = Path(tempfile.mkdtemp(prefix="pochta-rspamd-"))  # rspamd's user must enter it
    rspamd = Rspamd(folder, dns_server.address)
    s = Stack(tmp_path_factory.mktemp("spam"), spam={"rspamd": rspamd.url, "timeout": 10})
    s.setup_users("example.com", "bob@example.com")
    s.start("up")
    yield s, rspamd
    s.stop_all()
    rspamd.stop()
    dns_server.close()
    shutil.rmtree(folder, ignore_errors=True)


def send(s: Stack, message: bytes) -> None:
    with smtplib.SMTP("127.0.0.1", s.mta_port, timeout=30) as c:
        c.sendmail("alice@origin.test", ["bob@example.com"], message)


def test_gtube_is_refused_before_the_250_and_never_delivered(world):
    s, _ = world
    with pytest.raises(smtplib.SMTPDataError) as refused:
        send(s, clean("gtube").replace(b"Shall we", GTUBE.encode() + b"\r\nShall we"))
    assert refused.value.smtp_code == 550 and b"5.7.1" in refused.value.smtp_error
    send(s, clean("sentinel one"))
    inbox = wait_mail(s, "bob@example.com", 1)
    assert not any(b"GTUBE" in m for m in inbox)
    assert b"X-Spam-Flag: NO" in inbox[-1] and b"X-Spam-Status: No, score=" in inbox[-1]


def test_a_spammy_message_goes_to_junk(world):
    s, _ = world
    send(s, b"From: a@b.test\r\nSubject: cheap pills\r\n\r\nbuy\r\n")  # no To, Date, Message-ID
    junk = s.mailbox_root / "example.com" / "bob" / ".Junk" / "new"
    assert wait_for(lambda: junk.is_dir() and any(junk.iterdir()))
    [message] = [p.read_bytes() for p in junk.iterdir()]
    assert b"X-Spam-Flag: YES" in message and b"cheap pills" in message


def spam_status(s: Stack) -> dict:
    r = s.pochta("status", "--json", check=False)
    return next(c for c in json.loads(r.stdout)["checks"] if c["name"] == "rspamd")


def test_rspamd_stopped_means_fail_open(world):
    s, rspamd = world
    assert spam_status(s)["state"] == "ok"
    rspamd.stop()
    down = spam_status(s)
    assert down["state"] == "warn" and "accepted unscanned" in down["detail"]
    before = len(wait_mail(s, "bob@example.com", 1))
    send(s, clean("while rspamd is down"))
    inbox = wait_mail(s, "bob@example.com", before + 1)
    assert b"while rspamd is down" in inbox[-1] and b"X-Spam-Flag" not in inbox[-1]
    assert "spam check failed" in s.log("up")
