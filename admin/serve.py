"""`pochta serve mta|msa|mda|queue` (one process, foreground) and `pochta up` (all, supervised).

``serve mta`` starts ``serve queue`` (the queue runner) as its child: nobody needs to start it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import logging
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Coroutine
from concurrent.futures import ThreadPoolExecutor
from enum import StrEnum
from typing import Any

import typer

from admin import runfiles, sdnotify
from admin.context import context
from admin.logs import reopen_logs, setup_logging
from mta.supervision import PARENT_PIPE, inherited_config, restart_delay
from store import telemetry
from store.config import Config, ConfigError, LiveConfig, parse_address, reloaded
from store.config import load as load_config

ROLES = ("mda", "mta", "msa")
UNDER_UP = "POCHTA_UNDER_UP"  # set by `pochta up` for the processes it starts


class Role(StrEnum):
    mta = "mta"
    msa = "msa"
    mda = "mda"
    queue = "queue"


async def _serve(cfg: Config, role: str, config_path: str | None) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    live = LiveConfig(cfg)
    # fsync and SQL run in threads; more of them lets concurrent sessions' fsyncs overlap
    # (the file system merges them into one journal commit: group commit for free).
    loop.set_default_executor(ThreadPoolExecutor(max_workers=64, thread_name_prefix=role))

    def stopping() -> None:
        if not stop.is_set():
            sdnotify.notify("STOPPING=1")
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping)
    loop.add_signal_handler(signal.SIGUSR1, reopen_logs)
    loop.add_signal_handler(signal.SIGHUP, functools.partial(reload, live, role, config_path))
    if role == "mda":
        from mda.server import run
    elif role == "mta":
        from mta.server import run_mta

        run = functools.partial(run_mta, config_path=config_path)
        if not os.environ.get(UNDER_UP):  # the MTA on its own (a unit of its own) serves
            if cfg.metrics.listen:        # the stack's metrics and certificate
                start_metrics(cfg)
            if cfg.acme.enabled:
                start_acme(cfg)
    elif role == "queue":
        from mta.server import run_queue as run
    else:
        from mta.server import run_msa as run
    freeze_imported_objects()
    runfiles.record(cfg, role)
    try:
        await run(cfg, stop, ready=functools.partial(sdnotify.notify, "READY=1"), live=live)
    finally:
        runfiles.forget(live.current, role)


def reload(live: LiveConfig, role: str, config_path: str | None) -> None:
    """SIGHUP: the config file read again and its live keys applied (store/config.py
    LIVE_KEYS); a broken file changes nothing. The log file is reopened too (logrotate)."""
    log = logging.getLogger("pochta.reload")
    reopen_logs()
    try:
        loaded = load_config(config_path)
    except ConfigError as e:
        log.error("reload refused, the running config stays: %s", e)
        return
    new, later = reloaded(live.current, loaded)
    try:
        live.publish(new)
    except Exception:
        log.exception("reload failed part way: restart %s", role)
        return
    logging.getLogger().setLevel(new.log_level.upper())
    with contextlib.suppress(OSError):
        runfiles.record(new, role, later)
    log.info("config reloaded from %s%s", new.source,
             f"; changed keys that need a restart: {', '.join(later)}" if later else "")


def freeze_imported_objects() -> None:
    """Keep the garbage collector off what the imports made (gc.freeze).

    A full collection walks every object in the process: with SQLAlchemy, aiosmtpd and
    dnspython loaded that took 35-90 ms in the MTA, twice in a few seconds of 50 sessions, and
    each one stalls every session. The modules, classes and functions never become garbage.
    """
    gc.collect()
    gc.freeze()


def run_loop(main: Coroutine[Any, Any, None], kind: str) -> None:
    """asyncio.run, on uvloop when it is installed and wanted (about twice the speed)."""
    if kind in ("auto", "uvloop"):
        try:
            import uvloop
        except ImportError:
            if kind == "uvloop":
                raise ConfigError("config key 'event_loop': uvloop is not installed") from None
        else:
            uvloop.run(main)
            return
    asyncio.run(main)


def raise_file_limit() -> None:
    """Every SMTP session is a descriptor: use the hard limit, not the 1024 soft default."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def serve(ctx: typer.Context, role: Role) -> None:
    """Run one process in the foreground, logging to stderr."""
    c = context(ctx)
    under_mta = role is Role.queue and os.environ.get(PARENT_PIPE)
    cfg = inherited_config() if under_mta else c.config
    setup_logging(cfg, role.value)
    raise_file_limit()
    if cfg.metrics.listen:
        telemetry.enable(cfg.data_dir)  # before any metric exists (the imports below)
    from store.privileges import prepare, shared_folder

    prepare(cfg, role.value)  # as root: state to its users, before anything is opened
    shared_folder(cfg, runfiles.run_dir(cfg))
    if cfg.metrics.listen:
        shared_folder(cfg, telemetry.folder(cfg.data_dir))
    try:
        run_loop(_serve(cfg, role.value, c.config_path), cfg.event_loop)
    except OSError as e:
        logging.getLogger("pochta").error("cannot start %s: %s", role.value, e)
        raise SystemExit(1) from None


def listen_addresses(cfg: Config, role: str) -> list[str]:
    if role == "mda":
        return [cfg.mda.listen]
    if role == "mta":
        return list(cfg.mta.listen)
    if role == "queue":
        return []
    return list(cfg.msa.listen) + list(cfg.msa.listen_tls) + list(cfg.odmr.listen) + \
        list(cfg.mta_sts.listen)


