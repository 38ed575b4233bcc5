"""`pochta systemd-units` checked by systemd's own verifier, and the readiness protocol the
units rely on (Type=notify) heard on a socket of ours."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.support.smtp import wait_for
from tests.support.stack import Stack


def test_the_written_units_pass_systemd_analyze_verify():
    verifier = shutil.which("systemd-analyze")
    if verifier is None:
        pytest.skip("systemd-analyze is not installed (apt install systemd)")
    base = Path(tempfile.mkdtemp(dir="/var/tmp", prefix="pochta-units-"))
    try:
        s = Stack(base / "data")
        units = base / "units"
        out = s.pochta("systemd-units", "--prefix", str(units)).stdout
        names = sorted(p.name for p in units.iterdir())
        assert names == ["pochta-mda.service", "pochta-msa.service", "pochta-mta.service",
                         "pochta.target"], out
        mta = (units / "pochta-mta.service").read_text()
        assert "Type=notify" in mta and "NoNewPrivileges=yes" in mta
        assert f"--config {s.config} serve mta" in mta
        assert f"ReadWritePaths={base / 'data'}" in mta
        r = subprocess.run([verifier, "verify", "--man=no", *sorted(map(str, units.iterdir()))],
                           capture_output=True, text=True, timeout=60)
        # verify exits 0 on many mistakes it only warns about: its silence is the pass.
        assert r.returncode == 0 and r.stdout + r.stderr == "", r.stdout + r.stderr
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_units_are_refused_for_state_under_tmp(tmp_path):
    s = Stack(tmp_path)  # pytest's folder is under /tmp
    r = s.pochta("systemd-units", "--prefix", str(tmp_path / "units"), check=False)
    assert r.returncode == 1 and "/tmp" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "units").exists()


@pytest.mark.parametrize("role", ["mda", "mta"])
def test_a_process_says_ready_once_serving_and_stopping_when_told(tmp_path, role):
    address = tmp_path / "notify.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(address))
    listener.settimeout(30)
    s = Stack(tmp_path)
    s.setup_users("example.com", "bob@example.com")
    try:
        s.start(role, env={"NOTIFY_SOCKET": str(address)})  # returns once it listens
        assert listener.recv(4096) == b"READY=1"
        if role == "mta":  # its queue runner too is serving before the stop
            assert wait_for(lambda: "queue ready" in s.log(role), 30), s.log(role)
        s.stop(role, signal.SIGTERM)
        assert listener.recv(4096) == b"STOPPING=1"
        listener.settimeout(0.5)  # the MTA's queue runner is not the unit's main process
        with pytest.raises(TimeoutError):
            listener.recv(4096)
    finally:
        s.stop_all()
        listener.close()
        os.unlink(address)
