"""Prometheus plumbing: one endpoint for the metrics every process counts (store/metrics.py).

The MTA, MSA, MDA and queue runner are separate processes, so prometheus-client runs in its
multiprocess mode: each process writes its values into memory-mapped files of one folder
(``<data_dir>/metrics``) and the endpoint adds them up at each scrape. The folder is named in
the environment (``PROMETHEUS_MULTIPROC_DIR``) before the first metric exists, by
``enable()``; the children a process starts inherit it. Without ``[metrics] listen`` nothing
is enabled and the metrics are plain in-memory counters nobody reads.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

ENV = "PROMETHEUS_MULTIPROC_DIR"


def folder(data_dir: str) -> Path:
    return Path(data_dir) / "metrics"


def enable(data_dir: str) -> Path:
    """Multiprocess mode into ``<data_dir>/metrics``: call before this module is imported."""
    path = folder(data_dir)
    if os.environ.get(ENV) == str(path):
        return path
    if "store.metrics" in sys.modules:
        raise RuntimeError("metrics enabled after the first metric was made")
    os.environ[ENV] = str(path)
    return path


def _pid_of(name: str) -> int | None:
    m = re.search(r"_(\d+)\.db\Z", name)
    return int(m.group(1)) if m else None


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process (the MTA runs as pochta, `up` as root)
    return True


def prune(path: Path, *, counters_too: bool) -> None:
    """Remove the files of processes that are gone: their live gauges always (a dead
    session count is no session), and with ``counters_too`` everything (a new start of the
    stack: the counters start again, which Prometheus' rate() expects of a restart)."""
    with contextlib.suppress(FileNotFoundError):
        for f in path.iterdir():
            pid = _pid_of(f.name)
            if pid is None or alive(pid):
                continue
            if counters_too or f.name.startswith("gauge_live"):
                with contextlib.suppress(FileNotFoundError, PermissionError):
                    f.unlink()


def serve(listen: str, path: Path) -> Any:
    """The /metrics endpoint on "host:port", in a thread; returns the HTTP server."""
    from prometheus_client import CollectorRegistry, start_http_server
    from prometheus_client.multiprocess import MultiProcessCollector
    from prometheus_client.registry import Collector

    from store.config import parse_address

    class Pruned(Collector):
        def __init__(self) -> None:
            self.inner = MultiProcessCollector(None, str(path))

        def collect(self) -> Iterable[Any]:
            prune(path, counters_too=False)
            return self.inner.collect()

    registry = CollectorRegistry()
    registry.register(Pruned())
    host, port = parse_address(listen, "metrics.listen")
    server, _thread = start_http_server(port, host, registry)
    return server
