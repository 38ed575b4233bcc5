"""Mailbox locations: ``<mailbox_root>/<domain>/<localpart>``, as Dovecot's %d/%n expects."""

from __future__ import annotations

from pathlib import Path

from store import addresses


class UnsafeAddress(ValueError):
    pass


def mailbox_path(mailbox_root: str | Path, address: str) -> Path:
    """The mailbox of ``address`` (already a normalised mailbox of ours, no +tag)."""
    local, domain = addresses.split(address)
    for part in (local, domain):
        if not part or part in (".", "..") or "/" in part or "\0" in part or part.startswith("."):
            raise UnsafeAddress(f"{address!r} cannot name a mailbox path")
    if local.endswith(".lock"):  # another mbox's dotlock: never a mailbox of its own
        raise UnsafeAddress(f"{address!r} cannot name a mailbox path")
    return Path(mailbox_root) / domain / local
