"""`pochta serve mda`: the LMTP listener on ``[mda] listen`` (TCP or unix socket)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from mda.deliver import Deliverer
from mda.filtering import SieveDelivery
from mda.session import LMTPHandler
from mta.smtp.data import delivery_size_limit
from mta.smtp.lmtp import LMTPProtocol
from mta.smtp.server import Connections, start_listeners
from store.config import Config, LiveConfig
from store.db import Database
from store.directory import CachedDirectory
from store.privileges import drop as drop_privileges
from store.sieve import SieveStore

log = logging.getLogger("pochta.mda")


async def run(cfg: Config, stop: asyncio.Event,
              ready: Callable[[], object] = lambda: None,
              live: LiveConfig | None = None) -> None:
    db = Database(cfg.database_url)
    deliverer = Deliverer(cfg.mda, cfg.hostname, use_syncfs=cfg.sync_method == "auto")
    directory = CachedDirectory(db, cfg.directory_cache_ttl)
    handler = LMTPHandler(directory, deliverer,
                          SieveDelivery(deliverer, SieveStore(db), directory, cfg.spool_dir,
                                        cfg.hostname,
                                        junk_folder=cfg.spam.junk_folder if cfg.spam.rspamd
                                        else ""))
    connections = Connections(max_total=500, max_per_ip=0)
    current = [cfg]  # the last (re)loaded config, for new connections

    def factory() -> LMTPProtocol:
        c = current[0]
        # What the MTA accepts, plus the headers added since: never accept, then bounce.
        size_limit = delivery_size_limit(max(c.mta.max_message_size, c.msa.max_message_size),
                                         c.mda.max_message_size)
        return LMTPProtocol(
            handler, connections=connections, listener="lmtp", hostname=c.hostname, ident="LMTP",
            data_size_limit=size_limit, enable_SMTPUTF8=True,
            decode_data=False, timeout=c.mda.idle_timeout)

    def apply(new: Config) -> None:
        current[0] = new
        directory.ttl = new.directory_cache_ttl

    if live is not None:
        live.subscribe(apply)

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
