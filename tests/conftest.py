"""Shared fixtures: databases on both backends, temporary configs, the real pochta command."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from tests.support.pochta import POSTGRES_URL

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
