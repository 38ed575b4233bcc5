import pytest

from mda.maildir import UniqueNames
from mda.mbox import entry, quote, split_entries, unquote, with_state
from mda.message import stored_message


def test_unique_names():
    n = UniqueNames("host/with:odd")
    a, b = n.next(10, now=1.5), n.next(10, now=1.5)
    assert a != b
    assert a.startswith("1.M500000P") and a.endswith(r".host\057with\072odd,S=10")


def test_mboxrd_quoting_round_trip():
    text = b"From me\n>From you\n>>From them\nFromage\n From x\n"
    q = quote(text)
    assert q == b">From me\n>>From you\n>>>From them\nFromage\n From x\n"
    assert unquote(q) == text
    mbox = entry(text, "a@b") + entry(b"second\n", "<>")
    assert split_entries(mbox) == [text, b"second\n"]


def test_mbox_state_headers_are_ours_only():
    forged = (b"Subject: hi\nStatus: RO\nX-Status: D\nX-UID: 7\nX-IMAPbase: 1 2\n"
              b"X-Keywords: $Junk\n  more\ncontent-length : 9\nTo: b@c\n\nbody\nStatus: RO\n")
    assert with_state(forged) == b"Subject: hi\nTo: b@c\n\nbody\nStatus: RO\n"
    flagged = with_state(b"Subject: hi\n\nbody\n", ["\\Seen", "\\Flagged", "$Label1"])
    assert flagged == (b"Subject: hi\nStatus: R\nX-Status: F\nX-Keywords: $Label1\n\n"
                       b"body\n")
    plain = b"Subject: hi\n\nbody\n"
    assert with_state(plain) is plain  # nothing to do: the same bytes
    assert split_entries(entry(forged, "a@b", flags=["\\Seen"]))[0].startswith(
        b"Subject: hi\nTo: b@c\nStatus: R\n\n")


def test_header_prepending():
    out = stored_message(b"Subject: x\n\nbody", "a@b.test", "c@d.test")
    assert out == b"Return-Path: <a@b.test>\nDelivered-To: c@d.test\nSubject: x\n\nbody\n"
    assert stored_message(b"x\n", "<>", "c@d").startswith(b"Return-Path: <>\n")


def test_batcher_shares_one_thread_trip_between_concurrent_callers():
    import asyncio

    from store.batching import Batcher

    batches: list[list[int]] = []

    async def run(items: list[int]) -> list[int | BaseException]:
        batches.append(items)
        await asyncio.sleep(0.01)  # as a trip to a thread would: callers pile up meanwhile
        return [ValueError("odd") if i % 2 else i * 10 for i in items]

    async def main() -> list[object]:
        b: Batcher[int, int] = Batcher(run, max_batch=8)
        return await asyncio.gather(*(b.submit(i) for i in range(20)), return_exceptions=True)

    results = asyncio.run(main())
    assert [r for r in results if not isinstance(r, BaseException)] == list(range(0, 200, 20))
    assert all(isinstance(r, ValueError) for r in results[1::2])
    assert len(batches) < 20 and max(len(b) for b in batches) <= 8
    assert sorted(i for b in batches for i in b) == list(range(20))


def test_disk_sync_keeps_a_lone_fast_fsync_on_the_loop_and_batches_and_slow_ones_off_it():
    import asyncio
    import threading
    import time

    from store.batching import DiskSync

    def fsync_like(seconds: float) -> str:
        time.sleep(seconds)
        return threading.current_thread().name

    async def main() -> list[str]:
        disk = DiskSync()
        loop_thread = threading.current_thread().name
        where = [await disk.run(1, 1, fsync_like, 0.0001)]  # a lone message, a fast disk: loop
        where.append(await disk.run(5, 5, fsync_like, 0.0001))  # a batch: the thread
        for _ in range(20):  # the disk turns slow (5 ms an fsync): the average follows
            where.append(await disk.run(1, 1, fsync_like, 0.005))
        assert not disk.inline(1)
        where.append(await disk.run(1, 1, fsync_like, 0.0001))  # now in the thread
        return [w == loop_thread for w in where]

    on_loop = asyncio.run(main())
    assert on_loop[0] and not on_loop[1] and not on_loop[-1]


