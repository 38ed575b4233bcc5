"""The real `pochta` command in a subprocess: output, exit codes, one-line errors."""

import pytest

from tests.support.pochta import run_pochta


@pytest.fixture
def cfg(tmp_path, database_url):
    p = tmp_path / "pochta.toml"
    p.write_text(f'data_dir = "{tmp_path}"\ndatabase_url = "{database_url}"\n')
    r = run_pochta(p, "db", "upgrade")
    assert r.returncode == 0, r.stderr
    return p


def ok(cfg, *args, stdin=None):
    r = run_pochta(cfg, *args, stdin=stdin)
    assert r.returncode == 0, r.stderr
    return r.stdout


def fails(cfg, *args, stdin=None):
    r = run_pochta(cfg, *args, stdin=stdin)
    assert r.returncode != 0
    assert r.stderr.startswith("pochta: ") and r.stderr.count("\n") == 1, r.stderr
    assert "Traceback" not in r.stderr
    return r.stderr


def test_domain_user_alias_round_trip(cfg):
    ok(cfg, "domain", "add", "Example.COM")
    ok(cfg, "domain", "add", "xn--bcher-kva.de")
    ok(cfg, "user", "add", "Alice@example.com", "--password-stdin", stdin="s3cret\n")
    ok(cfg, "user", "add", "jürgen@bücher.de", "--password-stdin", stdin="pw\n")
    ok(cfg, "alias", "add", "team@example.com", "alice@example.com", "friend@foreign.org")
    ok(cfg, "alias", "add", "@example.com", "alice@example.com")

    domains = ok(cfg, "domain", "list").splitlines()
    assert domains[0].split() == ["DOMAIN", "USERS", "ALIASES", "KIND", "ROUTE"]
    assert domains[1].split() == ["bücher.de", "1", "0", "local", "-"]
    assert domains[2].split() == ["example.com", "1", "3", "local", "-"]
    users = ok(cfg, "user", "list", "example.com")
    assert "alice@example.com" in users and "jürgen" not in users
    aliases = ok(cfg, "alias", "list")
    assert "team@example.com" in aliases and "friend@foreign.org" in aliases

    ok(cfg, "alias", "remove", "team@example.com", "friend@foreign.org")
    assert "friend@foreign.org" not in ok(cfg, "alias", "list")
    ok(cfg, "user", "remove", "alice@example.com")
    assert "alice" not in ok(cfg, "user", "list")


def test_password_is_stored_hashed_and_checked(cfg, database_url):
    from store.db import Database
    from store.directory import Directory

    ok(cfg, "domain", "add", "example.com")
    ok(cfg, "user", "add", "bob@example.com", "--password-stdin", stdin="correct horse\n")
    db = Database(database_url)
    try:
        d = Directory(db)
        assert d.authenticate("bob@example.com", "correct horse") == "bob@example.com"
        ok(cfg, "user", "passwd", "bob@example.com", "--password-stdin", stdin="battery\n")
        assert d.authenticate("bob@example.com", "correct horse") is None
        assert d.authenticate("bob@example.com", "battery") == "bob@example.com"
    finally:
        db.dispose()


def test_mistakes_get_one_line(cfg):
    ok(cfg, "domain", "add", "example.com")
    ok(cfg, "user", "add", "bob@example.com", "--password-stdin", stdin="pw\n")
    assert "not a domain of ours" in fails(cfg, "user", "add", "x@unknown.org",
                                           "--password-stdin", stdin="pw\n")
    assert "already exists" in fails(cfg, "user", "add", "BOB@example.com",
                                     "--password-stdin", stdin="pw\n")
    assert "already exists" in fails(cfg, "domain", "add", "EXAMPLE.com")
    assert "invalid" in fails(cfg, "user", "add", "bad address@example.com",
                              "--password-stdin", stdin="pw\n")
    assert "still has" in fails(cfg, "domain", "remove", "example.com")
    assert "--password-stdin" in fails(cfg, "user", "add", "new@example.com", stdin="")
    ok(cfg, "domain", "remove", "example.com", "--force")
    assert "does not exist" in fails(cfg, "user", "remove", "bob@example.com")


def test_bad_config_and_missing_schema(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[mta]\nmax_recipients = 'many'\n")
    r = run_pochta(bad, "domain", "list")
    assert r.returncode != 0 and "'mta.max_recipients'" in r.stderr and "Traceback" not in r.stderr
    fresh = tmp_path / "fresh.toml"
    fresh.write_text(f'data_dir = "{tmp_path / "fresh"}"\n')
    r = run_pochta(fresh, "domain", "list")
    assert r.returncode != 0 and "pochta db upgrade" in r.stderr


def test_the_database_and_the_data_folder_are_private(tmp_path):
    """Password hashes readable by pochta alone: the SQLite file 0600 (and its -wal/-shm),
    a data folder we create 0700; an existing database others could read is made private."""
    import os
    import stat

    data = tmp_path / "data"
    p = tmp_path / "pochta.toml"
    p.write_text(f'data_dir = "{data}"\n')
    old = os.umask(0o022)
    try:
        assert run_pochta(p, "db", "upgrade").returncode == 0
        assert run_pochta(p, "domain", "add", "example.com").returncode == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    db_files = [f for f in data.iterdir() if f.name.startswith("pochta.db")]
    assert db_files and all(stat.S_IMODE(f.stat().st_mode) == 0o600 for f in db_files), \
        {f.name: oct(f.stat().st_mode) for f in db_files}
    (data / "pochta.db").chmod(0o644)  # made by an earlier version
    assert run_pochta(p, "domain", "list").returncode == 0
    assert stat.S_IMODE((data / "pochta.db").stat().st_mode) == 0o600


def test_queue_list_pages_oldest_first(tmp_path):
    """A page reads only what it shows; --after gives the next one, --limit 0 all."""
    import json
    import time

    from mta.envelope import Envelope, Recipient

    spool = tmp_path / "spool"
    spool.mkdir()
    p = tmp_path / "pochta.toml"
    p.write_text(f'data_dir = "{tmp_path}"\nspool_dir = "{spool}"\n')
    now = time.time()
    ids = [f"{int(now * 1e6) + i:014x}abcdef" for i in range(5)]
    for i, qid in enumerate(ids):
        env = Envelope(id=qid, created=now, mail_from="a@example.com",
                       recipients=[Recipient(address=f"u{i}@down.test", original=f"u{i}@down.test")])
        (spool / f"{qid}.msg").write_bytes(env.to_json() + b"\nSubject: x\r\n\r\nx\r\n")
    first = ok(p, "queue", "list", "--limit", "2")
    assert [ln.split()[0] for ln in first.splitlines()[1:3]] == ids[:2]
    assert first.splitlines()[-1] == (f"the oldest 2 of 5 message(s) in the queue; next page: "
                                      f"--after {ids[1]} (--limit 0: all)")
    page = json.loads(ok(p, "queue", "list", "--json", "--limit", "2", "--after", ids[1]))
    assert [m["id"] for m in page["messages"]] == ids[2:4] and page["next_after"] == ids[3]
    rest = json.loads(ok(p, "queue", "list", "--json", "--after", ids[3]))
    assert [m["id"] for m in rest["messages"]] == ids[4:] and "next_after" not in rest
    assert ok(p, "queue", "list", "--limit", "0").splitlines()[-1] == "5 message(s) in the queue"
    assert "not a queue id" in fails(p, "queue", "list", "--after", "../x")
