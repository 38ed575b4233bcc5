"""MX look-ups with dnspython through ``[delivery] resolver`` (RFC 5321 §5.1, RFC 7505).

``route(domain)`` gives the hosts to try, best first, or says why none: a permanent failure
(NXDOMAIN, null MX) bounces at once; a temporary one (SERVFAIL, timeout) is retried.

With ``[delivery] dnssec`` the resolver is asked for authenticated data (RFC 6840 §5.7) and
its AD bit is trusted, as Postfix's ``smtp_dns_support_level = dnssec``: that resolver must be
a local validating one (unbound on 127.0.0.1). A host whose MX and address answers were
authenticated is ``secure``: only then are its TLSA records looked up (DANE, RFC 7672 §2.2).
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import TypeVar, cast

import dns.asyncresolver
import dns.exception
import dns.flags
import dns.message
import dns.rdatatype
import dns.resolver
from dns.rdtypes.ANY.MX import MX

from store.config import parse_address

R = TypeVar("R", dns.resolver.Resolver, dns.asyncresolver.Resolver)


def configured(cls: type[R], server: str, timeout: float) -> R:
    """A dnspython resolver asking ``[delivery] resolver`` ("host:port"), else the system's."""
    r = cls(configure=not server)
    if server:
        host, port = parse_address(server, "delivery.resolver")
        r.nameservers = [host]
        r.port = port
    r.lifetime = r.timeout = timeout
    return r


@dataclass(frozen=True)
class Host:
    name: str
    ip: str
    secure: bool = False  # its MX and address answers were DNSSEC-authenticated


@dataclass(frozen=True)
class RouteError(Exception):
    permanent: bool
    status: str  # enhanced status code
    text: str


def better_than(by_pref: dict[int, list[str]], ourselves: str) -> dict[int, list[str]]:
    """The MX hosts by preference, less ours and those no better than ours."""
    me = ourselves.lower().rstrip(".")
    mine = [pref for pref, names in by_pref.items() if me and me in (n.lower() for n in names)]
    if not mine:
        return by_pref
    return {pref: names for pref, names in by_pref.items() if pref < min(mine)}


def negative_ttl(response: dns.message.Message) -> float:
    """How long "no such record" may be remembered (RFC 2308 §5): the SOA's TTL or its
    minimum, whichever is lower; 0 (not at all) without an SOA."""
    for rrset in response.authority:
        if rrset.rdtype == dns.rdatatype.SOA and len(rrset):
            return float(min(rrset.ttl, rrset[0].minimum))
    return 0.0


