"""What the MTA, MSA and MDA listeners share on top of aiosmtpd's SMTP class.

- every reply carries an RFC 3463 enhanced status code (aiosmtpd's built-in replies mostly
  don't), except the greeting, EHLO/LHLO lines and intermediate 334/354 replies (RFC 2034 §3);
- a ``Connections`` registry that caps sessions in total and per client IP (421 4.7.0), and
  says 421 to every open session at shutdown;
- an idle timeout that says 421 4.4.2 before closing (RFC 5321 §4.5.3.2) instead of vanishing;
- DATA read by ``mta.smtp.data`` (CRLF-strict, in 64 KiB chunks), not aiosmtpd's line loop;
- ``start_listeners`` for "host:port" and "unix:/path" addresses.

Our own policy replies are written with their codes (see ``mta/replies.py``); this module only
fills in aiosmtpd's defaults.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import operator
import os
import re
import socket
import ssl
import stat
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session, _AuthMechAttr, login_always_fail, syntax

from mta.smtp import replies
from mta.smtp.data import CHUNK as DATA_CHUNK
from mta.smtp.data import DataResult, SinkFactory, read_data
from store import metrics
from store.config import parse_address

log = logging.getLogger("pochta.smtp")

_HAS_ENHANCED = re.compile(r"^\d{3}[ -][245]\.\d{1,3}\.\d{1,3}( |$)")
# The enhanced code for aiosmtpd's built-in replies that lack one, by basic code.
DEFAULT_ENHANCED = {
    "211": "2.0.0", "214": "2.0.0", "221": "2.0.0", "235": "2.7.0", "250": "2.0.0",
    "251": "2.1.5", "252": "2.5.0",
    "421": "4.3.0", "450": "4.2.0", "451": "4.3.0", "452": "4.3.1", "454": "4.7.0",
    "500": "5.5.2", "501": "5.5.4", "502": "5.5.1", "503": "5.5.1", "504": "5.5.4",
    "530": "5.7.0", "535": "5.7.8", "538": "5.7.11", "550": "5.0.0", "552": "5.3.4",
    "553": "5.1.3", "554": "5.0.0", "555": "5.5.4",
}
_SIMPLE_PATH = re.compile(r"\s*<([A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
                          r"@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*)>(.*)\Z", re.DOTALL)
NO_ENHANCED = {"220", "334", "354"}
# Final replies that may wait for the next command's (see BaseSMTP._pipelined); not those
# followed by a close (221, 421, aiosmtpd's 502 for too many bad commands) or a TLS handshake.
HOLDABLE = {b"250", b"251", b"252", b"450", b"451", b"452", b"500", b"501", b"503", b"550",
            b"551", b"552", b"553", b"554", b"555"}
BDAT_ARGS = re.compile(r"(\d{1,10})(?: +(LAST))?", re.IGNORECASE)  # RFC 3030 §2
DATA_ERRORS = {
    "size": replies.MESSAGE_TOO_BIG,
    "line": replies.LINE_TOO_LONG,
    "bare-eol": replies.BARE_EOL,
    "storage": replies.SPOOL_FULL,
    "io": replies.LOCAL_ERROR,
}


@functools.lru_cache(maxsize=1024)  # replies repeat: a few dozen texts make most of them
def with_enhanced_code(line: str) -> str:
    """Add the default enhanced status code to one reply line that has none."""
    code = line[:3]
    if code in NO_ENHANCED or _HAS_ENHANCED.match(line) or code not in DEFAULT_ENHANCED:
        return line
    sep, text = line[3:4] or " ", line[4:]
    return f"{code}{sep}{DEFAULT_ENHANCED[code]} {text}".rstrip()


def enhanced_status(line: bytes) -> str:
    """"5.7.1" of b"550 5.7.1 text"; the basic code when there is none (a greeting)."""
    parts = line.split(b" ", 2)
    if len(parts) > 1 and _ENHANCED_ONLY.fullmatch(parts[1]):
        return parts[1].decode()
    return line[:3].decode(errors="replace")


_ENHANCED_ONLY = re.compile(rb"[245]\.\d{1,3}\.\d{1,3}")


class Connections:
    """Open sessions of one server process: limits on entry, a 421 to each at shutdown."""

    def __init__(self, max_total: int, max_per_ip: int,
                 exempt: Callable[[str], bool] | None = None) -> None:
        """``exempt(ip)``: clients without a per-address limit (trusted networks, as Postfix
        exempts $mynetworks: a local application may open many sessions)."""
        self.max_total = max_total
        self.max_per_ip = max_per_ip
        self.exempt = exempt
        self.open: set[BaseSMTP] = set()
        self.per_ip: Counter[str] = Counter()
        self.handshakes = 0  # implicit-TLS connections still in their handshake
        self.closing = False

    def admit(self, proto: BaseSMTP) -> str | None:
        """Register ``proto``; return a refusal reply if a limit is reached."""
        if self.closing:
            return replies.SHUTTING_DOWN
        ip = proto.peer_ip
        if self.max_total and len(self.open) + self.handshakes >= self.max_total:
            return replies.TOO_MANY_CONNECTIONS
        if (self.max_per_ip and ip and self.per_ip[ip] >= self.max_per_ip
                and not (self.exempt is not None and self.exempt(ip))):
            return replies.TOO_MANY_FROM_ADDRESS
        self.open.add(proto)
        if ip:
            self.per_ip[ip] += 1
        return None

    def release(self, proto: BaseSMTP) -> None:
        if proto in self.open:
            self.open.discard(proto)
            ip = proto.peer_ip
            if ip:
                self.per_ip[ip] -= 1
                if self.per_ip[ip] <= 0:
                    del self.per_ip[ip]

    def begin_handshake(self, ip: str) -> bool:
        """An implicit-TLS connection before its handshake: counted against the same limits
        (a client opening thousands of TCP connections to 465 and never saying hello must
        not get past them); False: close it."""
        if self.closing or (self.max_total and len(self.open) + self.handshakes >= self.max_total):
            return False
        if (self.max_per_ip and ip and self.per_ip[ip] >= self.max_per_ip
                and not (self.exempt is not None and self.exempt(ip))):
            return False
        self.handshakes += 1
        if ip:
            self.per_ip[ip] += 1
        return True

    def end_handshake(self, ip: str) -> None:
        self.handshakes -= 1
        if ip:
            self.per_ip[ip] -= 1
            if self.per_ip[ip] <= 0:
                del self.per_ip[ip]

    def shutdown(self, hostname: str) -> None:
        """Tell every open session we are going away (RFC 5321 §3.8) and close it."""
        self.closing = True
        for proto in list(self.open):
            proto.say_and_close(replies.SHUTTING_DOWN_HOST.format(host=hostname))


class Handler:
    """The handler contract beyond aiosmtpd's ``handle_VERB`` hooks (which it finds by name):
    our handlers derive from this class and override what they use. Nothing here may be
    named ``auth_*`` or ``handle_*``: aiosmtpd would take it for a mechanism or a hook."""

    offers_auth = False  # AUTH exists on this listener (submission)
    offers_etrn = False  # ETRN exists on this listener (port 25)

    async def on_connect(self, server: BaseSMTP) -> str | None:
        """Before the greeting: a refusal reply, or None to go on."""
        return None

    # Where a message larger than SPILL_AT goes as it arrives: a factory of (file, path), or
    # None to keep every message in memory.
    data_sink: SinkFactory | None = None


# Per (protocol class, handler class): the names aiosmtpd's __init__ finds by introspection.
Names = dict[str, str]  # verb -> attribute, e.g. "MAIL" -> "smtp_MAIL"
_INTROSPECTED: dict[tuple[type, type], tuple[dict[str, tuple[str, bool]], Names, Names]] = {}


class BoundOnUse(Mapping[str, Any]):
    """verb -> bound method, bound when looked up: aiosmtpd binds some 25 per connection."""

    __slots__ = ("_obj", "_names")

    def __init__(self, obj: Any, names: Names) -> None:
        self._obj = obj
        self._names = names

    def __getitem__(self, verb: str) -> Any:
        return getattr(self._obj, self._names[verb])

    def __contains__(self, verb: object) -> bool:
        return verb in self._names

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


class SessionVerbs(BoundOnUse):
    """A session's verb table, counting each lookup of aiosmtpd's command loop against the
    listener's call limits (aiosmtpd's own count is a table per session from its first
    moment, an idle one's too): over its limit, a verb's method is the 421 and the close.
    HELP's look-up of its argument counts too: "HELP NOOP" is one NOOP more."""

    __slots__ = ()

    def get(self, verb: str, default: Any = None) -> Any:
        proto: BaseSMTP = self._obj
        limits = proto._settings.call_limits
        if limits is not None and verb in self._names:
            calls = proto._calls
            if calls is None:
                calls = proto._calls = {}
            calls[verb] = count = calls.get(verb, 0) + 1
            if count > limits.get(verb, limits.get("*", 20)):
                return functools.partial(proto.over_call_limit, verb)
        return super().get(verb, default)


