"""Shared fixtures: databases on both backends, temporary configs, the real pochta command."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

sys.path.insert(0, str(Path(__file__).parent))

POSTGRES_URL = os.environ.get("POCHTA_TEST_POSTGRES", "")
BACKENDS = ["sqlite"] + (["postgres"] if POSTGRES_URL else [])


@pytest.fixture(params=BACKENDS)
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database: a new SQLite file, or a new PostgreSQL database (dropped after)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'pochta.db'}"
        return
    name = f"pochta_t_{uuid.uuid4().hex[:12]}"
    admin = create_engine(POSTGRES_URL.replace("postgresql://", "postgresql+psycopg://", 1),
                          isolation_level="AUTOCOMMIT", pool_pre_ping=True)  # (a test restarts it)
    with admin.connect() as c:
        c.execute(text(f'CREATE DATABASE "{name}"'))
    base = POSTGRES_URL.rsplit("/", 1)[0]
    try:
        yield f"{base}/{name}"
    finally:
        with admin.connect() as c:
            c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture
def directory(database_url: str):
    from store.db import Database
    from store.directory import Directory
    from store.migrate import upgrade_to_head

    upgrade_to_head(database_url)
    db = Database(database_url)
    yield Directory(db)
    db.dispose()


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


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--slow", action="store_true",
                     help="also the long sweeps (scripts/test --slow); CI runs the short ones")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--slow"):
        return
    skip = pytest.mark.skip(reason="a long sweep: run with --slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
