"""Outbound SMTP: foreign recipients of a message to their domain's MX hosts (or a smarthost).

One connection per destination domain carries all of that domain's recipients. Hosts are tried
best first; a host that cannot be reached, or answers 4xx, passes the still-deferred recipients
to the next one. What TLS each host must give is ``mta/tlspolicy.py``'s decision (the admin's
tls-policy, DANE, MTA-STS): mandatory TLS has no clear-text fallback and a certificate the
policy rejects ends the session before MAIL (4.7.5, the next host is tried); otherwise STARTTLS
is used whenever offered (opportunistic: RFC 7435) and a failed handshake is retried in plain
text. A smarthost gets verified TLS (``delivery.smarthost_tls``) before any credential or
message, with no fallback. Capabilities are respected: a
message needing SMTPUTF8 or 8BITMIME that the host lacks fails permanently (5.6.7 / 5.6.3), and
so does one larger than its SIZE. Concurrency is capped per domain and in total.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import ssl
from collections import defaultdict
from collections.abc import Callable

import aiosmtplib

from mta.courier import pipelining
from mta.dns import Host, Resolver, RouteError
from mta.envelope import Envelope, Recipient
from mta.reply import LOCAL_DECISION, Reply
from mta.spool import SpooledMessage
from mta.tlspolicy import (
    OPPORTUNISTIC,
    DomainPolicy,
    Refused,
    Requirement,
    TLSPolicies,
    failure_type,
)
from mta.tlsverify import dane_error, peer_chain
from store import addresses
from store.config import Config, parse_address, parse_host_port
from store.directory import Directory, lookup
from store.tlspolicy import TLSPolicyStore

log = logging.getLogger("pochta.outbound")


def _insecure_context() -> ssl.SSLContext:
    # Opportunistic TLS: encrypt against passive eavesdropping; MX certificates are not checked.
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def wire_address(address: str) -> str:
    """The address as sent on the wire: A-label domain; the local part as is (UTF-8 if any)."""
    if not address:
        return ""
    local, domain = addresses.split(address)
    return f"{local}@{addresses.ascii_domain(domain)}"


def needs_smtputf8(env: Envelope, rcpts: list[Recipient]) -> bool:
    if env.smtputf8:
        return True
    return any(not addresses.local_of(a).isascii() for a in
               [env.mail_from, *(r.address for r in rcpts)] if a)


class _Retry(Exception):
    """This host failed as a whole: try the next one."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(reply.line)
        self.reply = reply


# Per-command time limits, RFC 5321 §4.5.3.2 (a slow receiver is not a dead one), and
# Postfix's 30 s for the TCP connection (a host that drops SYNs; the next MX is tried).
IDLE_REUSE = 2.0  # seconds a connection waits for the next message to its host (Postfix: 2 s)
MAX_REUSE = 100  # messages over one connection, then a fresh one
MAX_IDLE = 64  # idle connections kept in all
# Messages over the spill size (mta/smtp/data.py: 1 MiB) read into memory for remote hosts at
# once: at most 8 x the size limit in memory, however many attempts run.
LARGE_AT_ONCE = 8