def _introspect(proto: SMTP, handler: Any) -> tuple[dict[str, tuple[str, bool]], Names, Names]:
    key = (type(proto), type(handler))
    if key not in _INTROSPECTED:
        auth: dict[str, tuple[str, bool]] = {}
        for obj in (proto, handler):
            for name in dir(obj):
                if name.startswith("auth_"):
                    func = getattr(obj, name)
                    mech = getattr(func, "__auth_mechanism_name__",
                                   name.replace("auth_", "").replace("__", "-"))
                    auth[mech] = (name, obj is proto)
        hooks = {m[len("handle_"):]: m for m in dir(handler) if m.startswith("handle_")}
        verbs = {m[len("smtp_"):]: m for m in dir(proto) if m.startswith("smtp_")}
        _INTROSPECTED[key] = (auth, hooks, verbs)
    return _INTROSPECTED[key]


@dataclass(frozen=True, eq=False)
class ListenerSettings:
    """What every session of one listener shares: aiosmtpd keeps it per connection (some 25
    attributes each); here one object per listener and config, read through properties."""

    handler: Any
    connections: Connections
    listener: str
    ident: str
    hostname: str
    data_size_limit: int | None
    enable_SMTPUTF8: bool
    decode_data: bool
    tls_context: ssl.SSLContext | None
    require_starttls: Any
    timeout: float
    auth_required: bool
    auth_require_tls: bool
    authenticator: Any
    call_limits: dict[str, int] | None
    max_errors: int
    auth: dict[str, tuple[str, bool]]  # mechanism -> (attribute, on the protocol itself)
    hooks: BoundOnUse
    verbs: Names
    loop: asyncio.AbstractEventLoop


