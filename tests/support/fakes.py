"""Stand-ins for what cannot exist here: the internet's DNS and remote MX hosts.

``FakeDNS`` answers UDP queries on 127.0.0.1 from a zones table (like chasquid's minidns).
``SinkMX`` is a recording SMTP server on another loopback address whose replies a test scripts.
"""

from __future__ import annotations

import socket
import struct
import threading
from collections import Counter
from dataclasses import dataclass, field

import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP as AioSMTP


class FakeDNS:
    """zones: {("name.", "MX"): ["10 mx1.name."], ...}; names in ``servfail`` fail; answers
    for names in ``secure`` carry the AD bit (a validating resolver's "authenticated")."""

    def __init__(self) -> None:
        self.zones: dict[tuple[str, str], list[str]] = {}
        self.servfail: set[str] = set()
        self.secure: set[str] = set()
        # TTL 0: the tests change records while the servers run, and a resolver that caches
        # (ours does, for the TTL) must see the change at once.
        self.ttl = 0
        self.asked: Counter[tuple[str, str]] = Counter()  # (name., type) -> questions
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.running = True
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def add(self, name: str, rtype: str, *values: str, secure: bool = False) -> None:
        key = name.lower().rstrip(".") + "."
        self.zones.setdefault((key, rtype), []).extend(values)
        if secure:
            self.secure.add(key)

    def replace(self, name: str, rtype: str, *values: str) -> None:
        self.zones[(name.lower().rstrip(".") + ".", rtype)] = list(values)

    def _serve(self) -> None:
        while self.running:
            try:
                data, peer = self.sock.recvfrom(4096)
            except (TimeoutError, OSError):
                continue
            try:
                q = dns.message.from_wire(data)
            except Exception:
                continue
            r = dns.message.make_response(q)
            r.flags |= dns.flags.AA
            question = q.question[0]
            name = question.name.to_text().lower()
            rtype = dns.rdatatype.to_text(question.rdtype)
            self.asked[(name, rtype)] += 1
            if name in self.secure:
                r.flags |= dns.flags.AD
            if name in self.servfail:
                r.set_rcode(dns.rcode.SERVFAIL)
            elif (name, rtype) in self.zones:
                r.answer.append(dns.rrset.from_text_list(name, self.ttl, "IN", rtype,
                                                         self.zones[(name, rtype)]))
            elif not any(n == name for n, _ in self.zones):
                r.set_rcode(dns.rcode.NXDOMAIN)
            self.sock.sendto(r.to_wire(), peer)

    def close(self) -> None:
        self.running = False
        self.thread.join(2)
        self.sock.close()


@dataclass
class Received:
    mail_from: str
    rcpts: list[str]
    data: bytes
    tls: bool
    mail_options: list[str]


@dataclass
class SinkHandler:
    """Per-recipient scripted replies: ``rcpt_replies[address]`` is a list consumed in order."""

    messages: list[Received] = field(default_factory=list)
    rcpt_replies: dict[str, list[str]] = field(default_factory=dict)
    data_reply: str = "250 2.0.0 Ok: stored"

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        script = self.rcpt_replies.get(address.lower())
        if script:
            reply = script.pop(0) if len(script) > 1 else script[0]
            if not reply.startswith("250"):
                return reply
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server, session, envelope):
        if self.data_reply.startswith("250"):
            self.messages.append(Received(envelope.mail_from, list(envelope.rcpt_tos),
                                          envelope.original_content, session.ssl is not None,
                                          list(envelope.mail_options)))
        return self.data_reply


class _SinkController(Controller):
    def __init__(self, handler, host, port, tls_context, smtputf8, authenticator) -> None:
        self.tls_context = tls_context
        self.smtputf8 = smtputf8
        self.authenticator = authenticator
        super().__init__(handler, hostname=host, port=port)

    def factory(self):
        extra = {}
        if self.authenticator is not None:
            extra = {"authenticator": self.authenticator, "auth_required": True,
                     "auth_require_tls": True}
        return AioSMTP(self.handler, hostname="sink.test", tls_context=self.tls_context,
                       enable_SMTPUTF8=self.smtputf8, decode_data=False, **extra)


class SinkMX:
    def __init__(self, host: str, port: int, tls_context=None, smtputf8: bool = True,
                 authenticator=None) -> None:
        self.host = host
        self.port = port
        self.handler = SinkHandler()
        self.controller = _SinkController(self.handler, host, port, tls_context, smtputf8,
                                          authenticator)
        self.controller.start()

    @property
    def messages(self) -> list[Received]:
        return self.handler.messages

    def stop(self) -> None:
        self.controller.stop()


