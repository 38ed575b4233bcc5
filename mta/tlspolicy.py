"""Which TLS a delivery to a domain and host requires, and why.

In order of precedence (the first that speaks decides):

1. the administrator's ``pochta tls-policy`` for the domain (Postfix's smtp_tls_policy_maps):
   ``none`` (no STARTTLS), ``may`` (opportunistic), ``encrypt`` (TLS, any certificate),
   ``verify`` (TLS, a certificate valid for the MX name), ``dane`` (TLSA records required);
2. DANE (RFC 7672): with ``[delivery] dnssec``, a host whose MX and address answers were
   authenticated and whose ``_<port>._tcp.<host>`` TLSA records are usable;
3. MTA-STS (RFC 8461): the domain's policy (TXT id, HTTPS fetch, database cache): ``enforce``
   requires a matching MX name and a valid certificate for it, ``testing`` checks and
   records but never stops delivery;
4. else opportunistic TLS (RFC 7435).

A message with ``TLS-Required: No`` (RFC 8689 §5) asks for 4 whatever 2 and 3 say.
Every look-up and fetch is asynchronous and bounded; none blocks the queue runner's loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass

import h11

from mta.dns import Host, Resolver, RouteError
from mta.mtasts import MAX_POLICY_BYTES, PolicyError, allows, parse_policy, parse_record
from mta.tlsverify import Tlsa, usable
from store import addresses
from store.tlspolicy import StsPolicy, TLSPolicyStore

log = logging.getLogger("pochta.tlspolicy")

RECHECK = 300.0  # seconds between looks at a domain's _mta-sts TXT record, per process
ADMIN_TTL = 5.0  # seconds an administrator's policy is remembered (as directory look-ups)
REFRESH_AFTER = 86_400.0  # a cached policy older than this is fetched again in the background
FETCH_TIMEOUT = 30.0  # seconds for the whole HTTPS fetch (RFC 8461 §3.3: "reasonable")


@dataclass(frozen=True)
class Requirement:
    level: str  # "none", "may", "encrypt", "verify" or "dane"
    source: str = "default"  # "tls-policy", "dane", "mta-sts" or "default"
    enforce: bool = True  # False: MTA-STS testing (checked and recorded, never blocking)
    tlsa: tuple[Tlsa, ...] = ()
    sts: StsPolicy | None = None

    @property
    def mandatory(self) -> bool:
        """No delivery without TLS (no clear-text fallback)."""
        return self.enforce and self.level in ("encrypt", "verify", "dane")

    @property
    def authenticated(self) -> bool:
        """The peer's identity is checked before the message goes (REQUIRETLS needs it)."""
        return self.enforce and self.level in ("verify", "dane")

    def describe(self) -> str:
        return self.level if self.source in ("default", self.level) else \
            f"{self.level} ({self.source})"


OPPORTUNISTIC = Requirement("may")


class Refused(Exception):
    """No delivery to this host under the policy now (4.7.5, tried again later)."""


@dataclass(frozen=True)
class DomainPolicy:
    admin: str | None  # the administrator's tls-policy level
    sts: StsPolicy | None  # an MTA-STS policy in force (enforce or testing)

    def hosts(self, hosts: list[Host]) -> list[Host]:
        """RFC 8461 §4.1: under ``enforce`` only MX hosts the policy names are used."""
        if self.admin is not None or self.sts is None or self.sts.mode != "enforce":
            return hosts
        return [h for h in hosts if allows(self.sts, h.name)]