class IdleConnections:
    """Connections whose transaction is over, kept for the next message to the same host
    with the same TLS requirement (Postfix's scache): no new TCP, greeting, EHLO, TLS
    handshake for every message of a newsletter or a queue draining. A connection is used
    only after RSET succeeds on it (with PIPELINING, the RSET ahead of the envelope); one that
    fails is closed and a fresh one made, so reuse never costs a message anything."""

    def __init__(self) -> None:
        self.idle: dict[tuple[object, ...], list[tuple[aiosmtplib.SMTP, bool, int, float]]] = {}
        self.count = 0
        self.reused = 0  # for the log and the benchmark

    async def take(self, key: tuple[object, ...]) -> tuple[aiosmtplib.SMTP, bool, int] | None:
        """An idle connection for ``key`` that answered RSET: (smtp, authenticated, uses)."""
        now = asyncio.get_running_loop().time()
        entries = self.idle.get(key)
        while entries:
            smtp, authenticated, uses, since = entries.pop()
            self.count -= 1
            if not entries:
                del self.idle[key]
            if now - since > IDLE_REUSE or not smtp.is_connected:
                await _quit(smtp)
                continue
            if pipelining.pipelines(smtp):  # its RSET goes out with the next envelope
                self.reused += 1
                return smtp, authenticated, uses
            try:
                await smtp.rset(timeout=10)
            except (aiosmtplib.SMTPException, OSError, TimeoutError):
                smtp.close()
                continue
            self.reused += 1
            return smtp, authenticated, uses
        return None

    def give(self, key: tuple[object, ...], smtp: aiosmtplib.SMTP, authenticated: bool,
             uses: int) -> bool:
        """Keep ``smtp`` for the next message to its host; False: the caller closes it."""
        if uses >= MAX_REUSE or self.count >= MAX_IDLE or not smtp.is_connected:
            return False
        loop = asyncio.get_running_loop()
        self.idle.setdefault(key, []).append((smtp, authenticated, uses, loop.time()))
        self.count += 1
        loop.call_later(IDLE_REUSE + 0.1, lambda: loop.create_task(self.expire()))
        return True

    async def expire(self, everything: bool = False) -> None:
        now = asyncio.get_running_loop().time()
        for key in list(self.idle):
            keep = []
            for entry in self.idle.pop(key):
                if everything or now - entry[3] > IDLE_REUSE or not entry[0].is_connected:
                    self.count -= 1
                    await _quit(entry[0])
                else:
                    keep.append(entry)
            if keep:
                self.idle[key] = keep


async def _quit(smtp: aiosmtplib.SMTP) -> None:
    if smtp.is_connected:
        try:
            await smtp.quit(timeout=5)
        except (aiosmtplib.SMTPException, OSError, TimeoutError):
            smtp.close()


CONNECT_TIMEOUT = 30.0
GREETING_TIMEOUT = 300.0  # §4.5.3.2.1; also EHLO, STARTTLS and AUTH
MAIL_TIMEOUT = 300.0  # §4.5.3.2.2
RCPT_TIMEOUT = 300.0  # §4.5.3.2.3
DATA_TIMEOUT = 600.0  # §4.5.3.2.4-6: 2 min for the 354, 3 per block, 10 for the final reply


