"""`pochta queue list|show|flush|delete`: the spool as the admin sees it.

These read the same files the MTA's queue runner writes. ``delete`` takes the item's lock, so
it never races an attempt in progress; ``flush`` is a notice to the runner (mta/notice.py).
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime

import typer

from admin.context import UserError, context, table
from mta.envelope import Envelope
from mta.notice import DOMAIN, NoRunner, send_command
from mta.spool import DAMAGED_DIR, Spool, SpoolError
from store import addresses

queue_app = typer.Typer(help="The mail queue (spool).", no_args_is_help=True)


def _spool(ctx: typer.Context) -> Spool:
    return Spool(context(ctx).config.spool_dir)


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S")


def _valid_id(qid: str) -> str:
    if not qid.isalnum():
        raise UserError(f"{qid!r} is not a queue id")
    return qid


STATES = ("new", "deferred", "held", "damaged")


def _matches(env: Envelope, domain: str, older_than: float | None, state: str,
             now: float) -> bool:
    if domain and not any(addresses.domain_of(r.address) == domain for r in env.pending):
        return False
    if older_than is not None and now - env.created < older_than:
        return False
    return not state or env.state == state


def _as_json(env: Envelope) -> dict[str, object]:
    return {"id": env.id, "arrived": _when(env.created), "arrived_unix": env.created,
            "size": env.size, "from": env.mail_from, "state": env.state,
            "recipients": [{"address": r.address, "original": r.original, "status": r.status,
                            "attempts": r.attempts,
                            "next_attempt": _when(r.next_attempt) if r.status == "pending"
                            else None,
                            "last_reply": r.last_reply, "last_relay": r.last_relay}
                           for r in env.recipients]}


DEFAULT_PAGE = 100  # table rows `queue list` shows unless told --limit


@queue_app.command("list")
def queue_list(
    ctx: typer.Context,
    as_json: bool = typer.Option(False, "--json", help="One JSON document on stdout."),
    domain: str = typer.Option("", "--domain", help="Only messages with a pending recipient "
                                                    "at this domain."),
    older_than: float | None = typer.Option(None, "--older-than", metavar="SECONDS", min=0,
                                            help="Only messages queued longer than this."),
    state: str = typer.Option("", "--state", help="Only messages in this state: "
                                                  + ", ".join(STATES) + "."),
    limit: int | None = typer.Option(None, "--limit", metavar="N", min=0,
                                     help="At most N messages, oldest first (default: 100 "
                                          "in the table, all with --json; 0: all)."),
    after: str = typer.Option("", "--after", metavar="ID",
                              help="Only messages queued after this one (the next page)."),
) -> None:
    """Messages waiting in the queue, with their pending recipients, oldest first."""
    state = state.strip().lower()
    if state and state not in STATES:
        raise UserError(f"--state: expected one of {', '.join(STATES)}, got {state!r}")
    if after:
        _valid_id(after)
    domain = domain.strip().lower().rstrip(".")
    spool = _spool(ctx)
    now = time.time()
    # Ids sort by arrival: a page reads only the envelopes it shows (a queue of 100,000 is
    # not loaded, nor drawn as a table, to show its first lines).
    ids = [q for q in spool.ids() if q > after] if after else spool.ids()
    most = (0 if as_json else DEFAULT_PAGE) if limit is None else limit
    envelopes: list[Envelope] = []
    more = False
    for qid in ids:
        if most and len(envelopes) == most:
            more = True
            break
        try:
            env = spool.load(qid)
        except (OSError, SpoolError):
            continue  # delivered meanwhile, or damaged: the runner puts it aside
        if _matches(env, domain, older_than, state, now):
            envelopes.append(env)
    damaged = [] if (domain or older_than is not None or state not in ("", "damaged")) \
        else spool.damaged()
    if state == "damaged":
        envelopes = []
    if as_json:
        typer.echo(json.dumps({
            "messages": [_as_json(e) for e in envelopes],
            **({"next_after": envelopes[-1].id} if more else {}),
            "damaged": [{"id": qid, "size": size, "state": "damaged",
                         "kept_in": str(spool.dir / DAMAGED_DIR)} for qid, size in damaged]},
            ensure_ascii=False, indent=2))
        return
    rows = []
    for env in envelopes:
        pending = env.pending
        nxt = min((r.next_attempt for r in pending), default=0.0)
        due = "now" if nxt <= now else _when(nxt)
        rows.append([env.id, _when(env.created), str(env.size), f"<{env.mail_from}>",
                     ", ".join(r.address for r in pending) or "-", due,
                     (pending[0].last_reply[:60] if pending else "")])
    for qid, size in damaged:
        rows.append([qid, "-", str(size), "-", "-", "-",
                     f"DAMAGED: unreadable, kept in {spool.dir / DAMAGED_DIR}"])
    table(["ID", "ARRIVED", "SIZE", "FROM", "PENDING", "NEXT", "LAST REPLY"], rows)
    filtered = bool(domain or older_than is not None or state or after)
    if more:
        typer.echo(f"the oldest {len(envelopes)} of "
                   + (f"{len(ids)} message(s) in the queue" if not filtered
                      else "the matching messages")
                   + f"; next page: --after {envelopes[-1].id} (--limit 0: all)")
    else:
        typer.echo(f"{len(envelopes)} message(s) in the queue"
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


def _target(qid: str | None, every: bool) -> str:
    if every == (qid is not None):
        raise UserError("name one message ID or --all")
    return "*" if every else _valid_id(qid or "")


def _hold_offline(spool: Spool, target: str, held: bool) -> int:
    """No runner: set the flag in the envelopes themselves (under each item's lock)."""
    count = 0
    for qid in spool.ids() if target == "*" else [target]:
        try:
            env = spool.load(qid)
        except FileNotFoundError:
            if target != "*":
                raise UserError(f"no message {qid} in the queue") from None
            continue
        except (OSError, SpoolError) as e:
            raise UserError(f"message {qid}: {e}") from None
        env.held = held
        try:
            count += spool.save(env)
        except SpoolError as e:
            raise UserError(str(e)) from None
    return count


def _hold_or_release(ctx: typer.Context, qid: str | None, every: bool, held: bool) -> None:
    spool = _spool(ctx)
    target = _target(qid, every)
    if target != "*" and not spool.committed(target):
        raise UserError(f"no message {target} in the queue")
    verb = "hold" if held else "release"
    try:
        send_command(spool.dir, f"!{verb} {target}")
    except NoRunner:
        _hold_offline(spool, target, held)
    what = "every message" if target == "*" else target
    typer.echo(f"{'held' if held else 'released'} {what}")


@queue_app.command("hold")
def queue_hold(ctx: typer.Context, qid: str | None = typer.Argument(None),
               every: bool = typer.Option(False, "--all", help="Every queued message.")) -> None:
    """Keep a message (or all) queued, not attempted, until released."""
    _hold_or_release(ctx, qid, every, True)


@queue_app.command("release")
def queue_release(ctx: typer.Context, qid: str | None = typer.Argument(None),
                  every: bool = typer.Option(False, "--all", help="Every held message.")) -> None:
    """Release a held message (or all): it is tried now."""
    _hold_or_release(ctx, qid, every, False)


@queue_app.command("bounce")
def queue_bounce(ctx: typer.Context, qid: str) -> None:
    """Return a message to its sender now (a DSN for every pending recipient)."""
    spool = _spool(ctx)
    _valid_id(qid)
    if not spool.committed(qid):
        raise UserError(f"no message {qid} in the queue")
    try:
        send_command(spool.dir, f"!bounce {qid}")
    except NoRunner as e:
        raise UserError(f"{e}: start it (pochta up) and bounce again") from None
    typer.echo(f"bouncing {qid}: its sender gets a report for every pending recipient")


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