_SETTINGS: dict[tuple[Any, ...], ListenerSettings] = {}


def listener_settings(proto: BaseSMTP, handler: Any, connections: Connections, listener: str,
                      max_errors: int, *, data_size_limit: int | None = None,
                      enable_SMTPUTF8: bool = False, decode_data: bool = False,
                      hostname: str | None = None, ident: str | None = None,
                      tls_context: ssl.SSLContext | None = None, require_starttls: bool = False,
                      timeout: float = 300, auth_required: bool = False,
                      auth_require_tls: bool = True,
                      command_call_limit: dict[str, int] | None = None,
                      authenticator: Any = None) -> ListenerSettings:
    """The shared settings for these arguments: made once, then found by their values."""
    loop = asyncio.get_event_loop()
    key = (type(proto), handler, connections, listener, max_errors, data_size_limit,
           enable_SMTPUTF8, decode_data, hostname, ident, tls_context, require_starttls,
           timeout, auth_required, auth_require_tls, id(command_call_limit), authenticator, loop)
    found = _SETTINGS.get(key)
    if found is None:
        assert hostname, "pass the configured hostname: None makes aiosmtpd call getfqdn()"
        auth, hooks, verbs = _introspect(proto, handler)
        if len(_SETTINGS) >= 64:
            _SETTINGS.clear()  # reloads made new handlers: the old keys go
        found = _SETTINGS[key] = ListenerSettings(
            handler=handler, connections=connections, listener=listener, ident=ident or "ESMTP",
            hostname=hostname, data_size_limit=data_size_limit,
            enable_SMTPUTF8=enable_SMTPUTF8, decode_data=decode_data, tls_context=tls_context,
            require_starttls=tls_context and require_starttls,  # as aiosmtpd (may be None)
            timeout=timeout, auth_required=auth_required, auth_require_tls=auth_require_tls,
            authenticator=authenticator, call_limits=command_call_limit,
            max_errors=max_errors, auth=auth, hooks=BoundOnUse(handler, hooks), verbs=verbs,
            loop=loop)
    return found


def _shared(name: str, doc: str = "") -> Any:
    return property(operator.attrgetter(f"_settings.{name}"), doc=doc)