def test_maildir_batch_delivers_each_copy_and_reports_each_failure(tmp_path):
    from mda.deliver import Deliverer, Job
    from store.config import MDAConfig
    from store.directory import UserInfo

    d = Deliverer(MDAConfig(mailbox_root=str(tmp_path)), "mx.test")
    from datetime import datetime

    now = datetime.now()
    amy = UserInfo(address="amy@example.com", enabled=True, created=now, quota_bytes=None)
    full = UserInfo(address="bob@example.com", enabled=True, created=now, quota_bytes=10)
    import asyncio

    jobs = [Job(amy, "amy@example.com", "s@x", b"Subject: 1\r\n\r\nx\r\n"),
            Job(full, "bob@example.com", "s@x", b"Subject: 2\r\n\r\nx\r\n"),
            Job(amy, "amy+t@example.com", "<>", b"Subject: 3\r\n\r\nx\r\n")]
    replies = asyncio.run(d.deliver_batch(jobs))
    assert [r[:9] for r in replies] == ["250 2.0.0", "452 4.2.2", "250 2.0.0"]
    new = sorted((tmp_path / "example.com" / "amy" / "new").iterdir())
    assert len(new) == 2 and not list((tmp_path / "example.com" / "amy" / "tmp").iterdir())
    assert {p.read_bytes().split(b"\n")[1] for p in new} == {
        b"Delivered-To: amy@example.com", b"Delivered-To: amy+t@example.com"}
    # The maildir vanishes (an admin removed it): the next delivery creates it again.
    import shutil
    shutil.rmtree(tmp_path / "example.com" / "amy")
    assert d.deliver(Job(amy, "amy@example.com", "s@x", b"x\r\n")).startswith("250 2.0.0")
    assert len(list((tmp_path / "example.com" / "amy" / "new").iterdir())) == 1
    # Removed again while known: the batch path (written from the loop) recreates it too.
    shutil.rmtree(tmp_path / "example.com" / "amy")
    replies = asyncio.run(d.deliver_batch([jobs[0], jobs[2]]))
    assert [r[:9] for r in replies] == ["250 2.0.0", "250 2.0.0"]
    assert len(list((tmp_path / "example.com" / "amy" / "new").iterdir())) == 2


def test_disk_sync_makes_a_batch_durable_with_one_syncfs_while_that_pays(tmp_path):
    import errno
    import os

    import pytest

    from store.batching import DiskSync
    from store.fsio import syncfs_available

    if not syncfs_available():
        pytest.skip("no syncfs here (Linux 5.8 or later)")

    opened: list[int] = []

    def batch(n: int) -> list[int]:
        fds = [os.open(tmp_path / f"m{i}-{os.urandom(4).hex()}", os.O_WRONLY | os.O_CREAT)
               for i in range(n)]
        opened.extend(fds)
        return fds

    disk = DiskSync(str(tmp_path))
    fds = batch(5)
    gone = 999_999  # a descriptor that fails: only its own entry reports it
    errors = disk.fsync_all(fds + [gone])
    assert errors[:5] == [None] * 5 and errors[5].errno == errno.EBADF
    assert disk.syncfs_average > 0  # the batch went by syncfs

    # A neighbour keeps the file system busy: syncfs now measures slower than the fsyncs
    # it would replace, so batches go by fsync, and syncfs is tried again now and then.
    disk.syncfs_average = 10.0
    used_syncfs = []
    for _ in range(DiskSync.RETRY):
        before = disk.syncfs_average
        assert disk.fsync_all(batch(3)) == [None] * 3
        used_syncfs.append(disk.syncfs_average != before)
    assert used_syncfs.count(True) == 1

    # Without an anchor (or on another file system) every file gets its own fsync.
    plain = DiskSync()
    assert plain.fsync_all(batch(4)) == [None] * 4 and plain.syncfs_average == 0
    for fd in opened:  # some 200 descriptors: not left to the rest of the run
        os.close(fd)


