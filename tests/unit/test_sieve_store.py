"""Users' scripts and vacation state in the database (SQLite and PostgreSQL)."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from store.directory import Directory, DirectoryUnavailable
from store.sieve import MAX_SCRIPTS, SieveStore, SieveStoreError


@pytest.fixture
def store(directory: Directory) -> SieveStore:
    directory.add_domain("example.com")
    directory.add_user("bob@example.com", "pw")
    return SieveStore(directory.db)


def test_one_active_script_and_what_the_mda_sees(store, directory):
    store.put("bob@example.com", "a", "keep;\n", activate=True)
    store.put("Bob@Example.com", "b", "discard;\n", activate=True)
    assert [(s.name, s.active) for s in store.scripts("bob@example.com")] == [
        ("a", False), ("b", True)]
    assert directory.mailbox("bob@example.com").sieve == "discard;\n"
    store.activate("bob@example.com", None)
    assert directory.mailbox("bob@example.com").sieve is None
    with pytest.raises(SieveStoreError) as e:
        store.activate("bob@example.com", "nope")
    assert e.value.code == "NONEXISTENT"


def test_delete_rename_and_limits(store):
    store.put("bob@example.com", "a", "keep;\n", activate=True)
    with pytest.raises(SieveStoreError) as e:
        store.delete("bob@example.com", "a")
    assert e.value.code == "ACTIVE"
    store.put("bob@example.com", "b", "keep;\n")
    with pytest.raises(SieveStoreError) as e:
        store.rename("bob@example.com", "b", "a")
    assert e.value.code == "ALREADYEXISTS"
    store.rename("bob@example.com", "b", "c")
    store.delete("bob@example.com", "c")
    for i in range(MAX_SCRIPTS - 1):
        store.put("bob@example.com", f"s{i}", "keep;\n")
    with pytest.raises(SieveStoreError) as e:
        store.put("bob@example.com", "one-too-many", "keep;\n")
    assert e.value.code == "QUOTA/MAXSCRIPTS"
    with pytest.raises(SieveStoreError):
        store.put("bob@example.com", "bad\nname", "keep;\n")
    with pytest.raises(SieveStoreError) as e:
        store.put("nobody@example.com", "a", "keep;\n")
    assert "does not exist" in str(e.value)


def test_removing_a_user_removes_its_scripts(store, directory):
    store.put("bob@example.com", "a", "keep;\n", activate=True)
    directory.remove_user("bob@example.com")
    directory.add_user("bob@example.com", "pw")
    assert store.scripts("bob@example.com") == []


def test_vacation_once_per_period_with_an_injected_clock(store):
    day = 86400.0
    due = store.vacation_due
    assert due("bob@example.com", "a@remote.test", "h", 7 * day, now=1000.0)
    assert not due("bob@example.com", "A@Remote.test", "h", 7 * day, now=1000.0 + 6 * day)
    assert due("bob@example.com", "a@remote.test", "other handle", 7 * day, now=1001.0)
    assert due("bob@example.com", "a@remote.test", "h", 7 * day, now=1000.0 + 7.5 * day)
    assert store.forget_vacations(older_than=1000.0 + 7 * day) == 1


def test_a_storm_from_one_sender_gets_one_reply_per_period(store):
    """A thousand deliveries from one sender at once (threads, as the MDA runs them), once
    for a new sender and once after the period ran out: one True each time."""
    day = 86400.0

    def storm(now: float) -> int:
        def one(_: int) -> bool:
            for _attempt in range(20):  # SQLite: "database is locked" under this contention
                try:
                    return store.vacation_due("bob@example.com", "storm@remote.test", "h",
                                              7 * day, now)
                except DirectoryUnavailable:
                    time.sleep(0.01)
            raise AssertionError("the database stayed locked")

        with ThreadPoolExecutor(16) as pool:
            return sum(pool.map(one, range(1000)))

    assert storm(1000.0) == 1
    assert storm(1000.0 + 3 * day) == 0
    assert storm(1000.0 + 8 * day) == 1  # the period is over: answered once more, once
