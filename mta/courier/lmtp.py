"""A small async LMTP client (RFC 2033) that reads one reply per accepted RCPT after DATA.

smtplib.LMTP reads a single reply after DATA (bpo-32803), which loses every per-recipient
result but the first; this client is what the queue runner hands local mail to the MDA with.
Commands are pipelined (LMTP servers must support PIPELINING, RFC 2033 §4.2). When the server
offers CHUNKING (RFC 3030; our MDA and Dovecot do), a message held in memory goes as
``BDAT <size> LAST`` in the same write as MAIL and RCPT: one round trip instead of two.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Iterator

from mta.reply import Reply
from mta.spool import SpooledMessage
from store.config import parse_address


class LMTPError(Exception):
    """The session failed as a whole (connection, protocol): every recipient is temporary."""

    def __init__(self, message: str, data_sent: bool = True) -> None:
        super().__init__(message)
        # False: the message never went out in this transaction, so nothing was delivered and
        # it may be tried again at once (e.g. on a reused connection the MDA had closed).
        self.data_sent = data_sent


def _stuff(block: bytes, at_line_start: bool) -> bytes:
    if at_line_start and block.startswith(b"."):
        block = b"." + block
    return block.replace(b"\r\n.", b"\r\n..")


def dot_stuffed_chunks(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """``dot_stuff`` for a message read a chunk at a time (big messages stay on disk)."""
    carry, at_start, last2 = b"", True, b""
    for block in chunks:
        data = carry + block
        # A CR at the end may start the CRLF of a "\r\n." that the next block completes.
        emit, carry = (data[:-1], b"\r") if data.endswith(b"\r") else (data, b"")
        if emit:
            yield _stuff(emit, at_start)
            at_start = emit.endswith(b"\r\n")
            last2 = (last2 + emit)[-2:]
    if carry:
        yield carry
        last2 = (last2 + carry)[-2:]
    if last2 != b"\r\n":
        yield b"\r\n"
    yield b".\r\n"


def dot_stuff(data: bytes) -> bytes:
    """CRLF-terminated, dot-stuffed message body followed by the end-of-data line."""
    if not data.endswith(b"\r\n"):
        data += b"\r\n"
    if data.startswith(b"."):
        data = b"." + data
    return data.replace(b"\r\n.", b"\r\n..") + b".\r\n"


class LMTPClient:
    def __init__(self, address: str, timeout: float = 120.0) -> None:
        self.address = address
        self.timeout = timeout
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.data_sent = False  # the current transaction sent the message
        self.chunking = False  # the server offers BDAT
        self.binarymime = False  # and BODY=BINARYMIME
        self.queue_ids = False  # the server offers XQUEUEID (ours: see mda/session.py)

    async def connect(self, local_name: str) -> None:
        try:
            if self.address.startswith("unix:"):
                conn = asyncio.open_unix_connection(self.address[5:], limit=1 << 16)
            else:
                host, port = parse_address(self.address, "mda.listen")
                conn = asyncio.open_connection(host, port, limit=1 << 16)
            self.reader, self.writer = await asyncio.wait_for(conn, self.timeout)
            async with asyncio.timeout(self.timeout):
                greeting = await self.read_reply()
            if greeting.code != 220:
                raise LMTPError(f"greeting: {greeting.line}")
            self.send(f"LHLO {local_name}")
            async with asyncio.timeout(self.timeout):
                lhlo = await self.read_reply()
            if lhlo.code != 250:
                raise LMTPError(f"LHLO: {lhlo.line}")
            keywords = lhlo.text.upper().split()
            self.chunking = "CHUNKING" in keywords
            self.binarymime = "BINARYMIME" in keywords
            self.queue_ids = "XQUEUEID" in keywords
        except (OSError, TimeoutError, asyncio.IncompleteReadError) as e:
            await self.close()
            raise LMTPError(f"cannot talk to the MDA at {self.address}: {e}") from e

    @property
    def connected(self) -> bool:
        return self.writer is not None and not self.writer.is_closing()

    def send(self, line: str) -> None:
        assert self.writer is not None
        self.writer.write(line.encode("utf-8") + b"\r\n")

    async def read_reply(self) -> Reply:
        assert self.reader is not None
        lines: list[str] = []
        while True:
            raw = await self.reader.readuntil(b"\n")  # deadline: asyncio.timeout in callers
            line = raw.rstrip(b"\r\n").decode("utf-8", "replace")
            if len(line) < 3 or not line[:3].isdigit():
                raise LMTPError(f"malformed reply {line!r}")
            lines.append(line[4:])
            if line[3:4] != "-":
                return Reply(int(line[:3]), " ".join(lines))
            if len(lines) > 100:
                raise LMTPError("reply too long")

    async def deliver(self, mail_from: str, rcpts: list[str], data: bytes | SpooledMessage,
                      smtputf8: bool = False, queue_id: str = "", retry: bool = False,
                      binary: bool = False) -> dict[str, Reply]:
        """One transaction; the reply for each recipient (RCPT refusal or its DATA reply).

        ``queue_id``: the message's id, sent (as ``XQUEUEID``) to an MDA that offers it, which
        names each copy after it and the recipient; ``retry``: this message may have been
        delivered already (an earlier attempt's outcome is unknown): the MDA then looks for
        those copies and answers 250 for them without making another (exactly once).
        """
        if not self.connected:
            raise LMTPError("not connected", data_sent=False)
        self.data_sent = False
        try:
            async with asyncio.timeout(self.timeout):
                return await self._transaction(mail_from, rcpts, data, smtputf8, queue_id,
                                               retry, binary)
        except (OSError, TimeoutError, asyncio.IncompleteReadError, UnicodeError) as e:
            await self.close()
            raise LMTPError(f"LMTP session with {self.address} failed: {e!r}",
                            data_sent=self.data_sent) from e
        except LMTPError:
            await self.close()
            raise

    async def _transaction(self, mail_from: str, rcpts: list[str], data: bytes | SpooledMessage,
                           smtputf8: bool, queue_id: str, retry: bool, binary: bool
                           ) -> dict[str, Reply]:
        assert self.writer is not None
        if binary:  # RFC 3030 §3: counted chunks only, never DATA's lines
            if not (self.chunking and self.binarymime):
                refused = Reply(554, "5.6.3 the MDA does not accept BINARYMIME")
                return dict.fromkeys(rcpts, refused)
            if isinstance(data, SpooledMessage):
                data = await asyncio.to_thread(data.read)
        params = " SMTPUTF8" if smtputf8 else ""
        if queue_id and self.queue_ids:
            params += f" XQUEUEID={queue_id}" + (" XRETRY" if retry else "")
        sender = "" if mail_from in ("", "<>") else mail_from
        # One write for the whole pipelined group: one segment, one wake-up of the MDA.
        bdat = self.chunking and isinstance(data, bytes)
        body = "BINARYMIME" if binary else "8BITMIME"
        lines = [f"MAIL FROM:<{sender}> BODY={body}{params}",
                 *(f"RCPT TO:<{r}>" for r in rcpts),
                 f"BDAT {len(data)} LAST" if bdat else "DATA", ""]  # type: ignore[arg-type]
        head = "\r\n".join(lines).encode("utf-8")
        self.writer.write(head + data if bdat else head)  # type: ignore[operator]
        await self.writer.drain()
        mail = await self.read_reply()
        if bdat and mail.code == 250:
            # The message went with the commands; but a server that answered MAIL with
            # nothing or no 250 (an idle connection it closed, its 421 at shutdown) delivered
            # nothing: that may be retried at once.
            self.data_sent = True
        results: dict[str, Reply] = {}
        accepted: list[str] = []
        for r in rcpts:
            reply = await self.read_reply()
            if mail.code != 250:
                results[r] = mail  # the MAIL refusal answers for everyone
            elif reply.code == 250:
                accepted.append(r)
            else:
                results[r] = reply
        if bdat:
            if not accepted:  # one reply for BDAT, none per recipient
                data_reply = await self.read_reply()
                return {r: results.get(r, data_reply) for r in rcpts}
            for r in accepted:  # RFC 2033 §4.2 with RFC 3030: one reply per accepted RCPT
                results[r] = await self.read_reply()
            return {r: results[r] for r in rcpts}
        data_reply = await self.read_reply()
        if data_reply.code != 354:
            if accepted and data_reply.code < 500 and mail.code == 250:
                for r in accepted:
                    results[r] = data_reply
            return {r: results.get(r, data_reply) for r in rcpts}
        self.data_sent = True
        if isinstance(data, SpooledMessage):
            for block in dot_stuffed_chunks(data.chunks()):
                self.writer.write(block)
                await self.writer.drain()  # keeps at most a chunk or two in memory
        else:
            self.writer.write(dot_stuff(data))
            await self.writer.drain()
        for r in accepted:  # RFC 2033 §4.2: one reply per accepted RCPT, in order
            results[r] = await self.read_reply()
        return {r: results[r] for r in rcpts}

    async def close(self) -> None:
        if self.writer is not None:
            w, self.writer = self.writer, None
            try:
                if not w.is_closing():
                    w.write(b"QUIT\r\n")
                w.close()
                await asyncio.wait_for(w.wait_closed(), 2)
            except (OSError, TimeoutError, asyncio.IncompleteReadError):
                pass
