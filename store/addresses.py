"""Mail address parsing and normalisation: the one way pochta writes an address down.

Domains are stored as lower-case U-labels (IDNA 2008, UTS 46 mapping), so ``xn--bcher-kva.de``
and ``BÜCHER.de`` are the same domain. Local parts are matched case-insensitively and stored
lower-case (RFC 5321 allows case-sensitive local parts; every mail server users meet treats them
as insensitive). ``user+tag`` is a subaddress of ``user`` (RFC 5233).
"""

from __future__ import annotations

import re
from functools import lru_cache

import idna

MAX_LOCAL = 64  # RFC 5321 4.5.3.1.1, in octets
MAX_DOMAIN = 255  # RFC 5321 4.5.3.1.2
MAX_ADDRESS = 254  # RFC 5321 4.5.3.1.3 path of 256 minus the angle brackets
SUBADDRESS_SEPARATOR = "+"

# Characters a mailbox name of ours may hold: dot-atom text minus those that mean something
# to routing or file systems ('%', '!', '/', '@', quotes), plus any non-ASCII letter (RFC 6531).
_LOCAL_OK = re.compile(r"[a-z0-9._+=\-\u0080-\U0010ffff]+\Z")
# What a foreign address may hold in its local part (RFC 5322 atext, UTF-8 allowed).
_ATEXT = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.\-\u0080-\U0010ffff]+\Z")


class AddressError(ValueError):
    """An address that is malformed; the message says why, in one line."""


@lru_cache(maxsize=4096)  # pure and called for every address: IDNA checks are costly
def normalize_domain(domain: str) -> str:
    """Return the lower-case U-label form of ``domain`` (A-labels accepted)."""
    d = domain.strip().rstrip(".")
    if not d:
        raise AddressError("empty domain")
    if d.startswith("[") or _looks_like_ip(d):
        raise AddressError(f"address literal {domain!r} is not a domain")
    try:
        ascii_form = idna.encode(d, uts46=True).decode("ascii")
        unicode_form = idna.decode(ascii_form)
    except (idna.IDNAError, UnicodeError) as e:
        raise AddressError(f"invalid domain {domain!r}: {e}") from None
    if len(ascii_form) > MAX_DOMAIN or "." not in ascii_form and ascii_form != "localhost":
        raise AddressError(f"invalid domain {domain!r}")
    return unicode_form.lower()


@lru_cache(maxsize=4096)
def ascii_domain(domain: str) -> str:
    """The A-label form used on the wire and in DNS."""
    return idna.encode(normalize_domain(domain), uts46=True).decode("ascii")


def _looks_like_ip(d: str) -> bool:
    return bool(re.fullmatch(r"[0-9.]+", d)) or ":" in d


def split(address: str) -> tuple[str, str]:
    """Split at the last '@' into (local part, domain), without normalising."""
    local, at, domain = address.rpartition("@")
    if not at or not local or not domain:
        raise AddressError(f"{address!r} is not of the form local@domain")
    return local, domain


def normalize(address: str) -> str:
    """Return ``local@domain`` with a lower-case local part and the U-label domain.

    Accepts any RFC 5321 mailbox (foreign addresses may hold characters we refuse in our own
    mailbox names), but never quoted strings, which hide '@' and routing characters.
    """
    address = address.strip()
    if address.startswith("<") and address.endswith(">"):
        address = address[1:-1]
    if len(address.encode("utf-8")) > MAX_ADDRESS:
        raise AddressError(f"address {address[:40]!r}... is longer than {MAX_ADDRESS} octets")
    local, domain = split(address)
    if '"' in local or "\\" in local:
        raise AddressError(f"quoted local part in {address!r} is not accepted")
    if not _ATEXT.match(local) or local.startswith(".") or local.endswith(".") or ".." in local:
        raise AddressError(f"invalid local part in {address!r}")
    if len(local.encode("utf-8")) > MAX_LOCAL:
        raise AddressError(f"local part of {address!r} is longer than {MAX_LOCAL} octets")
    return f"{local.lower()}@{normalize_domain(domain)}"


def normalize_mailbox(address: str) -> str:
    """Like ``normalize`` but for a mailbox of ours: also safe as a directory name."""
    addr = normalize(address)
    local, _ = split(addr)
    if not _LOCAL_OK.match(local) or local.startswith(SUBADDRESS_SEPARATOR):
        raise AddressError(f"{address!r}: a mailbox name may hold letters, digits and . _ - = only")
    if SUBADDRESS_SEPARATOR in local:
        raise AddressError(f"{address!r}: '+' separates subaddresses and cannot be in a mailbox name")
    if local.endswith(".lock"):  # an mbox's dotlock is <mailbox>.lock (Dovecot, mutt)
        raise AddressError(f"{address!r}: a mailbox name cannot end in '.lock'")
    return addr


def strip_subaddress(address: str) -> str:
    """``user+tag@domain`` -> ``user@domain``; other addresses unchanged."""
    local, domain = split(address)
    base, sep, _tag = local.partition(SUBADDRESS_SEPARATOR)
    if sep and base:
        return f"{base}@{domain}"
    return address


def domain_of(address: str) -> str:
    return split(address)[1]


def local_of(address: str) -> str:
    return split(address)[0]