class ScriptedMX:
    """A raw SMTP peer whose replies are exact bytes: multi-line, non-UTF-8, silence.

    ``replies[VERB]`` (EHLO, MAIL, RCPT, DATA for the reply after the final dot, or
    ``greeting``) replaces the default reply; a verb in ``silent`` gets no reply at all (a
    tarpit). Received messages are kept in ``messages`` (raw DATA, dot-stuffed as sent).
    """

    def __init__(self, host: str, port: int, pipelining: bool = False) -> None:
        self.host, self.port = host, port
        self.pipelining = pipelining  # advertise PIPELINING (RFC 2920)
        self.replies: dict[str, bytes] = {}
        self.rcpt_replies: dict[bytes, bytes] = {}  # a RCPT line containing the key: its reply
        self.chunks: list[bytes] = []  # what each recv() after EHLO got, to see what was pipelined
        self.silent: set[str] = set()
        self.messages: list[bytes] = []
        self.connections = 0
        # Per connection, in order: "421-at-rcpt" (421 and close), "reset-in-data" (the
        # connection reset after the first bytes of the message), "tls-silent" (STARTTLS
        # offered and answered 220, then no handshake), "close-after-message" (the
        # connection closed once a message is stored), "421-after-message" (the next command
        # after a stored message gets 421 and the connection is closed, as a host whose idle
        # timer ran out), else a normal session.
        self.plan: list[str] = []
        self.sock = socket.create_server((host, port), reuse_port=False)
        self.sock.settimeout(0.2)
        self.running = True
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while self.running:
            try:
                conn, _ = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            self.connections += 1
            threading.Thread(target=self._session, args=(conn,), daemon=True).start()

    def _reply(self, conn: socket.socket, verb: str, default: bytes) -> bool:
        if verb in self.silent:
            return False
        conn.sendall(self.replies.get(verb, default))
        return True

    def _session(self, conn: socket.socket) -> None:
        conn.settimeout(120)
        buf = b""
        mode = self.plan.pop(0) if self.plan else "ok"
        self.messages_in_session = False  # (one session at a time in the tests that ask)
        try:
            if not self._reply(conn, "greeting", b"220 scripted.test ESMTP\r\n"):
                while self.running and conn.recv(65536):
                    pass
                return
            greeted = False
            while self.running:
                while b"\r\n" not in buf:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    if greeted:
                        self.chunks.append(chunk)
                    buf += chunk
                line, _, buf = buf.partition(b"\r\n")
                verb = line.split(b" ", 1)[0].split(b":", 1)[0].upper().decode("ascii", "replace")
                if mode == "421-after-message" and self.messages_in_session:
                    conn.sendall(b"421 4.4.2 idle too long, closing\r\n")
                    return
                if verb == "EHLO":
                    greeted = True
                    tls = b"250-STARTTLS\r\n" if mode == "tls-silent" else b""
                    tls += b"250-PIPELINING\r\n" if self.pipelining else b""
                    ok = self._reply(conn, verb, b"250-scripted.test\r\n250-8BITMIME\r\n"
                                     + tls + b"250-SMTPUTF8\r\n250 DSN\r\n")
                elif verb == "RCPT" and any(k in line for k in self.rcpt_replies):
                    conn.sendall(next(v for k, v in self.rcpt_replies.items() if k in line))
                    ok = True
                elif verb == "STARTTLS" and mode == "tls-silent":
                    conn.sendall(b"220 2.0.0 go ahead\r\n")
                    ok = False  # and never a byte of the handshake
                elif verb == "RCPT" and mode == "421-at-rcpt":
                    conn.sendall(b"421 4.3.2 shutting down\r\n")
                    return
                elif verb == "DATA" and mode == "reset-in-data":
                    conn.sendall(b"354 go ahead\r\n")
                    conn.recv(1024)
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                    struct.pack("ii", 1, 0))  # close sends RST
                    return
                elif verb == "DATA":
                    conn.sendall(b"354 go ahead\r\n")  # even with no recipient: a sloppy peer
                    while b"\r\n.\r\n" not in buf and not buf.startswith(b".\r\n"):
                        chunk = conn.recv(65536)
                        if not chunk:
                            return
                        buf += chunk
                    if buf.startswith(b".\r\n"):  # an empty message: nothing to keep
                        buf = buf[3:]
                        conn.sendall(b"554 5.5.1 no valid recipients\r\n")
                        continue
                    data, _, buf = buf.partition(b"\r\n.\r\n")
                    self.messages.append(data)
                    self.messages_in_session = True
                    ok = self._reply(conn, "DATA", b"250 2.0.0 stored\r\n")
                    if mode == "close-after-message":
                        return
                elif verb == "QUIT":
                    conn.sendall(b"221 bye\r\n")
                    return
                else:
                    ok = self._reply(conn, verb, b"250 2.0.0 ok\r\n")
                if not ok:  # silent from here on: read and drop until the peer gives up
                    while self.running and conn.recv(65536):
                        pass
                    return
        except OSError:
            return
        finally:
            conn.close()

    def stop(self) -> None:
        self.running = False
        self.sock.close()
        self.thread.join(2)


class PolicyServer:
    """An HTTPS server on ``host``:443 for MTA-STS policies (RFC 8461 §3.3): ``policies`` maps
    a Host name to (status, content type, body); its certificate, from ``ca``, names them all."""

    def __init__(self, host: str, ca, names: list[str]) -> None:
        import http.server
        import ssl

        self.policies: dict[str, tuple[int, str, bytes]] = {}
        self.requests: list[str] = []
        self.posts: list[tuple[str, str, bytes]] = []  # (host+path, content type, body)
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                name = (self.headers.get("Host") or "").split(":")[0]
                server.requests.append(f"{name}{self.path}")
                status, ctype, body = server.policies.get(name, (404, "text/plain", b"none"))
                if self.path != "/.well-known/mta-sts.txt":
                    status, ctype, body = 404, "text/plain", b"no such file"
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                if status in (301, 302):
                    self.send_header("Location", "https://elsewhere.test/policy")
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self) -> None:  # noqa: N802 (a TLS-RPT report, RFC 8460 §5.3)
                name = (self.headers.get("Host") or "").split(":")[0]
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                server.posts.append((f"{name}{self.path}",
                                     self.headers.get("Content-Type") or "", body))
                self.send_response(201)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert(*names).configure_cert(ctx)
        self.httpd = http.server.ThreadingHTTPServer((host, 443), Handler)
        self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def set(self, domain: str, body: str, status: int = 200, ctype: str = "text/plain") -> None:
        self.policies[f"mta-sts.{domain}"] = (status, ctype, body.encode())

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
