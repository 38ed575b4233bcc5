"""The spool's file layout, without sockets: what survives a crash and what is garbage."""

import json
import os
import time

import pytest

import mta.spool
from mta.spool import FREE_DIR, RECYCLE_MAX, Envelope, Recipient, Spool, SpooledMessage, SpoolError

MESSAGE = b"Subject: hi\r\n\r\nbody\r\n"


def envelope(qid: str = "00000000000001abcdef") -> Envelope:
    return Envelope(id=qid, created=time.time(), mail_from="a@example.org",
                    recipients=[Recipient("b@example.com", "b@example.com")])


def items(spool_dir) -> list[str]:
    """The spool's files, without the pool of recycled ones."""
    return sorted(p.name for p in spool_dir.iterdir() if p.name != FREE_DIR)


def read(qid: str, spool: Spool, in_memory_max: int = 1 << 20) -> bytes | SpooledMessage:
    """What the queue runner gets for a delivery attempt (and the lock released again)."""
    got = spool.checkout(qid, in_memory_max)
    assert got is not None
    os.close(got[0])
    return got[1]


def test_a_committed_message_is_one_file_envelope_line_then_message(tmp_path):
    spool = Spool(tmp_path)
    spool.put(envelope(), MESSAGE)
    [f] = [p for p in tmp_path.iterdir() if p.name != FREE_DIR]
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


def test_a_message_file_without_envelope_line_is_an_error_not_a_crash(tmp_path):
    spool = Spool(tmp_path)
    (tmp_path / "00000000000001abcdef.msg").write_bytes(b"no newline at all")
    assert spool.recover() == []  # logged and left in place for the admin
    with pytest.raises(SpoolError):
        spool.load("00000000000001abcdef")


def test_a_layout_1_item_is_read_delivered_and_removed(tmp_path):
    spool = Spool(tmp_path)
    env = envelope()
    (tmp_path / f"{env.id}.eml").write_bytes(MESSAGE)
    (tmp_path / f"{env.id}.json").write_bytes(env.to_json())
    assert spool.ids() == [env.id] and spool.committed(env.id)
    assert read(env.id, spool) == MESSAGE
    spool.remove(env.id)
    assert items(tmp_path) == [] and spool.checkout(env.id) is None


def delivered(spool: Spool, env: Envelope) -> None:
    """What the runner does once every recipient is done."""
    got = spool.checkout(env.id)
    assert got is not None
    env.recipients[0].status = "sent"
    spool.checkin(env, got[0])


def test_a_delivered_file_is_recycled_for_the_next_message_cut_to_its_length(tmp_path):
    spool = Spool(tmp_path)
    first = envelope("00000000000001abcdef")
    spool.put(first, MESSAGE + b"a much longer body than the next one\r\n" * 50)
    inode = os.stat(spool.msg_path(first.id)).st_ino
    delivered(spool, first)
    assert spool.ids() == [] and len(os.listdir(tmp_path / FREE_DIR)) == 1
    second = envelope("00000000000002abcdef")
    spool.put(second, MESSAGE)
    assert os.stat(spool.msg_path(second.id)).st_ino == inode  # no new inode
    assert os.listdir(tmp_path / FREE_DIR) == []
    assert read(second.id, spool) == MESSAGE  # nothing of the longer message is left
    assert spool.load(second.id).id == second.id


def test_the_pool_is_bounded_and_large_files_are_deleted(tmp_path, monkeypatch):
    monkeypatch.setattr(mta.spool, "FREE_MAX", 2)
    spool = Spool(tmp_path)
    envs = [envelope(f"0000000000000{i}abcdef") for i in range(1, 5)]
    for env in envs[:3]:
        spool.put(env, MESSAGE)
    spool.put(envs[3], b"Subject: big\r\n\r\n" + b"x" * RECYCLE_MAX)
    for env in envs:
        delivered(spool, env)
    assert spool.ids() == []
    kept = os.listdir(tmp_path / FREE_DIR)
    assert len(kept) == 2 and envs[3].id + ".msg" not in kept


def test_a_recycled_file_is_not_its_old_item_for_a_late_locker(tmp_path, monkeypatch):
    spool = Spool(tmp_path)
    old, new = envelope("00000000000001abcdef"), envelope("00000000000002abcdef")
    spool.put(old, b"Subject: old\r\n\r\n")
    opened = spool._open_message_file(old.id)  # e.g. `pochta queue delete`, about to lock
    delivered(spool, old)  # the runner wins the lock and delivers it
    spool.put(new, MESSAGE)  # the file now holds another message under another name
    assert opened is not None and os.fstat(opened[0]).st_nlink == 1
    monkeypatch.setattr(spool, "_open_message_file", lambda qid: opened)
    with spool.locked(old.id) as present:
        assert not present
    opened = (os.open(spool.msg_path(new.id), os.O_RDONLY), str(spool.msg_path(old.id)))
    assert spool.checkout(old.id) is None
    monkeypatch.undo()
    assert read(new.id, spool) == MESSAGE


def test_a_stale_name_of_a_recycled_file_is_dropped_at_recovery(tmp_path):
    # Without a journal, a crash can keep a delivered item's name on a file rewritten since
    # for a message whose own name was not durable yet (so never acknowledged).
    spool = Spool(tmp_path)
    spool.put(envelope("00000000000001abcdef"), MESSAGE)
    stale = spool.msg_path("00000000000000abcdef")
    stale.write_bytes(envelope("00000000000009abcdef").to_json() + b"\n" + MESSAGE)
    assert [e.id for e in spool.recover()] == ["00000000000001abcdef"]
    assert not stale.exists()


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
