"""A private Dovecot instance for tests: own base_dir, 127.0.0.1, ports of its own."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

from tests.support.stack import free_port, wait_listening

DOVECOT = shutil.which("dovecot") or (
    "/usr/sbin/dovecot" if Path("/usr/sbin/dovecot").exists() else None)

# Run-as-root test settings: login processes as dovenull, auth reading our 0700 test folders.
TEST_OVERRIDES = """
base_dir = {base}/run
state_dir = {base}/state
log_path = {base}/dovecot.log
listen = 127.0.0.1
ssl = no
disable_plaintext_auth = no
default_internal_user = root
default_login_user = dovenull
service imap-login {{
  inet_listener imap {{
    port = {imap}
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
service pop3-login {{
  inet_listener pop3 {{
    port = {pop3}
  }}
  inet_listener pop3s {{
    port = 0
  }}
}}
"""


class Dovecot:
    def __init__(self, base: Path, conf_text: str) -> None:
        self.base = base
        base.mkdir(parents=True, exist_ok=True)
        (base / "run").mkdir(exist_ok=True)
        (base / "state").mkdir(exist_ok=True)
        self.conf = base / "dovecot.conf"
        self.imap_port = free_port()
        self.pop3_port = free_port()
        self.conf.write_text(conf_text + TEST_OVERRIDES.format(
            base=base, imap=self.imap_port, pop3=self.pop3_port))
        self.proc = subprocess.Popen([DOVECOT, "-F", "-c", str(self.conf)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            wait_listening(f"127.0.0.1:{self.imap_port}", self.proc)
            wait_listening(f"127.0.0.1:{self.pop3_port}", self.proc)
        except RuntimeError:
            # Say why (e.g. "Address already in use", exit 89), not only that it exited.
            if self.proc.poll() is None:
                raise
            err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
            raise RuntimeError(f"dovecot did not start: {err.strip()} {self.log()[-2000:]}"
                               ) from None

    def log(self) -> str:
        p = self.base / "dovecot.log"
        return p.read_text(errors="replace") if p.exists() else ""

    def stop(self) -> None:
        subprocess.run([DOVECOT, "-c", str(self.conf), "stop"], capture_output=True, timeout=20)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        time.sleep(0.1)
