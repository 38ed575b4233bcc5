"""The spool's file layout, without sockets: what survives a crash and what is garbage."""

import json
import os
import time

import pytest

from mta.envelope import Envelope, Recipient
from mta.spool import DAMAGED_DIR, Spool, SpooledMessage

MESSAGE = b"Subject: hi\r\n\r\nbody\r\n"


def envelope(qid: str = "00000000000001abcdef") -> Envelope:
    return Envelope(id=qid, created=time.time(), mail_from="a@example.org",
                    recipients=[Recipient("b@example.com", "b@example.com")])


def items(spool_dir) -> list[str]:
    """The spool's files."""
    return sorted(p.name for p in spool_dir.iterdir())


def read(qid: str, spool: Spool, in_memory_max: int = 1 << 20) -> bytes | SpooledMessage:
    """What the queue runner gets for a delivery attempt (and the lock released again)."""
    got = spool.checkout(qid, in_memory_max)
    assert got is not None
    os.close(got[0])
    return got[1]


def test_a_committed_message_is_one_file_envelope_line_then_message(tmp_path):
    spool = Spool(tmp_path)
    spool.put(envelope(), MESSAGE)
    [f] = list(tmp_path.iterdir())
    assert f.name == "00000000000001abcdef.msg"
    line, _, message = f.read_bytes().partition(b"\n")
    assert message == MESSAGE
    assert json.loads(line)["size"] == len(MESSAGE)
    assert spool.ids() == ["00000000000001abcdef"]
    assert spool.load("00000000000001abcdef").recipients[0].address == "b@example.com"
    assert read("00000000000001abcdef", spool) == MESSAGE


def test_large_messages_are_read_from_disk_past_the_envelope(tmp_path):
    spool = Spool(tmp_path)
    spill = tmp_path / ".data-x.tmp"
    spill.write_bytes(b"Subject: big\r\n\r\n" + b"x" * 5000 + b"\r\n")
    spool.put(envelope(), [b"Received: by us\r\n", (spill, 0)])
    got = read("00000000000001abcdef", spool, in_memory_max=100)
    assert isinstance(got, SpooledMessage)
    assert got.read() == b"Received: by us\r\n" + spill.read_bytes()
    assert got.header_section() == b"Received: by us\r\nSubject: big\r\n"
    assert spool.load("00000000000001abcdef").size == len(got.read())


def test_an_update_supersedes_the_envelope_line_and_removal_leaves_nothing(tmp_path):
    spool = Spool(tmp_path)
    env = envelope()
    spool.put(env, MESSAGE)
    got = spool.checkout(env.id)
    assert got is not None
    fd, data = got
    assert data == MESSAGE
    assert spool.checkout(env.id) is None  # busy while checked out
    env.recipients[0].attempts = 1
    spool.checkin(env, fd)
    assert spool.load(env.id).recipients[0].attempts == 1
    assert read(env.id, spool) == MESSAGE
    with spool.locked(env.id) as present:
        assert present
        spool.remove(env.id)
    assert items(tmp_path) == [] and spool.ids() == []
    with spool.locked(env.id) as present:
        assert not present


def test_crash_leftovers_are_garbage_only_when_idle(tmp_path):
    spool = Spool(tmp_path)
    spool.put(envelope(), MESSAGE)
    (tmp_path / ".00000000000002abcdef.tmp").write_bytes(b"half")
    (tmp_path / "00000000000003abcdef.json").write_bytes(envelope().to_json())
    assert spool.collect_garbage(min_age=3600) == 0  # young: perhaps still being written
    assert spool.collect_garbage(min_age=-1) == 2
    assert items(tmp_path) == ["00000000000001abcdef.msg"]


@pytest.mark.parametrize("content", [b"", b"no newline at all", b'{"version": 1}\n',
                                     b"\x00" * 4096])
