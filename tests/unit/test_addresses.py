import pytest

from store.addresses import (
    AddressError,
    ascii_domain,
    normalize,
    normalize_domain,
    normalize_mailbox,
    strip_subaddress,
)


@pytest.mark.parametrize("given,expected", [
    ("Bob@Example.COM", "bob@example.com"),
    ("<bob@example.com>", "bob@example.com"),
    ("x@xn--bcher-kva.de", "x@bücher.de"),
    ("Ünïcode@BÜCHER.de", "ünïcode@bücher.de"),
    ("a@example.com.", "a@example.com"),
])
def test_normalize(given, expected):
    assert normalize(given) == expected


@pytest.mark.parametrize("bad", [
    "no-at-sign", "@example.com", "a@", "a@[127.0.0.1]", "a@127.0.0.1", '"a@b"@example.com',
    "a..b@example.com", ".a@example.com", "a b@example.com", "x" * 65 + "@example.com",
    "a@-bad-.com", "a@exa mple.com",
])
def test_normalize_refuses(bad):
    with pytest.raises(AddressError):
        normalize(bad)


def test_mailbox_names_are_path_safe():
    for bad in ["a/b@example.com", "a%b@example.com", "a!b@example.com", "a+b@example.com",
                "alice.lock@example.com", "x.LOCK@example.com"]:  # alice's mbox dotlock
        with pytest.raises(AddressError):
            normalize_mailbox(bad)
    assert normalize_mailbox("Jean.Dupont@Example.com") == "jean.dupont@example.com"
    assert normalize_mailbox("lock.smith@example.com") == "lock.smith@example.com"
    from mda.paths import UnsafeAddress, mailbox_path
    with pytest.raises(UnsafeAddress):
        mailbox_path("/var/mail", "alice.lock@example.com")


def test_idn_round_trip():
    assert normalize_domain("BÜCHER.de") == "bücher.de"
    assert ascii_domain("bücher.de") == "xn--bcher-kva.de"


def test_subaddress():
    assert strip_subaddress("bob+lists@example.com") == "bob@example.com"
    assert strip_subaddress("bob@example.com") == "bob@example.com"
    assert strip_subaddress("+x@example.com") == "+x@example.com"


def test_a_line_break_is_never_part_of_an_address():
    for bad in ["alice\n@example.com", "al\rice@example.com", "alice@exa\nmple.com"]:
        with pytest.raises(AddressError):
            normalize(bad)
        with pytest.raises(AddressError):
            normalize_mailbox(bad)
