"""`pochta serve mta|msa|queue`: the listeners, and the queue runner.

The MTA and the MSA only accept and spool, then send the runner a notice. The runner is its own
process, ``pochta serve queue``, which ``serve mta`` starts as its child and restarts if it
dies: delivery then runs on another core than acceptance, and a user who starts the contract's
three roles gets delivery too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pickle
import signal
import ssl
import sys
from collections.abc import Callable

from mta.abuse import Greylister, PregreetMemory, RateLimiter, in_networks, make_async_resolver
from mta.authcheck import InboundChecks
from mta.dkimsign import Signer
from mta.forwarding import srs_of
from mta.notice import Notifier
from mta.session import Defences, Mode, SMTPHandler
from mta.smtp.protocol import SMTPProtocol
from mta.smtp.server import Connections, start_listeners
from mta.spool import Spool
from mta.supervision import PARENT_PIPE, restart_delay
from store.config import Config, ListenerLimits, LiveConfig
from store.db import Database
from store.directory import CachedDirectory
from store.privileges import account_for
from store.privileges import drop as drop_privileges
from store.sieve import SieveStore
from store.tlscert import reload_certificate, server_context, watch_certificate

log = logging.getLogger("pochta.server")


class Serving:
    """What a new connection gets: the config and handler of the last (re)load. Sessions
    already open finish with what they started with."""

    def __init__(self, cfg: Config, handler: SMTPHandler) -> None:
        self.cfg = cfg
        self.handler = handler

    def limits(self) -> ListenerLimits:
        return self.cfg.msa if self.handler.mode.submission else self.cfg.mta


def protocol_factory(serving: Serving, connections: Connections, tls: object, *,
                     require_auth: bool, implicit_tls: bool = False, listener: str = "smtp",
                     protocol: type[SMTPProtocol] = SMTPProtocol) -> Callable[[], SMTPProtocol]:
    def factory() -> SMTPProtocol:
        limits = serving.limits()
        return protocol(
            serving.handler, connections=connections, listener=listener,
            hostname=serving.cfg.hostname, ident="ESMTP",
            data_size_limit=limits.max_message_size or None, enable_SMTPUTF8=True,
            decode_data=False, tls_context=tls, timeout=limits.idle_timeout,
            max_errors=limits.max_errors, auth_required=require_auth,
            # On an implicit-TLS listener the whole connection is TLS, which aiosmtpd's
            # STARTTLS-only check cannot see.
            auth_require_tls=implicit_tls is False)
    return factory


def reconfigure(serving: Serving, new: Config, build: Callable[[Config, SMTPHandler], SMTPHandler],
                connections: Connections, directory: CachedDirectory, tls: ssl.SSLContext
                ) -> None:
    """A reload of the MTA or the MSA: a new handler and limits for new sessions, the cache
    time, the certificate."""
    serving.handler = build(new, serving.handler)
    serving.cfg = new
    limits = serving.limits()
    connections.max_total = limits.max_connections
    connections.max_per_ip = limits.max_connections_per_ip
    directory.ttl = new.directory_cache_ttl
    reload_certificate(tls, new)


async def _serve_until(stop: asyncio.Event, servers: list[asyncio.base_events.Server],
                       connections: Connections, hostname: str) -> None:
    await stop.wait()
    for s in servers:
        s.close()
    connections.shutdown(hostname)
    for s in servers:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(s.wait_closed(), 5)


async def run_queue(cfg: Config, stop: asyncio.Event,
                    ready: Callable[[], object] = lambda: None,
                    live: LiveConfig | None = None) -> None:
    # Here, not at the top: the MTA process (which only accepts) does not pay the memory of
    # the delivery side (TLS verification, cryptography, aiosmtplib) for each of its sessions.
    from mta.courier.local import LocalDelivery
    from mta.courier.remote import Outbound
    from mta.dsn import Bouncer
    from mta.queue import QueueRunner
    from mta.tlsrpt import Reporter
    from store.tlspolicy import TLSPolicyStore

    drop_privileges(cfg, "queue")  # it binds nothing
    db = Database(cfg.database_url)
    directory = CachedDirectory(db, cfg.directory_cache_ttl)
    spool = Spool(cfg.spool_dir, cfg.sync_method == "auto")
    bouncer = Bouncer(cfg.hostname, spool, directory)
    tls_store = TLSPolicyStore(db)
    runner = QueueRunner(cfg, spool, directory, LocalDelivery(cfg),
                         Outbound(cfg, directory=directory, tls_store=tls_store),
                         bouncer)
    bouncer.enqueue = runner.add
    outbound = runner.remote
    assert isinstance(outbound, Outbound)
    signer = Signer(cfg.dkim.keys_dir) if cfg.dkim.sign else None
    runner.reporter = Reporter(cfg.hostname, tls_store, spool, outbound.resolver,
                               enqueue=runner.add, https=outbound.policies.https, signer=signer)
    runner.signer = signer
    runner.srs = srs_of(cfg)
    mda = account_for(cfg, "mda")
    if mda is not None:
        runner.heard.add(mda.uid)  # its outbox notices (Sieve redirects, vacation replies)

    def apply(new: Config) -> None:
        directory.ttl = new.directory_cache_ttl
        runner.reconfigure(new, Outbound(new, directory=directory, tls_store=tls_store))

    if live is not None:
        live.subscribe(apply)
    if os.environ.get(PARENT_PIPE):
        _stop_when_parent_exits(stop)
    await runner.listen()  # before the scan: what is committed from now on comes as a notice
    await runner.recover()
    log.info("queue ready: spool %s, local delivery to %s", cfg.spool_dir, cfg.mda.listen)
    ready()
    try:
        await runner.run(stop)
    finally:
        db.dispose()
        log.info("queue stopped")


def _stop_when_parent_exits(stop: asyncio.Event) -> None:
    """EOF on stdin: the MTA that started us is gone (even SIGKILLed); finish and exit."""
    loop = asyncio.get_running_loop()

    def readable() -> None:
        if not os.read(0, 4096):
            loop.remove_reader(0)
            log.warning("the MTA process is gone: stopping the queue runner")
            stop.set()

    loop.add_reader(0, readable)


class QueueChild:
    """The queue runner process the MTA runs (supervise_queue), for passing signals on."""

    def __init__(self) -> None:
        self.proc: asyncio.subprocess.Process | None = None

    def reload(self) -> None:
        """Our reload is its reload too (systemd's ExecReload signals the MTA alone)."""
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGHUP)


