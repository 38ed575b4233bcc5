"""Outbound throughput (issue 22), pochta against Postfix in the same run. Not a test: it prints
figures and a met/MISSED line per target.

    .venv/bin/python bench/outbound.py                    # 5000 x 4 KB, plain and STARTTLS
    .venv/bin/python bench/outbound.py -n 2000 --runs 3   # medians of 3, the systems alternating

Messages for 20 remote domains (d0.test ... d19.test) are injected on port 25 from a trusted
network (pochta's ``[mta] relay_networks``, Postfix's ``mynetworks``) by 20 sessions, one
message per connection, and each system relays them to the domains' MX. The MXes are one sink
process listening on 127.0.0.10 ... 127.0.0.29 (one address per domain), with STARTTLS offered
or not. Measured until the sink holds every message: messages per second, connections the sink
saw (how many messages each carried: connection reuse), the most transactions one domain had
at once (the per-destination limit: pochta's 4, Postfix's 20), and lost or duplicated messages
(by Message-ID, at the sink).

pochta finds the MXes through a DNS stub (answers cached for their TTL, as from a real
resolver); Postfix, which must not ask the system's resolver here, gets a transport map
straight to each domain's address, which spares it the look-ups.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import signal
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.sharedctypes import Synchronized
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import run  # noqa: E402
from bench.bigqueue import dns_stub  # noqa: E402
from bench.run import (  # noqa: E402
    POSTFIX_DIR,
    _reply,
    free_port,
    message,
    proc_cpu,
    to_trash,
)
from bench.sink import SinkSessions  # noqa: E402

DOMAINS = [f"d{i}.test" for i in range(20)]


def mx_address(i: int) -> str:
    return f"127.0.0.{10 + i}"


# -- the sink: every domain's MX, in a process of its own ----------------------------------------

@dataclass
class SinkReport:
    ids: Counter[str]
    connections: int
    most_at_once: int  # transactions for one domain at the same time, the highest seen


def sink_main(port: int, tls_files: tuple[str, str] | None, delay: float, rtt: float,
              count: Synchronized[int], control: Connection) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    tls = None
    if tls_files:
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.load_cert_chain(*tls_files)

    def counted() -> None:
        with count.get_lock():
            count.value += 1

    sessions = SinkSessions(tls, delay, counted, rtt)

    async def main() -> None:
        servers = [await asyncio.start_server(sessions.session, mx_address(i), port,
                                              backlog=512, limit=1 << 20)
                   for i in range(len(DOMAINS))]
        control.send("ready")
        loop = asyncio.get_running_loop()
        asked = asyncio.Event()
        loop.add_reader(control.fileno(), asked.set)
        await asked.wait()
        control.recv()
        for s in servers:
            s.close()
        control.send(SinkReport(sessions.ids, sessions.connections, sessions.most_at_once))

    asyncio.run(main())


class Sink:
    def __init__(self, tls_files: tuple[str, str] | None, delay: float, rtt: float) -> None:
        self.port = free_port()
        self.count: Synchronized[int] = multiprocessing.Value("i", 0)
        self.control, child = multiprocessing.Pipe()
        self.proc = multiprocessing.get_context("fork").Process(
            target=sink_main, args=(self.port, tls_files, delay, rtt, self.count, child),
            daemon=True)
        self.proc.start()
        if not self.control.poll(20) or self.control.recv() != "ready":
            raise RuntimeError("the sink did not start")

    def report(self) -> SinkReport:
        self.control.send("report")
        report: SinkReport = self.control.recv()
        self.proc.join(10)
        return report


# -- the two relays ---------------------------------------------------------------------------

class Pochta(run.Pochta):
    """bench/run.py's pochta, relaying for 127.0.0.0/8 to the MXes the DNS stub names."""

    def __init__(self, sink_port: int, dns_port: int) -> None:
        super().__init__('relay_networks = ["127.0.0.0/8"]', sections=f"""
[delivery]
resolver = "127.0.0.1:{dns_port}"
smtp_port = {sink_port}
""")
        self.queue_pid = self.pids()["queue"]

    def cpu(self) -> float:
        return proc_cpu(self.procs["mta"].pid) + proc_cpu(self.queue_pid)


