"""Start real pochta processes from a TOML config in a temporary folder, and stop them."""

from __future__ import annotations

import atexit
import functools
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.support.fakes import FakeDNS
from tests.support.pochta import pochta_bin, run_pochta

_quiet_dns: FakeDNS | None = None


def quiet_dns() -> FakeDNS:
    """An empty DNS stub (NXDOMAIN for all): no test server ever asks the system's resolver."""
    global _quiet_dns
    if _quiet_dns is None:
        _quiet_dns = FakeDNS()
    return _quiet_dns


@functools.cache  # read once per run
def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


_handed_out: set[int] = set()  # never the same port twice in one test run (two servers of
# one test ask before either binds)


def free_port(host: str = "127.0.0.1") -> int:
    """A port to listen on, below the ephemeral range: a port the kernel handed out as free
    can be some outgoing connection's local port by the time the server binds it."""
    low = _ephemeral_low()
    if low > 12000:
        for _ in range(50):
            port = random.randrange(10000, low)
            if port in _handed_out:
                continue
            with socket.socket() as s:
                try:
                    s.bind((host, port))
                except OSError:
                    continue
            _handed_out.add(port)
            return port
    for _ in range(50):
        with socket.socket() as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        if port not in _handed_out:
            break
    _handed_out.add(port)
    return port


def wait_listening(addr: str, proc: subprocess.Popen | None = None, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {addr}")
        try:
            if addr.startswith("unix:"):
                with socket.socket(socket.AF_UNIX) as s:
                    s.connect(addr[5:])
            else:
                host, port = addr.rsplit(":", 1)
                with socket.create_connection((host, int(port)), timeout=1):
                    pass
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {addr}")


@functools.cache
def _migrated_database() -> Path:
    """An empty directory database at the newest schema, made once per test run by the real
    `pochta db upgrade`."""
    folder = Path(tempfile.mkdtemp(prefix="pochta-template-"))
    atexit.register(shutil.rmtree, folder, True)
    config = folder / "pochta.toml"
    config.write_text(f'data_dir = "{folder}"\nuser = "root"\n')
    r = run_pochta(config, "db", "upgrade")
    if r.returncode != 0:
        raise AssertionError(f"pochta db upgrade failed: {r.stderr}")
    return folder / "pochta.db"


class Stack:
    """A pochta data folder with its config; starts `pochta serve ROLE` or `pochta up`."""

    def __init__(self, base: Path, **sections: dict) -> None:
        self.base = base
        base.mkdir(parents=True, exist_ok=True)
        self.mta_port = free_port()
        self.msa_port = free_port()
        self.msa_tls_port = free_port()
        self.mda_port = free_port()
        self.settings: dict[str, dict] = {
            # CI runs as root and keeps each test's files in pytest's root-only temporary
            # folder: the processes stay root here (user = "root"); test_privileges.py runs
            # on the default (drop to "pochta") in a folder that user can reach.
            "": {"hostname": "mx.pochta.test", "data_dir": str(base), "user": "root"},
            "mta": {"listen": [f"127.0.0.1:{self.mta_port}"]},
            "msa": {"listen": [f"127.0.0.1:{self.msa_port}"],
                    "listen_tls": [f"127.0.0.1:{self.msa_tls_port}"]},
            "mda": {"listen": f"127.0.0.1:{self.mda_port}"},
            "delivery": {"retry_initial": 1, "retry_max": 2, "resolver": quiet_dns().address},
        }
        for name, values in sections.items():
            self.settings.setdefault("" if name == "top" else name, {}).update(values)
        self.config = base / "pochta.toml"
        self.write()
        self.procs: dict[str, subprocess.Popen] = {}
        self.logs: dict[str, Path] = {}

    def write(self) -> None:
        def value(v):
            if isinstance(v, bool):
                return "true" if v else "false"
            if isinstance(v, list):
                return "[" + ", ".join(value(x) for x in v) + "]"
            if isinstance(v, str):
                return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
            return str(v)

        lines = [f"{k} = {value(v)}" for k, v in self.settings[""].items()]
        for section, values in self.settings.items():
            if section:
                lines.append(f"[{section}]")
                lines += [f"{k} = {value(v)}" for k, v in values.items()]
        self.config.write_text("\n".join(lines) + "\n")

    @property
    def mda_listen(self) -> str:
        return self.settings["mda"]["listen"]

    @property
    def mailbox_root(self) -> Path:
        return Path(self.settings["mda"].get("mailbox_root", self.base / "mail"))

    def pochta(self, *args: str, stdin: str | None = None, check: bool = True):
        r = run_pochta(self.config, *args, stdin=stdin)
        if check and r.returncode != 0:
            raise AssertionError(f"pochta {' '.join(args)} failed: {r.stderr}")
        return r

    def setup_users(self, domain: str, *users: str, password: str = "pw") -> None:
        """A domain and its users, as `pochta db upgrade`, `domain add` and `user add` make them.

        On the default SQLite database this copies a database that `pochta db upgrade` migrated
        once per run and adds the rows through store/ in this process: a `pochta` process per
        verb costs a second or more each, in every test (the verbs have their own tests)."""
        top = self.settings[""]
        if "database_url" in top or top.get("user") != "root":  # the CLI gives its files away
            self.pochta("db", "upgrade")
            self.pochta("domain", "add", domain)
            for u in users:
                self.pochta("user", "add", u, "--password-stdin", stdin=password + "\n")
            return
        from store.db import Database
        from store.directory import Directory

        db_file = Path(top.get("data_dir", self.base)) / "pochta.db"
        if not db_file.exists():
            db_file.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(_migrated_database(), db_file)
            db_file.chmod(0o600)
        db = Database(f"sqlite:///{db_file}")
        try:
            directory = Directory(db)
            directory.add_domain(domain)
            for u in users:
                directory.add_user(u, password)
        finally:
            db.dispose()

    def start(self, role: str, listen: list[str] | None = None, preexec=None,
              env: dict[str, str] | None = None) -> subprocess.Popen:
        log = self.base / f"{role}.log"
        self.logs[role] = log
        env = {**{k: v for k, v in os.environ.items() if k != "POCHTA_CONFIG"}, **(env or {})}
        args = ["up"] if role == "up" else ["serve", role]
        with open(log, "ab") as err:  # the child keeps its own copy of the descriptor
            proc = subprocess.Popen([pochta_bin(), "--config", str(self.config), *args],
                                    stdout=subprocess.DEVNULL, stderr=err,
                                    stdin=subprocess.DEVNULL, env=env, preexec_fn=preexec)
        self.procs[role] = proc
        addrs = listen or {
            "mda": [self.mda_listen],
            "mta": self.settings["mta"]["listen"],
            "msa": self.settings["msa"]["listen"],
            "up": [self.mda_listen] + self.settings["mta"]["listen"]
            + self.settings["msa"].get("listen", []),
        }[role]
        for a in addrs:
            wait_listening(a, proc)
        return proc

    def stop(self, role: str, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
        proc = self.procs.pop(role)
        if proc.poll() is None:
            proc.send_signal(sig)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait()

    def stop_all(self) -> None:
        for role in list(self.procs):
            self.stop(role)

    def log(self, role: str) -> str:
        return self.logs[role].read_text(errors="replace") if role in self.logs else ""


def mail_files(root: Path, address: str) -> list[Path]:
    local, domain = address.split("@")
    new = root / domain / local / "new"
    return sorted(new.iterdir()) if new.exists() else []


def python() -> str:
    return sys.executable
