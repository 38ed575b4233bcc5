"""The spool's file layout, without sockets: what survives a crash and what is garbage."""

import json
import os
import time

import pytest

from mta.spool import Envelope, Recipient, Spool, SpooledMessage, SpoolError

MESSAGE = b"Subject: hi\r\n\r\nbody\r\n"


def envelope(qid: str = "00000000000001abcdef") -> Envelope:
    return Envelope(id=qid, created=time.time(), mail_from="a@example.org",
                    recipients=[Recipient("b@example.com", "b@example.com")])


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
    assert list(tmp_path.iterdir()) == []
    with spool.locked(env.id) as present:
        assert not present


def test_crash_leftovers_are_garbage_only_when_idle(tmp_path):
    spool = Spool(tmp_path)
    spool.put(envelope(), MESSAGE)
    (tmp_path / ".00000000000002abcdef.tmp").write_bytes(b"half")
    (tmp_path / "00000000000003abcdef.json").write_bytes(envelope().to_json())
    assert spool.collect_garbage(min_age=3600) == 0  # young: perhaps still being written
    assert spool.collect_garbage(min_age=-1) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00000000000001abcdef.msg"]


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
    assert list(tmp_path.iterdir()) == [] and spool.checkout(env.id) is None
