"""Thousands of connections (issue 22), pochta's side: not a test, figures and met/MISSED lines.

    .venv/bin/python bench/connections.py                 # 10,000 idle, then 2,000 busy sessions
    .venv/bin/python bench/connections.py --idle 2000 --busy 500

1. ``--idle`` sessions open on port 25 and stay silent after the banner (a botnet's
   connections): the MTA's RSS with them (target < 150 MB at 10,000), and how long a
   legitimate client's whole transaction takes meanwhile (target < 1 s).
2. ``--busy`` sessions each sending messages at once (4 KB, one per connection): no crash, and
   every message answered 250 is in the mailbox exactly once.

Config changed from the defaults, and why: ``[mta] max_connections`` (200 by default, the
limit a user gets) is raised above the session count, which is what this measures. Clients
come from 127.0.0.1, in ``local_networks``, so the per-address limit does not apply.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.run import (  # noqa: E402
    Pochta,
    count_ids,
    load,
    message,
    proc_rss_mb,
    send_one,
    wait_files,
)


async def open_idle(port: int, n: int) -> list[asyncio.StreamWriter]:
    writers: list[asyncio.StreamWriter] = []
    failed = 0

    async def one() -> None:
        nonlocal failed
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            await asyncio.wait_for(reader.readline(), 30)  # the banner: the session exists
            writers.append(writer)
        except (OSError, TimeoutError):
            failed += 1

    for start in range(0, n, 500):  # in waves: the listen backlog is finite
        await asyncio.gather(*(one() for _ in range(min(500, n - start))))
    if failed:
        print(f"  {failed} of {n} idle sessions could not be opened")
    return writers


async def idle_phase(system: Pochta, idle: int) -> tuple[float, float, float]:
    pid = system.pids()["mta"]
    base = proc_rss_mb(pid)
    t0 = time.perf_counter()
    writers = await open_idle(system.port, idle)
    opened = time.perf_counter() - t0
    await asyncio.sleep(1)
    rss = proc_rss_mb(pid)
    latencies: list[float] = []
    t1 = time.perf_counter()
    ok = await asyncio.wait_for(send_one(system.port, message(0, 4096, "legit"), latencies), 60)
    served = time.perf_counter() - t1
    print(f"idle sessions: {len(writers)} open in {opened:.1f} s; MTA RSS {base:.1f} MB -> "
          f"{rss:.1f} MB (+{1024 * (rss - base) / max(len(writers), 1):.1f} KB each)")
    print(f"a legitimate client meanwhile: whole transaction in {served * 1000:.0f} ms "
          f"({'250' if ok else 'refused'})")
    for w in writers:
        w.close()
    await asyncio.sleep(1)
    return rss, served, float(ok)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--idle", type=int, default=10_000)
    ap.add_argument("--busy", type=int, default=2_000)
    args = ap.parse_args()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = args.idle + args.busy + 1000
    if hard < want:
        raise SystemExit(f"the hard limit of open files is {hard}; this needs {want}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # the servers inherit it
    changed = f"max_connections = {max(args.idle, args.busy) + 100}"
    print(f"config changed from the defaults: [mta] {changed} (default 200)")
    system = Pochta(changed)
    try:
        rss, served, ok = asyncio.run(idle_phase(system, args.idle))
        wait_files(system.new_dir, 1, 30)
        n = args.busy * 2
        elapsed, _, failures = asyncio.run(load(system.port, n, args.busy, 4096, "busy"))
        accepted = n - failures
        wait_files(system.new_dir, accepted + 1, 300)
        ids = count_ids(system.new_dir, "busy")
        duplicated = sum(c - 1 for c in ids.values() if c > 1)
        alive = all(p.poll() is None for p in system.procs.values())
        print(f"busy sessions: {args.busy} at once, {n} messages in {elapsed:.1f} s: "
              f"{accepted} answered 250, {len(ids)} delivered, {duplicated} duplicated, "
              f"processes {'alive' if alive else 'DIED'}")
        if args.idle == 10_000:
            print(f"target {'met' if rss < 150 else 'MISSED'}: 10,000 idle sessions under "
                  f"150 MB of MTA RSS ({rss:.1f} MB)")
            print(f"target {'met' if ok and served < 1 else 'MISSED'}: a legitimate client "
                  f"served in under 1 s meanwhile ({served * 1000:.0f} ms)")
        print(f"target {'met' if alive and len(ids) >= accepted and not duplicated else 'MISSED'}"
              f": {args.busy} busy sessions, every 250'd message delivered once "
              f"({len(ids)} of {accepted}, {duplicated} duplicated)")
    finally:
        system.stop()


if __name__ == "__main__":
    main()
