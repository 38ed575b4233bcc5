"""`pochta tls-policy`: the administrator's TLS policy per destination domain (Postfix's
smtp_tls_policy_maps), over what MTA-STS and DANE would decide (mta/tlspolicy.py)."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

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




def _messages(path: Path, fmt: str) -> Iterator[bytes]:
    """The messages of a mailbox, read-only: maildir's new/ and cur/, or an mbox file."""
    if fmt == "mbox":
        import mailbox

        if path.is_file():
            for msg in mailbox.mbox(str(path), create=False):
                yield msg.as_bytes()
        return
    for sub in ("new", "cur"):
        folder = path / sub
        if folder.is_dir():
            for f in sorted(folder.iterdir()):
                with contextlib.suppress(OSError):
                    yield f.read_bytes()


def tls_reports(
    ctx: typer.Context,
    address: list[str] = typer.Option([], "--address", metavar="ADDRESS",
                                      help="Where reports arrive (default: postmaster of each "
                                           "of our domains, as `pochta dns` publishes)."),
    as_json: bool = typer.Option(False, "--json", help="The reports, as JSON."),
) -> None:
    """TLS reports (RFC 8460) others sent us: which senders failed to reach us over TLS, and
    why."""
    from mda.paths import mailbox_path
    from mta.tlsrpt import read_report

    c = context(ctx)
    cfg = c.config
    targets = address or [f"postmaster@{d}" for d, _, _ in c.directory.list_domains()]
    mailboxes: list[str] = []
    for a in targets:
        mailboxes += [m for m in c.directory.resolve(a) if c.directory.mailbox_exists(m)]
    reports = []
    for m in dict.fromkeys(mailboxes):
        for data in _messages(mailbox_path(cfg.mda.mailbox_root, m), cfg.mda.format):
            if b"tlsrpt" not in data.lower():
                continue
            report = read_report(data)
            if report is not None:
                reports.append(report)
    if as_json:
        typer.echo(json.dumps({"reports": reports}, indent=2))
        return
    rows = []
    for r in reports:
        start = str(r.get("date-range", {}).get("start-datetime", "?"))[:10]
        for p in r.get("policies", []) if isinstance(r.get("policies"), list) else []:
            pol, summary = p.get("policy", {}), p.get("summary", {})
            failures = ", ".join(
                f"{d.get('result-type', '?')}"
                + (f"@{d['receiving-mx-hostname']}" if d.get("receiving-mx-hostname") else "")
                + f" x{d.get('failed-session-count', '?')}"
                for d in p.get("failure-details", []) if isinstance(d, dict))
            rows.append([start, str(r.get("organization-name", "?"))[:40],
                         str(pol.get("policy-domain", "?")), str(pol.get("policy-type", "?")),
                         str(summary.get("total-successful-session-count", 0)),
                         str(summary.get("total-failure-session-count", 0)), failures or "-"])
    if not rows:
        typer.echo(f"no TLS reports in the mailboxes of {', '.join(targets) or '(none)'}")
        return
    table(["DAY", "FROM", "DOMAIN", "POLICY", "OK", "FAILED", "FAILURES"], sorted(rows))