class BaseSMTP(SMTP):
    """aiosmtpd's SMTP with enhanced status codes, connection limits and a polite timeout."""

    # aiosmtpd's per-connection attributes that only a reload changes: the listener's.
    event_handler = _shared("handler")
    connections = _shared("connections")
    listener = _shared("listener", "the metrics' label: smtp, submission, submissions, lmtp")
    __ident__ = _shared("ident")
    hostname = _shared("hostname")
    data_size_limit = _shared("data_size_limit")
    enable_SMTPUTF8 = _shared("enable_SMTPUTF8")
    _decode_data = _shared("decode_data")
    tls_context = _shared("tls_context")
    require_starttls = _shared("require_starttls")
    _timeout_duration = _shared("timeout")
    _auth_require_tls = _shared("auth_require_tls")
    _authenticator = _shared("authenticator")
    _handle_hooks = _shared("hooks")
    max_errors = _shared("max_errors")
    loop = _shared("loop")
    _proxy_timeout = None
    _enforce_call_limit = False  # counted in _smtp_methods (SessionVerbs): no table per session
    # What aiosmtpd sets per connection to a value that a session changes only rarely (STARTTLS,
    # our counters): the class holds the initial value, an assignment makes the session's own.
    _tls_handshake_okay = True
    _tls_protocol = None
    _original_transport = None
    _timeout_handle = None
    _handler_coroutine = None
    _deadline = 0.0
    _in_greeting_reply = False
    _hold_all = False  # within EHLO: every line waits for the last
    _admitted = False
    _calls: dict[str, int] | None = None  # commands so far, by verb (for call limits)
    errors = 0
    peer_ip = ""
    session: Session | None = None
    envelope: Envelope | None = None
    transport: asyncio.BaseTransport | None = None

    def __init__(self, handler: Handler, *, connections: Connections, listener: str = "smtp",
                 max_errors: int = 0, **kwargs: Any) -> None:
        """aiosmtpd 1.4's SMTP.__init__ without its per-connection introspection and tables.

        SMTP.__init__ walks dir() of the protocol and the handler and builds an inspect
        signature on every connection (a sixth of the MTA's CPU per message in the
        benchmark), and sets some 50 attributes: more than CPython shares between instances,
        so each idle session carried a 1.6 KB dict. tests/component/test_smtpserver.py
        checks that every attribute reads as after SMTP.__init__.
        """
        self._settings = listener_settings(self, handler, connections, listener, max_errors,
                                           **kwargs)
        asyncio.StreamReaderProtocol.__init__(
            self, asyncio.StreamReader(loop=self.loop, limit=self.line_length_limit),
            client_connected_cb=self._cb_client_connected, loop=self.loop)
        self._auth_required = self._settings.auth_required
        self._held: list[bytes] = []  # replies not sent yet: they go out with the next one

    @property
    def _ehlo_hook_ver(self) -> str | None:  # type: ignore[override]
        return "new" if "EHLO" in self._settings.hooks else None

    @property
    def _auth_methods(self) -> dict[str, _AuthMechAttr]:  # type: ignore[override]
        """Only AUTH and EHLO on submission read it: bound when they do."""
        return {mech: _AuthMechAttr(getattr(self if builtin else self.event_handler, name),
                                    builtin)
                for mech, (name, builtin) in self._settings.auth.items()}

    @property
    def _smtp_methods(self) -> SessionVerbs:  # type: ignore[override]
        return SessionVerbs(self, self._settings.verbs)

    @property
    def _auth_callback(self) -> Any:  # type: ignore[override]
        return None if self._authenticator is not None else login_always_fail

    @property
    def _call_limit_base(self) -> dict[str, int]:  # type: ignore[override]
        return self._settings.call_limits or {}

    @property
    def _call_limit_default(self) -> int:  # type: ignore[override]
        return (self._settings.call_limits or {}).get("*", 20)

    @property
    def handler(self) -> Handler:
        """aiosmtpd's ``event_handler``, typed: the contract our code relies on."""
        handler: Handler = self.event_handler
        return handler

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        """aiosmtpd's path parser (RFC 5322 machinery, a class definition per call) is a tenth
        of a session's CPU per message; plain <local@domain> paths take a regex instead."""
        m = _SIMPLE_PATH.match(arg)
        if m:
            rest = m.group(2).lstrip(" \t")  # as aiosmtpd: the space before parameters goes
            if not rest.startswith("("):  # a comment: the full parser's business
                return m.group(1), rest
        stripped = arg.lstrip()
        if stripped.startswith("<>"):
            return "<>", stripped[2:]
        try:
            return super()._getaddr(arg)
        except (AttributeError, IndexError, TypeError, ValueError):
            # The email package's parser trips over some malformed paths ("<a@[>"):
            # a malformed address (553), not a local error (451 and a traceback).
            return None, None

    # -- connection lifecycle -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        first = self.transport is None
        if first:
            peer = transport.get_extra_info("peername")
            self.peer_ip = peer[0] if isinstance(peer, tuple) else ""
        super().connection_made(transport)
        if not first and self._original_transport is not None:  # STARTTLS's handshake done
            count_tls(self.listener, transport)

    async def _handle_client(self) -> None:
        refusal = self.connections.admit(self)
        if refusal is not None:
            log.info("refused connection from %s: %s", self.peer_ip or "local", refusal)
            await self.push(refusal)
            self._close_transport()
            return
        self._admitted = True
        metrics.CONNECTIONS.labels(self.listener).inc()
        metrics.SESSIONS.labels(self.listener).inc()
        refusal = await self.handler.on_connect(self)
        if refusal is not None:
            log.info("refused connection from %s: %s", self.peer_ip or "local", refusal)
            if self.transport is not None and not self.transport.is_closing():
                await self.push(refusal)
                self._close_transport()
            return
        await super()._handle_client()

    async def talks_before_greeting(self, delay: float) -> bool:
        """Pre-greeting test (Postfix postscreen): send the first banner line, wait, and see
        whether the client spoke before our banner ended, as spam bots in a hurry do."""
        self._writer.write(f"220-{self.hostname} ESMTP\r\n".encode())
        await self._writer.drain()
        await asyncio.sleep(delay)
        return len(self._reader._buffer) > 0  # type: ignore[attr-defined]

    def connection_lost(self, error: Exception | None) -> None:
        self.connections.release(self)
        if self._admitted:
            self._admitted = False
            metrics.SESSIONS.labels(self.listener).dec()
        if self.session is None:
            # asyncio's TLS layer may report a failed implicit-TLS handshake as the loss of a
            # connection that was never made: no session to end (aiosmtpd would assert).
            self._break_cycles()
            return
        super().connection_lost(error)
        task = self._handler_coroutine  # cancelled by aiosmtpd: it ends on the next turn
        if task is None or task.done():
            self._break_cycles()
        else:
            task.add_done_callback(self._break_cycles)

    def _break_cycles(self, _task: object = None) -> None:
        """Drop what points back at this session, so refcounting frees it at once.

        Every session was a cycle of some 30 objects (the verb and hook tables bind our
        methods, the writer knows its protocol, the cancelled task's traceback holds the
        command loop's frame): the young-generation collections that found them cost the MTA
        ~2.5 ms each, and the full ones that followed 6-13 ms, stalling every session.
        """
        self._handler_coroutine = None
        self._client_connected_cb = None
        self._reader = self._writer = None  # type: ignore[assignment]

    async def over_call_limit(self, verb: str, _arg: str | None) -> None:
        log.warning("%s: over the limit for %s", self.peer_ip or "local", verb)
        self.say_and_close(replies.TOO_MANY_CALLS.format(verb=verb))

    def _close_transport(self) -> None:
        if self.transport is not None:
            self._flush_held()  # e.g. a refusal to a client that talked before the banner
            self.transport.close()

    def say_and_close(self, reply: str) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        with contextlib.suppress(Exception):
            self._flush_held()
            self._writer.write(reply.encode() + b"\r\n")
        self._close_transport()

    def _reset_timeout(self, duration: float | None = None) -> None:
        """aiosmtpd re-arms a timer at each command (and we at each DATA chunk): a heap push
        and a cancel each time. This moves a deadline; the one timer re-arms itself when it
        fires before it (RFC 5321 §4.5.3.2 times stay as they were)."""
        self._deadline = self.loop.time() + (duration or self._timeout_duration)
        handle = self._timeout_handle
        if handle is None or handle.cancelled() or handle.when() > self._deadline:
            if handle is not None:
                handle.cancel()
            self._timeout_handle = self.loop.call_at(self._deadline, self._on_timer)

    def _on_timer(self) -> None:
        if self.loop.time() < self._deadline:
            self._timeout_handle = self.loop.call_at(self._deadline, self._on_timer)
            return
        self._timeout_cb()

    def _timeout_cb(self) -> None:
        # RFC 5321 §4.5.3.2: the server may close an idle session; say so with a 421.
        log.info("%s idle timeout", self.peer_ip or "local")
        self.say_and_close(replies.IDLE_TIMEOUT.format(host=self.hostname))

    # -- replies ------------------------------------------------------------------------------

    async def push(self, status: str | bytes) -> None:
        if isinstance(status, str) and not self._in_greeting_reply:
            status = with_enhanced_code(status) if "\r\n" not in status else "\r\n".join(
                with_enhanced_code(line) for line in status.split("\r\n"))
        data = (status if isinstance(status, bytes) else status.encode(
            "utf-8" if self.enable_SMTPUTF8 else "ascii")) + b"\r\n"
        if data[0] in b"45":
            for line in data.split(b"\r\n")[-2:-1]:  # the last line carries the final code
                metrics.REFUSALS.labels(self.listener, enhanced_status(line)).inc()
        self._held.append(data)
        if self._hold_all or (data[:3] in HOLDABLE and self._pipelined()):
            return
        self._flush_held()
        await self._writer.drain()

    def _pipelined(self) -> bool:
        """Another command is already here: this reply can go out with the next one's (RFC
        2920 §3: a server flushes when its input runs dry). One send instead of one per reply,
        and on loopback each send costs some 40 us (it runs the receiver's TCP input)."""
        return b"\n" in self._reader._buffer  # type: ignore[attr-defined]

    def _flush_held(self) -> None:
        if self._held and self.transport is not None and not self.transport.is_closing():
            self._writer.write(b"".join(self._held))
        self._held.clear()

    @syntax("DATA")
    async def smtp_DATA(self, arg: str) -> None:
        if await self.check_helo_needed():
            return
        if await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push(replies.NEED_RCPT)
            return
        if arg:
            await self.push(replies.DATA_SYNTAX)
            return
        await self.push(replies.START_DATA)
        with self.reading_data():
            result = await read_data(self._reader, self.data_size_limit, self._reset_timeout,
                                     self.handler.data_sink)
        if result.error is not None:
            log.info("%s: DATA refused (%s, %d octets)", self.peer_ip, result.error, result.size)
            refusal = self.data_refusal(DATA_ERRORS[result.error])  # (before the reset)
            self._set_post_data_state()
            await self.push(refusal)
            return
        await self.deliver_message(result)

    async def deliver_message(self, result: DataResult) -> None:
        """A whole message (DATA or BDAT LAST) to the handler, and its reply to the client."""
        assert self.envelope is not None
        self.envelope.content = self.envelope.original_content = result.content
        self.envelope.spilled = result.path  # type: ignore[attr-defined]
        try:
            status = await self._call_handler_hook("DATA")
        finally:
            if result.path is not None:  # the handler has copied it into the spool, or not
                with contextlib.suppress(OSError):
                    os.unlink(result.path)
        self._set_post_data_state()
        await self.push(status)

    async def bdat_arguments(self, arg: str | None) -> tuple[int, bool] | None:
        """BDAT's chunk size and LAST (RFC 3030 §2); None after a 501 and the end of the
        session when the size is missing: what follows cannot be told from commands."""
        m = BDAT_ARGS.fullmatch((arg or "").strip())
        if m is None:
            await self.push(replies.BDAT_SYNTAX)
            self._close_transport()
            return None
        return int(m.group(1)), m.group(2) is not None

    async def read_chunk(self, size: int, take: Callable[[bytes], object] | None) -> None:
        """Read a BDAT chunk whatever the reply will be (it is data, not commands), handing
        each block to ``take``; None: read and drop it."""
        remaining = size
        with self.reading_data():
            while remaining:
                block = await self._reader.read(min(remaining, DATA_CHUNK))
                if not block:
                    raise ConnectionResetError("connection closed within a BDAT chunk")
                remaining -= len(block)
                self._reset_timeout()
                if take is not None:
                    take(block)

    def data_refusal(self, reply: str) -> str:
        """What a refused message is answered: one reply (LMTP: one per recipient)."""
        return reply

    @contextlib.contextmanager
    def reading_data(self) -> Iterator[None]:
        """The message is read in 64 KiB chunks: the reader's limit (the longest command line)
        would otherwise pause the socket every 2 KB and resume it at the next read, two epoll
        calls and a loop turn each time, for every message over 2 KB."""
        reader = self._reader  # (the MTA's line-checking proxy passes attributes through)
        old = reader._limit  # type: ignore[attr-defined]
        reader._limit = max(old, DATA_CHUNK)  # type: ignore[attr-defined]
        try:
            yield
        finally:
            reader._limit = old  # type: ignore[attr-defined]

    async def smtp_EHLO(self, hostname: str) -> None:
        # aiosmtpd pushes each EHLO line on its own (a send each): they go in one write.
        self._in_greeting_reply = bool(hostname)  # 501 for a missing name still gets a code
        self._hold_all = True
        try:
            await super().smtp_EHLO(hostname)
        finally:
            self._in_greeting_reply = False
            self._hold_all = False
        if self.transport is not None and not self.transport.is_closing():
            self._flush_held()
            await self._writer.drain()


