"""The local courier: local recipients to the MDA over LMTP (mta/courier/lmtp.py), reusing
idle connections."""

from __future__ import annotations

import asyncio
import logging

from mta.courier.lmtp import LMTPClient, LMTPError
from mta.envelope import Envelope, Recipient
from mta.reply import Reply
from mta.spool import SpooledMessage
from store.config import Config

log = logging.getLogger("pochta.queue")


class LocalDelivery:
    """The local courier (mta/courier/__init__.py). At most ``max_connections`` deliveries to
    the MDA at once: the queue runner's attempts are many more (remote hosts are slow), and
    the MDA's disk gains nothing from more (Postfix's LMTP limit is 20)."""

    def __init__(self, cfg: Config, max_connections: int = 32) -> None:
        self.address = cfg.mda.listen
        self.hostname = cfg.hostname
        self.timeout = cfg.delivery.lmtp_timeout
        self.max_idle = max_connections
        self.slots = asyncio.Semaphore(max_connections)
        self.idle: list[LMTPClient] = []

    async def deliver(self, env: Envelope, rcpts: list[Recipient], data: bytes | SpooledMessage,
                      retry: bool = False) -> dict[str, Reply]:
        """``retry``: an earlier attempt may have delivered some of ``rcpts`` without our
        knowing (see LMTPClient.deliver)."""
        async with self.slots:
            return await self._deliver(env, rcpts, data, retry)

    async def _deliver(self, env: Envelope, rcpts: list[Recipient], data: bytes | SpooledMessage,
                       retry: bool) -> dict[str, Reply]:
        addrs = list(dict.fromkeys(r.address for r in rcpts))
        while True:
            client = self.idle.pop() if self.idle else None
            reused = client is not None and client.connected
            try:
                if client is None or not reused:
                    client = LMTPClient(self.address, self.timeout)
                    await client.connect(self.hostname)
                results = await client.deliver(env.mail_from, addrs, data, env.smtputf8,
                                               queue_id=env.id, retry=retry,
                                               binary=env.body == "BINARYMIME")
                break
            except LMTPError as e:
                if reused and not e.data_sent:
                    # An idle connection the MDA closed meanwhile (it restarted, or timed out):
                    # nothing was delivered; go on with the next one, at worst a new one.
                    log.info("%s: MDA connection gone stale, trying another: %s", env.id, e)
                    continue
                log.warning("%s: MDA: %s", env.id, e)
                return {a: Reply(451, f"4.4.1 MDA not available: {e}") for a in addrs}
        if client.connected and len(self.idle) < self.max_idle:
            self.idle.append(client)
        else:
            await client.close()
        return results

    async def close(self) -> None:
        while self.idle:
            await self.idle.pop().close()
