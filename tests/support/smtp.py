"""SMTP from the test's side: a raw client, sending with smtplib, waiting for mail."""

from __future__ import annotations

import smtplib
import socket
import ssl
import time

from tests.support.stack import Stack, mail_files


def wait_for(predicate, timeout=20.0, interval=0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    return predicate()


def mailbox(stack: Stack, address: str) -> list[bytes]:
    return [p.read_bytes() for p in mail_files(stack.mailbox_root, address)]


def wait_mail(stack: Stack, address: str, n: int, timeout: float = 20) -> list[bytes]:
    wait_for(lambda: len(mail_files(stack.mailbox_root, address)) >= n, timeout)
    got = mailbox(stack, address)
    assert len(got) == n, f"{address}: {len(got)} messages, expected {n}\n{stack.log('up')}"
    return got


class Raw:
    """A raw SMTP client: exact bytes out, reply lines in."""

    def __init__(self, port: int, host: str = "127.0.0.1", source: str | None = None) -> None:
        self.sock = socket.create_connection((host, port), timeout=15,
                                             source_address=(source, 0) if source else None)
        self.buf = b""
        self.greeting = self.reply()

    def line(self) -> bytes:
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed")
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\r\n")
        return line

    def reply(self) -> str:
        lines: list[str] = []
        while True:
            try:
                line = self.line()
            except ConnectionError:
                raise ConnectionError("closed: " + " | ".join(lines)) from None
            lines.append(line.decode("utf-8", "replace"))
            if line[3:4] != b"-":
                return "\n".join(lines)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def cmd(self, line: str) -> str:
        self.send(line.encode() + b"\r\n")
        return self.reply()

    def close(self) -> None:
        self.sock.close()


def send(stack, sender, rcpts, body: bytes, **kw):
    with smtplib.SMTP("127.0.0.1", stack.mta_port, timeout=15) as c:
        c.ehlo("client.test")
        return c.sendmail(sender, rcpts, body, **kw)


def client_tls() -> ssl.SSLContext:
    """A client's TLS that checks nothing: our test certificates are self-signed."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def server_tls(name: str) -> ssl.SSLContext:
    """A peer's server TLS with a certificate for ``name`` from a throw-away CA (trustme)."""
    import trustme

    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    trustme.CA().issue_cert(name).configure_cert(ctx)
    return ctx


def starttls_certificate(port: int):
    """The certificate a server on ``port`` presents after STARTTLS (cryptography's x509)."""
    from cryptography import x509

    with smtplib.SMTP("127.0.0.1", port, timeout=30) as c:
        c.starttls(context=client_tls())
        der = c.sock.getpeercert(binary_form=True)
    return x509.load_der_x509_certificate(der)
