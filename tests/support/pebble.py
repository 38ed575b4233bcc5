"""pebble, Let's Encrypt's test ACME CA (Debian package `pebble`), on loopback."""

from __future__ import annotations

import json
import os
import shutil
import ssl
import subprocess
import time
import urllib.request
from pathlib import Path

import trustme

from tests.support.stack import free_port


class Pebble:
    """A pebble whose http-01 validations go to ``http_port`` of the address ``dns`` (a DNS
    stub) gives for each name."""

    def __init__(self, folder: Path, dns: str, http_port: int) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        ca = trustme.CA()
        cert = ca.issue_cert("127.0.0.1", "localhost")
        cert.private_key_pem.write_to_path(str(folder / "key.pem"))
        cert.cert_chain_pems[0].write_to_path(str(folder / "cert.pem"))
        ca.cert_pem.write_to_path(str(folder / "ca.pem"))
        self.ca_file = str(folder / "ca.pem")
        self.port = free_port()
        config = {"pebble": {
            "listenAddress": f"127.0.0.1:{self.port}",
            "managementListenAddress": f"127.0.0.1:{free_port()}",
            "certificate": str(folder / "cert.pem"), "privateKey": str(folder / "key.pem"),
            "httpPort": http_port, "tlsPort": free_port(), "ocspResponderURL": "",
            "externalAccountBindingRequired": False}}
        (folder / "pebble.json").write_text(json.dumps(config))
        env = {**os.environ, "PEBBLE_VA_NOSLEEP": "1", "PEBBLE_WFE_NONCEREJECT": "0"}
        self.log = folder / "pebble.log"
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                ["pebble", "-config", str(folder / "pebble.json"), "-dnsserver", dns],
                stdout=out, stderr=subprocess.STDOUT, env=env)
        self.directory = f"https://127.0.0.1:{self.port}/dir"
        ctx = ssl.create_default_context(cafile=self.ca_file)
        deadline = time.monotonic() + 20
        while True:
            try:
                with urllib.request.urlopen(self.directory, context=ctx, timeout=2):
                    break
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self.stop()
                    raise RuntimeError(f"pebble did not start: {self.log.read_text()}") from None
                time.sleep(0.1)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def available() -> bool:
    return shutil.which("pebble") is not None
