"""`pochta serve mta` and `pochta serve msa`: listeners, and the MTA's queue runner.

The MTA process runs the queue: it owns delivery. The MSA process only accepts and spools, then
drops a ``kick`` marker so the MTA's runner picks the message up at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from mta.abuse import Greylister, PregreetMemory, RateLimiter, make_async_resolver
from mta.authcheck import InboundChecks
from mta.dkimsign import Signer
from mta.dsn import Bouncer
from mta.outbound import Outbound
from mta.protocol import SMTPProtocol
from mta.queue import LocalDelivery, QueueRunner
from mta.session import Defences, Mode, SMTPHandler
from mta.spool import KICK, Envelope, Spool
from store.config import Config
from store.db import Database
from store.directory import CachedDirectory
from store.smtpserver import Connections, start_listeners
from store.tlscert import server_context

log = logging.getLogger("pochta.server")


def protocol_factory(cfg: Config, handler: SMTPHandler, connections: Connections,
                     tls: object, *, require_auth: bool, implicit_tls: bool = False
                     ) -> Callable[[], SMTPProtocol]:
    def factory() -> SMTPProtocol:
        return SMTPProtocol(
            handler, connections=connections, hostname=cfg.hostname, ident="ESMTP",
            data_size_limit=cfg.mta.max_message_size or None, enable_SMTPUTF8=True,
            decode_data=False, tls_context=tls, timeout=cfg.mta.idle_timeout,
            max_errors=cfg.mta.max_errors, auth_required=require_auth,
            # On an implicit-TLS listener the whole connection is TLS, which aiosmtpd's
            # STARTTLS-only check cannot see.
            auth_require_tls=implicit_tls is False)
    return factory


async def _serve_until(stop: asyncio.Event, servers: list[asyncio.base_events.Server],
                       connections: Connections, hostname: str) -> None:
    await stop.wait()
    for s in servers:
        s.close()
    connections.shutdown(hostname)
    for s in servers:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(s.wait_closed(), 5)


async def run_mta(cfg: Config, stop: asyncio.Event) -> None:
    db = Database(cfg.database_url)
    directory = CachedDirectory(db, cfg.directory_cache_ttl)
    spool = Spool(cfg.spool_dir)
    bouncer = Bouncer(cfg.hostname, spool, directory)
    runner = QueueRunner(cfg, spool, directory, LocalDelivery(cfg), Outbound(cfg).deliver,
                         bouncer)
    bouncer.enqueue = runner.add
    c = cfg.checks
    defences = Defences(
        checks=InboundChecks(cfg.hostname, cfg.delivery.resolver, spf_enabled=c.spf,
                             dkim_enabled=c.dkim, dmarc_enabled=c.dmarc,
                             dmarc_enforce=c.dmarc_enforce, temperror=c.temperror)
        if (c.spf or c.dkim or c.dmarc) else None,
        greylist=Greylister(db, c.greylist_delay, c.greylist_expiry) if c.greylist else None,
        dnsbl_resolver=make_async_resolver(cfg.delivery.resolver) if c.dnsbl else None,
        pregreet=PregreetMemory(c.pregreet_remember) if c.pregreet else None,
        connection_rate=RateLimiter(cfg.limits.connections_per_ip_per_minute,
                                    60.0 * cfg.limits.window_scale))
    handler = SMTPHandler(cfg, Mode("mta", submission=False, vrfy=cfg.mta.vrfy, expn=cfg.mta.expn),
                          directory, spool, kick=runner.add, defences=defences)
    connections = Connections(cfg.mta.max_connections, cfg.mta.max_connections_per_ip)
    tls = server_context(cfg)
    await runner.recover()
    servers = await start_listeners(
        cfg.mta.listen, protocol_factory(cfg, handler, connections, tls, require_auth=False),
        key="mta.listen")
    runner_task = asyncio.create_task(runner.run(stop))
    log.info("mta ready: SMTP on %s, spool %s, local delivery to %s", " ".join(cfg.mta.listen),
             cfg.spool_dir, cfg.mda.listen)
    try:
        await _serve_until(stop, servers, connections, cfg.hostname)
    finally:
        stop.set()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(runner_task, 15)
        db.dispose()
        log.info("mta stopped")


async def run_msa(cfg: Config, stop: asyncio.Event) -> None:
    from mta.submission import SubmissionHandler

    db = Database(cfg.database_url)
    directory = CachedDirectory(db, cfg.directory_cache_ttl)
    spool = Spool(cfg.spool_dir)

    def kick(_env: Envelope, _data: bytes | None) -> None:
        spool.touch_marker(KICK)  # the MTA's queue runner rescans the spool

    handler = SubmissionHandler(
        cfg, Mode("msa", submission=True, vrfy=cfg.msa.vrfy, expn=cfg.msa.expn),
        directory, spool, kick=kick,
        defences=Defences(connection_rate=RateLimiter(cfg.limits.connections_per_ip_per_minute,
                                                      60.0 * cfg.limits.window_scale)),
        signer=Signer(cfg.dkim.keys_dir) if cfg.dkim.sign else None)
    connections = Connections(cfg.mta.max_connections, cfg.mta.max_connections_per_ip)
    tls = server_context(cfg)
    servers = await start_listeners(
        cfg.msa.listen, protocol_factory(cfg, handler, connections, tls, require_auth=True),
        key="msa.listen")
    servers += await start_listeners(
        cfg.msa.listen_tls, protocol_factory(cfg, handler, connections, None, require_auth=True,
                                          implicit_tls=True),
        ssl_context=tls, key="msa.listen_tls")
    log.info("msa ready: submission on %s (STARTTLS), %s (TLS)", " ".join(cfg.msa.listen),
             " ".join(cfg.msa.listen_tls))
    try:
        await _serve_until(stop, servers, connections, cfg.hostname)
    finally:
        db.dispose()
        log.info("msa stopped")
