"""The courier seam: what the queue runner hands a message's due recipients to.

One interface, two couriers: ``LocalDelivery`` (local.py: LMTP to the MDA, lmtp.py its
client) and ``Outbound`` (remote.py: SMTP to the MX hosts or the smarthost). The runner only
schedules and records; a courier only delivers, returning one reply per recipient address
(2xx delivered, 4xx try again, 5xx failed), never raising for a recipient's fate.
"""

from __future__ import annotations

from typing import Protocol

from mta.envelope import Envelope, Recipient
from mta.reply import Reply
from mta.spool import SpooledMessage


class Courier(Protocol):
    async def deliver(self, env: Envelope, rcpts: list[Recipient], data: bytes | SpooledMessage,
                      retry: bool = False) -> dict[str, Reply]:
        """Deliver ``data`` to ``rcpts``; ``retry``: an earlier attempt may have delivered
        some of them without our knowing (only the local courier can act on it)."""
        ...

    async def close(self) -> None:
        """Let go of pooled connections (the runner is stopping)."""
        ...