class Postfix:
    name = "postfix"
    keep = False  # its queue and log are in /var/spool/postfix and /tmp/bench-postfix anyway

    def __init__(self, sink_port: int, tls: bool) -> None:
        subprocess.run(["bash", str(POSTFIX_DIR / "setup.sh")], check=True, capture_output=True)
        subprocess.run(["postsuper", "-d", "ALL"], capture_output=True)
        transport = Path("/tmp/bench-postfix/transport")
        transport.parent.mkdir(exist_ok=True)
        transport.write_text("".join(f"{d} smtp:[{mx_address(i)}]:{sink_port}\n"
                                     for i, d in enumerate(DOMAINS)))
        # setup.sh installs the reference main.cf again before every other benchmark.
        subprocess.run(["postconf", "-e", f"transport_maps = texthash:{transport}",
                        f"smtp_tls_security_level = {'may' if tls else 'none'}"], check=True)
        subprocess.run(["bash", str(POSTFIX_DIR / "start.sh")], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.port = 2525

    def cpu(self) -> float:
        return 0.0

    def stop(self) -> None:
        subprocess.run(["bash", str(POSTFIX_DIR / "stop.sh")], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        subprocess.run(["postsuper", "-d", "ALL"], capture_output=True)


# -- the load ---------------------------------------------------------------------------------

async def inject(port: int, n: int, sessions: int, size: int, run: str) -> int:
    """n messages, message i for rcpt@d<i % 20>.test, one per connection; the failures."""
    todo = list(range(n - 1, -1, -1))
    failures = 0

    async def one(i: int) -> bool:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            await _reply(reader)
            writer.write(b"EHLO load.bench.test\r\n")
            await _reply(reader)
            rcpt = f"rcpt{i}@{DOMAINS[i % len(DOMAINS)]}".encode()
            writer.write(b"MAIL FROM:<sender@bench.test>\r\nRCPT TO:<" + rcpt + b">\r\nDATA\r\n")
            replies = [await _reply(reader) for _ in range(3)]
            if not replies[2].startswith(b"354"):
                return False
            writer.write(message(i, size, run).replace(b"\r\n.", b"\r\n..") + b".\r\n")
            ok = (await _reply(reader)).startswith(b"250")
            writer.write(b"QUIT\r\n")
            return ok
        finally:
            writer.close()

    async def worker() -> None:
        nonlocal failures
        while todo:
            i = todo.pop()
            try:
                ok = await asyncio.wait_for(one(i), 60)
            except (OSError, TimeoutError, ConnectionError):
                ok = False
            failures += not ok

    await asyncio.gather(*(worker() for _ in range(sessions)))
    return failures


@dataclass
class Result:
    system: str
    tls: bool
    rate: float
    connections: int
    most_at_once: int
    cpu_ms: float
    lost: int
    dup: int


def run_one(kind: str, tls: bool, n: int, size: int, dns_port: int,
            tls_files: tuple[str, str], delay: float, rtt: float) -> Result:
    sink = Sink(tls_files if tls else None, delay, rtt)
    system: Pochta | Postfix = (Pochta(sink.port, dns_port) if kind == "pochta"
                                else Postfix(sink.port, tls))
    run = f"o{int(time.time() * 1000) % 10**9}"
    report = None
    try:
        cpu0 = system.cpu()
        t0 = time.perf_counter()
        failures = asyncio.run(inject(system.port, n, 20, size, run))
        deadline = time.perf_counter() + 600
        while sink.count.value < n - failures and time.perf_counter() < deadline:
            time.sleep(0.01)
        elapsed = time.perf_counter() - t0
        time.sleep(0.5)  # late duplicates would show up now
        cpu = system.cpu() - cpu0
        report = sink.report()
        ours = {k: v for k, v in report.ids.items() if k.startswith(run + ".")}
        lost = n - len(ours)
        dup = sum(v - 1 for v in ours.values())
        return Result(system.name, tls, len(ours) / elapsed, report.connections,
                      report.most_at_once, 1000 * cpu / n, lost, dup)
    finally:
        system.keep = report is None or lost > 0 or dup > 0
        system.stop()
        if sink.proc.is_alive():
            sink.proc.kill()


def median(results: list[Result]) -> Result:
    r = results[0]
    return Result(r.system, r.tls, statistics.median(x.rate for x in results),
                  int(statistics.median(x.connections for x in results)),
                  max(x.most_at_once for x in results),
                  statistics.median(x.cpu_ms for x in results),
                  sum(x.lost for x in results), sum(x.dup for x in results))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", "--messages", type=int, default=5000)
    parser.add_argument("-s", "--size", type=int, default=4096)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--no-postfix", action="store_true", help="pochta alone")
    parser.add_argument("--mx-delay", type=float, default=0.0, metavar="SECONDS",
                        help="the MX waits this long before its 250 to DATA (a distant host: "
                        "deliveries pile up to the per-destination limits)")
    parser.add_argument("--rtt", type=float, default=0.0, metavar="SECONDS",
                        help="the MX is this many seconds away: each time a client waits for "
                        "its replies costs one round trip (pipelining clients wait less)")
    args = parser.parse_args()
    from store.tlscert import make_self_signed

    folder = Path(tempfile.mkdtemp(prefix="pochta-outbound-sink-"))
    tls_files = (str(folder / "cert.pem"), str(folder / "key.pem"))
    make_self_signed(Path(tls_files[0]), Path(tls_files[1]), "sink.test")
    dns_port = free_port()
    zones: dict[tuple[str, str], list[str]] = {}
    for i, d in enumerate(DOMAINS):
        zones[(f"{d}.", "MX")] = [f"10 mx.{d}."]
        zones[(f"mx.{d}.", "A")] = [mx_address(i)]
    dns_sock, running = dns_stub(dns_port, zones)
    kinds = ["pochta"] if args.no_postfix else ["pochta", "postfix"]
    verdicts = []
    try:
        print(f"{args.messages} x {args.size // 1024} KB to {len(DOMAINS)} domains, 20 injecting "
              f"sessions, MX delay {args.mx_delay * 1000:.0f} ms, round trip "
              f"{args.rtt * 1000:.0f} ms; medians of {args.runs}")
        print(f"{'system':8} {'tls':8} {'msg/s':>7} {'conns':>6} {'msgs/conn':>9} "
              f"{'per-dest':>8} {'cpu ms/msg':>10} {'lost':>4} {'dup':>4}")
        for tls in (False, True):
            results: dict[str, list[Result]] = {k: [] for k in kinds}
            for i in range(args.runs):
                for kind in kinds if i % 2 == 0 else kinds[::-1]:
                    results[kind].append(run_one(kind, tls, args.messages, args.size, dns_port,
                                                 tls_files, args.mx_delay, args.rtt))
            med = {k: median(v) for k, v in results.items()}
            for r in med.values():
                cpu = f"{r.cpu_ms:.2f}" if r.system == "pochta" else "-"
                print(f"{r.system:8} {'starttls' if tls else 'plain':8} {r.rate:7.0f} "
                      f"{r.connections:6d} {args.messages / max(1, r.connections):9.1f} "
                      f"{r.most_at_once:8d} {cpu:>10} {r.lost:4d} {r.dup:4d}")
            if "postfix" in med:
                ratio = med["pochta"].rate / med["postfix"].rate
                verdicts.append((f"outbound {'STARTTLS' if tls else 'plain'} >= 1.5x Postfix",
                                 ratio >= 1.5, f"{ratio:.2f}x"))
            verdicts.append((f"pochta {'STARTTLS' if tls else 'plain'}: at most 4 transactions "
                             "per destination", med["pochta"].most_at_once <= 4,
                             f"{med['pochta'].most_at_once}"))
            verdicts.append((f"{'STARTTLS' if tls else 'plain'}: none lost or duplicated",
                             all(r.lost == 0 and r.dup == 0 for r in med.values()),
                             ", ".join(f"{r.system} {r.lost}/{r.dup}" for r in med.values())))
        for what, ok, figure in verdicts:
            print(f"target {'met' if ok else 'MISSED'}: {what} ({figure})")
    finally:
        running[0] = False
        dns_sock.close()
        to_trash(folder)


if __name__ == "__main__":
    main()
