"""`pochta tls-policy`: the administrator's TLS policy per destination domain (Postfix's
smtp_tls_policy_maps), over what MTA-STS and DANE would decide (mta/tlspolicy.py)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import typer
from sqlalchemy.exc import SQLAlchemyError

from admin.context import UserError, context, table
from store.tlspolicy import POLICIES, TLSPolicyError, TLSPolicyStore

tls_policy_app = typer.Typer(
    help="TLS required for mail to a domain: none, may, encrypt, verify or dane.",
    no_args_is_help=True)

LEVELS = {
    "none": "no STARTTLS at all (a partner whose TLS is broken)",
    "may": "STARTTLS when offered, any certificate (the default)",
    "encrypt": "TLS required, any certificate",
    "verify": "TLS required, a certificate valid for the MX host name",
    "dane": "TLS required, matching DNSSEC-signed TLSA records ([delivery] dnssec)",
}


@contextmanager
def _store(ctx: typer.Context) -> Iterator[TLSPolicyStore]:
    try:
        yield TLSPolicyStore(context(ctx).db)
    except TLSPolicyError as e:
        raise UserError(str(e)) from None
    except SQLAlchemyError as e:
        hint = " (run 'pochta db upgrade')" if "no such table" in str(e) or \
            "does not exist" in str(e) else ""
        raise UserError(f"database error: {str(e).splitlines()[0]}{hint}") from None


@tls_policy_app.command("add")
def tls_policy_add(ctx: typer.Context, domain: str,
                   level: str = typer.Argument(..., help=", ".join(POLICIES))) -> None:
    """Require LEVEL of TLS for mail to DOMAIN (replaces its earlier policy)."""
    with _store(ctx) as store:
        name = store.add(domain, level)
    typer.echo(f"TLS policy for {name}: {level} ({LEVELS[level]})")


@tls_policy_app.command("remove")
def tls_policy_remove(ctx: typer.Context, domain: str) -> None:
    """Let MTA-STS, DANE or opportunistic TLS decide for DOMAIN again."""
    with _store(ctx) as store:
        store.remove(domain)
    typer.echo(f"removed the TLS policy for {domain}")


@tls_policy_app.command("list")
def tls_policy_list(ctx: typer.Context) -> None:
    with _store(ctx) as store:
        rows = store.all()
    table(["DOMAIN", "POLICY", "MEANING"], [[d, p, LEVELS[p]] for d, p in rows])


