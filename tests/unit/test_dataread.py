"""The DATA decoder: end marker, dot-stuffing, limits, and every smuggling variant refused."""

import random

import pytest

from mta.smtp.data import DataDecoder, crlf_to_lf, line_error, line_longer_than


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


@pytest.mark.parametrize("where", ["first", "middle", "last", "unterminated"])
def test_line_longer_than_at_the_exact_limit(where):
    short = b"s" * 77 + b"\r\n"
    for length, too_long in ((998, False), (999, True)):
        line = b"L" * length
        data = {"first": line + b"\r\n" + short * 40, "middle": short * 20 + line + b"\r\n" + short * 20,
                "last": short * 40 + line + b"\r\n", "unterminated": short * 40 + line}[where]
        assert line_longer_than(data, 998) is too_long, (where, length)
    assert not line_longer_than(short * 1000, 998) and line_longer_than(b"x" * 5000, 998)


def test_line_too_long_still_finds_the_end():
    res, rest = decode(b"a" * 5000 + b"\r\nok\r\n.\r\nQUIT\r\n", split=100)
    assert res.error == "line" and rest == b"QUIT\r\n"
    res, _ = decode(b"a" * 998 + b"\r\n.\r\n")  # what the MDA accepts, the MTA accepts
    assert res.error is None
    res, _ = decode(b"a" * 999 + b"\r\n.\r\n")
    assert res.error == "line"
    res, _ = decode(b"..." + b"a" * 996 + b"\r\n.\r\n")  # dot-stuffed: 998 once unstuffed
    assert res.error is None
    res, _ = decode(b"ok\r\n" + b"a" * 1000 + b"\r\nok\r\n.\r\n")
    assert res.error == "line"


def test_large_message_spills_to_a_file(tmp_path):
    made = []

    def sink():
        p = tmp_path / f"spill{len(made)}"
        made.append(p)
        return open(p, "wb"), p

    body = (b"y" * 78 + b"\r\n") * 5000 + b"..dot\r\n"
    d = DataDecoder(None, sink_factory=sink, spill_at=100_000)
    for i in range(0, len(body + b".\r\n"), 4096):
        if d.feed((body + b".\r\n")[i:i + 4096]) >= 0:
            break
    res = d.result()
    assert res.error is None and res.content == b"" and res.path == made[0]
    assert res.path.read_bytes() == body.replace(b"..dot", b".dot")
    # An error after spilling removes the file.
    d = DataDecoder(None, sink_factory=sink, spill_at=1000)
    d.feed((b"a" * 500 + b"\r\n") * 4 + b"x")
    assert made[1].exists()
    d.feed(b"\n" + b"\r\n.\r\n")
    assert d.result().error == "bare-eol" and not made[1].exists()


def test_streamed_dot_stuffing_equals_in_memory(tmp_path):
    from mta.courier.lmtp import dot_stuff, dot_stuffed_chunks
    from mta.spool import SpooledMessage
    rng = random.Random(3)
    for trial in range(30):
        lines = [b"." * rng.randint(0, 2) + b"z" * rng.randint(0, 30) for _ in range(rng.randint(0, 60))]
        data = b"\r\n".join(lines) + (b"\r\n" if rng.random() < 0.8 else b"")
        p = tmp_path / f"m{trial}"
        p.write_bytes(b'{"envelope": 1}\n' + data)  # a spool file: the message after line 1
        spooled = SpooledMessage(p, 16)
        for chunk in (1, 2, 3, 7, 64):
            got = b"".join(dot_stuffed_chunks(spooled.chunks(chunk)))
            assert got == dot_stuff(data), (trial, chunk)


