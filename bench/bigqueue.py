"""A big queue (issue 22), pochta's side: N messages for a remote domain whose MX is down, and
what that does to local mail. Not a test: it prints figures and a met/MISSED line per target.

    .venv/bin/python bench/bigqueue.py              # 100,000 queued 4 KB messages
    .venv/bin/python bench/bigqueue.py -n 20000

Measured: the queue runner's RSS per queued message; restart to the first local delivery;
`pochta queue list`'s first page; local mail's end-to-end rate with the queue full against
an empty queue. The remote domain's DNS points at a closed port on 127.0.0.1 (connection
refused), as the issue describes. With ``--compare-postfix``, Postfix (../shared/bench) gets
the same number of messages for the dead MX and drains them to the same sink. Only the drain
is compared with Postfix; the other figures are pochta's alone for now.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.run import (  # noqa: E402
    POSTFIX_DIR,
    free_port,
    load,
    pochta_bin,
    proc_cpu,
    proc_rss_mb,
    wait_files,
)
from bench.sink import SinkSessions  # noqa: E402
from mta.envelope import Envelope, Recipient  # noqa: E402

DOWN = {("down.test.", "MX"): ["10 mx.down.test."], ("mx.down.test.", "A"): ["127.0.0.1"]}


def dns_stub(port: int, zones: dict[tuple[str, str], list[str]] = DOWN
             ) -> tuple[socket.socket, list[bool]]:
    """Answers ``zones`` ((name, type): records, TTL 60); by default down.test: MX
    mx.down.test, A 127.0.0.1 (nothing listens on the SMTP port)."""
    import threading

    import dns.message
    import dns.rdatatype
    import dns.rrset

    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", port))
    sock.settimeout(0.2)
    running = [True]

    def serve() -> None:
        while running[0]:
            try:
                data, peer = sock.recvfrom(4096)
                q = dns.message.from_wire(data)
            except Exception:
                continue
            r = dns.message.make_response(q)
            name = q.question[0].name.to_text().lower()
            rtype = dns.rdatatype.to_text(q.question[0].rdtype)
            if (name, rtype) in zones:
                r.answer.append(dns.rrset.from_text_list(name, 60, "IN", rtype,
                                                         zones[(name, rtype)]))
            else:  # "no such record", which a resolver may remember (RFC 2308)
                r.authority.append(dns.rrset.from_text(
                    "test.", 60, "IN", "SOA", "ns.test. hostmaster.test. 1 60 60 60 60"))
            sock.sendto(r.to_wire(), peer)

    threading.Thread(target=serve, daemon=True).start()
    return sock, running


class Sink:
    """The MX once it is back, in a thread of ours: it counts messages and connections."""

    def __init__(self, port: int) -> None:
        import threading

        self.port = port
        self.sessions = SinkSessions()
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(self.loop)
            self.server = self.loop.run_until_complete(asyncio.start_server(
                self.sessions.session, "127.0.0.1", port, backlog=512, limit=1 << 20))
            ready.set()
            self.loop.run_forever()

        threading.Thread(target=run, daemon=True).start()
        ready.wait(10)

    @property
    def count(self) -> int:
        return self.sessions.count

    @property
    def connections(self) -> int:
        return self.sessions.connections

    def stop(self) -> None:
        # The loop's thread is a daemon: it ends with the benchmark, sessions and all.
        self.loop.call_soon_threadsafe(self.server.close)


class Stack:
    def __init__(self, folder: Path) -> None:
        self.dir = folder
        self.port = free_port()
        self.dns_port = free_port()
        self.mx_port = free_port()
        self.cfg = folder / "pochta.toml"
        self.cfg.write_text(f"""
