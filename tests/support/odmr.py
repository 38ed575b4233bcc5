"""An ODMR customer (RFC 2645) for the tests: it logs in on the ODMR port, sends ATRN, and
after a 250 serves SMTP on the same connection, recording what it is given."""

from __future__ import annotations

import base64
import socket
from dataclasses import dataclass, field

from tests.support.smtp import Raw, client_tls


@dataclass
class Taken:
    mail_from: str
    rcpts: list[str]
    data: bytes


@dataclass
class Customer:
    port: int
    login: str
    password: str = "pw"
    # RCPT replies by address (default 250); "drop" in drop_at: hang up instead of replying
    rcpt_replies: dict[str, str] = field(default_factory=dict)
    drop_at_data: int = 0  # hang up after reading the Nth message's data, before replying
    taken: list[Taken] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.raw = Raw(self.port)  # reads lines and replies; its socket becomes TLS
        self.greeting = self.raw.greeting
        self.cmd = self.raw.cmd
        self.line = self.raw.line

    @property
    def sock(self) -> socket.socket:
        return self.raw.sock

    # -- as the client: login and ATRN --------------------------------------------------------

    def login_tls(self) -> None:
        assert self.cmd("EHLO customer.test").startswith("250")
        assert self.cmd("STARTTLS").startswith("220")
        self.raw.sock = client_tls().wrap_socket(self.raw.sock, server_hostname="mx.pochta.test")
        ehlo = self.cmd("EHLO customer.test")
        assert "ATRN" in ehlo and "AUTH" in ehlo, ehlo
        token = base64.b64encode(f"\0{self.login}\0{self.password}".encode()).decode()
        auth = self.cmd(f"AUTH PLAIN {token}")
        assert auth.startswith("235"), auth

    # -- as the server, after ATRN's 250 ------------------------------------------------------

    def serve(self) -> list[Taken]:
        """Serve the reversed session until QUIT or a planned hang-up; what was taken."""
        send = self.sock.sendall
        send(b"220 customer.test ESMTP\r\n")
        mail_from, rcpts = "", []
        while True:
            try:
                line = self.line().decode("utf-8", "replace")
            except (ConnectionError, OSError):
                return self.taken
            verb = line.split(" ", 1)[0].upper()
            if verb in ("EHLO", "HELO"):
                send(b"250-customer.test\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n250 SIZE 0\r\n")
            elif verb == "MAIL":
                mail_from, rcpts = line.split(":", 1)[1].split(" ")[0].strip("<>"), []
                send(b"250 2.1.0 ok\r\n")
            elif verb == "RCPT":
                addr = line.split(":", 1)[1].split(" ")[0].strip("<>")
                answer = self.rcpt_replies.get(addr, "250 2.1.5 ok")
                if answer.startswith("2"):
                    rcpts.append(addr)
                send(answer.encode() + b"\r\n")
            elif verb == "DATA":
                send(b"354 go ahead\r\n")
                data = b""
                while not data.endswith(b"\r\n.\r\n"):
                    data += self.line() + b"\r\n"
                if self.drop_at_data == len(self.taken) + 1:
                    self.sock.close()
                    return self.taken
                self.taken.append(Taken(mail_from, rcpts, data[:-3]))
                send(b"250 2.0.0 taken\r\n")
            elif verb in ("RSET", "NOOP"):
                send(b"250 2.0.0 ok\r\n")
            elif verb == "QUIT":
                send(b"221 2.0.0 bye\r\n")
                self.sock.close()
                return self.taken
            else:
                send(b"502 5.5.1 not here\r\n")

    def close(self) -> None:
        self.sock.close()
