"""A queued message's envelope: what the queue runner needs to schedule, deliver and report,
stored as the first line of its spool file and in ``<id>.json`` (mta/spool.py).

Schema version 1::

    {"version": 1, "id": ..., "created": <unix time>, "mail_from": "a@b" or "",
     "smtputf8": bool, "body": "7BIT"|"8BITMIME"|"BINARYMIME", "size": int, "client": {"ip", "helo",
     "protocol", "auth"}, "dsn": {"ret": "FULL"|"HDRS"|null, "envid": str|null},
     "report_at": <unix time, 0 unless a report is owed>, "held": bool, "requiretls": bool,
     "tls_optional": bool,
     "recipients": [{"address": final target, "original": RCPT address as given,
                     "orcpt": str|null, "notify": [..]|null, "status": "pending"|"sent"|
                     "failed"|"expired", "attempts": int, "next_attempt": <unix time>,
                     "last_reply": str, "last_relay": str, "delay_notified": bool,
                     "dsn_passed": bool}]}
"""

from __future__ import annotations

import json
import secrets
import sys
import time
from dataclasses import dataclass, field, fields
from typing import Any

FORMAT_VERSION = 1
PENDING, SENT, FAILED, EXPIRED = "pending", "sent", "failed", "expired"
FINAL = {SENT, FAILED, EXPIRED}


class EnvelopeError(ValueError):
    """Bytes that are not an envelope of a version we know."""


HELD = "held"  # last_relay of a recipient of a held relay domain: waiting, not attempted


@dataclass(slots=True)  # slots: a queue of 100,000 is 100,000 of these in memory
class Recipient:
    address: str
    original: str
    orcpt: str | None = None
    notify: list[str] | None = None
    status: str = PENDING
    attempts: int = 0
    next_attempt: float = 0.0
    last_reply: str = ""
    last_relay: str = ""
    delay_notified: bool = False  # a "delayed" DSN went out for this recipient
    dsn_passed: bool = False  # the next hop took our NOTIFY: it reports success, not us


@dataclass(slots=True)
class Envelope:
    id: str
    created: float
    mail_from: str
    recipients: list[Recipient]
    size: int = 0
    smtputf8: bool = False
    body: str = "7BIT"
    client: dict[str, Any] = field(default_factory=dict)
    dsn: dict[str, Any] = field(default_factory=dict)
    held: bool = False  # `pochta queue hold`: not attempted until released
    # RFC 8689: MAIL ... REQUIRETLS: relayed only over TLS to an authenticated next hop that
    # offers REQUIRETLS too (mta/courier/remote.py), else bounced with 5.7.30.
    requiretls: bool = False
    # RFC 8689 §5: "TLS-Required: No" (ignored with REQUIRETLS): TLS the receiving side asks
    # for is not required for this message; verification we require for our own sake is.
    tls_optional: bool = False
    version: int = FORMAT_VERSION
    # Every recipient is final but the sender's report could not be spooled yet: try again
    # then. The message stays in the queue until its report is durable.
    report_at: float = 0.0
    # Not stored: found in the spool rather than announced (or a report maybe sent before a
    # crash), so an earlier runner may have delivered some recipients without recording it:
    # the MDA checks for those copies (XRETRY), reports say so.
    recovered: bool = field(default=False, compare=False, repr=False)

    @property
    def pending(self) -> list[Recipient]:
        return [r for r in self.recipients if r.status == "pending"]

    @property
    def due(self) -> float | None:
        """When the next attempt is due: a pending recipient's, or the owed report's."""
        times = [r.next_attempt for r in self.recipients if r.status == PENDING]
        if times:
            return min(times)
        return self.report_at if self.finished else None

    @property
    def finished(self) -> bool:
        return all(r.status in FINAL for r in self.recipients)

    @property
    def state(self) -> str:
        """new: not tried yet; held: waits for a release (`queue hold`, or a held relay
        domain); deferred: tried, to be tried again."""
        pending = self.pending
        if self.held or (pending and all(r.last_relay == HELD for r in pending)):
            return "held"
        if any(r.attempts or r.last_reply for r in pending):
            return "deferred"
        return "new"

    def to_json(self) -> bytes:
        raw = {f.name: getattr(self, f.name) for f in _STORED_FIELDS}
        raw["recipients"] = [{f.name: getattr(r, f.name) for f in _RECIPIENT_FIELDS}
                             for r in self.recipients]
        return json.dumps(raw, ensure_ascii=False, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Envelope:
        try:
            raw = json.loads(data)
            if raw.get("version") != FORMAT_VERSION:
                raise EnvelopeError(f"unknown spool format version {raw.get('version')!r}")
            raw["recipients"] = [Recipient(**_interned(r, _RECIPIENT_STRINGS))
                                 for r in raw["recipients"]]
            for r in raw["recipients"]:
                if r.original == r.address:
                    r.original = r.address  # one string, not two equal ones
            # A queue of 100,000 holds 100,000 envelopes: the parts most of them have in
            # common (client, DSN options, sender, states) are one object each, not one per
            # envelope. Nothing changes client or dsn after acceptance.
            raw["client"] = _shared(raw.get("client"))
            raw["dsn"] = _shared(raw.get("dsn"))
            return cls(**_interned(raw, _ENVELOPE_STRINGS))
        except EnvelopeError:
            raise
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            raise EnvelopeError(f"not an envelope: {e!r}") from None


_RECIPIENT_FIELDS = fields(Recipient)
_STORED_FIELDS = [f for f in fields(Envelope) if f.name != "recovered"]
_RECIPIENT_STRINGS = ("status", "last_relay", "last_reply")
_ENVELOPE_STRINGS = ("mail_from", "body")
_SHARED: dict[tuple[tuple[str, Any], ...], dict[str, Any]] = {}


def _interned(raw: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    for key in keys:
        value = raw.get(key)
        if isinstance(value, str):
            raw[key] = sys.intern(value)
    return raw


def _shared(value: Any) -> Any:
    """One dict for every envelope whose ``client`` (or ``dsn``) is equal: read-only."""
    if not isinstance(value, dict):
        return value
    try:
        key = tuple(sorted(value.items()))
        hash(key)
    except TypeError:  # a value that is not hashable: keep this one's own
        return value
    found = _SHARED.get(key)
    if found is None:
        if len(_SHARED) >= 10_000:
            _SHARED.clear()  # bounded; the envelopes keep theirs
        found = _SHARED[key] = {sys.intern(k): v for k, v in value.items()}
    return found


def new_id() -> str:
    """Sortable by arrival (microseconds, hex) and unique (random suffix)."""
    return f"{time.time_ns() // 1000:014x}{secrets.token_hex(3)}"
