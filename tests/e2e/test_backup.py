"""`pochta export` / `pochta import`: a move from SQLite to each backend, passwords and DKIM
keys included; conflicts and bad files refused with nothing changed."""

from __future__ import annotations

import base64
import json
import smtplib

import pytest

from tests.support.smtp import client_tls
from tests.support.stack import Stack, wait_listening

PW = "moving pass wörd"


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    src = Stack(tmp_path_factory.mktemp("source"))
    src.setup_users("example.com", "bob@example.com", "amy@example.com", password=PW)
    src.pochta("alias", "add", "info@example.com", "bob@example.com", "amy@example.com")
    src.pochta("alias", "add", "@example.com", "bob@example.com")
    src.pochta("dkim", "keygen", "example.com", "--selector", "s1")
    src.pochta("domain", "add", "example.net", "--relay", "--to", "127.0.0.9:2525", "--hold")
    src.pochta("relay-recipient", "add", "x@example.net")
    src.pochta("tls-policy", "add", "partner.example", "verify")
    src.pochta("sieve", "put", "bob@example.com", "-", "--name", "filters",
               stdin='require "fileinto";\nfileinto "Archive";\n')
    out = src.pochta("export").stdout
    path = src.base / "export.json"
    path.write_text(out)
    return src, path, json.loads(out)


def test_the_export_is_the_documented_format(exported):
    _src, _path, doc = exported
    assert (doc["format"], doc["version"]) == ("pochta-export", 1)
    assert [d["name"] for d in doc["domains"]] == ["example.com"]
    assert doc["domains"][0]["dkim"]["active"] == "s1"
    assert "BEGIN PRIVATE KEY" in doc["domains"][0]["dkim"]["keys"][0]["private_key"]
    assert [u["address"] for u in doc["users"]] == ["amy@example.com", "bob@example.com"]
    assert all(u["password_hash"].startswith("$argon2id$") for u in doc["users"])
    assert {a["source"]: a["targets"] for a in doc["aliases"]} == {
        "@example.com": ["bob@example.com"],
        "info@example.com": ["bob@example.com", "amy@example.com"]}
    assert doc["relay_domains"] == [{"name": "example.net", "to": "127.0.0.9:2525", "hold": True,
                                     "odmr_user": "", "recipients": ["x@example.net"]}]
    assert doc["tls_policies"] == [{"domain": "partner.example", "policy": "verify"}]
    assert doc["sieve_scripts"] == [{"user": "bob@example.com", "name": "filters",
                                     "script": 'require "fileinto";\nfileinto "Archive";\n',
                                     "active": True}]
    assert "greylist" not in doc


def test_import_into_an_empty_database_moves_everything(exported, database_url, tmp_path):
    src, path, _doc = exported
    dst = Stack(tmp_path / "target", top={"database_url": database_url})
    r = dst.pochta("import", str(path))
    assert "imported 1 domains, 1 relay domains, 1 TLS policies, 1 Sieve scripts, 2 users, " \
        "2 aliases, 1 DKIM keys" in r.stdout
    for verb in (("user", "list"), ("alias", "list"), ("domain", "list"),
                 ("relay-recipient", "list"), ("tls-policy", "list"),
                 ("sieve", "get", "bob@example.com")):
        assert dst.pochta(*verb).stdout == src.pochta(*verb).stdout, verb
    assert (dst.base / "dkim" / "example.com" / "s1.key").read_bytes() == \
        (src.base / "dkim" / "example.com" / "s1.key").read_bytes()
    assert dst.pochta("dns", "example.com").stdout == src.pochta("dns", "example.com").stdout
    # The moved hash still lets the user log in.
    dst.start("msa", listen=[f"127.0.0.1:{dst.msa_port}"])
    try:
        wait_listening(f"127.0.0.1:{dst.msa_port}")
        with smtplib.SMTP("127.0.0.1", dst.msa_port, timeout=30) as c:
            c.starttls(context=client_tls())
            c.ehlo()
            code, _ = c.docmd("AUTH", "PLAIN " + base64.b64encode(
                f"\0amy@example.com\0{PW}".encode()).decode())
            assert code == 235
    finally:
        dst.stop_all()

    # Again: everything exists now. Refused, one line, nothing changed; --overwrite goes.
    dst.pochta("user", "remove", "bob@example.com")
    r = dst.pochta("import", str(path), check=False)
    assert r.returncode == 1 and r.stderr.count("\n") == 1
    assert "exists already" in r.stderr and "--overwrite" in r.stderr
    assert "bob@example.com" not in dst.pochta("user", "list").stdout
    dst.pochta("import", str(path), "--overwrite")
    assert dst.pochta("user", "list").stdout == src.pochta("user", "list").stdout


@pytest.mark.parametrize("mangle, reason", [
    (lambda d: "not json {", "not JSON"),
    (lambda d: {**d, "version": 2}, "newer than this pochta reads"),
    (lambda d: {**d, "format": "other"}, "not a pochta export"),
    (lambda d: {**d, "users": d["users"][:1] + [{**d["users"][1], "password_hash": "x"}]},
     "users[1].password_hash: not an argon2 hash"),
    (lambda d: {**d, "users": d["users"] + [{**d["users"][0], "address": "z@elsewhere.test"}]},
     "its domain is not in the file"),
    (lambda d: {**d, "domains": [{**d["domains"][0], "dkim": {"active": "s9", "keys": []}}]},
     "no key for selector"),
])
def test_a_bad_file_changes_nothing_and_says_why(exported, tmp_path, mangle, reason):
    _src, _path, doc = exported
    bad = mangle(doc)
    path = tmp_path / "bad.json"
    path.write_text(bad if isinstance(bad, str) else json.dumps(bad))
    dst = Stack(tmp_path / "target")
    dst.pochta("db", "upgrade")
    r = dst.pochta("import", str(path), check=False)
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert reason in r.stderr and "Traceback" not in r.stderr
    assert "example.com" not in dst.pochta("domain", "list").stdout
    assert not (dst.base / "dkim" / "example.com").exists()
