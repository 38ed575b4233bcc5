"""The queue runner's wake-up channel (mta/notice.py), over a real unix socket."""

import asyncio
import os
import subprocess
import sys

import pytest

from mta.notice import (
    AtrnRequest,
    NoRunner,
    Notice,
    NoticeSocket,
    Notifier,
    notice_address,
    parse_notice,
    send_channel,
    send_command,
)


def qid(i: int) -> str:
    return f"{i:020x}"


@pytest.mark.parametrize(("data", "expected"), [
    (b"0123456789abcdef0123 x 00000000000000000001",
     Notice(ids=["0123456789abcdef0123", "00000000000000000001"])),
    (b"!flush", Notice(flush=True)),
    (b"!flush Example.NET.", Notice(flush=True, flush_domain="example.net")),
    (b"!flush a b", Notice()),
    (b"!flush a/b", Notice()),
    (b"!rescan", Notice(rescan=True)),
    (b"!hold 0123456789abcdef0123", Notice(admin=("hold", "0123456789abcdef0123"))),
    (b"!release *", Notice(admin=("release", "*"))),
    (b"!bounce *", Notice()),  # one message at a time
    (b"!hold ../x", Notice()),
    (b"!flush @Example.net", Notice(flush=True, flush_domain="example.net", subdomains=True)),
    (b"!rm -rf", Notice()),
    (b"!atrn c@example.com 192.0.2.1 A.test,b.test",
     Notice(atrn=AtrnRequest("c@example.com", "192.0.2.1", ("a.test", "b.test")))),
    (b"!atrn c@example.com 192.0.2.1 a/b", Notice()),
    (b"!atrn nobody 192.0.2.1 a.test", Notice()),
    (b"\xff\xfe", Notice()),
    (b"", Notice()),
])
def test_notices_are_parsed_word_by_word_and_never_raise(data, expected):
    assert parse_notice(data) == expected


def test_an_atrn_brings_its_connection_and_nothing_else_keeps_one(tmp_path):
    import socket

    runner = NoticeSocket(tmp_path)
    assert runner.bind()
    try:
        ours, theirs = socket.socketpair()
        with ours, theirs:
            send_channel(tmp_path, "!atrn c@example.com 127.0.0.1 a.test", theirs)
            send_channel(tmp_path, "!flush", theirs)  # a socket with a flush: closed unread
            [atrn, flush] = runner.receive()
            assert atrn.atrn == AtrnRequest("c@example.com", "127.0.0.1", ("a.test",))
            assert atrn.channel is not None and flush.channel is None and flush.flush
            with atrn.channel:
                atrn.channel.sendall(b"453 4.0.0 You have no mail\r\n")
                assert ours.recv(100).startswith(b"453")
        assert len(os.listdir("/proc/self/fd")) < 64  # no descriptor leaked
    finally:
        runner.close()


def test_a_burst_larger_than_the_socket_queue_arrives_whole(tmp_path):
    runner = NoticeSocket(tmp_path)
    assert runner.bind()

    async def main() -> set[str]:
        notifier = Notifier(tmp_path)
        got: set[str] = set()
        for round_ in range(30):  # 30 loop iterations of 100 commits: more datagrams than
            for i in range(100):  # the kernel queues (10 by default) while nobody reads
                notifier.notify(qid(round_ * 100 + i))
            await asyncio.sleep(0)
        for _ in range(500):  # now the runner reads; the held ids follow as room appears
            for notice in runner.receive():
                got.update(notice.ids)
            if len(got) == 3000:
                break
            await asyncio.sleep(0.01)
        notifier.close()
        return got

    try:
        assert asyncio.run(main()) == {qid(i) for i in range(3000)}
    finally:
        runner.close()


def test_a_notifier_reaches_the_runner_that_replaced_the_one_it_knew(tmp_path):
    """The first runner exits, a new one binds (and has already scanned the spool): the next
    id must reach it, not be dropped on the old connection."""
    old = NoticeSocket(tmp_path)
    assert old.bind()

    async def main() -> list[Notice]:
        notifier = Notifier(tmp_path)
        notifier.notify(qid(1))
        await asyncio.sleep(0.01)
        assert [n.ids for n in old.receive()] == [[qid(1)]]
        old.close()
        new = NoticeSocket(tmp_path)
        assert new.bind()
        notifier.notify(qid(2))
        await asyncio.sleep(0.01)
        got = new.receive()
        new.close()
        notifier.close()
        return got

    assert [n.ids for n in asyncio.run(main())] == [[qid(2)]]


def test_a_runner_that_stopped_reading_gets_one_rescan_instead_of_the_dropped_ids(tmp_path):
    runner = NoticeSocket(tmp_path)
    assert runner.bind()

    async def main() -> list[Notice]:
        notifier = Notifier(tmp_path)
        notifier.MAX_PENDING = 500
        for round_ in range(20):
            for i in range(100):
                notifier.notify(qid(round_ * 100 + i))
            await asyncio.sleep(0)
        got: list[Notice] = []
        for _ in range(100):
            got += runner.receive()
            if any(n.rescan for n in got) and not notifier.pending:
                break
            await asyncio.sleep(0.01)
        notifier.close()
        return got

    try:
        got = asyncio.run(main())
    finally:
        runner.close()
    assert sum(n.rescan for n in got) == 1
    assert len({i for n in got for i in n.ids}) < 2000  # some were dropped: the rescan covers them


def test_without_a_runner_the_cli_says_so(tmp_path):
    with pytest.raises(NoRunner):
        send_command(tmp_path, "!flush")


def test_only_root_and_the_runners_own_user_are_heard(tmp_path):
    """Any local user can reach an abstract socket; a stranger's flood is ignored."""
    runner = NoticeSocket(tmp_path)
    assert runner.bind()
    try:
        send_command(tmp_path, "!flush")
        assert runner.receive() == [Notice(flush=True)]
        if os.geteuid() != 0:
            pytest.skip("sending as another user needs root")
        script = ("import socket,sys; s=socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM); "
                  "s.connect('\\0' + sys.argv[1]); s.send(b'!flush')")
        subprocess.run([sys.executable, "-c", script, notice_address(tmp_path)[1:]],
                       user="nobody", check=True, timeout=30)
        send_command(tmp_path, "!rescan")  # the sentinel: the stranger's datagram came first
        assert runner.receive() == [Notice(rescan=True)]
    finally:
        runner.close()


def test_a_notice_socket_name_is_held_by_one_runner(tmp_path):
    first, second = NoticeSocket(tmp_path), NoticeSocket(tmp_path)
    try:
        assert first.bind()
        assert not second.bind()
        first.close()
        assert second.bind()
    finally:
        first.close()
        second.close()


def test_the_socket_name_is_per_spool(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    assert notice_address(tmp_path / "a") != notice_address(tmp_path / "b")
