"""`pochta status`: real probes of the running processes; exit 0 healthy, 1 degraded, 2 down."""

from __future__ import annotations

import json

from tests.support.smtp import send, wait_mail
from tests.support.stack import Stack, wait_listening


def status(s: Stack) -> tuple[int, dict]:
    r = s.pochta("status", "--json", check=False)
    assert not r.stderr.strip(), r.stderr
    return r.returncode, json.loads(r.stdout)


def by_name(doc: dict, name: str) -> list[dict]:
    return [c for c in doc["checks"] if c["name"] == name]


def test_status_follows_the_processes_as_they_stop(tmp_path):
    s = Stack(tmp_path)
    s.setup_users("example.com", "bob@example.com")
    s.start("mda")
    s.start("mta")
    s.start("msa", listen=[f"127.0.0.1:{s.msa_port}"])
    wait_listening(f"127.0.0.1:{s.msa_tls_port}")
    try:
        send(s, "someone@elsewhere.test", ["bob@example.com"], b"Subject: hi\r\n\r\nx\r\n")
        wait_mail(s, "bob@example.com", 1)

        code, doc = status(s)
        assert (code, doc["status"]) == (0, "healthy"), doc
        assert [c["state"] for c in by_name(doc, "msa")] == ["ok", "ok"]  # 587 and 465
        assert by_name(doc, "queue runner")[0]["state"] == "ok"
        assert doc["queue"]["damaged"] == 0
        assert "1 domain(s)" in by_name(doc, "database")[0]["detail"]
        assert doc["dkim"] == {"example.com": None}
        text = s.pochta("status").stdout
        assert "pochta is healthy" in text and "certificate" in text

        s.stop("msa")
        code, doc = status(s)
        assert (code, doc["status"]) == (1, "degraded")
        assert [c["state"] for c in by_name(doc, "msa")] == ["down", "down"]
        assert by_name(doc, "mta")[0]["state"] == "ok"

        s.stop("mta")  # and its queue runner with it
        code, doc = status(s)
        assert (code, doc["status"]) == (2, "down")
        assert by_name(doc, "mta")[0]["state"] == "down"
        assert by_name(doc, "queue runner")[0]["state"] == "down"
    finally:
        s.stop_all()


def test_a_missing_database_is_down_and_status_creates_nothing(tmp_path):
    s = Stack(tmp_path)
    code, doc = status(s)
    assert code == 2
    assert "pochta db upgrade" in by_name(doc, "database")[0]["detail"]
    assert not (tmp_path / "pochta.db").exists()
