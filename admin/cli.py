"""The ``pochta`` command: thin Typer verbs over store/, mta/ and mda/.

No logic lives here beyond argument handling and printing. Every user mistake surfaces as one
line on stderr and a non-zero exit status, never a traceback.
"""

from __future__ import annotations

import getpass
import sys

import typer

from admin import (
    backup,
    dnscheck,
    dovecot,
    logs,
    queue_cmds,
    runfiles,
    serve,
    sieve_cmds,
    status,
    tls_cmds,
    units,
)
from admin.context import Context, UserError, context, table
from store.config import ConfigError, parse_host_port
from store.directory import DirectoryError, DirectoryUnavailable

app = typer.Typer(
    name="pochta",
    help="pochta: SMTP MTA, submission MSA and LMTP MDA for a self-hosted domain.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
db_app = typer.Typer(help="The directory database.", no_args_is_help=True)
domain_app = typer.Typer(help="Domains we receive mail for.", no_args_is_help=True)
user_app = typer.Typer(help="Mailbox users.", no_args_is_help=True)
alias_app = typer.Typer(help="Aliases; '@domain' is the catch-all.", no_args_is_help=True)
relay_recipient_app = typer.Typer(
    help="Recipients a relay domain accepts (none listed: all).", no_args_is_help=True)
log_app = typer.Typer(help="The log.", no_args_is_help=True)
log_app.command("summary")(logs.summary)
app.add_typer(db_app, name="db")
app.add_typer(log_app, name="log")
app.add_typer(domain_app, name="domain")
app.add_typer(user_app, name="user")
app.add_typer(alias_app, name="alias")
app.add_typer(queue_cmds.queue_app, name="queue")
app.add_typer(relay_recipient_app, name="relay-recipient")
app.add_typer(tls_cmds.tls_policy_app, name="tls-policy")
app.add_typer(sieve_cmds.sieve_app, name="sieve")
app.command("serve")(serve.serve)
app.command("up")(serve.up)
app.command("dovecot-config")(dovecot.dovecot_config)
app.command("systemd-units")(units.systemd_units)
app.command("status")(status.status)
app.command("reload")(runfiles.reload)
app.command("export")(backup.export)
app.command("dns")(dnscheck.dns_records)
app.command("check")(dnscheck.check)
app.command("import")(backup.import_)
app.command("tls-reports")(tls_cmds.tls_reports)


@app.callback()
def _root(
    ctx: typer.Context,
    config: str | None = typer.Option(
        None, "--config", "-c", envvar="POCHTA_CONFIG", help="TOML config file."),
) -> None:
    ctx.obj = Context(config)
    ctx.call_on_close(ctx.obj.close)


def read_password(from_stdin: bool) -> str:
    if from_stdin:
        data = sys.stdin.read()
        if data.endswith("\r\n"):
            data = data[:-2]
        elif data.endswith("\n"):
            data = data[:-1]
        return data
    if not sys.stdin.isatty():
        raise UserError("no terminal to ask for the password: use --password-stdin")
    first = getpass.getpass("Password: ")
    if getpass.getpass("Again: ") != first:
        raise UserError("the passwords differ")
    return first


# --- db ------------------------------------------------------------------------------------


@db_app.command("upgrade")
def db_upgrade(ctx: typer.Context) -> None:
    """Create the database if new and migrate it to the newest schema."""
    from store.migrate import current_revision, upgrade_to_head

    c = context(ctx)
    upgrade_to_head(c.config.database_url)
    typer.echo(f"database at revision {current_revision(c.config.database_url)}")


# --- domain --------------------------------------------------------------------------------


@domain_app.command("add")
def domain_add(
    ctx: typer.Context, domain: str,
    relay: bool = typer.Option(False, "--relay",
                               help="A domain we are backup MX for: queue its mail, pass it on."),
    to: str = typer.Option("", "--to", metavar="HOST[:PORT]",
                           help="With --relay: pass its mail to this host, not to its MX hosts."),
    hold: bool = typer.Option(False, "--hold",
                              help="With --relay: keep its mail until released (ETRN, "
                                   "pochta queue flush --domain)."),
    odmr_user: str = typer.Option("", "--odmr-user", metavar="ADDRESS",
                                  help="With --relay: keep its mail for this user, who takes "
                                       "it with ATRN on the [odmr] listener (RFC 2645)."),
) -> None:
    """Receive mail for DOMAIN (with --relay: as its backup MX)."""
    directory = context(ctx).directory
    if not relay:
        if to or hold or odmr_user:
            raise UserError("--to, --hold and --odmr-user are for a relay domain: add --relay")
        typer.echo(f"added domain {directory.add_domain(domain)}")
        return
    if to:
        try:
            parse_host_port(to)
        except ValueError as e:
            raise UserError(f"--to: {e}") from None
    if odmr_user and to:
        raise UserError("--to and --odmr-user exclude each other: an ODMR domain's mail "
                        "waits for its user's ATRN")
    name = directory.add_relay_domain(domain, to=to, hold=hold, odmr_user=odmr_user)
    if odmr_user:
        typer.echo(f"added relay domain {name}, held for {odmr_user} (ATRN)")
        return
    typer.echo(f"added relay domain {name}"
               + (f", passed on to {to}" if to else ", passed on to its better MX hosts")
               + (", held until released" if hold else ""))


@domain_app.command("list")
def domain_list(ctx: typer.Context) -> None:
    directory = context(ctx).directory
    rows = [[d, str(u), str(a), "local", "-"] for d, u, a in directory.list_domains()]
    for r in directory.list_relay_domains():
        route = (f"odmr:{r.odmr_user}" if r.odmr_user else (r.to or "mx")) + \
            (" hold" if r.hold else "") + (" listed-recipients" if r.restricted else "")
        rows.append([r.domain, "-", "-", "relay", route])
    table(["DOMAIN", "USERS", "ALIASES", "KIND", "ROUTE"], sorted(rows))


@domain_app.command("remove")
def domain_remove(
    ctx: typer.Context, domain: str,
    force: bool = typer.Option(False, "--force", help="Also remove its users and aliases."),
) -> None:
    context(ctx).directory.remove_domain(domain, force=force)
    typer.echo(f"removed domain {domain}")


# --- relay-recipient -----------------------------------------------------------------------


@relay_recipient_app.command("add")
def relay_recipient_add(ctx: typer.Context, address: str) -> None:
    """Accept mail for ADDRESS of a relay domain; once one is listed, only listed ones are."""
    typer.echo(f"added relay recipient {context(ctx).directory.add_relay_recipient(address)}")


@relay_recipient_app.command("remove")
def relay_recipient_remove(ctx: typer.Context, address: str) -> None:
    context(ctx).directory.remove_relay_recipient(address)
    typer.echo(f"removed relay recipient {address}")


@relay_recipient_app.command("list")
def relay_recipient_list(ctx: typer.Context,
                         domain: str | None = typer.Argument(None)) -> None:
    for address in context(ctx).directory.list_relay_recipients(domain):
        typer.echo(address)


# --- user ----------------------------------------------------------------------------------


@user_app.command("add")
def user_add(
    ctx: typer.Context, address: str,
    password_stdin: bool = typer.Option(False, "--password-stdin",
                                        help="Read the password from standard input."),
    quota: int | None = typer.Option(None, "--quota", help="Mailbox quota in bytes."),
) -> None:
    """Create the mailbox ADDRESS (its domain must exist)."""
    password = read_password(password_stdin)
    typer.echo(f"added user {context(ctx).directory.add_user(address, password, quota)}")


@user_app.command("passwd")
def user_passwd(
    ctx: typer.Context, address: str,
    password_stdin: bool = typer.Option(False, "--password-stdin"),
) -> None:
    password = read_password(password_stdin)
    typer.echo(f"changed password of {context(ctx).directory.set_password(address, password)}")


@user_app.command("list")
def user_list(ctx: typer.Context, domain: str | None = typer.Argument(None)) -> None:
    users = context(ctx).directory.list_users(domain)
    table(["ADDRESS", "ENABLED", "QUOTA", "CREATED"],
          [[u.address, "yes" if u.enabled else "no",
            str(u.quota_bytes) if u.quota_bytes else "-",
            u.created.strftime("%Y-%m-%d %H:%M")] for u in users])


@user_app.command("remove")
def user_remove(ctx: typer.Context, address: str) -> None:
    context(ctx).directory.remove_user(address)
    typer.echo(f"removed user {address}")


# --- alias ---------------------------------------------------------------------------------


@alias_app.command("add")
def alias_add(ctx: typer.Context, alias: str, targets: list[str]) -> None:
    """Deliver mail for ALIAS (or '@domain', the catch-all) to each TARGET."""
    src, tgts = context(ctx).directory.add_alias(alias, targets)
    typer.echo(f"added alias {src} -> {', '.join(tgts)}")


@alias_app.command("list")
def alias_list(ctx: typer.Context) -> None:
    rows = context(ctx).directory.list_aliases()
    table(["ALIAS", "TARGETS"], [[src, ", ".join(t)] for src, t in rows])


@alias_app.command("remove")
def alias_remove(ctx: typer.Context, alias: str,
                 target: str | None = typer.Argument(None)) -> None:
    context(ctx).directory.remove_alias(alias, target)
    typer.echo(f"removed alias {alias}" + (f" -> {target}" if target else ""))


# --- entry point ---------------------------------------------------------------------------

def main() -> None:
    try:
        app()
    except (ConfigError, DirectoryError, UserError) as e:
        typer.echo(f"pochta: {e}", err=True)
        sys.exit(1)
    except DirectoryUnavailable as e:
        hint = " (run 'pochta db upgrade')" if "no such table" in str(e) \
            or "does not exist" in str(e) else ""
        typer.echo(f"pochta: database error: {e}{hint}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)


# --- dkim / dns ----------------------------------------------------------------------------

dkim_app = typer.Typer(help="DKIM signing keys.", no_args_is_help=True)
app.add_typer(dkim_app, name="dkim")


@dkim_app.command("keygen")
def dkim_keygen(
    ctx: typer.Context, domain: str,
    selector: str | None = typer.Option(None, "--selector", "-s",
                                        help="Selector (default: pYYYYMM)."),
    algorithm: str = typer.Option("rsa", "--algorithm", help="rsa (2048 bits) or ed25519."),
) -> None:
    """Make a signing key for DOMAIN, switch signing to it, print its DNS record."""
    from pathlib import Path

    from mta import dkimsign
    from store.addresses import ascii_domain

    c = context(ctx)
    name = c.directory.domain_arg(domain)
    if not c.directory.is_local_domain(name):
        raise UserError(f"domain {name} is not a domain of ours (pochta domain add {name})")
    sel = selector or dkimsign.default_selector()
    try:
        record = dkimsign.generate(Path(c.config.dkim.keys_dir), name, sel, algorithm)
    except dkimsign.DKIMError as e:
        raise UserError(str(e)) from None
    typer.echo(f"{sel}._domainkey.{ascii_domain(name)}. IN TXT {dnscheck.split_txt(record)}")