class Outbound:
    """The remote courier. How many deliveries run at once, and to which destination, is the
    queue runner's decision (mta/queue.py); ``total`` only caps the connections of one
    message's many destinations."""

    def __init__(self, cfg: Config, resolver: Resolver | None = None, total: int = 64,
                 directory: Directory | None = None, tls_store: TLSPolicyStore | None = None
                 ) -> None:
        """``directory``: where relay domains (we are their backup MX) are looked up;
        ``tls_store``: TLS policies, the MTA-STS cache and TLS-RPT counts."""
        self.cfg = cfg
        self.directory = directory
        self.resolver = resolver or Resolver(cfg.delivery.resolver,
                                             dnssec=cfg.delivery.dnssec)
        self.policies = TLSPolicies(self.resolver, tls_store, cfg.delivery.ca_file)
        self.port = cfg.delivery.smtp_port
        self.smarthost = (parse_address(cfg.delivery.smarthost, "delivery.smarthost")
                          if cfg.delivery.smarthost else None)
        self.total = asyncio.Semaphore(total)
        self.large_messages = asyncio.Semaphore(LARGE_AT_ONCE)
        self.tls = _insecure_context()
        scale = cfg.delivery.timeout_scale
        self.timeouts = {"connect": CONNECT_TIMEOUT * scale, "greeting": GREETING_TIMEOUT * scale,
                         "mail": MAIL_TIMEOUT * scale, "rcpt": RCPT_TIMEOUT * scale,
                         "data": DATA_TIMEOUT * scale}
        self.smarthost_tls = cfg.delivery.smarthost_tls
        self.verified_tls = ssl.create_default_context(cafile=cfg.delivery.ca_file or None)
        self.verified_tls.minimum_version = ssl.TLSVersion.TLSv1_2
        self.connections = IdleConnections()

    async def close(self) -> None:
        """QUIT the idle connections."""
        await self.connections.expire(everything=True)

    async def deliver(self, env: Envelope, rcpts: list[Recipient], data: bytes | SpooledMessage,
                      retry: bool = False) -> dict[str, Reply]:
        """The Courier interface (mta/courier/__init__.py); ``retry`` means nothing to a remote host."""
        if isinstance(data, SpooledMessage):
            # aiosmtplib sends from memory: a large message is read in for remote delivery,
            # a few at a time (the runner makes up to 100 attempts at once).
            async with self.large_messages:
                loaded = await asyncio.to_thread(data.read)
                return await self._deliver(env, rcpts, loaded)
        return await self._deliver(env, rcpts, data)

    async def _deliver(self, env: Envelope, rcpts: list[Recipient], data: bytes
                       ) -> dict[str, Reply]:
        by_domain: dict[str, list[Recipient]] = defaultdict(list)
        for r in rcpts:
            by_domain[addresses.domain_of(r.address)].append(r)
        results: dict[str, Reply] = {}
        parts = await asyncio.gather(*(self._domain(env, d, rs, data)
                                       for d, rs in by_domain.items()), return_exceptions=True)
        for (domain, rs), part in zip(by_domain.items(), parts, strict=True):
            if isinstance(part, BaseException):
                if not isinstance(part, Exception):
                    raise part  # cancelled: the runner is stopping
                # A fault with one destination defers its recipients only.
                log.error("%s: delivery to %s failed: %r", env.id, domain, part, exc_info=part)
                part = {r.address: Reply(451, "4.3.0 local error in delivery, will retry")
                        for r in rs}
            results.update(part)
        return results

    async def _domain(self, env: Envelope, domain: str, rcpts: list[Recipient], data: bytes
                      ) -> dict[str, Reply]:
        async with self.total:
            relay = (await lookup(self.directory, "relay_route", domain)
                     if self.directory is not None else None)
            to_smarthost = self.smarthost is not None and relay is None
            if env.requiretls and to_smarthost and self.smarthost_tls == "starttls-unverified":
                # RFC 8689 §4.2.1: only to a next hop whose identity is verified.
                refused = Reply(550, "5.7.30 REQUIRETLS: the smarthost's TLS is not verified "
                                "(delivery.smarthost_tls)", LOCAL_DECISION)
                return {r.address: refused for r in rcpts}
            policy = DomainPolicy(None, None)
            try:
                if self.smarthost and to_smarthost:
                    hosts = [Host(self.smarthost[0], self.smarthost[0])]
                    port = self.smarthost[1]
                elif relay is not None and relay.to:
                    # A backup MX's configured primary; the smarthost is for the internet.
                    name, port = parse_host_port(relay.to)
                    hosts = [Host(name, ip) for ip in await self._addresses(name)]
                else:
                    policy = await self.policies.for_domain(domain)
                    hosts = await self.resolver.route(
                        addresses.ascii_domain(domain),
                        ourselves=self.cfg.hostname if relay is not None else "")
                    port = self.port
            except RouteError as e:
                code = 550 if e.permanent else 451
                return {r.address: Reply(code, f"{e.status} {e.text}", "dns") for r in rcpts}
            usable = hosts if env.tls_optional else policy.hosts(hosts)
            if not usable:
                named = ", ".join(sorted({h.name for h in hosts}))
                deferred = Reply(451, f"4.7.5 no MX host of {domain} ({named}) is one its "
                                 "MTA-STS policy names (enforce)", LOCAL_DECISION)
                if policy.sts is not None:
                    for name in sorted({h.name for h in hosts}):
                        await self.policies.record(domain, Requirement(
                            "verify", "mta-sts", sts=policy.sts), "validation-failure", name)
                return {r.address: deferred for r in rcpts}
            pending = list(rcpts)
            results: dict[str, Reply] = {}
            for host in usable:
                try:
                    requirement = OPPORTUNISTIC if to_smarthost else \
                        await self.policies.for_host(policy, host, port, env.tls_optional)
                    got = await self._session(env, host, port, pending, data,
                                              smarthost=to_smarthost, requirement=requirement,
                                              domain=domain)
                except Refused as e:
                    log.info("%s: %s[%s]:%d: %s", env.id, host.name, host.ip, port, e)
                    got = {r.address: Reply(451, f"4.7.5 {e}", LOCAL_DECISION) for r in pending}
                except _Retry as e:
                    log.info("%s: %s[%s]:%d: %s", env.id, host.name, host.ip, port, e.reply.line)
                    got = {r.address: e.reply for r in pending}
                results.update(got)
                pending = [r for r in pending if 400 <= results[r.address].code < 500]
                if not pending:
                    break
            return results

    async def _addresses(self, name: str) -> list[str]:
        try:
            ipaddress.ip_address(name)
            return [name]
        except ValueError:
            pass
        found = await self.resolver.addresses(name)
        if not found:
            raise RouteError(False, "4.4.4", f"no address for {name}")
        return found

    async def _session(self, env: Envelope, host: Host, port: int, rcpts: list[Recipient],
                       data: bytes, use_tls: bool = True, smarthost: bool = False,
                       requirement: Requirement = OPPORTUNISTIC, domain: str = ""
                       ) -> dict[str, Reply]:
        relay = f"{host.name}[{host.ip}]:{port}"

        def reply(code: int, text: str) -> Reply:
            return Reply(code, text, relay)

        def refuse(code: int, text: str) -> Reply:
            # Our own decision about this host: no remote MTA said it (no Remote-MTA in a DSN).
            return Reply(code, f"{text} ({relay})", LOCAL_DECISION)

        # To the smarthost TLS is verified unless configured otherwise: it gets our password
        # and all our mail; a message marked "TLS-Required: No" (RFC 8689 §5) may do with
        # unverified TLS when no password is at stake. To MX hosts it is opportunistic (RFC 7435).
        verify = smarthost and self.smarthost_tls != "starttls-unverified" and not (
            env.tls_optional and not self.cfg.delivery.smarthost_user)
        implicit = smarthost and self.smarthost_tls == "implicit"
        context = self.verified_tls if verify else self.tls
        authenticated = False  # (an MX host's identity, checked by _secure)
        # What a connection was opened for: only a message needing the same may reuse it.
        key = (host.ip, port, host.name, smarthost, verify, implicit, use_tls, requirement)
        reusable = False
        uses = 0
        taken = await self.connections.take(key)
        if taken is not None:
            smtp, authenticated, uses = taken
        else:
            try:
                sock = await _connect(host.ip, port, self.timeouts["connect"])
            except (OSError, TimeoutError) as e:
                raise _Retry(reply(451, f"4.4.1 cannot connect: {e or 'timed out'}")) from None
            smtp = aiosmtplib.SMTP(sock=sock, hostname=host.name if implicit else None,
                                   local_hostname=self.cfg.hostname,
                                   timeout=self.timeouts["greeting"], use_tls=implicit,
                                   tls_context=context if implicit else None, start_tls=False,
                                   validate_certs=verify)
        try:
            if taken is not None:
                try:
                    results = await self.transaction(env, smtp, rcpts, data, reply, refuse,
                                                     authenticated, reused=True)
                except pipelining.StaleConnection as e:
                    log.info("%s: %s: %s; on a fresh connection", env.id, relay, e)
                    return await self._session(env, host, port, rcpts, data, use_tls,
                                               smarthost, requirement, domain)
                reusable = True
                return results
            try:
                await smtp.connect(timeout=self.timeouts["greeting"])
            except (aiosmtplib.SMTPException, OSError) as e:
                sock.close()
                if verify and isinstance(e.__cause__ or e, ssl.SSLError):
                    raise _Retry(reply(454, f"4.7.5 TLS with the smarthost failed: {e}")) \
                        from None
                raise _Retry(reply(451, f"4.4.1 no greeting: {e}")) from None
            pipelining.keep_replies(smtp)
            try:
                await smtp.ehlo()
            except aiosmtplib.SMTPResponseException:
                await smtp.helo()
            if verify and not implicit:
                if not smtp.supports_extension("starttls"):
                    raise _Retry(reply(454, "4.7.0 the smarthost offers no STARTTLS "
                                       "(delivery.smarthost_tls requires it)"))
                try:
                    await smtp.starttls(tls_context=context, server_hostname=host.name)
                except (aiosmtplib.SMTPException, ssl.SSLError, OSError) as e:
                    raise _Retry(reply(454, f"4.7.5 TLS with the smarthost failed: {e}")) \
                        from None
                await smtp.ehlo()
            elif not implicit:  # (an unverified smarthost's requirement is OPPORTUNISTIC)
                secured = await self._secure(env, smtp, host, relay, use_tls, requirement,
                                             domain, refuse)
                if secured is None:  # the handshake failed: opportunistic, so again
                    return await self._session(env, host, port, rcpts, data, use_tls=False,
                                               smarthost=smarthost, requirement=requirement,
                                               domain=domain)
                if secured == "unverified":  # MTA-STS testing: the failure is recorded
                    return await self._session(env, host, port, rcpts, data,
                                               requirement=OPPORTUNISTIC, domain=domain)
                authenticated = secured is True
            d = self.cfg.delivery
            if smarthost and d.smarthost_user:
                if smtp.get_transport_info("ssl_object") is None:
                    raise _Retry(reply(454, "4.7.0 smarthost offers no TLS; "
                                       "not sending credentials in the clear"))
                await smtp.login(d.smarthost_user, d.smarthost_password)
            authenticated = verify or authenticated
            results = await self.transaction(env, smtp, rcpts, data, reply, refuse,
                                             authenticated)
            reusable = True
            return results
        except aiosmtplib.SMTPResponseException as e:
            r = reply(e.code, e.message)
            if e.code >= 500:
                return {x.address: r for x in rcpts}
            raise _Retry(r) from None
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as e:
            raise _Retry(reply(451, f"4.4.2 connection with {relay} failed: {e}")) from None
        finally:
            if not (reusable and self.connections.give(key, smtp, authenticated, uses + 1)):
                await _quit(smtp)

    async def _secure(self, env: Envelope, smtp: aiosmtplib.SMTP, host: Host, relay: str,
                      use_tls: bool, req: Requirement, domain: str,
                      refuse: Callable[[int, str], Reply]) -> bool | str | None:
        """TLS with an MX host as ``req`` requires: True if the peer was authenticated, else
        False; None when an optional handshake failed (start again without TLS);
        "unverified" when MTA-STS testing found the certificate invalid (start again with
        opportunistic TLS). A requirement not met raises _Retry (4.7.x, our decision: the
        next host is tried).

        ``verify`` (MTA-STS, tls-policy) is checked by OpenSSL in the handshake, against
        ``ca_file`` or the system's CAs and the MX name; DANE after it, on the chain the peer
        presented (mta/tlsverify.py)."""
        if req.level == "none" or not use_tls:
            return False
        checked = req.level in ("verify", "dane")
        if not smtp.supports_extension("starttls"):
            await self.policies.record(domain, req, "starttls-not-supported", host.name)
            if req.mandatory:
                raise _Retry(refuse(451, f"4.7.4 TLS required ({req.describe()}) but "
                                         f"{host.name} does not offer STARTTLS"))
            return False
        context = self.verified_tls if req.level == "verify" else self.tls
        try:
            await smtp.starttls(tls_context=context, server_hostname=host.name)
        except ssl.SSLCertVerificationError as e:
            invalid = f"certificate not valid for {host.name}: {e.verify_message}"
            await self.policies.record(domain, req, failure_type(invalid), host.name)
            if req.enforce:
                raise _Retry(refuse(451, f"4.7.5 {invalid} ({req.describe()})")) from None
            log.info("%s: %s: %s (MTA-STS testing: delivered anyway)", env.id, relay, invalid)
            smtp.close()
            return "unverified"
        except (aiosmtplib.SMTPException, ssl.SSLError, OSError) as e:
            if checked:
                await self.policies.record(domain, req, "validation-failure", host.name)
            if req.mandatory:
                raise _Retry(refuse(451, f"4.7.5 TLS handshake with {host.name} failed "
                                         f"({req.describe()}): {e}")) from None
            log.info("%s: %s: STARTTLS failed (%s); retrying without TLS", env.id, relay, e)
            smtp.close()
            return None
        problem: str | None = None
        if req.level == "dane":
            chain = peer_chain(smtp.get_transport_info("ssl_object"))
            problem = dane_error(chain, list(req.tlsa), host.name)
        if problem is not None:
            await self.policies.record(domain, req, failure_type(problem), host.name)
            raise _Retry(refuse(451, f"4.7.5 {problem} ({req.describe()})"))
        if checked:
            await self.policies.record(domain, req, "success")
        # RFC 3207 §4.2: what the server said before TLS is forgotten (aiosmtplib clears it);
        # its extensions are those of a new EHLO over the encrypted channel.
        await smtp.ehlo()
        return req.authenticated

    async def transaction(self, env: Envelope, smtp: aiosmtplib.SMTP, rcpts: list[Recipient],
                           data: bytes, reply: Callable[[int, str], Reply],
                           refuse: Callable[[int, str], Reply], authenticated: bool = False,
                           reused: bool = False) -> dict[str, Reply]:
        """One mail transaction; ``authenticated``: the peer's identity was verified (a
        verified smarthost, MTA-STS enforce, DANE), which REQUIRETLS needs; ``reused``: an
        idle connection taken without its RSET (pipelining: it goes with the envelope)."""
        options: list[str] = []
        if needs_smtputf8(env, rcpts):
            if not smtp.supports_extension("smtputf8"):
                refused = refuse(554, "5.6.7 the receiving host does not support SMTPUTF8")
                return {x.address: refused for x in rcpts}
            options.append("SMTPUTF8")
        chunking = smtp.supports_extension("chunking")
        if env.body == "BINARYMIME":
            # RFC 3030 §3: relayed as is only to a host that takes it; we do not convert.
            if not (chunking and smtp.supports_extension("binarymime")):
                refused = refuse(554, "5.6.3 the receiving host does not accept binary MIME "
                                      "(BINARYMIME) and pochta does not convert it")
                return {x.address: refused for x in rcpts}
            options.append("BODY=BINARYMIME")
        elif env.body == "8BITMIME" or not data.isascii():
            if smtp.supports_extension("8bitmime"):
                options.append("BODY=8BITMIME")
            else:
                refused = refuse(554, "5.6.3 the receiving host does not accept 8-bit messages")
                return {x.address: refused for x in rcpts}
        if smtp.supports_extension("size"):
            limit = smtp.esmtp_extensions.get("size", "")
            if limit.isdigit() and int(limit) and len(data) > int(limit):
                refused = refuse(552, f"5.3.4 message size {len(data)} exceeds the host's limit {limit}")
                return {x.address: refused for x in rcpts}
            options.append(f"SIZE={len(data)}")
        if env.requiretls:  # RFC 8689 §4.2.1
            if not authenticated:
                refused = refuse(550, "5.7.30 REQUIRETLS: no authenticated TLS path (MTA-STS "
                                      "enforce or DANE) to this host")
                return {x.address: refused for x in rcpts}
            if not smtp.supports_extension("requiretls"):
                refused = refuse(550, "5.7.30 REQUIRETLS: the receiving host does not offer it")
                return {x.address: refused for x in rcpts}
            options.append("REQUIRETLS")
        encoding = "utf-8" if "SMTPUTF8" in options else "ascii"
        dsn = smtp.supports_extension("dsn")
        if dsn:  # RFC 3461 §4: pass the sender's DSN requests on to a host that takes them
            if (env.dsn or {}).get("ret"):
                options.append(f"RET={env.dsn['ret']}")
            if (env.dsn or {}).get("envid"):
                options.append(f"ENVID={env.dsn['envid']}")
        rcpt_options: list[list[str]] = []
        for r in rcpts:
            rcpt_options.append([])
            if dsn:
                if r.notify:
                    rcpt_options[-1].append("NOTIFY=" + ",".join(r.notify))
                if r.orcpt:
                    rcpt_options[-1].append(f"ORCPT={r.orcpt}")
        results: dict[str, Reply] = {}
        accepted: list[str] = []
        pipelined = pipelining.pipelines(smtp)
        if pipelined:
            got = await pipelining.send_envelope(
                smtp, command(b"MAIL FROM:", wire_address(env.mail_from), options, encoding),
                [command(b"RCPT TO:", wire_address(r.address), o, encoding)
                 for r, o in zip(rcpts, rcpt_options, strict=True)],
                not chunking, self.timeouts, reset=reused)
            if got.mail.code != 250:
                raise aiosmtplib.SMTPSenderRefused(got.mail.code, got.mail.message,
                                                   env.mail_from)
            for r, resp in zip(rcpts, got.rcpts, strict=True):
                results[r.address] = reply(resp.code, resp.message)
                if resp.code in (250, 251):
                    accepted.append(r.address)
            if accepted and got.data is not None and got.data.code != 354:
                raise aiosmtplib.SMTPDataError(got.data.code, got.data.message)
        else:
            await mail(smtp, wire_address(env.mail_from), options, encoding,
                       self.timeouts["mail"])
            for r, o in zip(rcpts, rcpt_options, strict=True):
                try:
                    resp = await rcpt(smtp, wire_address(r.address), o, encoding,
                                      self.timeouts["rcpt"])
                    accepted.append(r.address)
                    results[r.address] = reply(resp.code, resp.message)
                except aiosmtplib.SMTPRecipientRefused as e:
                    results[r.address] = reply(e.code, e.message)
        if not accepted:
            return results
        if chunking:  # counted, not dot-stuffed: the message goes as it is, in one write
            resp = await send_bdat(smtp, data, self.timeouts["data"])
        elif pipelined:  # DATA went with the envelope and got its 354
            resp = await pipelining.send_message(smtp, data, self.timeouts["data"])
            if resp.code != 250:
                raise aiosmtplib.SMTPDataError(resp.code, resp.message)
        else:
            resp = await smtp.data(data, timeout=self.timeouts["data"])
        for a in accepted:
            results[a] = Reply(resp.code, resp.message, results[a].relay, dsn_passed=dsn)
        return results


