"""A real Dovecot reads what the MDA wrote, and logs users in with their pochta passwords."""

from __future__ import annotations

import imaplib
import os
import poplib
import shutil
import sqlite3
import tempfile
from pathlib import Path

import pytest
from scramp import ScramClient

from tests.support.dovecot import DOVECOT, Dovecot
from tests.support.lmtp_raw import lmtp_send
from tests.support.stack import Stack

pytestmark = pytest.mark.skipif(DOVECOT is None, reason="no dovecot binary (apt install dovecot-imapd)")

MAIL_OWNER = "nobody"  # Dovecot refuses to serve mail owned by root
MSG = (b"From: a@remote.test\r\nTo: bob@example.com\r\nSubject: =?utf-8?q?caf=C3=A9?=\r\n"
       b"X-Raw: \xc3\xa9t\xc3\xa9\r\nMessage-ID: <dv1@remote.test>\r\n\r\n"
       b"Hello Dovecot.\r\n..dot line\r\n\xe2\x82\xac 8-bit body\r\n")


@pytest.fixture
def shared_dir():
    # Dovecot's mail processes run as MAIL_OWNER: the mailbox root must be reachable for it,
    # which pytest's 0700 tmp folders are not.
    d = Path(tempfile.mkdtemp(prefix="pochta-dovecot-"))
    os.chmod(d, 0o755)
    (d / "home").mkdir()
    shutil.chown(d / "home", MAIL_OWNER)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def imap_fetch(port: int, user: str, password: str) -> list[bytes]:
    m = imaplib.IMAP4("127.0.0.1", port, timeout=15)
    try:
        # AUTHENTICATE PLAIN carries a UTF-8 password, which LOGIN in imaplib cannot.
        m.authenticate("PLAIN", lambda _: b"\0" + user.encode() + b"\0" + password.encode())
        typ, data = m.select("INBOX", readonly=True)
        assert typ == "OK", data
        out = []
        for i in range(1, int(data[0]) + 1):
            typ, msg = m.fetch(str(i), "(BODY.PEEK[])")
            out.append(msg[0][1])
        return out
    finally:
        m.logout()


def imap_scram_login(port: int, user: str, password: str) -> None:
    """AUTHENTICATE SCRAM-SHA-256, the server's proof checked (scramp raises if wrong)."""
    client = ScramClient(["SCRAM-SHA-256"], user, password)
    steps = iter([
        lambda _: client.get_client_first().encode(),
        lambda challenge: (client.set_server_first(challenge.decode()),
                           client.get_client_final().encode())[1],
        lambda challenge: (client.set_server_final(challenge.decode()), b"")[1],
    ])
    m = imaplib.IMAP4("127.0.0.1", port, timeout=15)
    try:
        typ, _ = m.authenticate("SCRAM-SHA-256", lambda challenge: next(steps)(challenge))
        assert typ == "OK"
    finally:
        m.logout()


def static_conf(location: str, shared_dir: Path) -> str:
    """Dovecot over our mailboxes with one static password (the SQL userdb has its own test)."""
    return f"""
protocols = imap pop3
mail_location = {location}
mail_uid = {MAIL_OWNER}
mail_gid = nogroup
auth_mechanisms = plain
passdb {{
  driver = static
  args = password=static-pw
}}
userdb {{
  driver = static
  args = home={shared_dir}/home/%d/%n
}}
"""


def expected(rcpt: str) -> bytes:
    # IMAP gives CRLF line endings back; we stored LF, plus our two trace headers.
    return f"Return-Path: <a@remote.test>\r\nDelivered-To: {rcpt}\r\n".encode() + MSG


@pytest.mark.parametrize("fmt", ["maildir", "mbox"])
def test_dovecot_reads_our_mailbox(tmp_path, shared_dir, fmt):
    stack = Stack(tmp_path, mda={"mailbox_root": str(shared_dir / "mail"), "format": fmt,
                                 "mail_owner": MAIL_OWNER})
    stack.setup_users("example.com", "bob@example.com")
    stack.start("mda")
    dv = None
    try:
        _, data = lmtp_send(stack.mda_listen, "a@remote.test", ["bob@example.com"], MSG)
        assert data[0].startswith("250")
        root = shared_dir / "mail"
        location = (f"maildir:{root}/%d/%n" if fmt == "maildir"
                    else f"mbox:{shared_dir}/home/%d/%n/mail:INBOX={root}/%d/%n")
        dv = Dovecot(tmp_path / "dovecot", static_conf(location, shared_dir))
        got = imap_fetch(dv.imap_port, "bob@example.com", "static-pw")
        assert got == [expected("bob@example.com")], dv.log()
    finally:
        if dv:
            dv.stop()
        stack.stop_all()


