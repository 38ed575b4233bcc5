"""`pochta sieve`: users' Sieve scripts (the same store ManageSieve edits). A script with a
syntax error is refused with its line and column and is never stored or activated."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import typer

from admin.context import UserError, context, table
from sieve import check
from store.sieve import SieveStore, SieveStoreError

sieve_app = typer.Typer(help="Users' Sieve filters (RFC 5228): put, get, list, activate, "
                             "check.", no_args_is_help=True)


@contextmanager
def _store(ctx: typer.Context) -> Iterator[SieveStore]:
    # Database failures come as DirectoryUnavailable, which `main` reports (with the hint
    # to upgrade a database without the scripts table).
    try:
        yield SieveStore(context(ctx).db)
    except SieveStoreError as e:
        raise UserError(str(e)) from None


def _read(file: str) -> tuple[str, str]:
    """(text, default name) of FILE, "-" being stdin."""
    if file == "-":
        data = sys.stdin.buffer.read()
        name = "default"
    else:
        path = Path(file)
        try:
            data = path.read_bytes()
        except OSError as e:
            raise UserError(f"cannot read {file}: {e.strerror or e}") from None
        name = path.stem or "default"
    try:
        return data.decode("utf-8"), name
    except UnicodeDecodeError as e:
        raise UserError(f"{file}: not UTF-8 ({e.reason} at byte {e.start})") from None


def _checked(text: str, file: str) -> None:
    error = check(text)
    if error:
        raise UserError(f"{file}: {error}")


@sieve_app.command("put")
def sieve_put(ctx: typer.Context, user: str,
              file: str = typer.Argument("-", help="the script; - reads stdin"),
              name: str = typer.Option("", help="the script's name (default: the file's)"),
              activate: bool = typer.Option(True, help="make it the active script")) -> None:
    """Store USER's script from FILE (checked first) and make it the active one."""
    text, default = _read(file)
    _checked(text, file)
    script = name or default
    with _store(ctx) as store:
        address = store.put(user, script, text, activate=activate)
    typer.echo(f"stored script {script!r} for {address}{' (active)' if activate else ''}")


@sieve_app.command("get")
def sieve_get(ctx: typer.Context, user: str,
              name: str = typer.Argument("", help="default: the active script")) -> None:
    """Print USER's active script (or the named one)."""
    with _store(ctx) as store:
        _, text = store.get(user, name or None)
    typer.echo(text, nl=not text.endswith("\n"))


@sieve_app.command("list")
def sieve_list(ctx: typer.Context, user: str) -> None:
    """USER's scripts; the active one is marked."""
    with _store(ctx) as store:
        scripts = store.scripts(user)
    if not scripts:
        typer.echo("(no scripts)")
        return
    table(["NAME", "ACTIVE", "BYTES"],
          [[s.name, "yes" if s.active else "", str(s.size)] for s in scripts])


@sieve_app.command("activate")
def sieve_activate(ctx: typer.Context, user: str,
                   name: str = typer.Argument("", help="the script; empty: none active"))\
        -> None:
    """Make NAME USER's active script (no name: no filtering at all)."""
    with _store(ctx) as store:
        if name:
            _, text = store.get(user, name)
            _checked(text, name)  # stored by an older version, perhaps
        store.activate(user, name or None)
    typer.echo(f"active script of {user}: {name!r}" if name else f"{user} has no active script")


@sieve_app.command("check")
def sieve_check(ctx: typer.Context, user: str,
                file: str = typer.Argument("", help="a script to check; default: USER's "
                                                    "active one; - reads stdin")) -> None:
    """Check a script's syntax (FILE, or USER's active script): line and column of errors."""
    if file:
        text, _ = _read(file)
        where = file
    else:
        with _store(ctx) as store:
            where, text = store.get(user)
    _checked(text, where)
    typer.echo(f"{where}: OK")
