"""The real `pochta` command, and the PostgreSQL server the database tests may use."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

POSTGRES_URL = os.environ.get("POCHTA_TEST_POSTGRES", "")


def pochta_bin() -> str:
    exe = Path(sys.executable).parent / "pochta"
    return str(exe) if exe.exists() else "pochta"


def run_pochta(config: Path | None, *args: str, stdin: str | None = None,
               env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    cmd = [pochta_bin()]
    if config is not None:
        cmd += ["--config", str(config)]
    full_env = {k: v for k, v in os.environ.items() if k != "POCHTA_CONFIG"}
    full_env.update(env or {})
    return subprocess.run(cmd + list(args), input=stdin, capture_output=True, text=True,
                          timeout=timeout, env=full_env)