def test_a_damaged_item_is_put_aside_once_and_listed(tmp_path, caplog, content):
    """A committed file emptied or torn by a file system that lost data: an error in the log,
    moved to damaged/ (never delivered, never silently removed), listed for the admin."""
    spool = Spool(tmp_path)
    spool.put(envelope("00000000000002abcdef"), MESSAGE)
    (tmp_path / "00000000000001abcdef.msg").write_bytes(content)
    with caplog.at_level("ERROR", logger="pochta.spool"):
        assert [e.id for e in spool.recover()] == ["00000000000002abcdef"]
    assert "00000000000001abcdef: damaged queue item" in caplog.text
    assert spool.ids() == ["00000000000002abcdef"]
    assert spool.damaged() == [("00000000000001abcdef", len(content))]
    assert (tmp_path / DAMAGED_DIR / "00000000000001abcdef.msg").read_bytes() == content
    caplog.clear()
    spool.recover()
    assert "damaged" not in caplog.text  # said once, not at every start


def test_a_file_under_another_items_name_is_damaged_not_delivered(tmp_path):
    spool = Spool(tmp_path)
    content = envelope("00000000000009abcdef").to_json() + b"\n" + MESSAGE
    (tmp_path / "00000000000000abcdef.msg").write_bytes(content)
    assert spool.recover() == []
    assert spool.damaged() == [("00000000000000abcdef", len(content))]


def delivered(spool: Spool, env: Envelope) -> None:
    """What the runner does once every recipient is done."""
    got = spool.checkout(env.id)
    assert got is not None
    env.recipients[0].status = "sent"
    spool.checkin(env, got[0])


def test_a_delivered_item_leaves_no_file(tmp_path):
    spool = Spool(tmp_path)
    env = envelope()
    spool.put(env, MESSAGE)
    got = spool.checkout(env.id)
    assert got is not None
    env.recipients[0].attempts = 1
    spool.checkin(env, got[0], done=False)  # an attempt left it pending: a .json too
    assert items(tmp_path) == [f"{env.id}.json", f"{env.id}.msg"]
    delivered(spool, env)
    assert items(tmp_path) == [] and spool.checkout(env.id) is None


def test_a_removed_item_is_not_its_old_self_for_a_late_locker(tmp_path, monkeypatch):
    spool = Spool(tmp_path)
    old = envelope("00000000000001abcdef")
    spool.put(old, b"Subject: old\r\n\r\n")
    opened = spool._open_message_file(old.id)  # e.g. `pochta queue delete`, about to lock
    delivered(spool, old)  # the runner wins the lock and delivers it
    assert opened is not None and os.fstat(opened[0]).st_nlink == 0
    monkeypatch.setattr(spool, "_open_message_file", lambda qid: opened)
    with spool.locked(old.id) as present:
        assert not present


def test_one_envelope_that_cannot_be_written_fails_alone_in_its_batch(tmp_path):
    import asyncio

    spool = Spool(tmp_path)
    good = [envelope(f"0000000000000{i}abcdef") for i in range(3)]
    bad = envelope("00000000000009abcdef")
    bad.client = {"helo": "caf\udce9"}  # not encodable as UTF-8

    async def commit_all():
        return await asyncio.gather(*(spool.commit(e, MESSAGE) for e in [*good, bad]),
                                    return_exceptions=True)

    results = asyncio.run(commit_all())
    assert results[:3] == [None, None, None]
    assert isinstance(results[3], UnicodeEncodeError)
    assert sorted(spool.ids()) == sorted(e.id for e in good)


def test_a_message_committed_after_its_client_left_is_still_announced(tmp_path):
    """The session waiting for the commit is cancelled (the client disconnected after the
    final dot): the commit goes on, and the queue runner hears of the committed message."""
    import asyncio

    from mta.session import commit_and_announce

    spool = Spool(tmp_path)
    announced: list[str] = []

    async def scenario():
        release = asyncio.Event()
        real_commit = spool.commit

        async def slow_commit(env, message):
            await release.wait()
            await real_commit(env, message)

        spool.commit = slow_commit  # type: ignore[method-assign]
        env = envelope()
        session = asyncio.ensure_future(
            commit_and_announce(spool, env, MESSAGE, announced.append))
        await asyncio.sleep(0)
        session.cancel()  # the client went away mid-commit
        release.set()
        for _ in range(100):
            if announced:
                break
            await asyncio.sleep(0.01)
        assert session.cancelled()

    asyncio.run(scenario())
    assert announced == ["00000000000001abcdef"] and spool.ids() == announced
