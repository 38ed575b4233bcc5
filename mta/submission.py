"""Submission (RFC 6409) policy on top of the MTA session: AUTH, sender rules, header fixes.

- AUTH PLAIN and LOGIN (RFC 4954, 4616) only under TLS; the password hash is checked in a
  thread, never on the event loop. Failures answer 535 5.7.8 after a delay that doubles per
  failure from the same client IP and for the same account (a brute-force brake), and never say
  which part was wrong. PLAIN with an authorization identity other than the login is refused.
- MAIL FROM and the From: header must be the login's own address or an alias resolving to it.
- A message without Message-ID or Date gets them (RFC 6409 §8.3).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import hmac
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from email.utils import formatdate, getaddresses, make_msgid
from typing import Any

from mta.abuse import RateLimiter
from mta.dkimsign import Signer
from mta.policy import header_fields, header_section
from mta.session import SMTPHandler
from mta.smtp import MISSING, AuthResult, Session, replies
from mta.smtp.protocol import SMTPEnvelope, SMTPProtocol
from store import addresses, metrics, passwords
from store.directory import DirectoryUnavailable

log = logging.getLogger("pochta.msa")

MAX_BRAKE = 8.0  # seconds


@dataclass
class Login:
    login: str


class Brake:
    """Failure counts per client IP and per account; the delay doubles with each failure.

    An account is keyed by its canonical address (``Alice+x@Example.com`` is alice's), so
    spelling it another way does not reset its count; counts are forgotten after
    ``forget_after`` seconds without a failure, and at most ``MAX_KEYS`` are kept (a client
    trying a million names must not grow the process).
    """

    MAX_KEYS = 10_000

    def __init__(self, base: float = 0.25, forget_after: float = 900.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.base = base
        self.forget_after = forget_after
        self.clock = clock
        self.failures: dict[str, tuple[int, float]] = {}

    @staticmethod
    def account(login: str) -> str:
        try:
            return addresses.strip_subaddress(addresses.normalize(login))
        except addresses.AddressError:
            return login.lower()[:320]

    def _count(self, key: str, now: float) -> int:
        n, last = self.failures.get(key, (0, 0.0))
        return 0 if now - last > self.forget_after else n

    def delay(self, ip: str, login: str) -> float:
        now = self.clock()
        n = max(self._count("ip:" + ip, now), self._count("user:" + self.account(login), now))
        return min(MAX_BRAKE, self.base * (2 ** n))

    def failed(self, ip: str, login: str) -> None:
        now = self.clock()
        if len(self.failures) >= self.MAX_KEYS:
            self._forget(now)
        for key in ("ip:" + ip, "user:" + self.account(login)):
            self.failures[key] = (self._count(key, now) + 1, now)

    def succeeded(self, ip: str, account: str) -> None:
        self.failures.pop("ip:" + ip, None)
        self.failures.pop("user:" + self.account(account), None)

    def _forget(self, now: float) -> None:
        self.failures = {k: v for k, v in self.failures.items()
                         if now - v[1] <= self.forget_after}
        if len(self.failures) >= self.MAX_KEYS:  # all recent: keep the newer half
            recent = sorted(self.failures.items(), key=lambda kv: kv[1][1])
            self.failures = dict(recent[len(recent) // 2:])


class SubmissionHandler(SMTPHandler):
    def __init__(self, *args: Any, signer: Signer | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.brake = Brake()
        limits = self.cfg.limits
        self.signer = signer
        hour = 3600.0 * limits.window_scale
        self.messages_per_user = RateLimiter(limits.messages_per_user_per_hour, hour)
        # Not named auth_*: aiosmtpd would advertise any such attribute as a mechanism.
        self.failed_logins = RateLimiter(limits.auth_failures_per_ip_per_hour, hour)
        self.decoy_secret = secrets.token_bytes(32)

    def keep_counts(self, old: SubmissionHandler) -> None:
        """After a reload with the same limits: the counts so far still apply."""
        self.brake = old.brake
        self.messages_per_user = old.messages_per_user
        self.failed_logins = old.failed_logins
        self.decoy_secret = old.decoy_secret
        if old.defences.connection_rate is not None:
            self.defences.connection_rate = old.defences.connection_rate

    # -- AUTH ---------------------------------------------------------------------------------

    async def _check(self, server: SMTPProtocol, authzid: str, login: str, password: str
                     ) -> AuthResult:
        ip = server.peer_ip
        if self.failed_logins.over(ip):
            log.warning("%s: too many authentication failures", ip)
            metrics.DEFENCE_HITS.labels("auth_rate").inc()
            return AuthResult(success=False, handled=False,
                              message=replies.AUTH_TOO_MANY_FAILURES)
        if authzid and authzid.lower() != login.lower():
            ok = None  # RFC 4616 §2: acting as another user is not offered here
        else:
            try:
                ok = await asyncio.to_thread(self.directory.authenticate, login, password)
            except DirectoryUnavailable:
                return AuthResult(success=False, handled=False,
                                  message=replies.AUTH_TEMPORARY)
        if ok is None:
            return await self._failed(server, login)
        return self._succeeded(server, ok)

    async def _failed(self, server: SMTPProtocol, login: str) -> AuthResult:
        ip = server.peer_ip
        delay = self.brake.delay(ip, login)
        self.brake.failed(ip, login)
        self.failed_logins.hit(ip)
        log.info("auth failed from %s for %r; braking %.2f s", ip, login[:64], delay)
        metrics.AUTH_FAILURES.labels(server.listener).inc()
        await asyncio.sleep(delay)
        return AuthResult(success=False, handled=False, message=replies.AUTH_FAILED)

    def _succeeded(self, server: SMTPProtocol, login: str) -> AuthResult:
        self.brake.succeeded(server.peer_ip, login)
        log.info("auth ok from %s as %s", server.peer_ip, login)
        return AuthResult(success=True, auth_data=Login(login))

    async def auth_PLAIN(self, server: SMTPProtocol, args: list[str]) -> AuthResult:
        if len(args) == 1:
            answer = await server.challenge_auth("", encode_to_b64=False)
            if answer is MISSING:
                return AuthResult(success=False, handled=True)
            raw: bytes = answer
        else:
            try:
                raw = base64.b64decode(args[1], validate=True)
            except binascii.Error:
                return AuthResult(success=False, handled=False,
                                  message=replies.AUTH_BAD_BASE64)
        try:
            authzid, login, password = raw.decode("utf-8").split("\0")
        except (UnicodeDecodeError, ValueError):
            return AuthResult(success=False, handled=False,
                              message=replies.AUTH_BAD_PLAIN)
        return await self._check(server, authzid, login, password)

    async def auth_LOGIN(self, server: SMTPProtocol, args: list[str]) -> AuthResult:
        if len(args) > 1:
            try:
                user_raw: Any = base64.b64decode(args[1], validate=True)
            except binascii.Error:
                return AuthResult(success=False, handled=False,
                                  message=replies.AUTH_BAD_BASE64)
        else:
            user_raw = await server.challenge_auth("Username:")
        if user_raw is MISSING:
            return AuthResult(success=False, handled=True)
        pass_raw = await server.challenge_auth("Password:")
        if pass_raw is MISSING:
            return AuthResult(success=False, handled=True)
        try:
            login, password = user_raw.decode("utf-8"), pass_raw.decode("utf-8")
        except UnicodeDecodeError:
            return AuthResult(success=False, handled=False, message=replies.AUTH_FAILED)
        return await self._check(server, "", login, password)

    async def auth_SCRAM__SHA__256(self, server: SMTPProtocol, args: list[str]) -> AuthResult:
        return await self._scram(server, args, plus=False)

    async def auth_SCRAM__SHA__256__PLUS(self, server: SMTPProtocol, args: list[str]
                                         ) -> AuthResult:
        return await self._scram(server, args, plus=True)

    async def _scram(self, server: SMTPProtocol, args: list[str], plus: bool) -> AuthResult:
        """SCRAM-SHA-256[-PLUS] (RFC 5802, 7677) by scramp: the server-final message goes
        in a 334 and the client's empty answer comes before the 235 (RFC 4954 §4). -PLUS
        binds to our certificate (tls-server-end-point, RFC 5929), the binding Python's TLS
        gives. An unknown user gets a made-up salt, so a probe learns nothing."""
        from scramp import ScramException, ScramMechanism

        if self.failed_logins.over(server.peer_ip):
            metrics.DEFENCE_HITS.labels("auth_rate").inc()
            return AuthResult(success=False, handled=False,
                              message=replies.AUTH_TOO_MANY_FAILURES)
        if len(args) > 1:
            try:
                first = b"" if args[1] == "=" else base64.b64decode(args[1], validate=True)
            except binascii.Error:
                return AuthResult(success=False, handled=False, message=replies.AUTH_BAD_BASE64)
        else:
            answer = await server.challenge_auth("", encode_to_b64=False)
            if answer is MISSING:
                return AuthResult(success=False, handled=True)
            first = answer
        channel = ("tls-server-end-point", self.certificate_pem()) if plus else None
        name = "SCRAM-SHA-256-PLUS" if plus else "SCRAM-SHA-256"
        login = ""

        def keys(username: str) -> tuple[bytes, bytes, bytes, int]:
            nonlocal login
            login = username
            stored = self.directory.scram_keys(username)
            if stored is not None:
                with contextlib.suppress(ValueError):
                    return passwords.parse_scram_keys(stored)
            return self.decoy_keys(username)

        try:
            scram = ScramMechanism(name).make_server(keys, channel_binding=channel)
            await asyncio.to_thread(scram.set_client_first, first.decode("utf-8"))
            final = await server.challenge_auth(scram.get_server_first())
            if final is MISSING:
                return AuthResult(success=False, handled=True)
            try:
                scram.set_client_final(final.decode("utf-8"))
            except ScramException:
                return await self._failed(server, login)
            done = await server.challenge_auth(scram.get_server_final())
        except (ScramException, UnicodeDecodeError, ValueError):
            return await self._failed(server, login or "?")
        except DirectoryUnavailable:
            return AuthResult(success=False, handled=False, message=replies.AUTH_TEMPORARY)
        if done is MISSING:
            return AuthResult(success=False, handled=True)
        if done:  # RFC 5802 §7: the client's last answer is empty
            return await self._failed(server, login)
        return self._succeeded(server, addresses.normalize(login))

    def decoy_keys(self, username: str) -> tuple[bytes, bytes, bytes, int]:
        """Keys for a user we do not have: the same salt each time (as a real user's), that
        no password matches."""
        salt = hmac.new(self.decoy_secret, username.encode(), hashlib.sha256).digest()[:16]
        return salt, secrets.token_bytes(32), secrets.token_bytes(32), passwords.SCRAM_ITERATIONS

    def certificate_pem(self) -> str:
        """Our certificate, for tls-server-end-point."""
        try:
            with open(self.cfg.tls.cert, encoding="ascii") as f:
                return f.read()
        except (OSError, UnicodeDecodeError):
            return ""

    # -- sender rules -------------------------------------------------------------------------

    async def _owns(self, login: str, address: str) -> bool:
        return await asyncio.to_thread(self.directory.owns, login, address)

    async def handle_MAIL(self, server: SMTPProtocol, session: Session, envelope: SMTPEnvelope,
                          address: str, mail_options: list[str]) -> str:
        login = session.login_data
        try:
            owned = address not in ("<>", "") and await self._owns(login, address)
        except DirectoryUnavailable:
            return replies.DIRECTORY_UNAVAILABLE
        if not owned:
            return replies.SENDER_NOT_OWNED.format(addr=address, login=login)
        if self.messages_per_user.hit(login):
            log.warning("%s: message rate limit reached", login)
            metrics.DEFENCE_HITS.labels("message_rate").inc()
            return replies.MESSAGE_RATE
        return await super().handle_MAIL(server, session, envelope, address, mail_options)

    async def check_message(self, session: Session, content: bytes) -> bytes | str:
        login = session.login_data
        fields = header_fields(header_section(content))
        froms = []
        for name, value in fields:
            if name == "from":
                found = [a for _, a in getaddresses([value]) if a]
                if not found:  # a From: we cannot read could be read otherwise by a client
                    return replies.FROM_UNREADABLE
                froms += found
        try:
            for addr in froms:
                if not await self._owns(login, addr):
                    return replies.FROM_NOT_OWNED.format(addr=addr, login=login)
        except DirectoryUnavailable:
            return replies.DIRECTORY_UNAVAILABLE
        names = {name for name, _ in fields}
        added = b""
        if "message-id" not in names:
            domain = addresses.ascii_domain(addresses.domain_of(login))
            added += f"Message-ID: {make_msgid(domain=domain)}\r\n".encode()
        if "date" not in names:
            added += f"Date: {formatdate(localtime=False, usegmt=True)}\r\n".encode()
        content = added + content
        if self.signer is not None:
            domain = addresses.domain_of(froms[0] if froms else login)
            signature = await asyncio.to_thread(self.signer.sign, content, domain)
            content = signature + content
        return content