TLS_HANDSHAKE_TIMEOUT = 30.0  # seconds for an implicit-TLS client to finish its handshake


class ImplicitTLSGate(asyncio.Protocol):
    """An implicit-TLS (port 465) connection until its handshake is done.

    asyncio's TLS server hands a connection to the protocol only after the handshake, so
    neither our connection limits nor our timeout would see a client that connects and never
    sends a ClientHello. Here the plain TCP connection is counted first (closed at once
    beyond the limits: there is no cleartext to say 421 in), the handshake gets
    ``TLS_HANDSHAKE_TIMEOUT``, and only then does the SMTP session begin on the TLS transport.
    """

    def __init__(self, factory: Callable[[], asyncio.Protocol], context: ssl.SSLContext,
                 connections: Connections) -> None:
        self.factory = factory
        self.context = context
        self.connections = connections

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        transport.pause_reading()  # the ClientHello is for start_tls, not for us
        peer = transport.get_extra_info("peername")
        ip = peer[0] if isinstance(peer, tuple) else ""
        if not self.connections.begin_handshake(ip):
            log.info("refused implicit-TLS connection from %s: too many", ip or "local")
            transport.abort()
            return
        asyncio.get_running_loop().create_task(self._handshake(transport, ip))

    async def _handshake(self, transport: asyncio.Transport, ip: str) -> None:
        protocol = self.factory()
        try:
            tls = await asyncio.get_running_loop().start_tls(
                transport, protocol, self.context, server_side=True,
                ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT)
        except (OSError, ssl.SSLError, TimeoutError, ConnectionError) as e:
            log.info("TLS handshake with %s failed: %s", ip or "local", e or "timed out")
            transport.abort()
            return
        finally:
            self.connections.end_handshake(ip)
        if tls is None or tls.is_closing():
            return
        count_tls(getattr(protocol, "listener", "?"), tls)
        protocol.connection_made(tls)


