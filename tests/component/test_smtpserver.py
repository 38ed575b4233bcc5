"""Our fast protocol constructor sets exactly what aiosmtpd's SMTP.__init__ sets."""

import asyncio

from aiosmtpd.smtp import SMTP

from mda.session import LMTPHandler, LMTPProtocol
from mta.smtp.protocol import CALL_LIMITS, SMTPProtocol
from mta.smtp.server import Connections, with_enhanced_code
from mta.submission import SubmissionHandler

IGNORED = {"_stream_reader_wr", "_strong_reader", "_source_traceback", "_stream_reader",
           "_loop", "_paused", "_drain_waiters", "_connection_lost", "_closed", "_over_ssl",
           "_task"}


def _state(proto) -> dict:
    out = {}
    for k, v in vars(proto).items():
        if k in IGNORED:
            continue
        if isinstance(v, dict):
            v = {kk: (getattr(vv, "__func__", vv), ) if callable(vv) else vv
                 for kk, vv in v.items()}
        elif hasattr(v, "__func__"):
            v = v.__func__
        out[k] = v
    return out


def _compare(cls, handler, **kwargs):
    async def build():
        ours = cls(handler, connections=Connections(1, 1), **kwargs)
        theirs = cls.__new__(cls)
        SMTP.__init__(theirs, handler, **kwargs)
        theirs.connections = ours.connections
        theirs.peer_ip, theirs._in_greeting_reply, theirs._admitted = "", False, False
        theirs.listener = "smtp"
        theirs._held, theirs._hold_all, theirs._deadline = [], False, 0.0
        if hasattr(ours, "errors"):
            theirs.max_errors, theirs.errors = ours.max_errors, ours.errors
        a, b = _state(ours), _state(theirs)
        for key in ("_auth_methods",):
            a[key] = {m: (v.is_builtin, v.method.__name__) for m, v in ours._auth_methods.items()}
            b[key] = {m: (v.is_builtin, v.method.__name__) for m, v in theirs._auth_methods.items()}
        a.pop("_reader", None), b.pop("_reader", None)
        assert set(a) == set(b)
        for k in a:
            if k in ("_smtp_methods", "_handle_hooks"):
                assert set(a[k]) == set(b[k]), k
            elif k not in ("loop",):
                assert a[k] == b[k], k

    asyncio.run(build())


def test_fast_init_matches_aiosmtpd_for_submission():
    handler = SubmissionHandler.__new__(SubmissionHandler)
    handler.offers_auth = True
    _compare(SMTPProtocol, handler, hostname="mx.test", ident="ESMTP", data_size_limit=1000,
             enable_SMTPUTF8=True, decode_data=False, tls_context=None, timeout=300,
             auth_required=True, auth_require_tls=True, command_call_limit=CALL_LIMITS)


def test_fast_init_matches_aiosmtpd_for_lmtp():
    _compare(LMTPProtocol, LMTPHandler.__new__(LMTPHandler), hostname="mx.test", ident="LMTP",
             data_size_limit=1000, enable_SMTPUTF8=True, decode_data=False, timeout=30)


def test_enhanced_codes_filled_in():
    assert with_enhanced_code("250 OK") == "250 2.0.0 OK"
    assert with_enhanced_code("503 Error: need MAIL command") == "503 5.5.1 Error: need MAIL command"
    assert with_enhanced_code("550 5.1.1 <x> no") == "550 5.1.1 <x> no"
    assert with_enhanced_code("354 End data") == "354 End data"
    assert with_enhanced_code("250-SIZE 100").startswith("250-2.0.0 ")


def test_a_closed_session_is_freed_without_the_garbage_collector():
    """A session must not be a reference cycle: the collections that find thousands of them
    stall every open session (up to 90 ms in the MTA under load)."""
    import gc
    import weakref

    from mta.smtp.server import BaseSMTP
    from mta.smtp.server import Handler as HandlerBase

    class Handler(HandlerBase):  # the contract every handler of ours follows
        async def handle_DATA(self, server, session, envelope):
            return "250 2.0.0 OK"

    async def main():
        sessions: list[weakref.ref] = []
        connections = Connections(10, 10)

        def factory():
            proto = BaseSMTP(Handler(), connections=connections, hostname="mx.test")
            sessions.append(weakref.ref(proto))
            return proto

        server = await asyncio.get_running_loop().create_server(factory, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        for command in (b"QUIT\r\n", b"EHLO c.test\r\nMAIL FROM:<a@b.test>\r\n"):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            await reader.readline()
            writer.write(command)
            await writer.drain()
            if command.startswith(b"EHLO"):
                # mid-transaction: the client vanishes
                await asyncio.wait_for(reader.readuntil(b"250 2.0.0 OK\r\n"), 5)
            else:
                await asyncio.wait_for(reader.read(), 5)
            writer.close()
            await writer.wait_closed()
        for _ in range(50):  # the server side ends a few loop turns later
            await asyncio.sleep(0.01)
            if all(ref() is None for ref in sessions):
                break
        server.close()
        await server.wait_closed()
        return sessions

    gc.collect()
    gc.disable()
    try:
        sessions = asyncio.run(asyncio.wait_for(main(), 30))
        assert len(sessions) == 2
        assert [ref() for ref in sessions] == [None, None]
    finally:
        gc.enable()


def test_a_connection_lost_before_it_was_made_is_no_error():
    """asyncio's TLS layer may report a failed implicit-TLS handshake (a probe that connects
    and hangs up) as connection_lost of a protocol whose connection_made never ran."""
    from mta.smtp.server import BaseSMTP
    from mta.smtp.server import Handler as HandlerBase

    async def main():
        connections = Connections(10, 10)
        proto = BaseSMTP(HandlerBase(), connections=connections, hostname="mx.test")
        proto.connection_lost(ConnectionResetError())  # no AssertionError from aiosmtpd
        assert not connections.open

    asyncio.run(main())