def test_dovecot_config_logs_users_in_with_pochta_passwords(tmp_path, shared_dir):
    stack = Stack(tmp_path, mda={"mailbox_root": str(shared_dir / "mail"),
                                 "mail_owner": MAIL_OWNER})
    stack.setup_users("example.com", "bob@example.com", "amy@example.com",
                      password="imap pass wörd")
    db = sqlite3.connect(tmp_path / "pochta.db")  # amy: from before SCRAM keys (argon2 only)
    with db:
        db.execute("UPDATE users SET scram_sha256 = NULL WHERE address = 'amy@example.com'")
    db.close()
    stack.start("mda")
    dv = None
    try:
        _, data = lmtp_send(stack.mda_listen, "a@remote.test", ["bob@example.com"], MSG)
        assert data[0].startswith("250")
        conf = stack.pochta("dovecot-config").stdout
        assert "driver = sql" in conf and f"maildir:{shared_dir}/mail/%d/%n" in conf
        assert (tmp_path / "dovecot-home").is_dir()  # mail_home exists for Dovecot
        # Our TLS certificate may not exist yet in this test; IMAP without TLS is enough here.
        conf = "\n".join(line for line in conf.splitlines()
                         if not line.startswith(("ssl", "mail_home")))
        conf += f"\nmail_home = {shared_dir}/home/%d/%n\n"
        dv = Dovecot(tmp_path / "dovecot", conf)
        assert imap_fetch(dv.imap_port, "bob@example.com", "imap pass wörd") == \
            [expected("bob@example.com")], dv.log()
        with pytest.raises(imaplib.IMAP4.error):
            imap_fetch(dv.imap_port, "bob@example.com", "wrong")
        imap_scram_login(dv.imap_port, "bob@example.com", "imap pass wörd")
        with pytest.raises(imaplib.IMAP4.error):
            imap_scram_login(dv.imap_port, "bob@example.com", "wrong")
        assert imap_fetch(dv.imap_port, "amy@example.com", "imap pass wörd") == []
        p = poplib.POP3("127.0.0.1", dv.pop3_port, timeout=15)
        p.user("bob@example.com")
        p.pass_("imap pass wörd")  # poplib sends UTF-8
        count, _ = p.stat()
        assert count == 1
        lines = p.retr(1)[1]
        assert b"Subject: =?utf-8?q?caf=C3=A9?=" in lines
        p.quit()
    finally:
        if dv:
            dv.stop()
        stack.stop_all()


def generated_conf(stack: Stack, shared_dir: Path) -> str:
    """`pochta dovecot-config` as a user runs it, without TLS (no certificate in these tests)
    and with a home Dovecot's mail processes can write."""
    conf = "\n".join(line for line in stack.pochta("dovecot-config").stdout.splitlines()
                     if not line.startswith(("ssl", "mail_home")))
    return conf + f"\nmail_home = {shared_dir}/home/%d/%n\n"


@pytest.mark.parametrize("fmt", ["maildir", "mbox"])
def test_dovecot_shows_a_sieve_fileinto_folder(tmp_path, shared_dir, fmt):
    """Sieve's fileinto "Lists/pochta" makes a folder Dovecot (configured by `pochta
    dovecot-config`) lists as Lists/pochta, subscribed, with the message in it and the flags
    the script set; a sender's own mbox state headers set nothing."""
    stack = Stack(tmp_path, mda={"mailbox_root": str(shared_dir / "mail"), "format": fmt,
                                 "mail_owner": MAIL_OWNER})
    stack.setup_users("example.com", "bob@example.com")
    stack.pochta("sieve", "put", "bob@example.com", "-", stdin=(
        'require ["fileinto", "imap4flags"];\n'
        'if header :contains "subject" "caf" {\n'
        '  fileinto :flags ["\\\\Flagged", "\\\\Seen"] "Lists/pochta";\n}\n'))
    stack.start("mda")
    dv = None
    forged = MSG.replace(b"\r\n\r\n", b"\r\nStatus: RO\r\nX-Status: D\r\n\r\n", 1)
    try:
        _, data = lmtp_send(stack.mda_listen, "a@remote.test", ["bob@example.com"], MSG)
        assert data[0].startswith("250")
        _, data = lmtp_send(stack.mda_listen, "a@remote.test", ["bob@example.com"],
                            forged.replace(b"caf", b"tea"))
        assert data[0].startswith("250")
        dv = Dovecot(tmp_path / "dovecot", generated_conf(stack, shared_dir))
        m = imaplib.IMAP4("127.0.0.1", dv.imap_port, timeout=15)
        try:
            m.authenticate("PLAIN", lambda _: b"\0bob@example.com\0pw")
            typ, listing = m.list()
            assert typ == "OK" and any(line.endswith(b' "/" Lists/pochta')
                                       for line in listing), listing
            typ, subscribed = m.lsub()
            assert typ == "OK" and any(line.endswith(b' "/" Lists/pochta')
                                       for line in subscribed), subscribed
            typ, data = m.select("Lists/pochta", readonly=True)
            assert typ == "OK" and int(data[0]) == 1, dv.log()
            typ, fetched = m.fetch("1", "(FLAGS BODY.PEEK[])")
            assert b"\\Flagged" in fetched[0][0] and b"\\Seen" in fetched[0][0]
            assert fetched[0][1] == expected("bob@example.com")
            typ, data = m.select("INBOX", readonly=True)
            assert int(data[0]) == 1
            typ, fetched = m.fetch("1", "(FLAGS BODY.PEEK[HEADER])")
            assert b"\\Seen" not in fetched[0][0] and b"\\Deleted" not in fetched[0][0]
        finally:
            m.logout()
    finally:
        if dv:
            dv.stop()
        stack.stop_all()
