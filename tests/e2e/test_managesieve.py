"""ManageSieve (RFC 5804) on `[managesieve] listen`, driven by sievelib's client (what
several web mailers use): STARTTLS, AUTHENTICATE PLAIN, PUTSCRIPT, SETACTIVE and the rest;
the active script then filters a message that arrives on port 25."""

from __future__ import annotations

import base64
import smtplib
import socket
import ssl
from typing import BinaryIO

import pytest
import trustme
from sievelib.managesieve import Client

from tests.support.smtp import wait_for
from tests.support.stack import Stack, free_port

GOOD = 'require "fileinto";\nif header :contains "subject" "report" { fileinto "Reports"; }\n'


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    base = tmp_path_factory.mktemp("managesieve")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "mx.pochta.test")
    cert.private_key_pem.write_to_path(str(base / "key.pem"))
    cert.cert_chain_pems[0].write_to_path(str(base / "cert.pem"))
    ca.cert_pem.write_to_path(str(base / "ca.pem"))
    port = free_port()
    s = Stack(base, managesieve={"listen": [f"127.0.0.1:{port}"]},
              tls={"cert": str(base / "cert.pem"), "key": str(base / "key.pem")})
    s.setup_users("example.com", "bob@example.com", password="sieve pw")
    s.start("up", listen=[s.mda_listen, *s.settings["mta"]["listen"], f"127.0.0.1:{port}"])
    yield s, port, str(base / "ca.pem")
    s.stop_all()


@pytest.fixture
def client(world, monkeypatch):
    s, port, ca = world
    monkeypatch.setenv("SSL_CERT_FILE", ca)  # sievelib verifies with the default context
    c = Client("127.0.0.1", port)
    assert c.connect("bob@example.com", "sieve pw", starttls=True, authmech="PLAIN"), c.errmsg
    yield c
    c.logout()


def test_putscript_setactive_and_the_filter_runs(world, client):
    s, _, _ = world
    caps = client.get_sieve_capabilities()
    assert "fileinto" in caps and "vacation" in caps and "imap4flags" in caps
    assert client.havespace("filters", len(GOOD))
    assert client.checkscript(GOOD)
    assert client.putscript("filters", GOOD)
    assert client.setactive("filters")
    active, others = client.listscripts()
    assert active == "filters" and others == []
    assert client.getscript("filters").rstrip() == GOOD.rstrip()  # sievelib strips the end
    assert "Reports" in s.pochta("sieve", "get", "bob@example.com").stdout  # one store

    with smtplib.SMTP("127.0.0.1", s.mta_port, timeout=15) as c:
        c.sendmail("a@remote.test", ["bob@example.com"],
                   b"Subject: monthly report\r\n\r\nnumbers\r\n")
    folder = s.mailbox_root / "example.com" / "bob" / ".Reports" / "new"
    assert wait_for(lambda: folder.is_dir() and any(folder.iterdir()))


def test_a_broken_script_is_refused_with_its_position_and_never_stored(client):
    assert not client.checkscript('if true {\n  keep\n}\n')
    assert b"line 3, column 1" in client.errmsg
    assert not client.putscript("broken", 'fileinto "x";\n')
    assert b"require" in client.errmsg
    active, others = client.listscripts()
    assert "broken" not in others and active != "broken"


def test_rename_delete_and_the_active_script_is_protected(client):
    assert client.putscript("spare", "keep;\n")
    assert client.renamescript("spare", "spare2")
    _, others = client.listscripts()
    assert "spare2" in others and "spare" not in others
    assert client.setactive("spare2")
    assert not client.deletescript("spare2")  # active: refused
    assert client.setactive("")
    assert client.deletescript("spare2")
    assert client.setactive("filters") or True


def greeted(port: int, timeout: float = 10) -> tuple[socket.socket, BinaryIO]:
    """A raw connection past the greeting (capabilities, then OK)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    f = sock.makefile("rb")
    while True:
        line = f.readline()
        assert line, "closed before the greeting ended"
        if line.startswith(b"OK"):
            return sock, f


def test_no_auth_before_tls_and_bad_passwords_end_the_session(world):
    s, port, _ = world
    sock, f = greeted(port)
    with sock:
        sock.sendall(b'AUTHENTICATE "PLAIN" "AGJvYkBleGFtcGxlLmNvbQBzaWV2ZSBwdw=="\r\n')
        assert f.readline().startswith(b"NO (ENCRYPT-NEEDED)")
        sock.sendall(b"PUTSCRIPT \"x\" {5+}\r\nkeep;\r\n")
        assert f.readline().startswith(b"NO")
    raw, f = greeted(port, timeout=30)
    with raw:
        raw.sendall(b"STARTTLS\r\n")
        assert f.readline().startswith(b"OK")
        ctx = ssl.create_default_context()
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        with ctx.wrap_socket(raw, server_hostname="mx.pochta.test") as tls:
            t = tls.makefile("rb")
            while not t.readline().startswith(b"OK"):
                pass
            bad = base64.b64encode(b"\0bob@example.com\0wrong").decode()
            answers = []
            for _ in range(3):
                tls.sendall(f'AUTHENTICATE "PLAIN" "{bad}"\r\n'.encode())
                answers.append(t.readline())
            assert answers[0].startswith(b"NO") and answers[2].startswith(b"BYE")
            assert t.readline() == b""  # closed


def test_garbage_gets_an_answer_and_no_traceback(world):
    s, port, _ = world
    sock, f = greeted(port)
    with sock:
        sock.sendall(b"\xff\xfe\x00 NOOP\r\n")
        assert f.readline().startswith(b"NO")
        sock.sendall(b'CAPABILITY "unterminated\r\n')
        assert f.readline().startswith(b"NO")
        sock.sendall(b"X" * 100_000 + b"\r\n")  # a line far over the limit
        answer = f.readline()
        assert answer.startswith(b"BYE") and b"too long" in answer
        try:  # closed: with the rest of that line unread, by a reset
            assert f.readline() == b""
        except ConnectionResetError:
            pass
    sock, f = greeted(port)
    with sock:
        sock.sendall(b"PUTSCRIPT \"x\" {999999999+}\r\n")  # a literal over the size limit
        answer = f.readline()
        assert answer.startswith(b"BYE"), answer
    assert "Traceback" not in s.log("up")


def test_status_probes_managesieve(world):
    import json

    s, port, _ = world
    r = s.pochta("status", "--json", check=False)
    [check] = [c for c in json.loads(r.stdout)["checks"] if c["name"] == "managesieve"]
    assert check["state"] == "ok" and f"127.0.0.1:{port} answered" in check["detail"]
