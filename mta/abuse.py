"""Abuse defences: rate limits, DNS blocklists, greylisting, the pre-greeting test.

Pure parts (windows, triplet keys, DNSBL names, network membership) are plain functions and
small classes; the DNS and database calls are thin and bounded by timeouts.
"""

from __future__ import annotations

import hashlib
import ipaddress
import time
from collections import defaultdict, deque
from collections.abc import Iterable
from functools import lru_cache

import dns.asyncresolver
import dns.exception
from sqlalchemy import delete, select

from mta.dns import configured
from store.db import Database
from store.models import Greylist


def in_networks(ip: str, networks: Iterable[str]) -> bool:
    return _in_networks(ip, tuple(networks))


@lru_cache(maxsize=4096)  # asked at connect and at each MAIL/RCPT: clients come back
def _in_networks(ip: str, networks: tuple[str, ...]) -> bool:
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return False
    return any(addr in net for net in _parsed(networks))


@lru_cache(maxsize=16)
def _parsed(networks: tuple[str, ...]) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    return [ipaddress.ip_network(n, strict=False) for n in networks]


class RateLimiter:
    """Events per key in a sliding window, in memory (per process)."""

    def __init__(self, limit: int, window: float) -> None:
        self.limit = limit
        self.window = window
        self.events: defaultdict[str, deque[float]] = defaultdict(deque)

    def _trim(self, key: str, now: float) -> deque[float]:
        q = self.events[key]
        while q and q[0] <= now - self.window:
            q.popleft()
        if not q:
            del self.events[key]
            q = self.events[key]
        return q

    def over(self, key: str, now: float | None = None) -> bool:
        """True if ``key`` already used its budget in the window (does not count this one)."""
        if not self.limit:
            return False
        now = time.monotonic() if now is None else now
        return len(self._trim(key, now)) >= self.limit

    def hit(self, key: str, now: float | None = None) -> bool:
        """Count one event; True if that went over the limit."""
        if not self.limit:
            return False
        now = time.monotonic() if now is None else now
        q = self._trim(key, now)
        q.append(now)
        if len(self.events) > 100_000:  # bounded memory under a flood of distinct keys
            self.events.clear()
        return len(q) > self.limit


def dnsbl_name(ip: str, zone: str) -> str:
    """1.2.3.4 -> 4.3.2.1.zone; IPv6 by reversed nibbles (RFC 5782 §2.4)."""
    addr = ipaddress.ip_address(ip)
    if addr.version == 4:
        return ".".join(reversed(ip.split("."))) + "." + zone
    nibbles = addr.exploded.replace(":", "")
    return ".".join(reversed(nibbles)) + "." + zone


async def dnsbl_listed(ip: str, zones: list[str], resolver: dns.asyncresolver.Resolver
                       ) -> str | None:
    """The first zone listing ``ip`` (an A answer in 127.0.0.0/8), or None; errors: not listed."""
    for zone in zones:
        try:
            answer = await resolver.resolve(dnsbl_name(ip, zone), "A", search=False)
        except (dns.exception.DNSException, ValueError):
            continue
        if any(rr.to_text().startswith("127.") for rr in answer):
            return zone
    return None


def make_async_resolver(server: str, timeout: float = 3.0) -> dns.asyncresolver.Resolver:
    return configured(dns.asyncresolver.Resolver, server, timeout)


def client_network(ip: str) -> str:
    """The /24 (IPv4) or /64 (IPv6) a client's retries may come from."""
    addr = ipaddress.ip_address(ip)
    prefix = 24 if addr.version == 4 else 64
    return str(ipaddress.ip_network(f"{ip}/{prefix}", strict=False))


def triplet_key(ip: str, sender: str, rcpt: str) -> str:
    return hashlib.sha256(f"{client_network(ip)}|{sender}|{rcpt}".encode()).hexdigest()


class Greylister:
    """RFC 6647 greylisting: the first try of a (network, sender, recipient) gets 451 4.7.1."""

    def __init__(self, db: Database, delay: float, expiry: float) -> None:
        self.db = db
        self.delay = delay
        self.expiry = expiry
        self.last_cleanup = 0.0

    def check(self, ip: str, sender: str, rcpt: str, now: float | None = None) -> float:
        """0 if the triplet may pass now, else the seconds it must still wait."""
        now = time.time() if now is None else now
        key = triplet_key(ip, sender, rcpt)
        with self.db.transaction() as s:
            if now - self.last_cleanup > 3600:
                self.last_cleanup = now
                s.execute(delete(Greylist).where(Greylist.last_seen < now - self.expiry))
            row = s.scalar(select(Greylist).where(Greylist.key == key))
            if row is None or row.last_seen < now - self.expiry:
                if row is not None:
                    s.delete(row)
                    s.flush()
                s.add(Greylist(key=key, first_seen=now, last_seen=now, passed=False))
                return self.delay
            row.last_seen = now
            if row.passed or now - row.first_seen >= self.delay:
                row.passed = True
                return 0.0
            return self.delay - (now - row.first_seen)


class PregreetMemory:
    """Client IPs that passed the pre-greeting test, until when."""

    def __init__(self, remember: float) -> None:
        self.remember = remember
        self.passed: dict[str, float] = {}

    def known(self, ip: str, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        until = self.passed.get(ip)
        return until is not None and until > now

    def add(self, ip: str, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        if len(self.passed) > 100_000:
            self.passed = {k: v for k, v in self.passed.items() if v > now}
        self.passed[ip] = now + self.remember

