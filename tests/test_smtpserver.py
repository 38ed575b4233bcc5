"""Our fast protocol constructor sets exactly what aiosmtpd's SMTP.__init__ sets."""

import asyncio

from aiosmtpd.smtp import SMTP

from mda.session import LMTPHandler, LMTPProtocol
from mta.protocol import CALL_LIMITS, SMTPProtocol
from mta.submission import SubmissionHandler
from store.smtpserver import Connections, with_enhanced_code

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
