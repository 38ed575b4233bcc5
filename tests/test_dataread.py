"""The DATA decoder: end marker, dot-stuffing, limits, and every smuggling variant refused."""

import random

import pytest

from store.dataread import DataDecoder


def decode(stream: bytes, max_size=None, split=None):
    d = DataDecoder(max_size)
    chunks = [stream] if split is None else [stream[i:i + split] for i in range(0, len(stream), split)]
    consumed = 0
    for c in chunks:
        used = d.feed(c)
        if used >= 0:
            consumed += used
            return d.result(), stream[consumed:]
        consumed += len(c)
    raise AssertionError("no end marker found")


@pytest.mark.parametrize("split", [None, 1, 2, 3, 5, 7, 64])
def test_roundtrip_and_rest(split):
    msg = b"Subject: x\r\n\r\n..dot\r\n.\r\n"[:-3]  # message ends with '..dot' line, stuffed
    res, rest = decode(msg + b".\r\nMAIL FROM:<a@b>\r\n", split=split)
    assert res.error is None
    assert res.content == b"Subject: x\r\n\r\n.dot\r\n"
    assert rest == b"MAIL FROM:<a@b>\r\n"


def test_empty_and_blank_messages():
    assert decode(b".\r\n")[0].content == b""
    assert decode(b"\r\n.\r\n")[0].content == b"\r\n"
    assert decode(b"..\r\n.\r\n")[0].content == b".\r\n"


def test_random_splits_agree():
    rng = random.Random(7)
    lines = [b"." * rng.randint(0, 3) + bytes(rng.choice(b"ab.\xff") for _ in range(rng.randint(0, 80)))
             for _ in range(300)]
    original = b"".join(line + b"\r\n" for line in lines)
    stuffed = b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n" for line in lines)
    for split in (1, 2, 13, 1000, None):
        res, rest = decode(stuffed + b".\r\n", split=split)
        assert res.content == original and rest == b""


@pytest.mark.parametrize("variant", [b"\n.\n", b"\n.\r\n", b"\r.\r", b"\r\n.\n", b"\r.\r\n", b"\n.\r"])
def test_smuggling_variants_refuse_the_whole_transaction(variant):
    stream = (b"Subject: one\r\n\r\nfirst" + variant + b"MAIL FROM:<evil@x>\r\nRCPT TO:<v@y>\r\n"
              b"DATA\r\nSubject: smuggled\r\n\r\n.\r\n")
    for split in (None, 1, 4):
        res, rest = decode(stream, split=split)
        assert res.error == "bare-eol" and res.content == b""
        assert rest == b""


def test_size_limit():
    res, _ = decode(b"x" * 50 + b"\r\n" + b"y" * 50 + b"\r\n.\r\n", max_size=80, split=20)
    assert res.error == "size" and res.content == b""


def test_line_too_long_still_finds_the_end():
    res, rest = decode(b"a" * 5000 + b"\r\nok\r\n.\r\nQUIT\r\n", split=100)
    assert res.error == "line" and rest == b"QUIT\r\n"
    res, _ = decode(b"a" * 999 + b"\r\n.\r\n")
    assert res.error is None