class Resolver:
    def __init__(self, server: str = "", timeout: float = 5.0, dnssec: bool = False) -> None:
        self.r = configured(dns.asyncresolver.Resolver, server, timeout)
        # Answers kept for their TTL: a queue draining to one domain asked for its MX and
        # addresses once per message, most of the runner's CPU (py-spy, bench/bigqueue.py).
        self.r.cache = dns.resolver.LRUCache(10_000)
        # And what query() made of them, until they expire: dnspython's cached path (a
        # resolution object, names parsed, the cache's lock) was still a fifth of the runner's
        # time when a queue drained to one domain.
        self.answers: dict[tuple[str, str], tuple[float, list[dns.rdata.Rdata] | None, bool]] = {}
        self.dnssec = dnssec
        if dnssec:
            self.r.flags = dns.flags.RD | dns.flags.AD

    async def _query(self, name: str, rtype: str) -> list[dns.rdata.Rdata] | None:
        """Answers, or None for NOERROR/NODATA; NXDOMAIN and failures raise RouteError."""
        return (await self.query(name, rtype))[0]

    async def query(self, name: str, rtype: str) -> tuple[list[dns.rdata.Rdata] | None, bool]:
        """``_query``'s answers, and whether they were authenticated (the AD bit, trusted
        only with ``dnssec``)."""
        key = (name.lower(), rtype)
        kept = self.answers.get(key)
        if kept is not None:
            if kept[0] > time.time():
                return kept[1], kept[2]
            del self.answers[key]
        try:
            answer = await self.r.resolve(name, rtype, search=False)
            secure = self.dnssec and bool(answer.response.flags & dns.flags.AD)
            self._keep(key, answer.expiration, list(answer), secure)
            return list(answer), secure
        except dns.resolver.NoAnswer as e:
            # (an authenticated "no such record" is not needed here)
            self._keep(key, time.time() + negative_ttl(e.response()), None, False)
            return None, False
        except dns.resolver.NXDOMAIN:
            raise RouteError(True, "5.1.2", f"domain {name} does not exist (NXDOMAIN)") from None
        except (dns.exception.Timeout, dns.resolver.NoNameservers, dns.resolver.LifetimeTimeout):
            raise RouteError(False, "4.4.3", f"DNS lookup of {name} {rtype} failed") from None
        except dns.exception.DNSException as e:
            raise RouteError(False, "4.4.3", f"DNS lookup of {name} {rtype} failed: {e}") from None

    def _keep(self, key: tuple[str, str], expires: float, answers: list[dns.rdata.Rdata] | None,
              secure: bool) -> None:
        if expires > time.time():
            if len(self.answers) >= 10_000:
                self.answers.clear()
            self.answers[key] = (expires, answers, secure)

    async def addresses(self, name: str) -> list[str]:
        return [ip for ip, _ in await self.secure_addresses(name)]

    async def secure_addresses(self, name: str) -> list[tuple[str, bool]]:
        out: list[tuple[str, bool]] = []
        for rtype in ("A", "AAAA"):
            try:
                answers, secure = await self.query(name, rtype)
            except RouteError as e:
                if e.permanent or rtype == "AAAA":
                    continue
                raise
            out += [(a.to_text(), secure) for a in answers or []]
        return out

    async def txt(self, name: str) -> list[str]:
        """The TXT strings at ``name`` (each record's strings joined); [] if none or NXDOMAIN;
        RouteError if the look-up failed."""
        try:
            answers = await self._query(name, "TXT")
        except RouteError as e:
            if e.permanent:
                return []
            raise
        return [b"".join(rr.strings).decode("utf-8", "replace")  # type: ignore[attr-defined]
                for rr in answers or []]

    async def tlsa(self, name: str) -> tuple[list[tuple[int, int, int, bytes]], bool]:
        """The TLSA records at ``name`` (usage, selector, mtype, data) and whether the answer
        (or its absence) was authenticated; RouteError if the look-up failed."""
        try:
            answers, secure = await self.query(name, "TLSA")
        except RouteError as e:
            if e.permanent:  # NXDOMAIN: no records (its authenticity is not needed: none)
                return [], False
            raise
        return [(rr.usage, rr.selector, rr.mtype, rr.cert)  # type: ignore[attr-defined]
                for rr in answers or []], secure

    async def route(self, domain: str, ourselves: str = "") -> list[Host]:
        """``ourselves``: our host name, when we may be one of the domain's MX hosts (a backup
        MX): only hosts better than ours are used (RFC 5321 §5.1), never ourselves."""
        found, mx_secure = await self.query(domain, "MX")
        mx = cast("list[MX] | None", found)
        if mx is None:
            names = [domain]  # RFC 5321 §5.1: no MX -> the domain itself is the implicit MX
        else:
            if len(mx) == 1 and mx[0].exchange.to_text() == ".":
                raise RouteError(True, "5.1.10", f"domain {domain} accepts no mail (null MX)")
            by_pref: dict[int, list[str]] = {}
            for rr in mx:
                by_pref.setdefault(rr.preference, []).append(rr.exchange.to_text().rstrip("."))
            by_pref = better_than(by_pref, ourselves)
            if not by_pref:
                raise RouteError(False, "4.4.6", f"mail for {domain} loops back to us: "
                                                 "no MX host better than ours")
            names = []
            for pref in sorted(by_pref):
                group = by_pref[pref]
                random.shuffle(group)  # equal preferences share the load
                names += group
        hosts: list[Host] = []
        last: RouteError | None = None
        for name in names:
            try:
                hosts += [Host(name, ip, mx_secure and secure)
                          for ip, secure in await self.secure_addresses(name)]
            except RouteError as e:
                last = e
        if not hosts:
            if last is None and mx is None:
                raise RouteError(True, "5.1.2", f"domain {domain} has neither MX nor address")
            raise last or RouteError(False, "4.4.4", f"no address for the mail hosts of {domain}")
        return hosts