# MAIL and RCPT as aiosmtplib's smtp.mail and smtp.rcpt send them, without its address parser:
# email.utils took a tenth of a draining runner's loop for paths checked at acceptance already
# (aiosmtplib still refuses a command line with CR or LF).

def command(verb: bytes, path: str, options: list[str], encoding: str) -> bytes:
    """``MAIL FROM:<path> OPTIONS`` or ``RCPT TO:<path> OPTIONS`` as one line's bytes."""
    return b" ".join([verb + b"<" + path.encode(encoding) + b">",
                      *(o.encode("ascii") for o in options)])


async def mail(smtp: aiosmtplib.SMTP, sender: str, options: list[str], encoding: str,
               limit: float) -> aiosmtplib.SMTPResponse:
    response = await smtp.execute_command(command(b"MAIL FROM:", sender, options, encoding),
                                          timeout=limit)
    if response.code != 250:
        raise aiosmtplib.SMTPSenderRefused(response.code, response.message, sender)
    return response


async def rcpt(smtp: aiosmtplib.SMTP, recipient: str, options: list[str], encoding: str,
               limit: float) -> aiosmtplib.SMTPResponse:
    response = await smtp.execute_command(command(b"RCPT TO:", recipient, options, encoding),
                                          timeout=limit)
    if response.code not in (250, 251):
        raise aiosmtplib.SMTPRecipientRefused(response.code, response.message, recipient)
    return response


async def send_bdat(smtp: aiosmtplib.SMTP, data: bytes, limit: float
                    ) -> aiosmtplib.SMTPResponse:
    """``BDAT <size> LAST`` and the message (RFC 3030), which aiosmtplib lacks: written under
    its command lock, as its own DATA is (private names of aiosmtplib 5, pinned in
    pyproject.toml); the reply is read as any other. A refusal raises SMTPDataError, as
    ``smtp.data`` does."""
    protocol = smtp.protocol
    if protocol is None or protocol._command_lock is None:
        raise aiosmtplib.SMTPServerDisconnected("Server not connected")
    async with protocol._command_lock:
        protocol._response_pending = True
        protocol.write(b"BDAT %d LAST\r\n" % len(data) + data)
        response = await protocol.read_response(timeout=limit)
    if response.code != 250:
        raise aiosmtplib.SMTPDataError(response.code, response.message)
    return response


async def _connect(ip: str, port: int, limit: float) -> socket.socket:
    """A TCP connection to ``ip``, within ``limit`` seconds."""
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, (ip, port)),
                               limit)
    except BaseException:
        sock.close()
        raise
    return sock
