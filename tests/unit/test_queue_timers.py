"""The queue runner's timers: a waiting message is taken at its time or up to a tick later,
never before, and a queue of many waits in few lists."""

from mta.queue import QueueRunner
from mta.spool import Spool
from store.config import Config


def runner(tmp_path) -> QueueRunner:
    return QueueRunner(Config(), Spool(str(tmp_path / "spool"), False), None, None, None, None)


def test_never_early_and_at_most_a_tick_late(tmp_path):
    r = runner(tmp_path)
    r._at(100.01, "a")
    r._at(100.25, "b")
    r._at(100.10, "c")
    r._release_due(100.05)
    assert list(r.ready) == []  # a is due, but its tick (100.1) is not
    r._release_due(100.10)
    assert sorted(r.ready) == ["a", "c"]
    r._release_due(100.29)
    assert sorted(r.ready) == ["a", "c"]
    r._release_due(100.30)
    assert sorted(r.ready) == ["a", "b", "c"]
    assert not r.timers and not r.ticks


def test_a_big_queue_waits_in_few_lists(tmp_path):
    r = runner(tmp_path)
    for i in range(100_000):
        r._at(1000.0 + i / 10_000, f"id{i}")  # 100,000 messages due over 10 seconds
    assert len(r.ticks) == len(r.timers) <= 101
    r._release_due(1005.0)
    assert len(r.ready) == 50_001