hostname = "mx.bench.test"
data_dir = "{folder}"
log_level = "warning"
[mta]
listen = ["127.0.0.1:{self.port}"]
[msa]
listen = []
listen_tls = []
[mda]
listen = "127.0.0.1:{free_port()}"
[delivery]
resolver = "127.0.0.1:{self.dns_port}"
smtp_port = {self.mx_port}
""")
        self.run = [pochta_bin(), "--config", str(self.cfg)]
        subprocess.run(self.run + ["db", "upgrade"], check=True, capture_output=True)
        subprocess.run(self.run + ["domain", "add", "bench.test"], check=True, capture_output=True)
        subprocess.run(self.run + ["user", "add", "user@bench.test", "--password-stdin"],
                       input=b"bench\n", check=True, capture_output=True)
        self.procs: list[subprocess.Popen[bytes]] = []
        self.new_dir = folder / "mail" / "bench.test" / "user" / "new"

    def start(self) -> float:
        """Start mda and mta; when port 25 accepts (monotonic)."""
        self.procs = [subprocess.Popen(self.run + ["serve", role], stderr=subprocess.DEVNULL)
                      for role in ("mda", "mta")]
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                return time.monotonic()
            except OSError:
                time.sleep(0.02)
        raise TimeoutError("the MTA did not start")

    def queue_pid(self) -> int:
        """The queue runner (serve mta's child), once it has started (its CPU time still)."""
        mta = self.procs[1].pid
        for _ in range(200):
            children = Path(f"/proc/{mta}/task/{mta}/children").read_text().split()
            if children:
                pid = int(children[0])
                last, deadline = -1.0, time.time() + 120
                while time.time() < deadline and (now := proc_cpu(pid)) != last:
                    last = now
                    time.sleep(0.5)
                return pid
            time.sleep(0.05)
        raise TimeoutError("no queue runner")

    def stop(self) -> None:
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()


def postfix_drain(n: int, mx_port: int) -> tuple[int, float, int]:
    """Postfix's side of the drain: n messages for down.test (a transport map to the dead MX's
    port: Postfix must not ask the system's resolver) injected with smtp-source, deferred,
    then the sink up and `postqueue -f`. (messages drained, seconds, connections)."""
    subprocess.run(["bash", str(POSTFIX_DIR / "setup.sh")], check=True, capture_output=True)
    subprocess.run(["postsuper", "-d", "ALL"], capture_output=True)
    transport = Path("/tmp/bench-postfix/transport")
    transport.parent.mkdir(exist_ok=True)
    transport.write_text(f"down.test smtp:[127.0.0.1]:{mx_port}\n")
    subprocess.run(["postconf", "-e", f"transport_maps = texthash:{transport}"], check=True)
    subprocess.run(["bash", str(POSTFIX_DIR / "start.sh")], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        subprocess.run(["smtp-source", "-s", "20", "-m", str(n), "-l", "4096",
                        "-f", "sender@bench.test", "-t", "u@down.test", "127.0.0.1:2525"],
                       check=True, capture_output=True, timeout=1800)
        deadline = time.monotonic() + 1800
        while time.monotonic() < deadline and (
                queued("deferred") < n or queued("incoming") or queued("active")):
            time.sleep(0.5)
        sink = Sink(mx_port)
        t0 = time.monotonic()
        subprocess.run(["postqueue", "-f"], check=True)
        while sink.count < n and time.monotonic() < deadline:
            time.sleep(0.2)
        drained = time.monotonic() - t0
        sink.stop()
        return sink.count, drained, sink.connections
    finally:
        subprocess.run(["bash", str(POSTFIX_DIR / "stop.sh")], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        subprocess.run(["postsuper", "-d", "ALL"], capture_output=True)


def queued(name: str) -> int:
    return sum(len(files) for _, _, files in os.walk(f"/var/spool/postfix/{name}"))


def fill(spool: Path, n: int) -> None:
    """n committed 4 KB messages for down.test, as the MTA writes them (no fsync: setup)."""
    body = b"Subject: queued\r\n\r\n" + b"x" * 4000 + b"\r\n"
    now = time.time()
    for i in range(n):
        env = Envelope(id=f"{int(now * 1e6) - n + i:014x}{i % 0xffffff:06x}", created=now,
                       mail_from="sender@bench.test", size=len(body),
                       recipients=[Recipient(address=f"u{i}@down.test",
                                             original=f"u{i}@down.test", next_attempt=now)])
        (spool / f"{env.id}.msg").write_bytes(env.to_json() + b"\n" + body)


def local_rate(port: int, new_dir: Path, n: int, run: str) -> float:
    before = len(list(new_dir.iterdir())) if new_dir.is_dir() else 0
    t0 = time.monotonic()
    asyncio.run(load(port, n, 10, 4096, run))
    wait_files(new_dir, before + n, timeout=300)
    return n / (time.monotonic() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", "--messages", type=int, default=100_000)
    parser.add_argument("--local", type=int, default=1000, help="local messages per rate run")
    parser.add_argument("--compare-postfix", action="store_true",
                        help="and Postfix's drain of the same number of messages")
    parser.add_argument("--profile", metavar="FILE",
                        help="py-spy's collapsed stacks of the queue runner while it drains")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="pochta-bigq-"))
    s = Stack(folder)
    dns_sock, running = dns_stub(s.dns_port)
    try:
        s.start()
        empty_rss = proc_rss_mb(s.queue_pid())
        empty_rate = local_rate(s.port, s.new_dir, args.local, "empty")
        s.stop()
        fill(folder / "spool", args.messages)
        up = s.start()
        delivered = 0.0
        asyncio.run(load(s.port, 1, 1, 4096, "first"))
        wait_files(s.new_dir, args.local + 1, timeout=600)
        delivered = time.monotonic() - up
        full_rss = proc_rss_mb(s.queue_pid())
        per_message_kb = 1024 * (full_rss - empty_rss) / args.messages
        full_rate = local_rate(s.port, s.new_dir, args.local, "full")
        t0 = time.monotonic()
        listing = subprocess.run(s.run + ["queue", "list"], capture_output=True, text=True)
        first_page = time.monotonic() - t0
        print(f"queued for a dead MX: {args.messages} x 4 KB")
        print(f"queue runner RSS: {empty_rss:.0f} MB empty -> {full_rss:.0f} MB full "
              f"({per_message_kb:.2f} KB per message)")
        print(f"restart to the first local delivery: {delivered:.2f} s")
        print(f"`pochta queue list` first page: {first_page:.2f} s "
              f"({listing.stdout.strip().splitlines()[-1]})")
        print(f"local mail end to end (10 sessions, 4 KB): {empty_rate:.0f} msg/s with the queue "
              f"empty, {full_rate:.0f} msg/s full ({100 * full_rate / empty_rate:.0f} %)")
        sink = Sink(s.mx_port)  # the MX is back
        spy = subprocess.Popen(["py-spy", "record", "-p", str(s.queue_pid()), "-f", "raw",
                                "-o", args.profile, "-r", "200"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) \
            if args.profile else None
        t0 = time.monotonic()
        subprocess.run(s.run + ["queue", "flush"], check=True, capture_output=True)
        deadline = t0 + 1800
        while sink.count < args.messages and time.monotonic() < deadline:
            time.sleep(0.2)
        drained = time.monotonic() - t0
        sink.stop()
        if spy is not None:
            spy.send_signal(2)  # SIGINT: py-spy writes what it sampled
            spy.wait(60)
        rate = sink.count / drained
        print(f"drain once the MX is back (flush): {sink.count} messages in {drained:.1f} s "
              f"over {sink.connections} connections, {rate:.0f} msg/s")
        s.stop()
        verdicts: list[tuple[str, bool, str]] = []
        if args.compare_postfix:
            count, seconds, conns = postfix_drain(args.messages, free_port())
            theirs = count / seconds
            print(f"Postfix's drain of the same queue (postqueue -f): {count} messages in "
                  f"{seconds:.1f} s over {conns} connections, {theirs:.0f} msg/s")
            verdicts.append(("drain rate >= Postfix's", rate >= theirs,
                             f"{rate:.0f} against {theirs:.0f} msg/s"))
        verdicts += [
            ("runner RSS grows < 1 KB per queued message", per_message_kb < 1.0,
             f"{per_message_kb:.2f} KB"),
            ("restart to first local delivery < 10 s", delivered < 10, f"{delivered:.2f} s"),
            ("queue list first page < 1 s", first_page < 1, f"{first_page:.2f} s"),
            ("local rate with a full queue >= 80 % of empty", full_rate >= 0.8 * empty_rate,
             f"{100 * full_rate / empty_rate:.0f} %"),
        ]
        for what, ok, figure in verdicts:
            print(f"target {'met' if ok else 'MISSED'}: {what} ({figure})")
    finally:
        s.stop()
        running[0] = False
        dns_sock.close()
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
