"""pochta sending to a real receiver: Debian's exim 4.96 (scripts/test-peers unpacks it), with
STARTTLS, as every big receiver offers it. 8-bit and SMTPUTF8 messages arrive (the EHLO after
STARTTLS is what announces those extensions), messages go with BDAT (CHUNKING), and DSN
requests reach it: exim itself reports
the delivery, with our ENVID and ORCPT, and pochta does not report it a second time."""

from __future__ import annotations

import email
import email.policy
import os
import shutil
import smtplib
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.support.fakes import FakeDNS
from tests.support.smtp import client_tls, wait_for
from tests.support.stack import Stack, free_port

EXIM = Path(__file__).resolve().parents[2] / ".cache" / "peers" / "exim" / "usr" / "sbin" / "exim4"
PW = "correct horse"


def exim_usable() -> str:
    if os.geteuid() != 0:
        return "exim needs root here"
    if not EXIM.exists():
        return "no exim (scripts/test-peers unpacks it)"
    if subprocess.run(["getent", "passwd", "Debian-exim"], capture_output=True).returncode:
        return "no user Debian-exim (scripts/test-peers makes it)"
    return ""


pytestmark = pytest.mark.skipif(bool(exim_usable()), reason=exim_usable() or "ok")


@pytest.fixture
def exim():
    """exim on 127.0.0.21 with STARTTLS, SMTPUTF8, DSN and 8BITMIME, storing everything it
    accepts (its own DSNs included) in one maildir. Its folder is outside pytest's root-only
    one: exim works as Debian-exim."""
    top = Path(tempfile.mkdtemp(dir="/var/tmp", prefix="pochta-exim-"))
    base = top / "exim"
    for d in ("spool", "log", "mail"):
        (base / d).mkdir(parents=True)
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", "/CN=mx.exim.test", "-keyout", str(base / "key.pem"),
                    "-out", str(base / "cert.pem")], check=True, capture_output=True)
    port = free_port("127.0.0.21")
    conf = base / "exim.conf"
    conf.write_text(f"""\
exim_path = {EXIM}
keep_environment =
deliver_drop_privilege = true
primary_hostname = mx.exim.test
spool_directory = {base}/spool
log_file_path = {base}/log/%slog
daemon_smtp_ports = {port}
local_interfaces = 127.0.0.21
tls_certificate = {base}/cert.pem
tls_privatekey = {base}/key.pem
tls_advertise_hosts = *
smtputf8_advertise_hosts = *
dsn_advertise_hosts = *
accept_8bitmime = true
host_lookup =
rfc1413_hosts =
acl_smtp_rcpt = acl_check_rcpt
begin acl
acl_check_rcpt:
  accept
begin routers
store_all:
  driver = accept
  transport = store
begin transports
store:
  driver = appendfile
  directory = {base}/mail
  maildir_format
  user = Debian-exim
  group = Debian-exim
""")
    for p in (top, base):
        p.chmod(0o755)
    for d in ("spool", "log", "mail"):
        shutil.chown(base / d, "Debian-exim", "Debian-exim")
    proc = subprocess.Popen([str(EXIM), "-C", str(conf), "-bdf", "-odf"],  # -bdf: foreground
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert wait_for(lambda: _listening("127.0.0.21", port), 10), \
            (base / "log" / "paniclog").read_text() if (base / "log" / "paniclog").exists() else ""
        yield port, base
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(top, ignore_errors=True)


def _listening(host: str, port: int) -> bool:
    import socket
    try:
        socket.create_connection((host, port), 1).close()
        return True
    except OSError:
        return False


def stored(base: Path) -> list[email.message.EmailMessage]:
    new = base / "mail" / "new"
    return [email.message_from_bytes(p.read_bytes(), policy=email.policy.default)
            for p in sorted(new.iterdir())] if new.is_dir() else []


def test_8bit_smtputf8_and_dsn_reach_a_real_starttls_receiver(tmp_path, exim):
    port, base = exim
    dns_server = FakeDNS()
    dns_server.add("exim.test", "MX", "10 mx.exim.test.")
    dns_server.add("mx.exim.test", "A", "127.0.0.21")
    s = Stack(tmp_path / "pochta", delivery={"resolver": dns_server.address, "smtp_port": port})
    try:
        s.setup_users("example.com", "alice@example.com", password=PW)
        s.pochta("alias", "add", "jörg@example.com", "alice@example.com")
        s.start("up", listen=[s.mda_listen, f"127.0.0.1:{s.msa_port}"])
        with smtplib.SMTP("127.0.0.1", s.msa_port, timeout=20) as c:
            c.starttls(context=client_tls())
            c.login("alice@example.com", PW)
            c.sendmail("alice@example.com", ["bob@exim.test"],
                       "From: alice@example.com\r\nSubject: eight bit\r\nContent-Type: text/plain;"
                       " charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\ncafé ☕\r\n"
                       .encode(), mail_options=["BODY=8BITMIME"])
            c.sendmail("jörg@example.com", ["jörg@exim.test"],
                       "From: jörg@example.com\r\nSubject: smtputf8\r\n\r\nhallo\r\n".encode(),
                       mail_options=["SMTPUTF8"])
            c.sendmail("alice@example.com", ["carol@exim.test"],
                       b"From: alice@example.com\r\nSubject: with-dsn\r\n\r\nx\r\n",
                       mail_options=["RET=HDRS", "ENVID=ENV-4711"],
                       rcpt_options=["NOTIFY=SUCCESS", "ORCPT=rfc822;carol@exim.test"])

        def subjects() -> set[str]:
            return {str(m["Subject"]) for m in stored(base)}

        assert wait_for(lambda: {"eight bit", "smtputf8", "with-dsn"} <= subjects(), 30), (
            subjects(), s.log("up"))
        msgs = {str(m["Subject"]): m for m in stored(base)}
        assert "café ☕" in msgs["eight bit"].get_content()
        assert str(msgs["smtputf8"]["From"]) == "jörg@example.com"
        # exim's own success report for carol, with what pochta passed on.
        assert wait_for(lambda: any("ENV-4711" in m.as_string() for m in stored(base)), 20)
        report = next(m for m in stored(base) if "ENV-4711" in m.as_string())
        assert "rfc822;carol@exim.test" in report.as_string().replace(" ", "")
        # exim offers CHUNKING: pochta sent each message with BDAT (exim's "K" flag).
        received = [ln for ln in (base / "log" / "mainlog").read_text().splitlines()
                    if " <= " in ln and "mx.pochta.test" in ln]
        assert len(received) == 3 and all(" K " in ln for ln in received), received
        assert "status=bounced" not in s.log("up")
        # exim took the NOTIFY: pochta sends the sender no "relayed" report of its own.
        assert "sender notification" not in s.log("up")
    finally:
        s.stop_all()
        dns_server.close()
