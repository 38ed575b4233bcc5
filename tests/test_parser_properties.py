"""Property tests (hypothesis) for the parsers every peer's bytes go through."""

from __future__ import annotations

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from mta.lmtp_out import dot_stuff
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
