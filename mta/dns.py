"""MX look-ups with dnspython through ``[delivery] resolver`` (RFC 5321 §5.1, RFC 7505).

``route(domain)`` gives the hosts to try, best first, or says why none: a permanent failure
(NXDOMAIN, null MX) bounces at once; a temporary one (SERVFAIL, timeout) is retried.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TypeVar, cast

import dns.asyncresolver
import dns.exception
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


class Resolver:
    def __init__(self, server: str = "", timeout: float = 5.0) -> None:
        self.r = configured(dns.asyncresolver.Resolver, server, timeout)

    async def _query(self, name: str, rtype: str) -> list[dns.rdata.Rdata] | None:
        """Answers, or None for NOERROR/NODATA; NXDOMAIN and failures raise RouteError."""
        try:
            answer = await self.r.resolve(name, rtype, search=False)
            return list(answer)
        except dns.resolver.NoAnswer:
            return None
        except dns.resolver.NXDOMAIN:
            raise RouteError(True, "5.1.2", f"domain {name} does not exist (NXDOMAIN)") from None
        except (dns.exception.Timeout, dns.resolver.NoNameservers, dns.resolver.LifetimeTimeout):
            raise RouteError(False, "4.4.3", f"DNS lookup of {name} {rtype} failed") from None
        except dns.exception.DNSException as e:
            raise RouteError(False, "4.4.3", f"DNS lookup of {name} {rtype} failed: {e}") from None

    async def addresses(self, name: str) -> list[str]:
        out: list[str] = []
        for rtype in ("A", "AAAA"):
            try:
                answers = await self._query(name, rtype)
            except RouteError as e:
                if e.permanent or rtype == "AAAA":
                    continue
                raise
            out += [a.to_text() for a in answers or []]
        return out

    async def route(self, domain: str, ourselves: str = "") -> list[Host]:
        """``ourselves``: our host name, when we may be one of the domain's MX hosts (a backup
        MX): only hosts better than ours are used (RFC 5321 §5.1), never ourselves."""
        mx = cast("list[MX] | None", await self._query(domain, "MX"))
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
                hosts += [Host(name, ip) for ip in await self.addresses(name)]
            except RouteError as e:
                last = e
        if not hosts:
            if last is None and mx is None:
                raise RouteError(True, "5.1.2", f"domain {domain} has neither MX nor address")
            raise last or RouteError(False, "4.4.4", f"no address for the mail hosts of {domain}")
        return hosts
