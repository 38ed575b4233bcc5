"""MTA-STS (RFC 8461): the TXT record, the policy file and MX matching, as pure functions.

The look-ups, the HTTPS fetch and the cache live in ``mta/tlspolicy.py``; this file only says
what the bytes mean. Anything malformed is "no policy" (RFC 8461 §3.2, §3.3), never an error
that stops delivery.
"""

from __future__ import annotations

import re

from store.tlspolicy import StsPolicy

MAX_POLICY_BYTES = 64 * 1024  # RFC 8461 §3.3 leaves it to us; policies are a few lines
MAX_AGE_LIMIT = 31_557_600  # RFC 8461 §3.2: at most one year
_ID = re.compile(r"[A-Za-z0-9]{1,32}")
_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?"
_MX_PATTERN = re.compile(rf"(\*\.)?{_LABEL}(\.{_LABEL})+")


class PolicyError(ValueError):
    """A policy file that is not one (treated as no policy, and logged)."""


def parse_record(texts: list[str]) -> str | None:
    """The ``id`` of the one ``v=STSv1`` TXT record at ``_mta-sts.<domain>``; None when
    there is none, or more than one (RFC 8461 §3.1), or it is malformed."""
    records = [t for t in texts if t.startswith("v=STSv1")]
    if len(records) != 1:
        return None
    fields: dict[str, str] = {}
    for part in records[0].split(";"):
        key, eq, value = part.strip().partition("=")
        if not part.strip():
            continue
        if not eq:
            return None
        fields.setdefault(key.strip(), value.strip())
    if fields.get("v") != "STSv1" or not _ID.fullmatch(fields.get("id", "")):
        return None
    return fields["id"]


def parse_policy(text: str) -> tuple[str, tuple[str, ...], int]:
    """(mode, mx patterns, max_age) of a policy file; PolicyError if it is not a valid one."""
    version, mode, max_age = "", "", ""
    mx: list[str] = []
    for raw in text.replace("\r\n", "\n").split("\n"):
        line = raw.strip()
        if not line:
            continue
        key, colon, value = line.partition(":")
        if not colon:
            raise PolicyError(f"line without a colon: {line[:60]!r}")
        key, value = key.strip(), value.strip()
        if key == "version" and not version:
            version = value
        elif key == "mode" and not mode:
            mode = value
        elif key == "max_age" and not max_age:
            max_age = value
        elif key == "mx":
            if not _MX_PATTERN.fullmatch(value):
                raise PolicyError(f"malformed mx {value[:60]!r}")
            mx.append(value.lower().rstrip("."))
        # other keys: ignored (RFC 8461 §3.2: extensions)
    if version != "STSv1":
        raise PolicyError(f"version is {version[:20]!r}, not STSv1")
    if mode not in ("enforce", "testing", "none"):
        raise PolicyError(f"unknown mode {mode[:20]!r}")
    if not max_age.isdigit() or len(max_age) > 10:
        raise PolicyError(f"malformed max_age {max_age[:20]!r}")
    if mode != "none" and not mx:
        raise PolicyError("no mx for mode " + mode)
    return mode, tuple(mx), min(int(max_age), MAX_AGE_LIMIT)


def allows(policy: StsPolicy, host: str) -> bool:
    """Whether MX ``host`` is one the policy names."""
    return any(mx_matches(p, host) for p in policy.mx)


def mx_matches(pattern: str, host: str) -> bool:
    """RFC 8461 §4.1: an exact name, or ``*.`` standing for exactly one left-most label."""
    host = host.lower().rstrip(".")
    pattern = pattern.lower().rstrip(".")
    if pattern.startswith("*."):
        label, dot, rest = host.partition(".")
        return bool(label and dot) and rest == pattern[2:]
    return host == pattern


def policy_text(mode: str, mx: list[str], max_age: int) -> str:
    """A policy file's text."""
    return "version: STSv1\r\nmode: {}\r\n{}max_age: {}\r\n".format(
        mode, "".join(f"mx: {m}\r\n" for m in mx), max_age)


PUBLISHED_MAX_AGE = 604_800  # one week: RFC 8461 §3.2 suggests weeks for a stable policy


def published_policy(hostname: str, trusted_certificate: bool) -> str:
    """Our own policy (``pochta dns``, ``[mta_sts] listen``): our host as the MX; ``enforce``
    once our certificate comes from a public CA (ACME), else ``testing``: senders that
    enforce would refuse a self-signed certificate, and their mail would wait."""
    return policy_text("enforce" if trusted_certificate else "testing",
                       [hostname.rstrip(".").lower()], PUBLISHED_MAX_AGE)


def policy_id(text: str) -> str:
    """The TXT record's id: changes whenever the policy does (RFC 8461 §3.1)."""
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()[:20]
