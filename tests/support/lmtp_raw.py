"""A raw LMTP conversation over a socket, independent of pochta's own client."""

from __future__ import annotations

import socket

from tests.support.smtp import Raw


class RawLMTP(Raw):
    """Raw's line and reply reading, over TCP or a unix socket; QUIT on close."""

    def __init__(self, addr: str, timeout: float = 15) -> None:
        if addr.startswith("unix:"):
            self.sock = socket.socket(socket.AF_UNIX)
            self.sock.settimeout(timeout)
            self.sock.connect(addr[5:])
        else:
            host, port = addr.rsplit(":", 1)
            self.sock = socket.create_connection((host, int(port)), timeout=timeout)
        self.buf = b""
        self.greeting = self.reply()

    def send_data(self, data: bytes) -> None:
        self.send(data)

    def close(self) -> None:
        try:
            self.sock.sendall(b"QUIT\r\n")
        except OSError:
            pass
        self.sock.close()


def lmtp_send(addr, mail_from, rcpts, data, mail_params=""):
    """One transaction; (RCPT replies, DATA replies) read from the socket ourselves."""
    c = RawLMTP(addr)
    assert c.greeting.startswith("220 ")
    assert c.cmd("LHLO client.test").startswith("250")
    assert c.cmd(f"MAIL FROM:<{mail_from}>{mail_params}").startswith("250")
    rcpt_replies = [c.cmd(f"RCPT TO:<{r}>") for r in rcpts]
    accepted = sum(r.startswith("250") for r in rcpt_replies)
    data_replies = []
    if accepted:
        assert c.cmd("DATA").startswith("354")
        stuffed = data.replace(b"\r\n.", b"\r\n..")
        c.send_data(stuffed + b".\r\n")
        data_replies = [c.reply() for _ in range(accepted)]
    c.close()
    return rcpt_replies, data_replies
