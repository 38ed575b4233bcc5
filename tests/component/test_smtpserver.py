"""Our fast protocol constructor sets exactly what aiosmtpd's SMTP.__init__ sets."""

import asyncio
from collections.abc import Mapping

from aiosmtpd.smtp import SMTP

from mda.session import LMTPHandler, LMTPProtocol
from mta.smtp.protocol import CALL_LIMITS, SMTPProtocol
from mta.smtp.server import Connections, with_enhanced_code
from mta.submission import SubmissionHandler

IGNORED = {"_stream_reader_wr", "_strong_reader", "_source_traceback", "_stream_reader",
           "_loop", "_paused", "_drain_waiters", "_connection_lost", "_closed", "_over_ssl",
           "_task"}


def _value(v):
    """Methods by name: ours may override aiosmtpd's."""
    if isinstance(v, Mapping):
        return {kk: _value(vv) for kk, vv in v.items()}
    return v.__func__.__name__ if hasattr(v, "__func__") else v


def _compare(cls, handler, **kwargs):
    async def build():
        ours = cls(handler, connections=Connections(1, 1), **kwargs)
        # aiosmtpd's own class with our verbs and mechanisms (ours reads its per-listener
        # attributes through properties, which SMTP.__init__ cannot set).
        verbs = {n: getattr(cls, n) for n in dir(cls) if n.startswith(("smtp_", "auth_"))}
        theirs = type("Theirs", (SMTP,), verbs)(handler, **kwargs)
        names = set(vars(theirs)) - IGNORED - {"_reader"}
        for k in names:
            a, b = getattr(ours, k), getattr(theirs, k)
            if k == "_auth_methods":
                assert {m: (v.is_builtin, v.method.__name__) for m, v in a.items()} == \
                    {m: (v.is_builtin, v.method.__name__) for m, v in b.items()}
            elif k in ("_smtp_methods", "_handle_hooks"):
                assert set(a) == set(b), k
            elif k == "_enforce_call_limit":  # ours counts in the verb table instead
                assert ours._settings.call_limits is kwargs.get("command_call_limit")
            elif k not in ("loop", "connections"):
                assert _value(a) == _value(b), k
        # Few enough attributes of its own that CPython shares their keys between sessions:
        # an idle session's dict is a few hundred bytes, not 1.6 KB.
        assert len(vars(ours)) <= 30, sorted(vars(ours))

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
