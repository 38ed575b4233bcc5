"""What every `pochta` verb shares: the lazily built Context (config, database, directory),
the one-line user error, and table output. Verb modules import this, never admin.cli."""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass, field
from functools import cached_property

import typer
from rich.console import Console
from rich.table import Table

from store.config import Config, ConfigError
from store.config import load as load_config
from store.db import Database
from store.directory import Directory


class UserError(Exception):
    """A mistake on the command line, reported in one line."""


@dataclass
class Context:
    """What the verbs need, built lazily from the one config loaded at start."""

    config_path: str | None
    _db: Database | None = field(default=None, repr=False)

    @cached_property
    def config(self) -> Config:
        return load_config(self.config_path)

    @property
    def db(self) -> Database:
        if self._db is None:
            self._db = Database(self.config.database_url)
        return self._db

    @property
    def directory(self) -> Directory:
        return Directory(self.db)

    def close(self) -> None:
        """After a verb: run as root, what it created (database files, keys) goes to the
        service user (store/privileges.py), so the mail processes can use it."""
        if self._db is not None:
            self._db.dispose()
        if os.geteuid() == 0 and "config" in self.__dict__:
            from store.privileges import give_state

            with contextlib.suppress(ConfigError):  # no such user: nothing to give
                give_state(self.config)


def context(ctx: typer.Context) -> Context:
    """The one Context of this command line (made by the root callback)."""
    obj = ctx.find_root().obj
    assert isinstance(obj, Context)
    return obj


def table(headers: list[str], rows: list[list[str]]) -> None:
    t = Table(*headers, box=None, pad_edge=False, header_style="bold")
    for r in rows:
        t.add_row(*r)
    Console(width=200 if not sys.stdout.isatty() else None, soft_wrap=True).print(t)
