"""Which pochta processes run, and with what config: ``<data_dir>/run/<role>.json``.

Each `pochta serve` process writes its pid and the config it runs with at start and after a
reload, and removes the file when it stops. `pochta reload` reads them to know whom to signal
and which changed keys wait for a restart. Liveness is `pochta status`'s business (a real
probe); these files only name the processes.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
from pathlib import Path
from typing import Any

import typer

from admin.context import UserError, context
from store.config import Config, changed_keys, flatten, is_live
from store.fsio import atomic_write


def run_dir(cfg: Config) -> Path:
    return Path(cfg.data_dir) / "run"


def record(cfg: Config, role: str, restart_needed: list[str] | None = None) -> None:
    doc = {"pid": os.getpid(), "role": role, "config": flatten(cfg),
           "restart_needed": restart_needed or []}
    atomic_write(run_dir(cfg) / f"{role}.json", json.dumps(doc).encode(), mode=0o640)


def forget(cfg: Config, role: str) -> None:
    path = run_dir(cfg) / f"{role}.json"
    with contextlib.suppress(OSError, ValueError):
        if json.loads(path.read_bytes()).get("pid") == os.getpid():
            path.unlink()


def is_pochta(pid: int) -> bool:
    """The pid is a live pochta process (not a recycled number)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return any(b"pochta" in part or part == b"admin" for part in cmdline) and (
        b"serve" in cmdline or b"up" in cmdline)


def running(cfg: Config) -> list[dict[str, Any]]:
    """The recorded processes that still run, by role."""
    out = []
    with contextlib.suppress(FileNotFoundError):
        for path in sorted(run_dir(cfg).glob("*.json")):
            try:
                doc = json.loads(path.read_bytes())
                pid = int(doc["pid"])
            except (OSError, ValueError, KeyError, TypeError):
                continue
            if is_pochta(pid):
                out.append(doc)
    return out


def reload_targets(procs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Whom a reload signals: every recorded process but a queue runner whose MTA runs (the
    MTA passes its reload on; systemd's ExecReload signals the MTA alone)."""
    mta_runs = any(doc.get("role") == "mta" for doc in procs)
    return [doc for doc in procs if not (doc.get("role") == "queue" and mta_runs)]


def reload(ctx: typer.Context) -> None:
    """Re-read the config in the running processes (SIGHUP); refuses a broken config."""
    cfg = context(ctx).config  # a broken config stops here: one line, nothing signalled
    procs = running(cfg)
    if not procs:
        raise UserError(f"no running pochta process has its state in {cfg.data_dir}")
    new = flatten(cfg)
    later: set[str] = set()
    signalled = []
    targets = reload_targets(procs)
    for doc in procs:
        later.update(k for k in changed_keys(doc.get("config", {}), new) if not is_live(k))
        later.update(doc.get("restart_needed", []))
        if doc not in targets:
            signalled.append(f"{doc['role']} (pid {doc['pid']}, through the mta)")
            continue
        try:
            os.kill(int(doc["pid"]), signal.SIGHUP)
        except ProcessLookupError:
            continue
        except PermissionError:
            raise UserError(f"not allowed to signal {doc['role']} (pid {doc['pid']}): "
                            "run as its user or root") from None
        signalled.append(f"{doc['role']} (pid {doc['pid']})")
    typer.echo(f"reload sent to {', '.join(signalled)}")
    if later:
        typer.echo(f"changed keys that need a restart: {', '.join(sorted(later))}")
