"""The queue runner: its own process (``pochta serve queue``, started by ``serve mta``) that
empties the spool, on the second core while the MTA's loop only accepts mail.

It loads every committed message at start (crash recovery), then sleeps until the earliest
``next_attempt``, a notice (``Notifier``: datagrams of new messages' ids from the MTA and the
MSA; a ``kick`` marker file when the runner is not there) or a flush. For each due message it
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
import hashlib
import heapq
import logging
import os
import re
import socket
import time
from collections import Counter, defaultdict, deque
from collections.abc import Awaitable, Callable

from mta import policy
from mta.courier import Courier
from mta.dsn import Bouncer, wants
from mta.envelope import EXPIRED, FAILED, SENT, Envelope, Recipient
from mta.lmtp_out import LMTPClient, LMTPError
from mta.reply import Reply
from mta.spool import FLUSH, KICK, Spool, SpooledMessage, SpoolError
from store import addresses
from store.config import Config
from store.directory import Directory, DirectoryUnavailable, lookup

log = logging.getLogger("pochta.queue")

QUEUE_ID = re.compile(r"[0-9a-f]{20}")


def notice_address(spool: Spool) -> str:
    """The runner's datagram socket: Linux's abstract namespace (no path length limit, no file
    to clean up), one name per spool directory."""
    digest = hashlib.sha256(os.fsencode(os.path.realpath(spool.dir))).hexdigest()[:24]
    return f"\0pochta-queue-{digest}"


class Notifier:
    """Tells the queue runner about messages just committed to the spool (MTA and MSA).

    The ids committed in one loop iteration (a group commit) go in one datagram: Linux queues
    only ``net.unix.max_dgram_qlen`` datagrams per socket (10 by default), and a notice that
    does not fit must not wait for the runner's once-a-second marker check. When the queue is
    full the ids wait here until the runner's socket is writable again; when the runner is not
    there, a ``kick`` marker makes it rescan the spool once it is.
    """

    MAX_IDS = 150  # ids per datagram: 21 bytes each, some 3 KB
    MAX_PENDING = 100_000  # ids held for a runner that stopped reading: then the marker

    def __init__(self, spool: Spool) -> None:
        self.spool = spool
        self.address = notice_address(spool)
        self.sock: socket.socket | None = None
        self.pending: list[str] = []
        self.scheduled = False  # a flush is due on the loop (call_soon or writer)

    def notify(self, env: Envelope) -> None:
        self.pending.append(env.id)
        if not self.scheduled:
            self.scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self.scheduled = False
        if self.sock is not None:
            asyncio.get_running_loop().remove_writer(self.sock.fileno())
        try:
            if self.sock is None:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                self.sock.setblocking(False)
                self.sock.connect(self.address)
            while self.pending:
                batch = self.pending[: self.MAX_IDS]
                self.sock.send(" ".join(batch).encode("ascii"))
                del self.pending[: len(batch)]
        except BlockingIOError:  # the runner's queue is full: resume once it has room
            if len(self.pending) <= self.MAX_PENDING:
                assert self.sock is not None
                self.scheduled = True
                asyncio.get_running_loop().add_writer(self.sock.fileno(), self._flush)
                return
            self._kick()
        except OSError:  # no runner (not started yet, restarting): it rescans on the marker
            self._kick()

    def _kick(self) -> None:
        self.pending.clear()
        if self.sock is not None:  # connect again next time: the runner may be a new one
            self.sock.close()
            self.sock = None
        self.spool.touch_marker(KICK)

    def close(self) -> None:
        if self.sock is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_writer(self.sock.fileno())
            self.sock.close()
            self.sock = None



class LocalDelivery:
    """The local courier (mta/courier.py): local recipients to the MDA over LMTP, reusing
    idle connections."""

    def __init__(self, cfg: Config, max_idle: int = 32) -> None:
        self.address = cfg.mda.listen
        self.hostname = cfg.hostname
        self.timeout = cfg.delivery.lmtp_timeout
        self.max_idle = max_idle
        self.idle: list[LMTPClient] = []

    async def deliver(self, env: Envelope, rcpts: list[Recipient], data: bytes | SpooledMessage,
                      retry: bool = False) -> dict[str, Reply]:
        """``retry``: an earlier attempt may have delivered some of ``rcpts`` without our
        knowing (see LMTPClient.deliver)."""
        addrs = list(dict.fromkeys(r.address for r in rcpts))
        while True:
            client = self.idle.pop() if self.idle else None
            reused = client is not None and client.connected
            try:
                if client is None or not reused:
                    client = LMTPClient(self.address, self.timeout)
                    await client.connect(self.hostname)
                results = await client.deliver(env.mail_from, addrs, data, env.smtputf8,
                                               queue_id=env.id, retry=retry)
                break
            except LMTPError as e:
                if reused and not e.data_sent:
                    # An idle connection the MDA closed meanwhile (it restarted, or timed out):
                    # nothing was delivered; go on with the next one, at worst a new one.
                    log.info("%s: MDA connection gone stale, trying another: %s", env.id, e)
                    continue
                log.warning("%s: MDA: %s", env.id, e)
                return {a: Reply(451, f"4.4.1 MDA not available: {e}") for a in addrs}
        if client.connected and len(self.idle) < self.max_idle:
            self.idle.append(client)
        else:
            await client.close()
        return results

    async def close(self) -> None:
        while self.idle:
            await self.idle.pop().close()


class QueueRunner:
    """The scheduler: which message is attempted when, and how many at once.

    At most ``concurrency`` attempts run at once, and at most ``per_destination`` of them
    deliver to one remote domain. A message whose due recipients all go to remote domains
    that are at their limit waits without an attempt slot (``waiting``), and is taken again
    when one of those deliveries ends: a slow or tarpitting destination holds its own slots
    only, never local delivery or other domains.
    """

    def __init__(self, cfg: Config, spool: Spool, directory: Directory, local: Courier,
                 remote: Courier, bouncer: Bouncer, concurrency: int = 32,
                 per_destination: int = 4, clock: Callable[[], float] = time.time) -> None:
        self.cfg = cfg
        self.spool = spool
        self.directory = directory
        self.local = local
        self.remote = remote
        self.bouncer = bouncer
        self.clock = clock
        self.items: dict[str, Envelope] = {}
        # What to try when: ids due now in arrival order, later ones by due time. Entries may
        # be stale (an id twice, an old time); each is checked against its envelope when taken.
        self.ready: deque[str] = deque()
        self.timers: list[tuple[float, str]] = []
        self.busy: set[str] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.wake = asyncio.Event()
        self.concurrency = concurrency
        self.fresh: set[str] = set()  # just written: in the page cache, read without a thread
        # Found in the spool rather than announced: an earlier runner may have delivered some
        # recipients and died before recording it (the MDA then checks for those copies).
        self.recovered: set[str] = set()
        self.next_marker_check = 0.0
        self.notices: socket.socket | None = None
        self.per_destination = per_destination
        self.in_flight: Counter[str] = Counter()  # remote domain -> attempts delivering there
        self.waiting: defaultdict[str, deque[str]] = defaultdict(deque)  # domain -> ids
        self.parked: dict[str, str] = {}  # id -> the full domain it waits for
        self.local_domains: set[str] = set()  # learnt from routing: no destination limit

    def add(self, env: Envelope, maybe_sent: bool = False) -> None:
        """A message this process just spooled (a DSN): deliver it now. ``maybe_sent``: it
        may have been delivered before a crash (see Bouncer.notify)."""
        self.items[env.id] = env
        self.fresh.add(env.id)
        if maybe_sent:
            self.recovered.add(env.id)
        self.ready.append(env.id)
        self.wake.set()

    def _schedule(self, env: Envelope) -> None:
        """Queue ``env`` for its next attempt: now, or when its first pending recipient is due
        (a parked one's recipients for its full destination wait for that to have room)."""
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
            heapq.heappush(self.timers, (due, env.id))

    async def listen(self, wait: float = 30.0) -> None:
        """Take notices of new messages; waits while an older runner of this spool exits."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.setblocking(False)
        deadline = time.monotonic() + wait
        while True:
            try:
                sock.bind(notice_address(self.spool))
                break
            except OSError:
                if time.monotonic() > deadline:
                    sock.close()
                    raise
                await asyncio.sleep(0.2)
        self.notices = sock
        asyncio.get_running_loop().add_reader(sock.fileno(), self._on_notices)

    def _on_notices(self) -> None:
        assert self.notices is not None
        for _ in range(100):  # bounded: let the loop breathe under a flood
            try:
                ids = self.notices.recv(1 << 16).decode("ascii", "replace").split()
            except BlockingIOError:
                break
            for qid in ids:
                if not QUEUE_ID.fullmatch(qid) or qid in self.items:
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
        self.wake.set()

    async def recover(self) -> None:
        """Load what the spool holds (crash recovery); before the listeners open."""
        for env in await asyncio.to_thread(self.spool.recover):
            if env.id not in self.items:  # a notice may have brought it in already
                self.items[env.id] = env
                self.recovered.add(env.id)
                self._schedule(env)
        if self.items:
            log.info("recovered %d message(s) from the spool", len(self.items))

    async def run(self, stop: asyncio.Event) -> None:
        next_gc = time.monotonic() + 3600.0
        while not stop.is_set():
            if time.monotonic() >= self.next_marker_check:  # other processes' kicks, flush
                self.next_marker_check = time.monotonic() + 1.0
                await self._markers()
            if time.monotonic() >= next_gc:  # leftovers of a crash that came after start-up
                next_gc = time.monotonic() + 3600.0
                await asyncio.to_thread(self.spool.collect_garbage)
            now = self.clock()
            while self.timers and self.timers[0][0] <= now:
                self.ready.append(heapq.heappop(self.timers)[1])
            while self.ready and len(self.busy) < self.concurrency:
                qid = self.ready.popleft()
                env = self.items.get(qid)
                if env is None or qid in self.busy or qid in self.parked:
                    continue
                due = env.due
                if due is None:
                    continue
                if due > now:
                    heapq.heappush(self.timers, (due, qid))
                    continue
                destinations = self._take_destinations(env, now)
                if destinations is None:
                    continue  # parked: its destinations are all busy
                self.busy.add(qid)
                task = asyncio.create_task(self._attempt(env, destinations))
                self.tasks.add(task)
                task.add_done_callback(self.tasks.discard)
            # A finished attempt, a notice or a marker sets wake; else the earliest timer.
            wait = 1.0 if not self.timers else min(1.0, self.timers[0][0] - now)
            try:
                await asyncio.wait_for(self.wake.wait(), max(0.0, wait))
            except TimeoutError:
                pass
            self.wake.clear()
        if self.notices is not None:
            asyncio.get_running_loop().remove_reader(self.notices.fileno())
            self.notices.close()
        if self.tasks:
            await asyncio.wait(self.tasks, timeout=10)
        await self.local.close()
        await self.remote.close()

    async def _markers(self) -> None:
        kicked = await asyncio.to_thread(self.spool.take_marker, KICK)
        flushed = await asyncio.to_thread(self.spool.take_marker, FLUSH)
        if kicked or flushed:
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
                    self.recovered.add(qid)
                    self._schedule(env)
        if flushed:
            log.info("flush: every deferred recipient is due now")
            now = self.clock()
            for env in self.items.values():
                for r in env.pending:
                    r.next_attempt = min(r.next_attempt, now)
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
                    heapq.heappush(self.timers, (self.clock() + 1.0, env.id))
                else:
                    self._schedule(env)
            self.wake.set()

    def _due(self, env: Envelope, blocked: set[str]) -> list[Recipient]:
        """The pending recipients due now, but those for the ``blocked`` domains."""
        now = self.clock()
        return [r for r in env.pending if r.next_attempt <= now
                and (not blocked or addresses.domain_of(r.address) not in blocked)]

    async def _deliver(self, env: Envelope, blocked: set[str]) -> bool:
        """One attempt for the due recipients but those for ``blocked`` domains; False if the
        item was busy (try again soon)."""
        if env.id in self.fresh:
            # Just written, so in the page cache: a few syscalls, cheaper than a thread trip.
            self.fresh.discard(env.id)
            got = self.spool.checkout(env.id)
        else:
            got = await asyncio.to_thread(self.spool.checkout, env.id)
        if got is None:
            if not self.spool.committed(env.id):
                self.items.pop(env.id, None)  # deleted by `pochta queue delete`
                self.recovered.discard(env.id)
                return True
            return False
        fd, data = got
        reported = False
        try:
            due = self._due(env, blocked)
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
            self.recovered.discard(env.id)
        return True

    async def _report(self, env: Envelope, data: bytes | SpooledMessage) -> bool:
        """The sender's final report (DSN) spooled durably; False (and a retry time in the
        envelope) if it could not be: the message must not leave the queue before it."""
        try:
            await self.bouncer.bounce(env, data, env.id in self.recovered)
            return True
        except Exception as e:  # disk full, I/O error, the directory down, a bug
            log.error("%s: cannot queue the sender's report, keeping the message: %r", env.id, e)
            env.report_at = self.clock() + self.cfg.delivery.retry_initial
            return False

    async def _report_delays(self, env: Envelope, data: bytes | SpooledMessage,
                             delayed: list[Recipient]) -> None:
        try:
            await self.bouncer.notify(env, data, [(r, "delayed") for r in delayed],
                                      env.id in self.recovered)
        except Exception as e:
            log.error("%s: cannot queue the delay report (tried again later): %r", env.id, e)
            for r in delayed:
                r.delay_notified = False

    async def _route_and_send(self, env: Envelope, rcpts: list[Recipient], data: bytes | SpooledMessage
                              ) -> dict[str, Reply]:
        local: list[Recipient] = []
        remote: list[Recipient] = []
        try:
            for r in rcpts:
                domain = addresses.domain_of(r.address)
                ours = await lookup(self.directory, "is_local_domain", domain)
                (local if ours else remote).append(r)
                if ours:
                    if len(self.local_domains) >= 10_000:
                        self.local_domains.clear()
                    self.local_domains.add(domain)
        except DirectoryUnavailable as e:
            return {r.address: Reply(451, f"4.3.0 directory unavailable: {e}") for r in rcpts}
        results: dict[str, Reply] = {}
        groups: list[tuple[list[Recipient], Awaitable[dict[str, Reply]]]] = []
        if local:
            retry = env.id in self.recovered or any(r.attempts for r in local)
            groups.append((local, self.local.deliver(env, local, data, retry)))
        if remote:
            groups.append((remote, self.remote.deliver(env, remote, data)))
        outcomes = await asyncio.gather(*(job for _, job in groups), return_exceptions=True)
        for (rcpts_of_group, _), outcome in zip(groups, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                if not isinstance(outcome, Exception):
                    raise outcome  # cancellation: the runner is stopping
                # A fault in one courier fails its own recipients for now, never the others'
                # results: those were delivered and must be recorded as such.
                log.error("%s: delivery fault: %r", env.id, outcome, exc_info=outcome)
                outcome = {r.address: Reply(451, "4.3.0 local error in delivery, will retry")
                           for r in rcpts_of_group}
            results.update(outcome)
        return results

    def _record(self, env: Envelope, rcpts: list[Recipient], results: dict[str, Reply]
                ) -> list[Recipient]:
        """Apply one attempt's replies; return the recipients now due a "delayed" DSN."""
        now = self.clock()
        d = self.cfg.delivery
        delayed = []
        for r in rcpts:
            reply = results.get(r.address, Reply(451, "4.3.0 no result for this recipient"))
            r.attempts += 1
            r.last_reply = reply.line
            relay = r.last_relay = reply.relay or "mda"
            if reply.ok:
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
            status = {SENT: "sent", FAILED: "bounced", EXPIRED: "expired"}.get(r.status, "deferred")
            log.info("%s: to=<%s>%s relay=%s delay=%.2f attempts=%d status=%s (%s)", env.id,
                     r.address, f" orig_to=<{r.original}>" if r.original != r.address else "",
                     relay, now - env.created, r.attempts, status, reply.line)
        return delayed