async def supervise_queue(config_path: str | None, stop: asyncio.Event,
                          current: Callable[[], Config],
                          child: QueueChild | None = None) -> None:
    """Run ``pochta serve queue`` as our child until ``stop``; restart it if it dies. It runs
    with our current config (inherited_config), sent on its stdin."""
    cmd = [sys.executable, "-m", "admin"] + (["--config", config_path] if config_path else [])
    restarts = 0
    while not stop.is_set():
        # Its own session: a Ctrl-C on the terminal reaches us, and we stop it in order.
        proc = await asyncio.create_subprocess_exec(
            *cmd, "serve", "queue", stdin=asyncio.subprocess.PIPE,
            # NOTIFY_SOCKET is the MTA's: systemd hears the unit's main process only.
            env={**{k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"},
                 PARENT_PIPE: "1"}, start_new_session=True)
        assert proc.stdin is not None
        frame = pickle.dumps(current())
        proc.stdin.write(len(frame).to_bytes(8, "big") + frame)
        with contextlib.suppress(ConnectionError):  # it died at once: the restart below
            await proc.stdin.drain()
        if child is not None:
            child.proc = proc
        exited = asyncio.create_task(proc.wait())
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait([exited, stopping], return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        if stop.is_set():
            if proc.returncode is None:
                proc.terminate()
                try:
                    await asyncio.wait_for(exited, 20)
                except TimeoutError:
                    proc.kill()
                    await exited
            return
        delay = restart_delay(restarts)
        restarts += 1
        log.error("queue runner exited with status %s; restarting in %.0f s",
                  proc.returncode, delay)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), delay)


async def run_mta(cfg: Config, stop: asyncio.Event, config_path: str | None = None,
                  ready: Callable[[], object] = lambda: None,
                  live: LiveConfig | None = None) -> None:
    db = Database(cfg.database_url)
    directory = CachedDirectory(db, cfg.directory_cache_ttl)
    spool = Spool(cfg.spool_dir, cfg.sync_method == "auto")
    notifier = Notifier(spool.dir)

    def build(cfg: Config, old: SMTPHandler | None) -> SMTPHandler:
        c = cfg.checks
        kept = old.defences if old is not None and old.cfg.checks == c else None
        defences = Defences(
            checks=InboundChecks(cfg.hostname, cfg.delivery.resolver, spf_enabled=c.spf,
                                 dkim_enabled=c.dkim, dmarc_enabled=c.dmarc,
                                 dmarc_enforce=c.dmarc_enforce, temperror=c.temperror)
            if (c.spf or c.dkim or c.dmarc) else None,
            greylist=Greylister(db, c.greylist_delay, c.greylist_expiry) if c.greylist else None,
            dnsbl_resolver=make_async_resolver(cfg.delivery.resolver) if c.dnsbl else None,
            # What a client proved (pregreet) or used up (rate) survives a reload.
            pregreet=(kept.pregreet if kept is not None else PregreetMemory(c.pregreet_remember))
            if c.pregreet else None,
            connection_rate=kept.connection_rate
            if kept is not None and old is not None and old.cfg.limits == cfg.limits
            else RateLimiter(cfg.limits.connections_per_ip_per_minute,
                             60.0 * cfg.limits.window_scale))
        return SMTPHandler(cfg, Mode("mta", submission=False, vrfy=cfg.mta.vrfy,
                                     expn=cfg.mta.expn),
                           directory, spool, announce=notifier.notify, defences=defences)

    serving = Serving(cfg, build(cfg, None))
    connections = Connections(cfg.mta.max_connections, cfg.mta.max_connections_per_ip,
                              exempt=lambda ip: in_networks(ip, serving.cfg.checks.local_networks))
    tls = server_context(cfg)

    queue_child = QueueChild()

    def apply(new: Config) -> None:
        reconfigure(serving, new, build, connections, directory, tls)
        queue_child.reload()

    if live is not None:
        live.subscribe(apply)
    queue_stop = asyncio.Event()
    queue = asyncio.create_task(
        supervise_queue(config_path, queue_stop, lambda: serving.cfg, queue_child))
    servers = await start_listeners(
        cfg.mta.listen, protocol_factory(serving, connections, tls, require_auth=False),
        key="mta.listen")
    drop_privileges(cfg, "mta")
    watcher = asyncio.create_task(watch_certificate(tls, lambda: serving.cfg, stop))
    log.info("mta ready: SMTP on %s, spool %s", " ".join(cfg.mta.listen), cfg.spool_dir)
    ready()
    try:
        await _serve_until(stop, servers, connections, cfg.hostname)
    finally:
        watcher.cancel()
        queue_stop.set()  # after the listeners: sessions still finishing get their notices
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(queue, 30)
        notifier.close()
        db.dispose()
        log.info("mta stopped")


