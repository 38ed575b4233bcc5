"""`pochta serve mda`: the LMTP listener on ``[mda] listen`` (TCP or unix socket)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from mda.deliver import Deliverer
from mda.session import LMTPHandler
from mta.smtp.data import delivery_size_limit
from mta.smtp.lmtp import LMTPProtocol
from mta.smtp.server import Connections, start_listeners
from store.config import Config
from store.db import Database
from store.directory import CachedDirectory
from store.privileges import drop as drop_privileges

log = logging.getLogger("pochta.mda")


async def run(cfg: Config, stop: asyncio.Event,
              ready: Callable[[], object] = lambda: None) -> None:
    db = Database(cfg.database_url)
    deliverer = Deliverer(cfg.mda, cfg.hostname, use_syncfs=cfg.sync_method == "auto")
    handler = LMTPHandler(CachedDirectory(db, cfg.directory_cache_ttl), deliverer)
    connections = Connections(max_total=500, max_per_ip=0)
    # What the MTA accepts, plus the headers added since: never accept, then bounce.
    size_limit = delivery_size_limit(max(cfg.mta.max_message_size, cfg.msa.max_message_size),
                                     cfg.mda.max_message_size)

    def factory() -> LMTPProtocol:
        return LMTPProtocol(
            handler, connections=connections, listener="lmtp", hostname=cfg.hostname, ident="LMTP",
            data_size_limit=size_limit, enable_SMTPUTF8=True,
            decode_data=False, timeout=cfg.mda.idle_timeout)

    servers = await start_listeners([cfg.mda.listen], factory, key="mda.listen")
    drop_privileges(cfg, "mda")
    log.info("mda ready: LMTP on %s, %s in %s", cfg.mda.listen, cfg.mda.format,
             cfg.mda.mailbox_root)
    ready()
    try:
        await stop.wait()
    finally:
        for s in servers:
            s.close()
        connections.shutdown(cfg.hostname)
        for s in servers:
            try:
                await asyncio.wait_for(s.wait_closed(), 5)
            except TimeoutError:
                pass
        db.dispose()
        log.info("mda stopped")