def count_tls(listener: str, transport: asyncio.BaseTransport) -> None:
    obj = transport.get_extra_info("ssl_object")
    if obj is not None:
        metrics.TLS_SESSIONS.labels(listener, obj.version() or "unknown").inc()


async def start_listeners(
    addresses: Iterable[str],
    factory: Callable[[], asyncio.Protocol],
    *,
    ssl_context: ssl.SSLContext | None = None,
    connections: Connections | None = None,
    key: str = "listen",
) -> list[asyncio.base_events.Server]:
    """Listen on each "host:port" or "unix:/path"; a stale unix socket file is replaced.

    ``ssl_context``: implicit TLS, its handshakes counted in ``connections`` (see
    ImplicitTLSGate)."""
    loop = asyncio.get_running_loop()
    servers = []
    if ssl_context is not None:
        assert connections is not None
        context, inner = ssl_context, factory

        def factory() -> asyncio.Protocol:
            return ImplicitTLSGate(inner, context, connections)

        ssl_context = None
    for addr in addresses:
        if addr.startswith("unix:"):
            path = addr[len("unix:"):]
            with contextlib.suppress(FileNotFoundError):
                if stat.S_ISSOCK(os.lstat(path).st_mode):
                    os.unlink(path)
            old = os.umask(0o117)  # socket mode 0660: owner and group only
            try:
                srv = await loop.create_unix_server(factory, path, ssl=ssl_context)
            finally:
                os.umask(old)
        else:
            host, port = parse_address(addr, key)
            srv = await loop.create_server(factory, host, port, ssl=ssl_context,
                                           reuse_address=True, backlog=512,
                                           family=socket.AF_INET6 if ":" in host else socket.AF_INET)
        servers.append(srv)
    return servers