class TLSPolicies:
    def __init__(self, resolver: Resolver, store: TLSPolicyStore | None, ca_file: str = "",
                 clock: Callable[[], float] = time.time) -> None:
        self.resolver = resolver
        self.store = store
        self.clock = clock
        self.https = ssl.create_default_context(cafile=ca_file or None)
        self.https.minimum_version = ssl.TLSVersion.TLSv1_2
        self.memo: dict[str, tuple[float, StsPolicy | None]] = {}
        self.admin_memo: dict[str, tuple[float, str | None]] = {}
        self.refreshing: set[str] = set()
        self.tasks: set[asyncio.Task[None]] = set()

    async def for_domain(self, domain: str) -> DomainPolicy:
        admin = await self._admin(domain)
        sts = None if admin is not None else await self.sts_policy(domain)
        return DomainPolicy(admin, sts if sts is not None and sts.mode != "none" else None)

    async def _admin(self, domain: str) -> str | None:
        """The administrator's level for ``domain``, remembered for ADMIN_TTL seconds."""
        if self.store is None:
            return None
        now = time.monotonic()
        memo = self.admin_memo.get(domain)
        if memo is not None and now - memo[0] < ADMIN_TTL:
            return memo[1]
        try:
            admin = await asyncio.to_thread(self.store.get, domain)
        except Exception as e:
            # A database not upgraded yet has no policies to apply (`pochta db upgrade`);
            # any other failure defers the delivery rather than weakening a policy.
            if "no such table" not in str(e) and "does not exist" not in str(e):
                raise
            log.warning("no TLS policy table (run 'pochta db upgrade'): %s",
                        str(e).splitlines()[0])
            admin = None
        if len(self.admin_memo) >= 10_000:
            self.admin_memo.clear()
        self.admin_memo[domain] = (now, admin)
        return admin

    async def for_host(self, policy: DomainPolicy, host: Host, port: int,
                       tls_optional: bool = False) -> Requirement:
        """Raises Refused when the host cannot be used now (DANE required but unusable).
        ``tls_optional``: the message's TLS-Required: No, which sets DANE and MTA-STS aside
        (not the administrator's policy)."""
        if policy.admin is not None and policy.admin != "dane":
            return Requirement(policy.admin, "tls-policy")
        if tls_optional and policy.admin is None:
            return OPPORTUNISTIC
        if policy.admin == "dane" or (self.resolver.dnssec and host.secure):
            records = await self._tlsa(host, port) if host.secure else []
            if records:
                return Requirement("dane", "tls-policy" if policy.admin else "dane",
                                   tlsa=tuple(records))
            if policy.admin == "dane":
                raise Refused(f"no usable DNSSEC-signed TLSA record for {host.name} "
                              "(tls-policy dane)")
        if policy.sts is not None:
            return Requirement("verify", "mta-sts", enforce=policy.sts.mode == "enforce",
                               sts=policy.sts)
        return OPPORTUNISTIC

    async def _tlsa(self, host: Host, port: int) -> list[Tlsa]:
        name = f"_{port}._tcp.{host.name}"
        try:
            records, secure = await self.resolver.tlsa(name)
        except RouteError as e:
            # RFC 7672 §2.2: a secure host whose TLSA look-up fails is not used now.
            raise Refused(f"TLSA look-up of {name} failed: {e.text}") from None
        return usable([Tlsa(*r) for r in records]) if secure else []

    async def record(self, domain: str, req: Requirement, result: str, mx: str = "") -> None:
        """One TLS session's outcome for the domain's TLS-RPT report (RFC 8460 §4.3), kept
        per day in the database; only for a domain with a policy (MTA-STS or DANE)."""
        if self.store is None or req.source not in ("mta-sts", "dane"):
            return
        policy_type = "sts" if req.source == "mta-sts" else "tlsa"
        policy_string = req.sts.text() if req.sts is not None else "\n".join(
            f"{t.usage} {t.selector} {t.mtype} {t.data.hex()}" for t in req.tlsa)
        day = time.strftime("%Y-%m-%d", time.gmtime(self.clock()))
        try:
            await asyncio.to_thread(self.store.count, day, domain, policy_type, policy_string,
                                    result, "" if result == "success" else mx)
        except Exception as e:  # a report count is not worth a delivery
            log.warning("cannot count a TLS result for %s: %s", domain, e)

    # -- MTA-STS ------------------------------------------------------------------------------

    async def sts_policy(self, domain: str) -> StsPolicy | None:
        """The domain's MTA-STS policy in force, from the cache when its TXT id is unchanged
        (RFC 8461 §5.1); a failed fetch keeps the cached policy until it expires."""
        now = self.clock()
        memo = self.memo.get(domain)
        if memo is not None and now - memo[0] < RECHECK and (memo[1] is None
                                                             or memo[1].expires > now):
            return memo[1]
        cached = await self._cached(domain)
        if cached is not None and cached.expires <= now:
            cached = None
        name = addresses.ascii_domain(domain)
        try:
            record_id = parse_record(await self.resolver.txt(f"_mta-sts.{name}"))
        except RouteError:
            record_id = cached.id if cached is not None else None  # look-up failed: keep it
        if record_id is None:
            policy = cached  # RFC 8461 §3.1: no record, yet a cached policy goes on
        elif cached is not None and cached.id == record_id:
            policy = cached
            if now - cached.fetched > REFRESH_AFTER:
                self._refresh_later(domain, record_id)
        else:
            policy = await self.fetch(domain, record_id) or cached
        if len(self.memo) >= 10_000:
            self.memo.clear()
        self.memo[domain] = (now, policy)
        return policy

    async def _cached(self, domain: str) -> StsPolicy | None:
        if self.store is None:
            return None
        try:
            return await asyncio.to_thread(self.store.sts_get, domain)
        except Exception as e:  # the database down: the policy is fetched again
            log.warning("MTA-STS cache of %s unreadable: %s", domain, e)
            return None

    def _refresh_later(self, domain: str, record_id: str) -> None:
        if domain in self.refreshing:
            return
        self.refreshing.add(domain)

        async def refresh() -> None:
            try:
                await self.fetch(domain, record_id)
            finally:
                self.refreshing.discard(domain)

        task = asyncio.get_running_loop().create_task(refresh())
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def fetch(self, domain: str, record_id: str) -> StsPolicy | None:
        """Fetch, check and cache the policy; None (logged) if there is no valid one."""
        name = addresses.ascii_domain(domain)
        host = f"mta-sts.{name}"
        try:
            async with asyncio.timeout(FETCH_TIMEOUT):
                ips = await self.resolver.addresses(host)
                if not ips:
                    raise PolicyError(f"no address for {host}")
                problems = []
                for ip in ips[:3]:
                    try:
                        text = await https_get(ip, 443, host, "/.well-known/mta-sts.txt",
                                               self.https)
                        break
                    except (OSError, ssl.SSLError, PolicyError, h11.ProtocolError) as e:
                        problems.append(f"{ip}: {e}")
                else:
                    raise PolicyError("; ".join(problems))
            mode, mx, max_age = parse_policy(text)
        except (PolicyError, RouteError, TimeoutError) as e:
            log.warning("MTA-STS policy of %s not usable: %s", domain, e or "timed out")
            return None
        policy = StsPolicy(record_id, mode, mx, max_age, self.clock())
        log.info("MTA-STS policy of %s: mode %s, mx %s, max_age %d", domain, mode,
                 ",".join(mx) or "-", max_age)
        if self.store is not None:
            try:
                await asyncio.to_thread(self.store.sts_put, domain, policy)
            except Exception as e:
                log.warning("cannot cache the MTA-STS policy of %s: %s", domain, e)
        return policy


