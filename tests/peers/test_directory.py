"""Directory semantics through the real database (SQLite, and PostgreSQL when configured)."""

import pytest

from store.directory import DirectoryError


@pytest.fixture
def d(directory):
    directory.add_domain("example.com")
    directory.add_domain("bücher.de")
    for u in ["alice@example.com", "bob@example.com", "carol@example.com", "jürgen@bücher.de"]:
        directory.add_user(u, "pw-" + u)
    return directory


def test_user_resolves_to_itself_case_insensitively(d):
    assert d.resolve("Alice@EXAMPLE.com") == ["alice@example.com"]
    assert d.resolve("nobody@example.com") == []


def test_subaddress_delivers_to_user(d):
    assert d.resolve("alice+lists@example.com") == ["alice@example.com"]
    assert d.mailbox_exists("ALICE+x@example.com")
    assert not d.mailbox_exists("nobody+x@example.com")


def test_alias_fans_out_to_local_and_foreign(d):
    d.add_alias("team@example.com", ["alice@example.com", "Bob@Example.com", "ext@foreign.org"])
    assert d.resolve("team@example.com") == ["alice@example.com", "bob@example.com",
                                              "ext@foreign.org"]
    assert d.resolve("team+x@example.com") == d.resolve("team@example.com")


def test_nested_aliases_and_dedup(d):
    d.add_alias("all@example.com", ["team@example.com", "carol@example.com"])
    d.add_alias("team@example.com", ["alice@example.com", "carol@example.com"])
    assert d.resolve("all@example.com") == ["alice@example.com", "carol@example.com"]


def test_alias_loop_terminates(d):
    d.add_alias("a@example.com", ["b@example.com"])
    d.add_alias("b@example.com", ["a@example.com", "alice@example.com"])
    assert d.resolve("a@example.com") == ["alice@example.com"]


def test_alias_back_to_own_mailbox(d):
    # Keep a copy and forward: the alias names the mailbox it shadows.
    d.add_alias("bob@example.com", ["bob@example.com", "ext@foreign.org"])
    assert d.resolve("bob@example.com") == ["bob@example.com", "ext@foreign.org"]


def test_depth_limit(d):
    for i in range(15):
        d.add_alias(f"l{i}@example.com", [f"l{i + 1}@example.com"])
    d.add_alias("l15@example.com", ["alice@example.com"])
    assert d.resolve("l14@example.com") == ["alice@example.com"]
    assert d.resolve("l0@example.com") == []


def test_catch_all_is_last(d):
    d.add_alias("@example.com", ["carol@example.com"])
    assert d.resolve("alice@example.com") == ["alice@example.com"]
    assert d.resolve("whatever@example.com") == ["carol@example.com"]
    assert d.resolve("alice+tag@example.com") == ["alice@example.com"]
    assert d.resolve("x@bücher.de") == []


def test_foreign_address_resolves_to_itself(d):
    assert d.resolve("someone@foreign.org") == ["someone@foreign.org"]
    assert not d.is_local_domain("foreign.org")


def test_idn_domains_accept_both_forms(d):
    assert d.is_local_domain("xn--bcher-kva.de")
    assert d.is_local_domain("BÜCHER.DE")
    assert d.resolve("JÜRGEN@xn--bcher-kva.de") == ["jürgen@bücher.de"]
    with pytest.raises(DirectoryError):
        d.add_domain("xn--bcher-kva.de")


def test_authenticate(d):
    assert d.authenticate("Alice@example.com", "pw-alice@example.com") == "alice@example.com"
    assert d.authenticate("alice@example.com", "wrong") is None
    assert d.authenticate("ghost@example.com", "anything") is None
    assert d.authenticate("not an address", "x") is None
    d.set_password("alice@example.com", "new")
    assert d.authenticate("alice@example.com", "new") == "alice@example.com"


def test_authenticate_rehashes_old_parameters(d):
    from argon2 import PasswordHasher
    from sqlalchemy import select

    from store.models import User

    weak = PasswordHasher(time_cost=1, memory_cost=8192, parallelism=1).hash("old")
    with d.db.transaction() as s:
        s.scalar(select(User).where(User.address == "bob@example.com")).password_hash = weak
    assert d.authenticate("bob@example.com", "old") == "bob@example.com"
    with d.db.transaction() as s:
        new = s.scalar(select(User.password_hash).where(User.address == "bob@example.com"))
    assert new != weak and new.startswith("$argon2id$") and "m=65536" in new


def test_vrfy_expn(d):
    d.add_alias("team@example.com", ["alice@example.com", "bob@example.com"])
    assert d.vrfy("alice+x@example.com") == "alice@example.com"
    assert d.vrfy("nobody@example.com") is None
    assert d.expn("team@example.com") == ["alice@example.com", "bob@example.com"]
    assert d.expn("alice@example.com") is None


def test_admin_mistakes(d):
    with pytest.raises(DirectoryError, match="not a domain of ours"):
        d.add_user("x@elsewhere.org", "pw")
    with pytest.raises(DirectoryError, match="already exists"):
        d.add_user("ALICE@example.com", "pw")
    with pytest.raises(DirectoryError, match="still has"):
        d.remove_domain("example.com")
    with pytest.raises(DirectoryError, match="does not exist"):
        d.remove_user("ghost@example.com")
    with pytest.raises(DirectoryError, match="empty"):
        d.add_user("new@example.com", "")
    d.remove_domain("example.com", force=True)
    assert not d.is_local_domain("example.com")
    assert [u.address for u in d.list_users()] == ["jürgen@bücher.de"]


def test_remove_alias_target(d):
    d.add_alias("team@example.com", ["alice@example.com", "bob@example.com"])
    d.remove_alias("team@example.com", "alice@example.com")
    assert d.resolve("team@example.com") == ["bob@example.com"]
    d.remove_alias("team@example.com")
    assert d.resolve("team@example.com") == []
    with pytest.raises(DirectoryError):
        d.remove_alias("team@example.com")
