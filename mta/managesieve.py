"""``[managesieve] listen``: ManageSieve (RFC 5804), in the MSA process, so that users edit
their Sieve filters from Thunderbird's Sieve add-on or Roundcube's managesieve plugin.

STARTTLS, then AUTHENTICATE PLAIN against the directory (only under TLS; three failures end
the session). Scripts live in the database (store/sieve.py), checked by the sieve package
before they are stored: a script with an error gets ``NO`` with its line and column and is
never stored or activated. Limits: 100 sessions, 10 minutes idle, command lines of 8 KB and
literals of the script size limit.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import re
import ssl
from collections.abc import Callable

from sieve import EXTENSIONS, Limits, check
from store.config import Config, parse_address
from store.directory import Directory, DirectoryUnavailable
from store.sieve import MAX_SCRIPT_BYTES, SieveStore, SieveStoreError

log = logging.getLogger("pochta.managesieve")

IDLE_TIMEOUT = 600.0
MAX_LINE = 8192
MAX_CONNECTIONS = 100
MAX_AUTH_FAILURES = 3
_LITERAL = re.compile(rb"\{(\d{1,9})\+?\}\r?\n?$")


class ProtocolError(Exception):
    """A command we cannot parse: answered NO, the session goes on."""


class Unrecoverable(ProtocolError):
    """Input we cannot find the end of (a line or literal over the limits): answered BYE,
    the session ends."""


def quote(s: str) -> str:
    if len(s) < 1024 and '"' not in s and "\\" not in s and "\r" not in s and "\n" not in s:
        return f'"{s}"'
    data = s.encode()
    return "{" + str(len(data)) + "}\r\n" + s


def tokens(line: bytes) -> list[str]:
    """A command line without its literals (``read_command`` reads those) split into atoms
    and quoted strings."""
    out: list[str] = []
    i = 0
    text = line.decode("utf-8", "replace")
    while i < len(text):
        c = text[i]
        if c in " \t":
            i += 1
        elif c == '"':
            j = i + 1
            buf: list[str] = []
            while j < len(text) and text[j] != '"':
                if text[j] == "\\" and j + 1 < len(text):
                    j += 1
                buf.append(text[j])
                j += 1
            if j >= len(text):
                raise ProtocolError("unterminated string")
            out.append("".join(buf))
            i = j + 1
        else:
            j = i
            while j < len(text) and text[j] not in ' \t"':
                j += 1
            out.append(text[i:j])
            i = j
    return out


async def read_command(reader: asyncio.StreamReader) -> list[str] | None:
    """One command with its literals ({n+} or {n}) read in; None at end of stream."""
    words: list[str] = []
    while True:
        try:
            line = await reader.readline()
        except ValueError:  # asyncio's limit: no end of line within it
            raise Unrecoverable("line too long") from None
        if not line:
            return None
        if len(line) > MAX_LINE:
            raise ProtocolError("line too long")
        m = _LITERAL.search(line)
        if m is None:
            words += tokens(line.rstrip(b"\r\n"))
            return words
        size = int(m.group(1))
        if size > MAX_SCRIPT_BYTES + 1024:
            raise Unrecoverable("literal too large")
        words += tokens(line[:m.start()])
        data = await reader.readexactly(size)
        words.append(data.decode("utf-8", "replace"))


class ManageSieveServer:
    def __init__(self, config: Callable[[], Config], directory: Directory,
                 store: SieveStore) -> None:
        self.config = config
        self.directory = directory
        self.store = store
        self.slots = asyncio.Semaphore(MAX_CONNECTIONS)
        self.tls: ssl.SSLContext | None = None

    async def start(self, context: ssl.SSLContext) -> list[asyncio.base_events.Server]:
        self.tls = context
        servers = []
        for addr in self.config().managesieve.listen:
            host, port = parse_address(addr, "managesieve.listen")
            servers.append(await asyncio.start_server(self.serve, host, port,
                                                      reuse_address=True, limit=MAX_LINE * 2))
        return servers

    def capabilities(self, tls: bool, authenticated: bool) -> str:
        lines = ['"IMPLEMENTATION" "pochta"', f'"SIEVE" "{" ".join(EXTENSIONS)}"',
                 '"VERSION" "1.0"', f'"MAXREDIRECTS" "{Limits().redirects}"']
        if not authenticated:
            lines.insert(1, '"SASL" "PLAIN"' if tls else '"SASL" ""')
        if not tls:
            lines.append('"STARTTLS"')
        return "\r\n".join(lines) + "\r\n"

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.slots.locked():
            writer.write(b'BYE "too many connections"\r\n')
            writer.close()
            return
        async with self.slots:
            try:
                await Session(self, reader, writer).run()
            except (OSError, ssl.SSLError, TimeoutError, asyncio.IncompleteReadError):
                pass
            finally:
                writer.close()
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(writer.wait_closed(), 2)


class Session:
    def __init__(self, server: ManageSieveServer, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
        self.server = server
        self.reader = reader
        self.writer = writer
        self.tls = False
        self.user: str | None = None
        self.failures = 0
        peer = writer.get_extra_info("peername")
        self.peer = peer[0] if peer else "?"

    async def send(self, text: str) -> None:
        self.writer.write(text.encode())
        await self.writer.drain()

    async def run(self) -> None:
        await self.send(self.server.capabilities(False, False) + 'OK "pochta ManageSieve"\r\n')
        while True:
            try:
                async with asyncio.timeout(IDLE_TIMEOUT):
                    words = await read_command(self.reader)
            except Unrecoverable as e:
                await self.send(f'BYE "{e}"\r\n')
                return
            except ProtocolError as e:
                await self.send(f'NO "{e}"\r\n')
                continue
            except TimeoutError:
                await self.send('BYE "idle for too long"\r\n')
                return
            if words is None:
                return
            if not words:
                await self.send('NO "empty command"\r\n')
                continue
            verb, args = words[0].upper(), words[1:]
            if verb == "LOGOUT":
                await self.send('OK "bye"\r\n')
                return
            reply = await self.dispatch(verb, args)
            if reply is None:
                return
            await self.send(reply)

    async def dispatch(self, verb: str, args: list[str]) -> str | None:
        if verb == "CAPABILITY":
            return self.server.capabilities(self.tls, self.user is not None) + 'OK\r\n'
        if verb == "NOOP":
            return 'OK "NOOP completed"\r\n'
        if verb == "STARTTLS":
            if self.tls or self.server.tls is None:
                return 'NO "TLS is active already"\r\n'
            await self.send('OK "begin TLS negotiation"\r\n')
            await self.writer.start_tls(self.server.tls)
            self.tls = True
            return self.server.capabilities(True, False) + 'OK\r\n'
        if verb == "AUTHENTICATE":
            return await self.authenticate(args)
        if self.user is None:
            return 'NO "authenticate first"\r\n'
        try:
            return await asyncio.to_thread(self.script_verb, verb, args)
        except SieveStoreError as e:
            code = f"({e.code}) " if e.code else ""
            return f'NO {code}{quote(str(e))}\r\n'
        except DirectoryUnavailable as e:
            log.error("managesieve: database unavailable: %s", e)
            return 'NO (TRYLATER) "database unavailable"\r\n'

    async def authenticate(self, args: list[str]) -> str | None:
        if self.user is not None:
            return 'NO "authenticated already"\r\n'
        if not self.tls:
            return 'NO (ENCRYPT-NEEDED) "STARTTLS first"\r\n'
        if not args or args[0].upper() != "PLAIN":
            return 'NO "only PLAIN is offered"\r\n'
        if len(args) > 1:
            response = args[1]
        else:
            await self.send('""\r\n')
            words = await read_command(self.reader)
            if not words:
                return None
            response = words[0]
        try:
            authzid, login, password = base64.b64decode(response, validate=True).decode(
            ).split("\0")
        except (ValueError, UnicodeDecodeError):
            return 'NO "malformed PLAIN response"\r\n'
        if authzid and authzid.lower() != login.lower():
            return 'NO "acting for another user is not allowed"\r\n'
        user = await asyncio.to_thread(self.server.directory.authenticate, login, password)
        if user is None:
            self.failures += 1
            log.info("managesieve: failed login for %r from %s", login, self.peer)
            await asyncio.sleep(min(2.0 * self.failures, 5.0))
            if self.failures >= MAX_AUTH_FAILURES:
                await self.send('BYE "too many failed logins"\r\n')
                return None
            return 'NO "authentication failed"\r\n'
        self.user = user
        log.info("managesieve: %s logged in from %s", user, self.peer)
        return 'OK "logged in"\r\n'

    def script_verb(self, verb: str, args: list[str]) -> str:
        store = self.server.store
        user = self.user
        assert user is not None

        def need(n: int) -> None:
            if len(args) != n:
                raise SieveStoreError(f"{verb} takes {n} argument(s)")

        if verb == "LISTSCRIPTS":
            need(0)
            lines = [quote(s.name) + (" ACTIVE" if s.active else "")
                     for s in store.scripts(user)]
            return "".join(line + "\r\n" for line in lines) + 'OK\r\n'
        if verb == "GETSCRIPT":
            need(1)
            _, text = store.get(user, args[0])
            return "{" + str(len(text.encode())) + "}\r\n" + text + "\r\nOK\r\n"
        if verb in ("PUTSCRIPT", "CHECKSCRIPT"):
            need(2 if verb == "PUTSCRIPT" else 1)
            text = args[-1]
            error = check(text)
            if error:
                return f"NO {quote(error)}\r\n"
            if verb == "CHECKSCRIPT":
                return 'OK "script is valid"\r\n'
            store.put(user, args[0], text)
            log.info("managesieve: %s stored script %r", user, args[0])
            return 'OK "stored"\r\n'
        if verb == "SETACTIVE":
            need(1)
            if args[0]:
                error = check(store.get(user, args[0])[1])
                if error:
                    return f"NO {quote(error)}\r\n"
            store.activate(user, args[0] or None)
            return 'OK\r\n'
        if verb == "DELETESCRIPT":
            need(1)
            store.delete(user, args[0])
            return 'OK\r\n'
        if verb == "RENAMESCRIPT":
            need(2)
            store.rename(user, args[0], args[1])
            return 'OK\r\n'
        if verb == "HAVESPACE":
            need(2)
            if not args[1].isdigit():
                return 'NO "size must be a number"\r\n'
            store.have_space(user, args[0], int(args[1]))
            return 'OK\r\n'
        return f'NO "unknown command {verb}"\r\n'
