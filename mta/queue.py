"""The queue runner: its own process (``pochta serve queue``, started by ``serve mta``) that
empties the spool, on the second core while the MTA's loop only accepts mail.

It loads every committed message at start (crash recovery), then sleeps until the earliest
``next_attempt`` or a notice on its one wake-up channel (mta/notice.py: ids of new messages
from the MTA and the MSA, a flush from the CLI). For each due message it
delivers the pending recipients: ours to the MDA over LMTP in one transaction, foreign ones
through ``Outbound`` (MX or smarthost). Each outcome is recorded in the
envelope file before the next attempt: 2xx sent, 5xx failed, 4xx retried with backoff until
``max_queue_lifetime``. A message leaves the spool when every recipient is final; failed and
expired recipients then get one DSN (``mta/dsn.py``) unless the sender is ``<>``.

Acceptance never waits for this: sessions only write the spool and send a notice.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import heapq
import logging
import math
import socket
import sys
import time
from collections import Counter, OrderedDict, defaultdict, deque
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from mta import outbox, policy
from mta.courier import Courier
from mta.courier.odmr import TurnedConnection
from mta.courier.remote import Outbound
from mta.dkimsign import Signer
from mta.dsn import Bouncer, wants
from mta.envelope import EXPIRED, FAILED, HELD, SENT, Envelope, Recipient, new_id
from mta.forwarding import Srs
from mta.notice import AtrnRequest, Notice, NoticeSocket
from mta.reply import LOCAL_DECISION, Reply
from mta.spool import Spool, SpooledMessage, SpoolError
from mta.tlsrpt import CHECK_EVERY, Reporter
from store import addresses, metrics
from store.config import Config
from store.directory import Directory, DirectoryUnavailable, lookup

log = logging.getLogger("pochta.queue")

TICKS_PER_SECOND = 10  # the timers' resolution
HEARTBEAT_INTERVAL = 5.0  # seconds between heartbeats (and, at most, gauge updates)
GAUGE_SHARE = 0.02  # the queue gauges walk every envelope: at most this share of the time

class QueueRunner:
    """The scheduler: which message is attempted when, and how many at once.

    At most ``concurrency`` attempts run at once, and at most ``per_destination`` of them
    deliver to one remote domain. A message whose due recipients all go to remote domains
    that are at their limit waits without an attempt slot (``waiting``), and is taken again
    when one of those deliveries ends: a slow or tarpitting destination holds its own slots
    only, never local delivery or other domains. 100 attempts, as Postfix's process limit: an
    attempt is a coroutine waiting on a distant host most of its time (the local courier
    has its own, lower, limit).
    """

    def __init__(self, cfg: Config, spool: Spool, directory: Directory, local: Courier,
                 remote: Courier, bouncer: Bouncer, concurrency: int = 100,
                 per_destination: int = 4, clock: Callable[[], float] = time.time) -> None:
        self.cfg = cfg
        self.spool = spool
        self.directory = directory
        self.local = local
        self.remote = remote
        self.bouncer = bouncer
        self.clock = clock
        self.items: dict[str, Envelope] = {}
        # What to try when: ids due now, in arrival order. Entries may be stale (an id twice,
        # an old time); each is checked against its envelope when taken.
        self.ready: deque[str] = deque()
        # Later ones by tick (a tenth of a second, rounded up: never early), a heap of the
        # ticks beside: a queue of 100,000 for a dead MX waits in a few hundred lists, not
        # 100,000 (time, id) tuples of 100 bytes each.
        self.timers: dict[int, list[str]] = {}
        self.ticks: list[int] = []
        self.busy: set[str] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.wake = asyncio.Event()
        self.concurrency = concurrency
        self.fresh: set[str] = set()  # just written: in the page cache, read without a thread
        self.notices: NoticeSocket | None = None
        self.commands: deque[Notice] = deque()  # flush and rescan requests, in order
        # (id, recipient) of held relay domains released by a flush or ETRN, until attempted
        self.released: set[tuple[str, str]] = set()
        self.bouncing: set[str] = set()  # ids the admin bounced: failed at their next attempt
        self.per_destination = per_destination
        self.in_flight: Counter[str] = Counter()  # remote domain -> attempts delivering there
        self.waiting: defaultdict[str, deque[str]] = defaultdict(deque)  # domain -> ids
        self.parked: dict[str, str] = {}  # id -> the full domain it waits for
        self.local_domains: set[str] = set()  # learnt from routing: no destination limit
        self.atrn_domains: set[str] = set()  # taken by an ODMR customer now (one at a time)
        self.reporter: Reporter | None = None  # TLS-RPT reports (mta/tlsrpt.py), daily
        self.srs: Srs | None = None  # forwarded copies' envelope sender (mta/forwarding.py)
        self.signer: Signer | None = None  # DKIM for the MDA's vacation replies
        self.heard: set[int] = set()  # uids besides ours whose notices count (the MDA's)
        self.outbox_keys: OrderedDict[str, str] = OrderedDict()  # key -> queue id (outbox.py)

    def add(self, env: Envelope, maybe_sent: bool = False) -> None:
        """A message this process just spooled (a DSN): deliver it now. ``maybe_sent``: it
        may have been delivered before a crash (see Bouncer.notify)."""
        self.items[env.id] = env
        self.fresh.add(env.id)
        if maybe_sent:
            env.recovered = True
        self.ready.append(env.id)
        self.wake.set()

    def _schedule(self, env: Envelope) -> None:
        """Queue ``env`` for its next attempt: now, or when its first pending recipient is due
        (a parked one's recipients for its full destination wait for that to have room)."""
        if env.held:
            return  # until released
        parked = self.parked.get(env.id)
        if parked is None:
            due = env.due
        else:
            times = [r.next_attempt for r in env.pending
                     if addresses.domain_of(r.address) != parked]
            due = min(times) if times else None
        if due is None:
            return
        if due <= self.clock():
            self.ready.append(env.id)
        else:
            self._at(due, env.id)

    def _release_due(self, now: float) -> None:
        """What the timers hold for ``now`` or before goes to ``ready``."""
        while self.ticks and self.ticks[0] <= now * TICKS_PER_SECOND:
            self.ready.extend(self.timers.pop(heapq.heappop(self.ticks)))

    def _at(self, due: float, qid: str) -> None:
        tick = math.ceil(due * TICKS_PER_SECOND)
        ids = self.timers.get(tick)
        if ids is None:
            ids = self.timers[tick] = []
            heapq.heappush(self.ticks, tick)
        ids.append(qid)

    async def listen(self, wait: float = 30.0) -> None:
        """Take notices (mta/notice.py); waits while an older runner of this spool exits."""
        notices = NoticeSocket(self.spool.dir, self.heard)
        deadline = time.monotonic() + wait
        while not notices.bind():
            if time.monotonic() > deadline:
                raise OSError(f"another queue runner holds the notice socket of {self.spool.dir}")
            await asyncio.sleep(0.2)
        self.notices = notices
        asyncio.get_running_loop().add_reader(notices.fileno(), self._on_notices)

    def _on_notices(self) -> None:
        assert self.notices is not None
        for notice in self.notices.receive():
            for qid in notice.ids:
                if qid in self.items:
                    continue
                try:
                    # Inline: the file was written a moment ago and is in the page cache.
                    self.items[qid] = self.spool.load(qid, fresh=True)
                except FileNotFoundError:
                    continue  # deleted already
                except (OSError, SpoolError) as e:
                    self.spool.quarantine(qid, e)
                    continue
                self.fresh.add(qid)
                self.ready.append(qid)
            if notice.atrn is not None and notice.channel is not None:
                self._spawn(self._atrn(notice.atrn, notice.channel))
            if notice.outbox and notice.channel is not None:
                self._spawn(self._outbox(notice.channel))
            if notice.rescan or notice.flush or notice.admin:
                self.commands.append(notice)
        self.wake.set()

    async def recover(self) -> None:
        """Load what the spool holds (crash recovery); before the listeners open."""
        for env in await asyncio.to_thread(self.spool.recover):
            if env.id not in self.items:  # a notice may have brought it in already
                self.items[env.id] = env
                env.recovered = True
                self._schedule(env)
        if self.items:
            log.info("recovered %d message(s) from the spool", len(self.items))

    async def run(self, stop: asyncio.Event) -> None:
        next_gc = time.monotonic() + 3600.0
        next_beat = next_gauges = 0.0
        stopping = asyncio.create_task(stop.wait())
        stopping.add_done_callback(lambda _: self.wake.set())
        while not stop.is_set():
            while self.commands:
                await self._command(self.commands.popleft())
            if time.monotonic() >= next_gc:  # leftovers of a crash that came after start-up
                next_gc = time.monotonic() + 3600.0
                await asyncio.to_thread(self.spool.collect_garbage)
                await self._rescan()  # a safety net: nothing stays unknown for long
            if time.monotonic() >= next_beat:
                next_beat = time.monotonic() + HEARTBEAT_INTERVAL
                if next_beat >= next_gauges:
                    # A walk of 100,000 envelopes takes a fraction of a second: with a big
                    # queue the gauges are refreshed less often, the heartbeat never.
                    started = time.monotonic()
                    self._gauges()
                    spent = time.monotonic() - started
                    next_gauges = started + max(HEARTBEAT_INTERVAL, spent / GAUGE_SHARE)
                self._heartbeat()
            if self.reporter is not None and time.monotonic() >= self.reporter.next_check:
                self.reporter.next_check = time.monotonic() + CHECK_EVERY
                self._spawn(self.reporter.run_once())
            now = self.clock()
            self._release_due(now)
            while self.ready and len(self.busy) < self.concurrency:
                qid = self.ready.popleft()
                env = self.items.get(qid)
                if env is None or qid in self.busy or qid in self.parked or env.held:
                    continue
                due = env.due
                if due is None:
                    continue
                if due > now:
                    self._at(due, qid)
                    continue
                destinations = self._take_destinations(env, now)
                if destinations is None:
                    continue  # parked: its destinations are all busy
                self.busy.add(qid)
                self._spawn(self._attempt(env, destinations))
            # A finished attempt, a notice or stop sets wake; else the earliest timer (capped:
            # the wall clock may be set back).
            wait = HEARTBEAT_INTERVAL if not self.ticks else min(
                HEARTBEAT_INTERVAL, self.ticks[0] / TICKS_PER_SECOND - now)
            try:
                await asyncio.wait_for(self.wake.wait(), max(0.0, wait))
            except TimeoutError:
                pass
            self.wake.clear()
        stopping.cancel()
        if self.notices is not None:
            asyncio.get_running_loop().remove_reader(self.notices.fileno())
            self.notices.close()
            self.notices = None
        if self.tasks:
            await asyncio.wait(self.tasks, timeout=10)
        await self.local.close()
        await self.remote.close()

    def _spawn(self, job: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(job)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _command(self, notice: Notice) -> None:
        # Only a sender that dropped ids asks for a rescan: whatever was committed while no
        # runner listened was found by this one's start-up scan.
        if notice.rescan:
            await self._rescan()
        if notice.admin:
            await self._admin(*notice.admin)
        if notice.flush:
            domain = notice.flush_domain
            log.info("flush: every deferred recipient%s is due now",
                     f" at {'*.' if notice.subdomains else ''}{domain}" if domain else "")
            now = self.clock()
            for env in self.items.values():
                touched = False
                for r in env.pending:
                    if flushes(addresses.domain_of(r.address), domain, notice.subdomains):
                        r.next_attempt = min(r.next_attempt, now)
                        self.released.add((env.id, r.address))
                        touched = True
                if touched:
                    self._schedule(env)

    async def _atrn(self, request: AtrnRequest, channel: socket.socket) -> None:
        """An ODMR customer's ATRN (RFC 2645; the MSA checked who may take which domain): its
        answer on ``channel``, then the domains' held messages delivered over it, oldest
        first. Messages under another attempt now wait for the next ATRN."""
        domains = set(request.domains)
        envs: list[Envelope] = []
        loop = asyncio.get_running_loop()
        try:
            if domains & self.atrn_domains or not isinstance(self.remote, Outbound):
                await loop.sock_sendall(channel, b"450 4.3.0 ATRN request refused: another "
                                                 b"session is taking that mail now\r\n")
                return
            envs = sorted((env for env in self.items.values()
                           if env.id not in self.busy and env.id not in self.parked
                           and not env.held and any(addresses.domain_of(r.address) in domains
                                                    for r in env.pending)),
                          key=lambda e: e.created)
            if not envs:
                await loop.sock_sendall(channel, b"453 4.0.0 You have no mail\r\n")
                return
            self.atrn_domains |= domains
            self.busy.update(env.id for env in envs)
            await loop.sock_sendall(channel, b"250 2.0.0 OK now reversing the connection\r\n")
            log.info("ATRN by %s from %s for %s: %d message(s)", request.login, request.client,
                     ",".join(sorted(domains)), len(envs))
            turned = TurnedConnection(self.remote, channel, request.client)
            try:
                if await turned.open():
                    for env in envs:
                        if turned.broken:
                            break  # the rest stays queued as it was
                        if env.id in self.items:
                            await self._deliver(env, set(), (domains, turned))
            finally:
                await turned.close()
        except OSError as e:
            log.info("ATRN by %s from %s: %s", request.login, request.client, e)
        finally:
            channel.close()
            self.atrn_domains -= domains
            for env in envs:
                self.busy.discard(env.id)
                if env.id in self.items:
                    self._schedule(env)
            self.wake.set()

    async def _outbox(self, channel: socket.socket) -> None:
        """A message the MDA made (mta/outbox.py): spooled, scheduled, its id answered."""
        loop = asyncio.get_running_loop()
        try:
            limit = max(self.cfg.mta.max_message_size, self.cfg.msa.max_message_size) + (1 << 20)
            try:
                out = await asyncio.wait_for(outbox.receive(channel, limit), 60)
            except (outbox.OutboxError, TimeoutError) as e:
                await loop.sock_sendall(channel, f"554 {e or 'time-out'}\n".encode())
                return
            qid = self.outbox_keys.get(out.key) if out.key else None
            if qid is None:
                qid = await self._spool_outgoing(out)
                if out.key:
                    self.outbox_keys[out.key] = qid
                    while len(self.outbox_keys) > 10_000:
                        self.outbox_keys.popitem(last=False)
            await loop.sock_sendall(channel, f"250 {qid}\n".encode())
        except (OSError, DirectoryUnavailable) as e:  # the MDA keeps the message instead
            log.error("outbox: cannot queue the MDA's message: %s", e)
            with contextlib.suppress(OSError):
                await loop.sock_sendall(channel, f"451 {e}\n".encode())
        finally:
            channel.close()

    async def _spool_outgoing(self, out: outbox.Outgoing) -> str:
        now = self.clock()
        data = out.message
        sender = out.mail_from
        if out.forwarded_by and self.srs is not None and sender and not await lookup(
                self.directory, "is_local_domain", addresses.domain_of(sender)):
            sender = self.srs.forward(sender, out.forwarded_by)
        if out.sign and self.signer is not None:
            data = await asyncio.to_thread(self.signer.sign, data, out.sign) + data
        env = Envelope(id=new_id(), created=now, mail_from=sender, size=len(data),
                       smtputf8=out.smtputf8, body="8BITMIME",
                       recipients=[Recipient(address=r, original=r, next_attempt=now,
                                             notify=out.notify) for r in out.recipients],
                       client={"protocol": out.kind, "ip": "", "helo": ""},
                       dsn={"ret": "HDRS", "envid": None})
        await asyncio.to_thread(self.spool.put, env, data)
        log.info("%s: queued from the MDA (%s) from=<%s> to=%s", env.id, out.kind, sender,
                 ",".join(f"<{r}>" for r in out.recipients))
        self.add(env)
        return env.id

    async def _admin(self, verb: str, target: str) -> None:
        """`pochta queue hold|release|bounce`: held messages are not attempted (the flag is in
        the envelope, so it outlives the runner); a bounced one fails every pending recipient
        at its next attempt, now, with the usual DSN."""
        envs = list(self.items.values()) if target == "*" else \
            [e for e in [self.items.get(target)] if e is not None]
        now = self.clock()
        for env in envs:
            env.held = verb == "hold"
            if verb == "bounce":
                self.bouncing.add(env.id)
            if verb != "hold":
                for r in env.pending:
                    r.next_attempt = min(r.next_attempt, now)
            if env.id not in self.busy:  # else the attempt under way records it
                try:
                    await asyncio.to_thread(self.spool.save, env)
                except (OSError, SpoolError) as e:
                    log.error("%s: cannot record %s: %s", env.id, verb, e)
                self._schedule(env)
            log.info("%s: %s by the administrator", env.id,
                     {"hold": "held", "release": "released", "bounce": "returned"}[verb])

    async def _rescan(self) -> None:
        """Load what the spool holds and this runner does not know."""
        for qid in await asyncio.to_thread(self.spool.ids):
            if qid not in self.items:
                try:
                    env = await asyncio.to_thread(self.spool.load, qid)
                except FileNotFoundError:
                    continue  # delivered or deleted since the listing
                except (OSError, SpoolError) as e:
                    await asyncio.to_thread(self.spool.quarantine, qid, e)
                    continue
                self.items[qid] = env
                env.recovered = True
                self._schedule(env)

    def _take_destinations(self, env: Envelope, now: float) -> tuple[set[str], set[str]] | None:
        """The destination domains this attempt delivers to, their slots taken, and those it
        must leave for later (at their limit); None if every due recipient's domain is full:
        the message is then parked on one of them, without an attempt slot. Every domain not
        known as ours counts, so that the first messages to a new domain do not all go
        before routing has said it is remote."""
        due = {addresses.domain_of(r.address) for r in env.pending if r.next_attempt <= now}
        limited = due - self.local_domains
        taken = {d for d in limited if self.in_flight[d] < self.per_destination}
        blocked = limited - taken
        if blocked and blocked == due:
            self._park(env.id, min(blocked))
            return None
        for d in taken:
            self.in_flight[d] += 1
        return taken, blocked

    def _park(self, qid: str, domain: str) -> None:
        self.parked[qid] = domain
        self.waiting[domain].append(qid)

    def _release(self, taken: set[str]) -> None:
        """The attempt's destination slots are free: messages waiting for them are due."""
        for d in taken:
            self.in_flight[d] -= 1
            if self.in_flight[d] <= 0:
                del self.in_flight[d]
            # A domain that routing found to be ours has no limit: all its waiters go.
            room = (len(self.waiting.get(d, ())) if d in self.local_domains
                    else self.per_destination - self.in_flight[d])
            queue = self.waiting.get(d)
            while queue and room > 0:
                qid = queue.popleft()
                if self.parked.get(qid) == d:  # else stale: taken, delivered or deleted
                    del self.parked[qid]
                    self.ready.append(qid)
                    room -= 1
            if queue is not None and not queue:
                del self.waiting[d]

    async def _attempt(self, env: Envelope, destinations: tuple[set[str], set[str]]) -> None:
        taken, blocked = destinations
        retry_soon = False
        try:
            retry_soon = not await self._deliver(env, blocked)
        except Exception:
            # A fault of ours outside any one delivery (each courier's faults are already
            # its recipients' 4xx): counted as a failed attempt, so the message still expires.
            log.exception("%s: delivery attempt failed", env.id)
            self._record(env, self._due(env, blocked), {})
        finally:
            self.busy.discard(env.id)
            self._release(taken)
            if env.id in self.items and not retry_soon:
                # Recipients left for a destination that is still full wait for its room.
                for d in sorted(blocked):
                    if (self.in_flight[d] >= self.per_destination
                            and any(addresses.domain_of(r.address) == d
                                    for r in self._due(env, set()))):
                        self._park(env.id, d)
                        break
            if env.id in self.items:
                if retry_soon:  # locked by the CLI for now
                    self._at(self.clock() + 1.0, env.id)
                else:
                    self._schedule(env)
            self.wake.set()

    def _due(self, env: Envelope, blocked: set[str]) -> list[Recipient]:
        """The pending recipients due now, but those for the ``blocked`` domains."""
        now = self.clock()
        return [r for r in env.pending if r.next_attempt <= now
                and (not blocked or addresses.domain_of(r.address) not in blocked)]

    async def _deliver(self, env: Envelope, blocked: set[str],
                       turned: tuple[set[str], Courier] | None = None) -> bool:
        """One attempt for the due recipients but those for ``blocked`` domains; False if the
        item was busy (try again soon). ``turned``: instead, the pending recipients of these
        ODMR domains, due or not, go to this customer's connection (ATRN)."""
        if env.id in self.fresh:
            # Just written, so in the page cache: a few syscalls, cheaper than a thread trip.
            self.fresh.discard(env.id)
            got = self.spool.checkout(env.id)
        else:
            got = await asyncio.to_thread(self.spool.checkout, env.id)
        if got is None:
            if not self.spool.committed(env.id):
                self.items.pop(env.id, None)  # deleted by `pochta queue delete`
                return True
            return False
        fd, data = got
        reported = False
        try:
            due = self._due(env, blocked) if turned is None else [
                r for r in env.pending if addresses.domain_of(r.address) in turned[0]]
            if turned is not None:
                results = await turned[1].deliver(env, due, data) if due else {}
            elif env.id in self.bouncing:
                self.bouncing.discard(env.id)
                results = {r.address: Reply(550, "5.0.0 returned to the sender by the "
                                                 "postmaster", LOCAL_DECISION) for r in due}
            else:
                results = await self._route_and_send(env, due, data) if due else {}
            delayed = self._record(env, due, results)
            if delayed:
                await self._report_delays(env, data, delayed)
            if env.finished:
                reported = await self._report(env, data)
        finally:
            if reported:
                self.spool.checkin(env, fd, True)  # two unlinks, no fsync: not worth a thread
            else:
                await asyncio.to_thread(self.spool.checkin, env, fd, False)
        if reported:
            self.items.pop(env.id, None)
        return True

    async def _report(self, env: Envelope, data: bytes | SpooledMessage) -> bool:
        """The sender's final report (DSN) spooled durably; False (and a retry time in the
        envelope) if it could not be: the message must not leave the queue before it."""
        try:
            await self.bouncer.bounce(env, data, env.recovered)
            return True
        except Exception as e:  # disk full, I/O error, the directory down, a bug
            log.error("%s: cannot queue the sender's report, keeping the message: %r", env.id, e)
            env.report_at = self.clock() + self.cfg.delivery.retry_initial
            return False

    async def _report_delays(self, env: Envelope, data: bytes | SpooledMessage,
                             delayed: list[Recipient]) -> None:
        try:
            await self.bouncer.notify(env, data, [(r, "delayed") for r in delayed],
                                      env.recovered)
        except Exception as e:
            log.error("%s: cannot queue the delay report (tried again later): %r", env.id, e)
            for r in delayed:
                r.delay_notified = False

    async def _route_and_send(self, env: Envelope, rcpts: list[Recipient], data: bytes | SpooledMessage
                              ) -> dict[str, Reply]:
        local: list[Recipient] = []
        remote: list[Recipient] = []
        results: dict[str, Reply] = {}
        released = {r.address for r in rcpts if (env.id, r.address) in self.released}
        self.released.difference_update((env.id, a) for a in released)
        try:
            for r in rcpts:
                domain = addresses.domain_of(r.address)
                ours = await lookup(self.directory, "is_local_domain", domain)
                if ours:
                    local.append(r)
                    if len(self.local_domains) >= 10_000:
                        self.local_domains.clear()
                    self.local_domains.add(domain)
                    continue
                route = await lookup(self.directory, "relay_route", domain)
                if route is not None and route.odmr_user:
                    results[r.address] = Reply(451, f"4.3.2 held for {domain} until "
                                                    f"{route.odmr_user} takes it (ATRN)", HELD)
                    continue
                if route is not None and route.hold and r.address not in released:
                    results[r.address] = Reply(451, f"4.3.2 held for {domain} until released "
                                                    "(ETRN)", HELD)
                    continue
                remote.append(r)
        except DirectoryUnavailable as e:
            return {r.address: Reply(451, f"4.3.0 directory unavailable: {e}") for r in rcpts}
        groups: list[tuple[list[Recipient], str, Awaitable[dict[str, Reply]]]] = []
        if local:
            retry = env.recovered or any(r.attempts for r in local)
            groups.append((local, "mda", self.local.deliver(env, local, data, retry)))
        try:
            forwarded = await self._forwarded(env, remote)
        except DirectoryUnavailable as e:
            return {r.address: Reply(451, f"4.3.0 directory unavailable: {e}") for r in rcpts}
        if forwarded is not None:
            # Forwarded by an alias: leaves with an SRS sender, in a transaction of its own.
            srs_env, fwd = forwarded
            remote = [r for r in remote if r not in fwd]
            groups.append((fwd, "none", self.remote.deliver(srs_env, fwd, data)))
        if remote:
            groups.append((remote, "none", self.remote.deliver(env, remote, data)))
        outcomes = await asyncio.gather(*(job for _, _, job in groups), return_exceptions=True)
        for (rcpts_of_group, relay, _), outcome in zip(groups, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                if not isinstance(outcome, Exception):
                    raise outcome  # cancellation: the runner is stopping
                # A fault in one courier fails its own recipients for now, never the others'
                # results: those were delivered and must be recorded as such.
                log.error("%s: delivery fault: %r", env.id, outcome, exc_info=outcome)
                outcome = {r.address: Reply(451, "4.3.0 local error in delivery, will retry",
                                            relay) for r in rcpts_of_group}
            results.update(outcome)
        return results

    async def _forwarded(self, env: Envelope, remote: list[Recipient]
                         ) -> tuple[Envelope, list[Recipient]] | None:
        """The recipients an alias of ours forwards to a foreign address, and the envelope
        they leave with (SRS sender); None when there are none or SRS is off. A sender of
        our own domains, or the null sender, needs no rewriting."""
        if self.srs is None or not env.mail_from or env.mail_from == "<>":
            return None
        fwd = [r for r in remote if r.original != r.address]
        if not fwd or await lookup(self.directory, "is_local_domain",
                                   addresses.domain_of(env.mail_from)):
            return None
        sender = self.srs.forward(env.mail_from, addresses.domain_of(fwd[0].original))
        return dataclasses.replace(env, mail_from=sender), fwd

    def _record(self, env: Envelope, rcpts: list[Recipient], results: dict[str, Reply]
                ) -> list[Recipient]:
        """Apply one attempt's replies; return the recipients now due a "delayed" DSN."""
        now = self.clock()
        d = self.cfg.delivery
        delayed = []
        for r in rcpts:
            reply = results.get(r.address, Reply(451, "4.3.0 no result for this recipient"))
            held = reply.relay == HELD  # not an attempt: nothing was tried
            if not held:
                r.attempts += 1
            r.last_reply = sys.intern(reply.line)  # one string for a dead MX's 100,000
            relay = r.last_relay = reply.relay or "mda"
            if held and now - env.created < d.max_queue_lifetime:
                r.next_attempt = now + d.retry_max  # until a release makes it due at once
            elif reply.ok:
                r.status = SENT
                r.dsn_passed = reply.dsn_passed
            elif reply.permanent:
                r.status = FAILED
            elif now - env.created >= d.max_queue_lifetime:
                r.status = EXPIRED
            else:
                r.next_attempt = now + policy.retry_delay(r.attempts, d.retry_initial, d.retry_max)
                if (d.delay_warning and not r.delay_notified and wants(r, "DELAY")
                        and now - env.created >= d.delay_warning):
                    r.delay_notified = True
                    delayed.append(r)
            status = {SENT: "sent", FAILED: "bounced", EXPIRED: "expired"}.get(
                r.status, "held" if held else "deferred")
            if not held:
                kind = self._relay_kind(relay)
                metrics.DELIVERIES.labels(kind, status).inc()
                if status == "sent":
                    metrics.DELIVERY_DELAY.labels(kind).observe(max(0.0, now - env.created))
            log.info("%s: to=<%s>%s relay=%s delay=%.2f attempts=%d status=%s (%s)", env.id,
                     r.address, f" orig_to=<{r.original}>" if r.original != r.address else "",
                     relay, now - env.created, r.attempts, status, reply.line)
        return delayed

    def reconfigure(self, cfg: Config, remote: Courier) -> None:
        """A reload: new attempts use ``cfg`` and ``remote``; those under way finish as they
        began."""
        self.cfg = cfg
        self.remote = remote

    def _gauges(self) -> None:
        by_state = Counter(env.state for env in self.items.values())
        for state in ("new", "deferred", "held"):
            metrics.QUEUE_MESSAGES.labels(state).set(by_state[state])
        now = self.clock()
        oldest = min((env.created for env in self.items.values()), default=now)
        metrics.QUEUE_OLDEST.set(max(0.0, now - oldest))

    def _heartbeat(self) -> None:
        """The heartbeat `pochta status` reads: this loop turns."""
        try:
            self.spool.beat()
        except OSError as e:
            log.warning("cannot write the queue heartbeat: %s", e)

    def _relay_kind(self, relay: str) -> str:
        """The metrics' relay label of a reply's relay ("mda", "host[ip]:port", "dns"...)."""
        if relay == "mda":
            return "local"
        smarthost = self.cfg.delivery.smarthost  # "host:port"; replies name "host[ip]:port"
        if smarthost and relay.startswith(smarthost.rpartition(":")[0].strip("[]") + "["):
            return "smarthost"
        return "remote"


def flushes(rcpt_domain: str, domain: str | None, subdomains: bool) -> bool:
    """Whether a flush of ``domain`` (None: all; ``subdomains``: ETRN's "@domain") covers a
    recipient at ``rcpt_domain``."""
    if domain is None or rcpt_domain == domain:
        return True
    return subdomains and rcpt_domain.endswith("." + domain)
