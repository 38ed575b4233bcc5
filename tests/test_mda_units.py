from mda.maildir import UniqueNames
from mda.mbox import entry, quote, split_entries, unquote
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


def test_header_prepending():
    out = stored_message(b"Subject: x\r\n\r\nbody", "a@b.test", "c@d.test")
    assert out == b"Return-Path: <a@b.test>\nDelivered-To: c@d.test\nSubject: x\n\nbody\n"
    assert stored_message(b"x\r\n", "<>", "c@d").startswith(b"Return-Path: <>\n")


def test_group_dir_sync_covers_concurrent_callers(tmp_path, monkeypatch):
    import threading
    import time

    from store import fsio

    calls = []
    real = fsio.fsync_dir

    def slow_fsync(path):
        calls.append(path)
        time.sleep(0.05)
        real(path)

    monkeypatch.setattr(fsio, "fsync_dir", slow_fsync)
    g = fsio.GroupDirSync()
    threads = [threading.Thread(target=g.sync, args=(tmp_path,)) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    # Everyone returned, and far fewer fsyncs than callers ran (at most one running, one next).
    assert 1 <= len(calls) <= 4