def test_crlf_to_lf_agrees_with_line_error():
    """The MDA's one-pass check and conversion says what line_error says, on every input."""
    rng = random.Random(7)
    cases = [b"", b"a\r\nb\r\n", b"a\nb\r\n", b"a\rb\r\n", b"a\n\rb", b"\r\n\r\n", b"x\r",
             b"\n", b"L" * 998 + b"\r\n", b"L" * 999 + b"\r\n", b"s\r\n" + b"L" * 999]
    pieces = [b"\r\n", b"\r", b"\n", b"ab", b"L" * 300, b"\r\n\r\n"]
    cases += [b"".join(rng.choice(pieces) for _ in range(rng.randint(1, 12))) for _ in range(3000)]
    for data in cases:
        lf, problem = crlf_to_lf(data, 998)
        assert problem == line_error(data, 998), data
        assert lf == (data.replace(b"\r\n", b"\n") if problem is None else b""), data


@pytest.mark.parametrize("errno_, expected", [(28, "storage"), (5, "io")])
def test_a_spill_write_error_refuses_the_message_but_reads_it_to_its_end(tmp_path, errno_, expected):
    """Disk full (or an I/O error) mid-DATA: the message is refused, and the rest of it is still
    data, never read as commands."""
    class Failing:
        def write(self, data):
            raise OSError(errno_, "no")

        def writelines(self, parts):
            raise OSError(errno_, "no")

        def close(self):
            pass

    path = tmp_path / "spill"
    d = DataDecoder(None, sink_factory=lambda: (Failing(), path), spill_at=1000)
    stream = (b"a" * 500 + b"\r\n") * 6 + b"RCPT TO:<x@y>\r\n" + b".\r\nNOOP\r\n"
    consumed = -1
    for i in range(0, len(stream), 700):
        used = d.feed(stream[i:i + 700])
        if used >= 0:
            consumed = i + used
            break
    assert d.result().error == expected and stream[consumed:] == b"NOOP\r\n"


# -- BDAT (RFC 3030): chunks split anywhere, checked as DATA -------------------------------

from mta.smtp.data import ChunkCollector  # noqa: E402


def collect(chunks: list[bytes], max_size: int | None = None) -> tuple[bytes, str | None]:
    c = ChunkCollector(max_size)
    for chunk in chunks:
        c.feed(chunk)
    r = c.finish()
    return r.content, r.error


def test_chunks_split_lines_and_crlfs_anywhere():
    msg = b"Subject: x\r\n\r\n" + b"line\r\n" * 100 + b".dot stays\r\n"
    for cut in range(1, len(msg)):
        assert collect([msg[:cut], msg[cut:]]) == (msg, None)
    assert collect([msg[i:i + 1] for i in range(len(msg))]) == (msg, None)


def test_a_last_chunk_without_crlf_gets_one_and_an_empty_last_chunk_is_fine():
    assert collect([b"Subject: x\r\n\r\nbody"]) == (b"Subject: x\r\n\r\nbody\r\n", None)
    assert collect([b"Subject: x\r\n\r\nbody\r\n", b""]) == (b"Subject: x\r\n\r\nbody\r\n", None)


def test_bare_line_ends_long_lines_and_size_fail_the_message():
    assert collect([b"a\nb\r\n"]) == (b"", "bare-eol")
    assert collect([b"a\r", b"b\r\n"]) == (b"", "bare-eol")  # a CR, then not LF
    assert collect([b"x\r"]) == (b"", "bare-eol")  # a CR at the very end
    assert collect([b"x" * 999 + b"\r\n"]) == (b"", "line")
    assert collect([b"x" * 600, b"x" * 600]) == (b"", "line")  # one line over two chunks
    assert collect([b"x" * 998 + b"\r\n"])[1] is None
    assert collect([b"a\r\n" * 10, b"b\r\n" * 10], max_size=40) == (b"", "size")


def test_a_binary_collector_keeps_octets_and_only_counts_size():
    c = ChunkCollector(max_size=10, binary=True)
    c.feed(b"a\nb\r\x00")
    c.feed(b"\xff" * 4)
    result = c.finish()
    assert result.error is None and result.content == b"a\nb\r\x00" + b"\xff" * 4
    c = ChunkCollector(max_size=10, binary=True)
    c.feed(b"x" * 11)
    assert c.finish().error == "size"
