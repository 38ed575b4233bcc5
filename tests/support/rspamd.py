"""A real rspamd (Debian's package) on 127.0.0.1 with a throw-away configuration: its own
ports, its DNS through our stub, and actions made sharp for tests (add header at 3 points,
no greylisting) so that a sloppy message is spam and a well-formed one is not."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

from tests.support.stack import free_port

RSPAMD = shutil.which("rspamd") or (Path("/usr/bin/rspamd").exists() and "/usr/bin/rspamd")


class Rspamd:
    def __init__(self, base: Path, dns_address: str) -> None:
        self.base = base
        self.port = free_port()
        controller = free_port()
        local = base / "local.d"
        override = base / "override.d"
        for d in (local, override, base / "db", base / "run"):
            d.mkdir(parents=True, exist_ok=True)
        (local / "worker-normal.inc").write_text(f'bind_socket = "127.0.0.1:{self.port}";\n')
        (local / "worker-controller.inc").write_text(
            f'bind_socket = "127.0.0.1:{controller}";\n')
        (override / "worker-proxy.inc").write_text("enabled = false;\n")
        (override / "worker-fuzzy.inc").write_text("enabled = false;\n")
        host, port = dns_address.rsplit(":", 1)
        (local / "options.inc").write_text(
            f'dns {{ nameserver = ["{host}:{port}"]; timeout = 1s; retransmits = 1; }}\n')
        (local / "logging.inc").write_text('type = "console"; level = "info";\n')
        (override / "actions.conf").write_text(
            "reject = 15;\nadd_header = 3;\nrewrite_subject = null;\ngreylist = null;\n")
        args = [str(RSPAMD), "-f", "-c", "/etc/rspamd/rspamd.conf",
                f"--var=LOCAL_CONFDIR={base}", f"--var=DBDIR={base / 'db'}",
                f"--var=RUNDIR={base / 'run'}"]
        if os.geteuid() == 0:
            user = "_rspamd"
            pw = pwd.getpwnam(user)
            for d in (base / "db", base / "run"):
                os.chown(d, pw.pw_uid, pw.pw_gid)
            os.chmod(base, 0o755)
            args += ["-u", user, "-g", user]
        self.log = base / "rspamd.log"
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 90  # the first start compiles its regular expressions
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"rspamd exited: {self.log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/ping", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"rspamd did not start: {self.log.read_text()[-2000:]}")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