async def https_get(ip: str, port: int, host: str, path: str, context: ssl.SSLContext,
                    limit: int = MAX_POLICY_BYTES) -> str:
    """GET https://host/path from ``ip`` (resolved by our resolver, not the system's), the
    certificate verified for ``host``. RFC 8461 §3.3: 200 only (no redirects), text/plain,
    at most ``limit`` bytes. PolicyError otherwise."""
    status, ctype, body = await https_request(ip, port, host, "GET", path, context,
                                              limit=limit)
    if status != 200:
        raise PolicyError(f"HTTP status {status} (redirects are not followed)")
    if ctype.split(";")[0].strip().lower() != "text/plain":
        raise PolicyError(f"content type {ctype[:40]!r}, not text/plain")
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError:
        raise PolicyError("policy is not UTF-8") from None


async def https_request(ip: str, port: int, host: str, method: str, path: str,
                        context: ssl.SSLContext, body: bytes = b"", content_type: str = "",
                        limit: int = MAX_POLICY_BYTES) -> tuple[int, str, bytes]:
    """One HTTP/1.1 exchange over TLS with ``ip`` (h11 does the protocol): the status, the
    content type and at most ``limit`` bytes of body (PolicyError beyond)."""
    reader, writer = await asyncio.open_connection(ip, port, ssl=context, server_hostname=host,
                                                   ssl_handshake_timeout=FETCH_TIMEOUT)
    try:
        conn = h11.Connection(h11.CLIENT)
        headers = [("Host", host), ("User-Agent", "pochta"), ("Connection", "close")]
        if method == "POST":
            headers += [("Content-Type", content_type), ("Content-Length", str(len(body)))]
        writer.write(conn.send(h11.Request(method=method, target=path, headers=headers)) or b"")
        if body:
            writer.write(conn.send(h11.Data(data=body)) or b"")
        writer.write(conn.send(h11.EndOfMessage()) or b"")
        await writer.drain()
        status, ctype, got = 0, "", bytearray()
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await reader.read(16384))
                continue
            if isinstance(event, h11.Response):
                status = event.status_code
                ctype = dict(event.headers).get(b"content-type", b"").decode("latin-1")
            elif isinstance(event, h11.Data):
                got += event.data
                if len(got) > limit:
                    raise PolicyError(f"response larger than {limit} bytes")
            elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                return status, ctype, bytes(got)
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(writer.wait_closed(), 5)


def failure_type(problem: str) -> str:
    """The RFC 8460 §4.3 result-type of a certificate problem (mta/tlsverify.py's text)."""
    text = problem.lower()
    if "tlsa" in text:
        return "validation-failure"
    if "validation time" in text or "expired" in text:
        return "certificate-expired"
    if "subjectaltname" in text or "name" in text and "match" in text:
        return "certificate-host-mismatch"
    return "certificate-not-trusted"
