"""Reading the DATA section: CRLF-strict, in large chunks, bytes searches instead of a loop per line.

RFC 5321 §2.3.8 allows only CRLF as a line ending, and §4.1.1.4 ends DATA with CRLF.CRLF. A
server that also accepts a bare LF (or CR) around the dot can be fooled into seeing two messages
where the next hop sees one: SMTP smuggling (CVE-2023-51764 class). Here the only end marker is
``\\r\\n.\\r\\n`` (the DATA command's own CRLF counts as the first), and any CR or LF that is not
part of a CRLF pair makes the whole transaction fail, so nothing of it is delivered.

``DataDecoder`` is the pure part (feed chunks, get the un-dot-stuffed message); ``read_data`` is
the thin shell that pulls chunks from an asyncio StreamReader and gives back what it read past
the end marker (a pipelining client may already have sent its next command).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

END = b"\r\n.\r\n"
MAX_LINE = 1000  # octets including CRLF, RFC 5321 §4.5.3.1.6
MAX_TEXT_LINE = MAX_LINE - 2  # a message line's octets before its CRLF: MTA and MDA alike
CHUNK = 1 << 16
# Room for what we add to a message after accepting it (Received, Authentication-Results,
# DKIM-Signature, Message-ID, Date, a DSN's framing): the MDA takes the MTA's largest message
# plus this, so nothing the MTA accepted is refused on the way to the mailbox.
PREPENDED_MAX = 64 << 10


def delivery_size_limit(accepted_max: int, own_max: int = 0) -> int | None:
    """The MDA's size limit, from the largest message the MTA accepts (0: no limit)."""
    if not accepted_max:
        return None
    return max(accepted_max, own_max) + PREPENDED_MAX


SPILL_AT = 1 << 20  # messages larger than this go to a file as they arrive, not into memory

# Opens the file a large message spills into: (writable file, its path).
SinkFactory = Callable[[], tuple[BinaryIO, Path]]


def line_longer_than(data: bytes, limit: int, eol: int = 2) -> bool:
    """Whether a line of ``data`` has more than ``limit`` bytes before its line end, which
    is ``eol`` bytes long (CRLF, or LF in a mailbox's form).

    One ``rfind`` per window of ``limit`` bytes, not one object per line: splitting 100 KB
    into lines cost the MTA and the MDA some 150 us each per message.
    """
    i, n = 0, len(data)
    while n - i > limit:
        j = data.rfind(b"\n", i, i + limit + eol)  # the window holds a line and its end
        if j < 0:
            return True
        i = j + 1
    return False


def line_error(data: bytes, longest: int) -> str | None:
    """"bare-eol" if a CR or LF in ``data`` is not part of a CRLF, "line" if a line is over
    ``longest`` bytes before its CRLF, else None (DATA and LMTP's BDAT check the same)."""
    pairs = data.count(b"\r\n")
    if data.count(b"\n") != pairs or data.count(b"\r") != pairs:
        return "bare-eol"
    if line_longer_than(data, longest):
        return "line"
    return None


def crlf_to_lf(data: bytes, longest: int) -> tuple[bytes, str | None]:
    """``data`` with its CRLFs turned into LFs, and ``line_error``'s verdict on ``data``.

    For a receiver that stores LF anyway (the MDA): one replace, one count of a single byte
    and a memchr instead of ``line_error``'s three counts (the one of CRLF is the slowest) and
    then the replace: 410 instead of 590 us for a 100 KB message on the development VM.
    """
    lf = data.replace(b"\r\n", b"\n")
    # What is left of a CR is a bare one; each replacement took one byte off, so any LF
    # beyond that count was bare.
    if b"\r" in lf or lf.count(b"\n") != len(data) - len(lf):
        return b"", "bare-eol"
    if line_longer_than(lf, longest, eol=1):
        return b"", "line"
    return lf, None


@dataclass
class DataResult:
    content: bytes  # the message, unless it spilled to ``path``
    error: str | None  # "size", "line", "bare-eol", "storage" or "io"; content empty if set
    size: int  # octets received, for the log
    path: Path | None = None  # the message spilled to this file (content is then b"")


class MessageBuffer:
    """Where a message's checked bytes go as they arrive: memory, and past ``spill_at`` a file
    (a 50 MB message must not cost 50 MB of memory per session)."""

    def __init__(self, sink_factory: SinkFactory | None = None, spill_at: int = SPILL_AT) -> None:
        self.sink_factory = sink_factory
        self.spill_at = spill_at
        self.sink: BinaryIO | None = None
        self.sink_path: Path | None = None
        self.held = 0  # bytes in self.parts
        self.parts: list[bytes] = []
        self.size = 0  # octets received, for the limit and the log
        self.error: str | None = None

    def _emit(self, data: bytes) -> None:
        if self.error:
            return
        try:
            if self.sink is not None:
                self.sink.write(data)
                return
            self.parts.append(data)
            self.held += len(data)
            if self.sink_factory is not None and self.held > self.spill_at:
                self.sink, self.sink_path = self.sink_factory()
                self.sink.writelines(self.parts)
                self.parts.clear()
        except OSError as e:
            # The message is refused, but read to its end: the rest of it is data, not
            # commands.
            self._fail(_write_error(e))

    def _fail(self, why: str) -> None:
        if self.error is None:
            self.error = why
        self.parts.clear()
        self.discard()

    def discard(self) -> None:
        """Drop a spilled file (error, or a connection lost mid-message)."""
        if self.sink is not None:
            with contextlib.suppress(OSError):
                self.sink.close()
            self.sink = None
        if self.sink_path is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.sink_path)
            self.sink_path = None

    def result(self) -> DataResult:
        if self.sink is not None and self.sink_path is not None and not self.error:
            try:
                self.sink.close()  # its buffer's last write may fail too
            except OSError as e:
                self.sink = None
                self._fail(_write_error(e))
            else:
                return DataResult(b"", None, self.size, self.sink_path)
        content = b"" if self.error else b"".join(self.parts)
        return DataResult(content, self.error, self.size)