def is_listening(addr: str) -> bool:
    try:
        if addr.startswith("unix:"):
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(0.5)
                s.connect(addr[5:])
        else:
            host, port = parse_address(addr, "listen")
            if host in ("0.0.0.0", "::"):
                host = "127.0.0.1" if host == "0.0.0.0" else "::1"
            with socket.create_connection((host, port), timeout=0.5):
                pass
        return True
    except OSError:
        return False


class Supervisor:
    """Starts each role as its own process, restarts the ones that die, stops all on signal."""

    def __init__(self, cfg: Config, config_path: str | None, roles: list[str]) -> None:
        self.cfg = cfg
        self.config_path = config_path
        self.roles = roles
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.restarts: dict[str, int] = dict.fromkeys(roles, 0)
        self.next_start: dict[str, float] = dict.fromkeys(roles, 0.0)
        self.stopping = False
        self.log = logging.getLogger("pochta.up")

    def spawn(self, role: str) -> None:
        cmd = [sys.executable, "-m", "admin"]
        if self.config_path:
            cmd += ["--config", self.config_path]
        cmd += ["serve", role]
        self.procs[role] = subprocess.Popen(cmd, stdin=subprocess.DEVNULL)
        self.log.info("started %s (pid %d)", role, self.procs[role].pid)

    def wait_ready(self, role: str, timeout: float = 20.0) -> bool:
        deadline = time.monotonic() + timeout
        addrs = listen_addresses(self.cfg, role)
        while time.monotonic() < deadline and not self.stopping:
            if self.procs[role].poll() is not None:
                return False
            if all(is_listening(a) for a in addrs):
                self.log.info("%s ready on %s", role, " ".join(addrs))
                return True
            time.sleep(0.05)
        return False

    def run(self) -> int:
        def on_signal(signum: int, _frame: object) -> None:
            self.stopping = True

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        for sig in (signal.SIGHUP, signal.SIGUSR1):  # `pochta reload` signals the others
            signal.signal(sig, lambda _s, _f: reopen_logs())
        for role in self.roles:
            self.spawn(role)
            if not self.wait_ready(role):
                if self.stopping:
                    break
                self.log.error("%s did not become ready; stopping", role)
                self.stop_all()
                return 1
        if not self.stopping:
            self.log.info("pochta up: %s running", ", ".join(self.roles))
        while not self.stopping:
            time.sleep(0.2)
            for role, proc in list(self.procs.items()):
                if proc.poll() is None or self.stopping:
                    continue
                now = time.monotonic()
                if self.next_start[role] == 0.0:
                    delay = restart_delay(self.restarts[role])
                    self.log.warning("%s exited with status %s; restarting in %.0f s",
                                     role, proc.returncode, delay)
                    self.next_start[role] = now + delay
                elif now >= self.next_start[role]:
                    self.restarts[role] += 1
                    self.next_start[role] = 0.0
                    self.spawn(role)
        self.stop_all()
        return 0

    def stop_all(self) -> None:
        for role, proc in reversed(list(self.procs.items())):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                self.log.info("stopping %s (pid %d)", role, proc.pid)
        deadline = time.monotonic() + 15
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.log.info("pochta stopped")


def up(ctx: typer.Context) -> None:
    """Start the MDA, MTA and MSA as supervised processes; Ctrl-C or SIGTERM stops them."""
    c = context(ctx)
    cfg = c.config
    setup_logging(cfg, "up")
    roles = [r for r in ROLES if listen_addresses(cfg, r)]
    renewer = None
    try:
        if cfg.metrics.listen:
            start_metrics(cfg)
        if cfg.acme.enabled:
            renewer = start_acme(cfg)
    except OSError as e:
        logging.getLogger("pochta.up").error("cannot start: %s", e)
        raise SystemExit(1) from None
    os.environ[UNDER_UP] = "1"  # the MTA we start leaves metrics and ACME to us
    from store.privileges import shared_folder

    shared_folder(cfg, runfiles.run_dir(cfg))
    runfiles.record(cfg, "up")  # `pochta reload` reopens our log too
    try:
        code = Supervisor(cfg, c.config_path, roles).run()
    finally:
        runfiles.forget(cfg, "up")
        if renewer is not None:
            renewer.stop()
    raise SystemExit(code)


def start_acme(cfg: Config) -> Any:
    """The http-01 responder (bound now, as root), a certificate if there is none, and the
    renewal loop; a renewed certificate is announced to every process (a reload)."""
    from admin.acme import Renewer

    def installed() -> None:
        for doc in runfiles.reload_targets(runfiles.running(cfg)):
            with contextlib.suppress(OSError):
                os.kill(int(doc["pid"]), signal.SIGHUP)

    renewer = Renewer(cfg, installed)
    renewer.listen()
    renewer.first()
    renewer.start()
    return renewer


def start_metrics(cfg: Config) -> object:
    """The stack's /metrics endpoint in this process (`up`, or `serve mta` on its own): its
    folder made for every process's files, those of processes gone removed."""
    from store.privileges import shared_folder

    path = shared_folder(cfg, telemetry.enable(cfg.data_dir))
    telemetry.prune(path, counters_too=True)
    server = telemetry.serve(cfg.metrics.listen, path)
    logging.getLogger("pochta").info("metrics on http://%s/metrics", cfg.metrics.listen)
    return server
