"""`pochta queue list|show|flush|delete`: the spool as the admin sees it.

These read the same files the MTA's queue runner writes. ``delete`` takes the item's lock, so
it never races an attempt in progress; ``flush`` is a notice to the runner (mta/notice.py).
"""

from __future__ import annotations

import time
from datetime import UTC, datetime

import typer

from admin.context import UserError, context, table
from mta.notice import DOMAIN, NoRunner, send_command
from mta.spool import DAMAGED_DIR, Spool, SpoolError

queue_app = typer.Typer(help="The mail queue (spool).", no_args_is_help=True)


def _spool(ctx: typer.Context) -> Spool:
    return Spool(context(ctx).config.spool_dir)


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S")


def _valid_id(qid: str) -> str:
    if not qid.isalnum():
        raise UserError(f"{qid!r} is not a queue id")
    return qid


@queue_app.command("list")
def queue_list(ctx: typer.Context) -> None:
    """Messages waiting in the queue, with their pending recipients."""
    spool = _spool(ctx)
    rows = []
    for qid in spool.ids():
        try:
            env = spool.load(qid)
        except (OSError, SpoolError):
            continue  # delivered meanwhile, or damaged: the runner puts it aside
        pending = env.pending
        nxt = min((r.next_attempt for r in pending), default=0.0)
        due = "now" if nxt <= time.time() else _when(nxt)
        rows.append([qid, _when(env.created), str(env.size), f"<{env.mail_from}>",
                     ", ".join(r.address for r in pending) or "-", due,
                     (pending[0].last_reply[:60] if pending else "")])
    damaged = spool.damaged()
    for qid, size in damaged:
        rows.append([qid, "-", str(size), "-", "-", "-",
                     f"DAMAGED: unreadable, kept in {spool.dir / DAMAGED_DIR}"])
    table(["ID", "ARRIVED", "SIZE", "FROM", "PENDING", "NEXT", "LAST REPLY"], rows)
    typer.echo(f"{len(rows) - len(damaged)} message(s) in the queue"
               + (f", {len(damaged)} damaged (see the log)" if damaged else ""))


@queue_app.command("show")
def queue_show(ctx: typer.Context, qid: str) -> None:
    """The envelope of one message, every recipient with its state and last reply."""
    spool = _spool(ctx)
    try:
        env = spool.load(_valid_id(qid))
    except FileNotFoundError:
        raise UserError(f"no message {qid} in the queue") from None
    except (OSError, ValueError, SpoolError) as e:
        raise UserError(f"message {qid}: unreadable envelope: {e}") from None
    typer.echo(f"id:       {env.id}\narrived:  {_when(env.created)}\nfrom:     <{env.mail_from}>\n"
               f"size:     {env.size}\nclient:   {env.client.get('ip') or '-'} "
               f"({env.client.get('protocol', '')})")
    table(["RECIPIENT", "ORIGINAL", "STATUS", "ATTEMPTS", "NEXT", "LAST REPLY"],
          [[r.address, r.original, r.status, str(r.attempts),
            _when(r.next_attempt) if r.status == "pending" else "-", r.last_reply]
           for r in env.recipients])


@queue_app.command("flush")
def queue_flush(ctx: typer.Context,
                domain: str = typer.Option("", help="only the recipients at this domain")) -> None:
    """Make every deferred message (or those to one domain) due now."""
    domain = domain.strip().lower().rstrip(".")
    if domain and not DOMAIN.fullmatch(domain):
        raise UserError(f"not a domain name: {domain!r}")
    try:
        send_command(_spool(ctx).dir, f"!flush {domain}".strip())
    except NoRunner as e:
        raise UserError(f"{e}: start it (pochta up) and flush again") from None
    what = f" to {domain}" if domain else ""
    typer.echo(f"flush requested: the queue runner retries every deferred message{what} now")


@queue_app.command("delete")
def queue_delete(ctx: typer.Context, qid: str) -> None:
    """Remove a message from the queue without delivering it further (no bounce)."""
    spool = _spool(ctx)
    _valid_id(qid)
    try:
        with spool.locked(qid) as present:
            if not present:
                raise UserError(f"no message {qid} in the queue")
            spool.remove(qid)
    except SpoolError as e:
        raise UserError(str(e)) from None
    typer.echo(f"deleted {qid}")