class DataDecoder(MessageBuffer):
    """Incremental decoder. ``feed`` returns the offset just past the end marker, or -1."""

    def __init__(self, max_size: int | None, max_line: int = MAX_LINE,
                 sink_factory: SinkFactory | None = None, spill_at: int = SPILL_AT) -> None:
        super().__init__(sink_factory, spill_at)
        self.max_size = max_size
        self.max_line = max_line
        # Invariant: pending starts at a line start with the CRLF that precedes that line.
        self.pending = bytearray(b"\r\n")
        self.done = False

    def feed(self, chunk: bytes) -> int:
        """Consume ``chunk``; return how many of its bytes belonged to DATA (or -1: need more)."""
        start = max(0, len(self.pending) - (len(END) - 1))
        self.pending += chunk
        end = self.pending.find(END, start)
        if end >= 0:
            if end > 0:
                self._process(bytes(self.pending[:end]))
            used = end + len(END) - (len(self.pending) - len(chunk))
            self.pending = bytearray()
            self.done = True
            return used
        cut = self.pending.rfind(b"\r\n")
        if cut > 0:
            self._process(bytes(self.pending[:cut]))
            del self.pending[:cut]
        # cut == 0: one line still in progress. Keep only what the search needs once too long.
        if len(self.pending) > self.max_line + 2:
            self._fail("line")
            del self.pending[: len(self.pending) - (len(END) - 1)]
            self.pending[:0] = b"x"  # no longer at a line start
        return -1

    def _process(self, segment: bytes) -> None:
        """``segment`` = CRLF + complete lines joined by CRLF; the last line's CRLF follows it."""
        self.size += len(segment)
        if self.error:
            return
        if self.max_size and self.size > self.max_size:
            self._fail("size")
            return
        pairs = segment.count(b"\r\n")
        if segment.count(b"\n") != pairs or segment.count(b"\r") != pairs:
            self._fail("bare-eol")
            return
        lines = segment.replace(b"\r\n.", b"\r\n")  # un-dot-stuffed, then measured: the
        if line_longer_than(lines, self.max_line - 2):  # MDA stores (and checks) this form
            self._fail("line")
            return
        self._emit(lines[2:] + b"\r\n")


class ChunkCollector(MessageBuffer):
    """The BDAT chunks of one transaction (RFC 3030), checked as DATA is: CRLF only, lines of
    at most 998 octets, the size limit. Chunks split lines (and CRLFs) anywhere: the part
    after the last CRLF waits for the next chunk. Over the limit, chunks are counted, not
    kept."""

    def __init__(self, max_size: int | None, max_line: int = MAX_LINE,
                 sink_factory: SinkFactory | None = None, spill_at: int = SPILL_AT,
                 binary: bool = False) -> None:
        super().__init__(sink_factory, spill_at)
        self.max_size = max_size
        self.max_line = max_line
        self.binary = binary  # BODY=BINARYMIME (RFC 3030 §3): octets as they come, no lines
        self.pending = bytearray()  # always starts at a line start

    def feed(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.error:
            return
        if self.max_size and self.size > self.max_size:
            self._fail("size")
            return
        if self.binary:
            self._emit(chunk)
            return
        self.pending += chunk
        cut = self.pending.rfind(b"\r\n")
        if cut >= 0:
            segment = bytes(self.pending[:cut + 2])
            del self.pending[:cut + 2]
            problem = line_error(segment, self.max_line - 2)
            if problem:
                self._fail(problem)
                return
            self._emit(segment)
        if len(self.pending) > self.max_line:
            self._fail("line")

    def finish(self) -> DataResult:
        """After BDAT LAST: a text message ends with CRLF, as after DATA."""
        if self.pending and not self.error:
            rest = bytes(self.pending) + b"\r\n"
            self.pending.clear()
            problem = line_error(rest, self.max_line - 2)
            if problem:
                self._fail(problem)
            else:
                self._emit(rest)
        return self.result()


def _write_error(e: OSError) -> str:
    return "storage" if e.errno in (errno.ENOSPC, errno.EDQUOT) else "io"


async def read_data(reader: asyncio.StreamReader, max_size: int | None,
                    on_progress: Callable[[], None] | None = None,
                    sink_factory: SinkFactory | None = None) -> DataResult:
    """Read one DATA section from ``reader``; bytes after the end marker stay in the reader."""
    decoder = DataDecoder(max_size, sink_factory=sink_factory)
    try:
        while True:
            chunk = await reader.read(CHUNK)
            if not chunk:
                raise ConnectionResetError("connection closed during DATA")
            if on_progress is not None:
                on_progress()
            used = decoder.feed(chunk)
            if used >= 0:
                rest = chunk[used:]
                if rest:
                    # Pipelined commands after the final dot: back to the command loop.
                    # asyncio has no unread(); aiosmtpd itself manipulates _buffer (STARTTLS).
                    reader._buffer[:0] = rest  # type: ignore[attr-defined]
                return decoder.result()
    except BaseException:
        decoder.discard()
        raise