def test_syncfs_only_where_it_flushes(tmp_path):
    """On a file system whose syncfs may flush nothing (FUSE, 9p, NFS...; tmpfs stands in for
    them here) a batch gets an fsync per file, as it does with sync_method = "fsync"."""
    import os

    import pytest

    from store.batching import DiskSync
    from store.fsio import SYNCFS_FLUSHES, filesystem_type, syncfs_available, syncfs_flushes

    if not syncfs_available():
        pytest.skip("no syncfs here (Linux 5.8 or later)")
    fd = os.open(tmp_path, os.O_RDONLY)
    try:
        on_disk = syncfs_flushes(fd)
        assert on_disk == (filesystem_type(fd) in SYNCFS_FLUSHES)
    finally:
        os.close(fd)
    shm = "/dev/shm"
    if not os.path.isdir(shm):
        pytest.skip("no tmpfs at /dev/shm")
    fd = os.open(shm, os.O_RDONLY)
    try:
        assert filesystem_type(fd) == 0x01021994 and not syncfs_flushes(fd)  # TMPFS_MAGIC
    finally:
        os.close(fd)

    def synced_by_syncfs(disk: DiskSync, where: str) -> bool:
        fds = [os.open(f"{where}/f{i}", os.O_WRONLY | os.O_CREAT) for i in range(5)]
        try:
            assert disk.fsync_all(fds) == [None] * 5
        finally:
            for f in fds:
                os.close(f)
        return disk.syncfs_average > 0

    d = tmp_path / "d"
    d.mkdir()
    assert synced_by_syncfs(DiskSync(str(d)), str(d)) == on_disk
    assert not synced_by_syncfs(DiskSync(str(d), use_syncfs=False), str(d))
    import tempfile
    with tempfile.TemporaryDirectory(dir=shm) as t:
        assert not synced_by_syncfs(DiskSync(t), t)


def test_copies_for_many_recipients_are_made_one_at_a_time(tmp_path):
    """A 5 MB message to 20 quota'd recipients of one mailbox (bob+1 ... bob+20): the copies
    are made and written one after the other, so the delivery holds about one copy beside
    the message, not twenty (the issue's 50 MB x 100 recipients asked for 5 GB)."""
    import asyncio
    import tracemalloc
    from datetime import datetime

    from mda.deliver import Deliverer, Job
    from store.config import MDAConfig
    from store.directory import UserInfo

    d = Deliverer(MDAConfig(mailbox_root=str(tmp_path)), "mx.test")
    bob = UserInfo(address="bob@example.com", enabled=True, created=datetime.now(),
                   quota_bytes=10**9)
    data = b"Subject: big\n\n" + b"z" * 5_000_000 + b"\n"
    jobs = [Job(bob, f"bob+{i}@example.com", "s@x", data) for i in range(20)]
    tracemalloc.start()
    try:
        replies = asyncio.run(d.deliver_batch(jobs))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert all(r.startswith("250") for r in replies)
    assert len(list((tmp_path / "example.com" / "bob" / "new").iterdir())) == 20
    assert peak < 3 * len(data), f"peak {peak / 1e6:.1f} MB for a {len(data) / 1e6:.0f} MB message"


def test_dovecot_subscriptions_file(tmp_path):
    from mda.subscriptions import HEADER, OldFormat, subscribe, with_folder

    assert with_folder(b"", "Lists/pochta") == HEADER + b"Lists\tpochta\n"
    assert with_folder(HEADER + b"Lists\tpochta\n", "Lists/pochta") is None
    assert with_folder(HEADER + b"A", "Caf\u00e9") == HEADER + b"A\nCaf&AOk-\n"
    with pytest.raises(OldFormat):
        with_folder(b"Lists.pochta\n", "B")
    path = tmp_path / "subscriptions"
    assert subscribe(path, "Junk") and not subscribe(path, "Junk")
    assert path.read_bytes() == HEADER + b"Junk\n"
    assert not (tmp_path / "subscriptions.lock").exists()
    (tmp_path / "subscriptions.lock").write_bytes(b"")  # Dovecot holds it: we wait, then fail
    import mda.subscriptions as subs

    saved, subs.LOCK_WAIT = subs.LOCK_WAIT, 0.1
    try:
        with pytest.raises(TimeoutError):
            subscribe(path, "Other")
    finally:
        subs.LOCK_WAIT = saved
    assert path.read_bytes() == HEADER + b"Junk\n"
