"""Property tests (hypothesis) for the parsers every peer's bytes go through."""

from __future__ import annotations

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from mta.courier.lmtp import dot_stuff
from mta.smtp.data import DataDecoder, crlf_to_lf
from store import addresses

# Message lines: any bytes but CR and LF, often starting with dots (stuffing).
line = st.builds(lambda dots, rest: b"." * dots + rest, st.integers(0, 3),
                 st.binary(max_size=120).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")))
message = st.lists(line, min_size=1, max_size=40).map(lambda ls: b"".join(x + b"\r\n" for x in ls))


def decode(stream: bytes, cuts: list[int]) -> tuple[bytes | None, str | None, bytes]:
    """Feed ``stream`` cut at ``cuts``; (content, error, bytes after the end marker)."""
    d = DataDecoder(None)
    bounds = sorted({c % (len(stream) + 1) for c in cuts} | {0, len(stream)})
    consumed = 0
    for a, b in zip(bounds, bounds[1:], strict=False):
        used = d.feed(stream[a:b])
        if used >= 0:
            res = d.result()
            return res.content, res.error, stream[a + used:]
        consumed = b
    raise AssertionError(f"no end marker in {consumed} bytes")


@settings(max_examples=300, deadline=None)
@given(message, st.lists(st.integers(0, 10_000), max_size=12))
def test_any_split_into_chunks_reads_the_same_message(msg, cuts):
    stream = dot_stuff(msg) + b"QUIT\r\n"
    content, error, rest = decode(stream, cuts)
    assert error is None and content == msg and rest == b"QUIT\r\n"


@settings(max_examples=300, deadline=None)
@given(message, st.integers(0, 10_000), st.sampled_from([b"\r", b"\n"]),
       st.lists(st.integers(0, 10_000), max_size=8))
def test_any_bare_cr_or_lf_is_refused(msg, where, bare, cuts):
    stuffed = dot_stuff(msg)[:-3]  # without ".\r\n"
    at = where % (len(stuffed) + 1)
    broken = stuffed[:at] + bare + stuffed[at:]
    assume(b"\r\n.\r\n" not in b"\r\n" + broken)  # the bare byte must not make an end marker
    assume(broken.replace(b"\r\n", b"").count(bare) > 0)  # still bare after insertion
    content, error, _ = decode(broken + b".\r\n" if broken.endswith(b"\r\n")
                               else broken + b"\r\n.\r\n", cuts)
    assert error == "bare-eol" and not content
    _, problem = crlf_to_lf(broken, 998)
    assert problem == "bare-eol"


local = st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=0x2FFF,
                                       exclude_characters='"(),:;<>@[\\]'), min_size=1,
                max_size=30)
label = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-é", min_size=1, max_size=12)
domain = st.lists(label, min_size=1, max_size=3).map(lambda ls: ".".join(ls) + ".test")


@settings(max_examples=300, deadline=None)
@given(local, domain)
def test_any_address_the_parser_accepts_round_trips(lp, dom):
    try:
        addr = addresses.normalize(f"{lp}@{dom}")
    except addresses.AddressError:
        return  # refused: nothing to round-trip
    assert addresses.normalize(addr) == addr  # idempotent
    l2, d2 = addresses.split(addr)
    assert f"{l2}@{d2}" == addr
    assert addresses.normalize(f"{l2}@{addresses.ascii_domain(d2)}") == addr  # A-label form
    assert "\n" not in addr and "\r" not in addr


@pytest.mark.parametrize("bad", ["a\n@b.test", "a@b\r.test", "a@b\n.test", "@b.test", "a@"])
def test_addresses_with_line_breaks_or_empty_parts_are_refused(bad):
    with pytest.raises(addresses.AddressError):
        addresses.normalize(bad)


# The wire layer's fast path for MAIL/RCPT paths (a regex, for speed) against aiosmtpd's
# full RFC 5322 parser: wherever the fast path answers, it must answer what the full one does.
atext = "abcXYZ019!#$%&'*+/=?^_`{|}~-."
path_local = st.text(alphabet=atext + "\"\\ ()<>@,;:é", min_size=0, max_size=20)
path_domain = st.text(alphabet="abc019-.[]:é", min_size=0, max_size=20)
rest = st.sampled_from(["", " SIZE=100", " BODY=8BITMIME SMTPUTF8", "  NOTIFY=NEVER", "x", ">",
                        " ", "\t(comment) SIZE=1", " (c)"])


@settings(max_examples=1000, deadline=None)
@given(st.sampled_from(["", " ", "  "]), path_local, path_domain, rest)
def test_the_fast_path_parser_agrees_with_aiosmtpds(lead, lp, dom, tail):
    from aiosmtpd.smtp import SMTP

    from mta.smtp.server import _SIMPLE_PATH, BaseSMTP

    ours = BaseSMTP.__new__(BaseSMTP)  # no session needed: the parsers use no state
    ours.local_part_limit = 0
    arg = f"{lead}<{lp}@{dom}>{tail}"
    if _SIMPLE_PATH.match(arg):
        assert ours._getaddr(arg) == SMTP._getaddr(ours, arg), arg
    null = f"{lead}<>{tail}"
    assert ours._getaddr(null) == SMTP._getaddr(ours, null), null


@settings(max_examples=500, deadline=None)
@given(st.text(alphabet="<>@[]()\"\\:;,. a0é\t", max_size=30))
def test_no_path_makes_the_parser_raise(arg):
    """Whatever follows MAIL FROM: or RCPT TO:, the answer is an address or None (553), never
    an exception (the email package's parser raises on "<a@[>": that was a 451)."""
    from mta.smtp.server import BaseSMTP

    ours = BaseSMTP.__new__(BaseSMTP)
    ours.local_part_limit = 0
    address, _ = ours._getaddr(arg)
    assert address is None or isinstance(address, str)
