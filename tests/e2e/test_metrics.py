"""`[metrics] listen`: one Prometheus endpoint for the whole stack, checked by promtool, and
its counters moving as the traffic says."""

from __future__ import annotations

import base64
import concurrent.futures
import shutil
import smtplib
import subprocess
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.fakes import FakeDNS, SinkMX
from tests.support.smtp import client_tls, wait_for, wait_mail
from tests.support.stack import Stack, free_port, wait_listening

PW = "metrics pass"
RELAY_CLIENT = "127.0.0.5"

pytestmark = pytest.mark.skipif(shutil.which("promtool") is None,
                                reason="promtool (Debian: prometheus) not installed")


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        assert r.status == 200
        return r.read().decode()


def promtool_check(text: str) -> None:
    r = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 0, r.stdout + r.stderr


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(text: str, name: str, **labels: str) -> float:
    return samples(text).get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    dns_server = FakeDNS()
    mx_port = free_port("127.0.0.2")
    mx = SinkMX("127.0.0.2", mx_port)
    dns_server.add("remote.test", "MX", "10 mx.remote.test.")
    dns_server.add("mx.remote.test", "A", "127.0.0.2")
    metrics_port = free_port()
    s = Stack(tmp_path_factory.mktemp("metrics"),
              mta={"relay_networks": [f"{RELAY_CLIENT}/32"]},
              metrics={"listen": f"127.0.0.1:{metrics_port}"},
              delivery={"resolver": dns_server.address, "smtp_port": mx_port})
    s.setup_users("example.com", "bob@example.com", "alice@example.com", password=PW)
    s.start("up")
    wait_listening(f"127.0.0.1:{s.msa_port}")
    yield s, mx, metrics_port
    s.stop_all()
    mx.stop()
    dns_server.close()


def send_local(s: Stack, i: int) -> None:
    with smtplib.SMTP("127.0.0.1", s.mta_port, timeout=30) as c:
        c.sendmail("someone@elsewhere.test", ["bob@example.com"],
                   f"Subject: load {i}\r\n\r\nbody {i}\r\n".encode())


def test_promtool_accepts_the_endpoint_during_load_and_the_counters_follow_it(world):
    s, mx, port = world
    before = scrape(port)
    n = 20
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        jobs = [pool.submit(send_local, s, i) for i in range(n)]
        during = scrape(port)  # while the sessions run
        for j in jobs:
            j.result()
    promtool_check(before)
    promtool_check(during)

    # One refused recipient, one message relayed for a client of relay_networks, one AUTH
    # failure and one good login on submission under STARTTLS.
    with smtplib.SMTP("127.0.0.1", s.mta_port, timeout=30) as c:
        c.ehlo("client.test")
        c.mail("someone@elsewhere.test")
        code, _ = c.rcpt("nobody@example.com")
        assert code == 550
    with smtplib.SMTP("127.0.0.1", s.mta_port, timeout=30,
                      source_address=(RELAY_CLIENT, 0)) as c:
        c.sendmail("app@example.com", ["someone@remote.test"], b"Subject: out\r\n\r\nx\r\n")
    with smtplib.SMTP("127.0.0.1", s.msa_port, timeout=30) as c:
        c.starttls(context=client_tls())
        c.ehlo()
        code, _ = c.docmd("AUTH", "PLAIN " + base64.b64encode(
            b"\0alice@example.com\0wrong").decode())
        assert code == 535
        c.login("alice@example.com", PW)
        c.sendmail("alice@example.com", ["bob@example.com"], b"Subject: sub\r\n\r\nx\r\n")

    wait_mail(s, "bob@example.com", n + 1)
    assert wait_for(lambda: mx.messages, timeout=30)
    after = wait_for(lambda: (t := scrape(port)) and value(
        t, "pochta_deliveries_total", relay="remote", outcome="sent") >= 1 and value(
        t, "pochta_deliveries_total", relay="local", outcome="sent") >= n + 1 and t)
    promtool_check(after)

    def grew(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert grew("pochta_messages_accepted_total", listener="smtp") == n + 1
    assert grew("pochta_messages_accepted_total", listener="submission") == 1
    assert grew("pochta_recipients_accepted_total", listener="smtp") == n + 1
    assert grew("pochta_messages_accepted_bytes_total", listener="smtp") > 20 * n
    assert grew("pochta_connections_total", listener="smtp") == n + 2
    assert grew("pochta_refusals_total", listener="smtp", status="5.1.1") == 1
    assert grew("pochta_auth_failures_total", listener="submission") == 1
    assert grew("pochta_refusals_total", listener="submission", status="5.7.8") == 1
    assert grew("pochta_tls_sessions_total", listener="submission", version="TLSv1.3") == 1
    assert grew("pochta_deliveries_total", relay="local", outcome="sent") == n + 1
    assert grew("pochta_deliveries_total", relay="remote", outcome="sent") == 1
    assert grew("pochta_mailbox_deliveries_total", outcome="sent") == n + 1
    assert grew("pochta_delivery_delay_seconds_count", relay="local") == n + 1
    # Nothing open, nothing queued once it is all delivered (the gauges follow within a beat).
    assert value(after, "pochta_sessions", listener="smtp") >= 0
    settled = wait_for(lambda: (t := scrape(port)) and value(
        t, "pochta_queue_messages", state="new") == 0 and value(
        t, "pochta_sessions", listener="smtp") == 0 and t, timeout=30)
    assert settled
    assert ("pochta_queue_oldest_message_age_seconds", ()) in samples(settled)


def test_a_broken_metrics_address_is_refused_with_one_line(tmp_path):
    s = Stack(tmp_path, metrics={"listen": "localhost"})
    r = s.pochta("queue", "list", check=False)
    assert r.returncode != 0
    assert r.stderr.strip().count("\n") == 0 and "metrics.listen" in r.stderr


def test_serve_mta_on_its_own_serves_the_endpoint(tmp_path):
    port = free_port()
    s = Stack(tmp_path, metrics={"listen": f"127.0.0.1:{port}"})
    s.setup_users("example.com", "bob@example.com")
    s.start("mta")
    try:
        with smtplib.SMTP("127.0.0.1", s.mta_port, timeout=30) as c:
            c.ehlo("client.test")
            c.mail("someone@elsewhere.test")
            assert c.rcpt("nobody@example.com")[0] == 550
        text = scrape(port)
        promtool_check(text)
        assert value(text, "pochta_refusals_total", listener="smtp", status="5.1.1") == 1
        # The queue runner (the MTA's child) reports through the same endpoint.
        assert wait_for(lambda: ("pochta_queue_messages", (("state", "new"),))
                        in samples(scrape(port)))
    finally:
        s.stop_all()