async def run_msa(cfg: Config, stop: asyncio.Event,
                  ready: Callable[[], object] = lambda: None,
                  live: LiveConfig | None = None) -> None:
    from mta.managesieve import ManageSieveServer
    from mta.odmr import OdmrHandler, OdmrProtocol
    from mta.stsserver import PolicyServer
    from mta.submission import SubmissionHandler

    db = Database(cfg.database_url)
    directory = CachedDirectory(db, cfg.directory_cache_ttl)
    spool = Spool(cfg.spool_dir, cfg.sync_method == "auto")
    notifier = Notifier(spool.dir)

    def build(cfg: Config, old: SMTPHandler | None,
              kind: type[SubmissionHandler] = SubmissionHandler) -> SubmissionHandler:
        handler = kind(
            cfg, Mode("msa", submission=True, vrfy=cfg.msa.vrfy, expn=cfg.msa.expn),
            directory, spool, announce=notifier.notify,
            defences=Defences(connection_rate=RateLimiter(
                cfg.limits.connections_per_ip_per_minute, 60.0 * cfg.limits.window_scale)),
            signer=Signer(cfg.dkim.keys_dir) if cfg.dkim.sign else None)
        if isinstance(old, SubmissionHandler) and old.cfg.limits == cfg.limits:
            handler.keep_counts(old)  # a reload is no way around a rate limit
        return handler

    def build_odmr(cfg: Config, old: SMTPHandler | None) -> SubmissionHandler:
        return build(cfg, old, OdmrHandler)

    serving = Serving(cfg, build(cfg, None))
    odmr = Serving(cfg, build_odmr(cfg, None))
    connections = Connections(cfg.msa.max_connections, cfg.msa.max_connections_per_ip,
                              exempt=lambda ip: in_networks(ip, serving.cfg.checks.local_networks))
    tls = server_context(cfg)

    def apply(new: Config) -> None:
        reconfigure(serving, new, build, connections, directory, tls)
        odmr.handler, odmr.cfg = build_odmr(new, odmr.handler), new

    if live is not None:
        live.subscribe(apply)
    servers = await start_listeners(
        cfg.msa.listen, protocol_factory(serving, connections, tls, require_auth=True,
                                         listener="submission"),
        key="msa.listen")
    servers += await start_listeners(
        cfg.msa.listen_tls, protocol_factory(serving, connections, None, require_auth=True,
                                             implicit_tls=True, listener="submissions"),
        ssl_context=tls, connections=connections, key="msa.listen_tls")
    servers += await start_listeners(
        cfg.odmr.listen, protocol_factory(odmr, connections, tls, require_auth=False,
                                          listener="odmr", protocol=OdmrProtocol),
        key="odmr.listen")
    servers += await PolicyServer(lambda: serving.cfg, directory).start(tls)
    servers += await ManageSieveServer(lambda: serving.cfg, directory, SieveStore(db)).start(tls)
    drop_privileges(cfg, "msa")
    watcher = asyncio.create_task(watch_certificate(tls, lambda: serving.cfg, stop))
    log.info("msa ready: submission on %s (STARTTLS), %s (TLS)%s%s%s",
             " ".join(cfg.msa.listen), " ".join(cfg.msa.listen_tls),
             f", ODMR on {' '.join(cfg.odmr.listen)}" if cfg.odmr.listen else "",
             f", MTA-STS policy on {' '.join(cfg.mta_sts.listen)}" if cfg.mta_sts.listen
             else "",
             f", ManageSieve on {' '.join(cfg.managesieve.listen)}" if cfg.managesieve.listen
             else "")
    ready()
    try:
        await _serve_until(stop, servers, connections, cfg.hostname)
    finally:
        watcher.cancel()
        notifier.close()
        db.dispose()
        log.info("msa stopped")
