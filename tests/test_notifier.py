"""New-message notices from the MTA/MSA to the queue runner, over a real unix socket."""

import asyncio
import socket

from mta.envelope import Envelope
from mta.queue import Notifier, notice_address
from mta.spool import KICK, Spool


def env(i: int) -> Envelope:
    return Envelope(id=f"{i:020x}", created=0.0, mail_from="", recipients=[])


def test_a_burst_larger_than_the_socket_queue_arrives_whole_without_a_marker(tmp_path):
    spool = Spool(tmp_path)
    runner = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    runner.bind(notice_address(spool))
    runner.setblocking(False)

    async def main() -> set[str]:
        notifier = Notifier(spool)
        got: set[str] = set()
        for round_ in range(30):  # 30 loop iterations of 100 commits: more datagrams than
            for i in range(100):  # the kernel queues (10 by default) while nobody reads
                notifier.notify(env(round_ * 100 + i))
            await asyncio.sleep(0)
        for _ in range(500):  # now the runner reads; the held ids follow as room appears
            try:
                while True:
                    got.update(runner.recv(1 << 16).decode().split())
            except BlockingIOError:
                pass
            if len(got) == 3000:
                break
            await asyncio.sleep(0.01)
        notifier.close()
        return got

    try:
        assert asyncio.run(main()) == {f"{i:020x}" for i in range(3000)}
        assert not (tmp_path / KICK).exists()
    finally:
        runner.close()


def test_without_a_runner_the_marker_makes_the_next_one_rescan(tmp_path):
    spool = Spool(tmp_path)

    async def main() -> None:
        notifier = Notifier(spool)
        notifier.notify(env(1))
        await asyncio.sleep(0.01)
        notifier.close()

    asyncio.run(main())
    assert (tmp_path / KICK).exists()
