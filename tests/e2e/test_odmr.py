"""On-Demand Mail Relay (RFC 2645): a customer without a fixed address logs in on the ODMR
port and takes its domain's held mail with ATRN over the same connection."""

from __future__ import annotations

import json
import smtplib

import pytest

from tests.support.odmr import Customer
from tests.support.smtp import mailbox, wait_for, wait_mail
from tests.support.stack import Stack, free_port

CUSTOMER = "customer@example.com"


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    port = free_port()
    s = Stack(tmp_path_factory.mktemp("odmr"), odmr={"listen": [f"127.0.0.1:{port}"]},
              delivery={"retry_initial": 3600, "retry_max": 3600})  # only ATRN delivers
    s.odmr_port = port
    s.setup_users("example.com", "bob@example.com", CUSTOMER)
    s.pochta("domain", "add", "odmr.test", "--relay", "--odmr-user", CUSTOMER)
    s.pochta("domain", "add", "other.test", "--relay", "--odmr-user", "bob@example.com")
    s.start("up", listen=[s.mda_listen, *s.settings["mta"]["listen"],
                          *s.settings["msa"]["listen"], f"127.0.0.1:{port}"])
    yield s
    s.stop_all()


def send25(s: Stack, rcpts: list[str], subject: str, sender: str = "bob@example.com") -> None:
    with smtplib.SMTP("127.0.0.1", s.mta_port, timeout=15) as c:
        c.sendmail(sender, rcpts, f"Subject: {subject}\r\n\r\nbody of {subject}\r\n".encode())


def held(s: Stack, rcpt: str) -> bool:
    return any(f"to=<{rcpt}>" in ln and "status=held" in ln for ln in s.log("up").splitlines())


def queued(s: Stack, domain: str) -> list[dict]:
    return json.loads(s.pochta("queue", "list", "--json", "--domain", domain).stdout)["messages"]


def test_the_domain_list_shows_who_takes_the_mail(stack):
    out = stack.pochta("domain", "list").stdout
    assert f"odmr:{CUSTOMER}" in out
    for args, says in ((("x.test", "--relay", "--odmr-user", "nobody@example.com"), "no user"),
                       (("x.test", "--relay", "--to", "h:25", "--odmr-user", CUSTOMER), "--to"),
                       (("x.test", "--odmr-user", CUSTOMER), "--relay")):
        r = stack.pochta("domain", "add", *args, check=False)
        assert r.returncode == 1 and says in r.stderr and len(r.stderr.splitlines()) == 1, r
    r = stack.pochta("user", "remove", CUSTOMER, check=False)
    assert r.returncode == 1 and "odmr.test" in r.stderr and "Traceback" not in r.stderr


def test_atrn_hands_over_the_held_mail_on_the_same_connection(stack):
    send25(stack, ["a@odmr.test"], "odmr-one")
    send25(stack, ["b@odmr.test", "bob@example.com"], "odmr-two")
    assert wait_for(lambda: held(stack, "a@odmr.test") and held(stack, "b@odmr.test"))
    wait_mail(stack, "bob@example.com", 1)  # the local copy is not held
    c = Customer(stack.odmr_port, CUSTOMER)
    c.login_tls()
    assert c.cmd("ATRN odmr.test").startswith("250 2.0.0")
    taken = c.serve()
    assert [(t.rcpts, t.mail_from) for t in taken] == [
        (["a@odmr.test"], "bob@example.com"), (["b@odmr.test"], "bob@example.com")]
    assert b"body of odmr-one" in taken[0].data and b"Received:" in taken[0].data
    assert wait_for(lambda: not queued(stack, "odmr.test"))
    sent = [ln for ln in stack.log("up").splitlines() if "status=sent" in ln and "ATRN[" in ln]
    assert len(sent) == 2
    # Nothing left: the next ATRN is told so, and the session goes on.
    c = Customer(stack.odmr_port, CUSTOMER)
    c.login_tls()
    assert c.cmd("ATRN").startswith("453")
    assert c.cmd("NOOP").startswith("250")
    c.close()


def test_refusals_change_nothing(stack):
    send25(stack, ["kept@odmr.test"], "odmr-kept")
    assert wait_for(lambda: held(stack, "kept@odmr.test"))
    c = Customer(stack.odmr_port, CUSTOMER)
    assert c.cmd("EHLO customer.test").startswith("250")
    assert c.cmd("ATRN odmr.test").startswith("530 5.7.0")  # no AUTH yet
    assert c.cmd("AUTH PLAIN AGN1c3RvbWVyQGV4YW1wbGUuY29tAHB3").startswith("5")  # not before TLS
    c.close()
    c = Customer(stack.odmr_port, CUSTOMER)
    c.login_tls()
    assert c.cmd("MAIL FROM:<x@example.com>").startswith("502 5.5.1")
    assert c.cmd("ATRN other.test").startswith("450 4.7.1")  # bob's, not ours
    assert c.cmd("ATRN odmr.test,other.test").startswith("450 4.7.1")
    assert c.cmd("ATRN odmr.test,,").startswith("501 5.5.4")
    assert c.cmd("ATRN example.com").startswith("450 4.7.1")  # a local domain: not held
    c.close()
    assert [m["recipients"][0]["address"] for m in queued(stack, "odmr.test")] == \
        ["kept@odmr.test"]
    # Another user's password does not make it theirs.
    c = Customer(stack.odmr_port, "bob@example.com")
    c.login_tls()
    assert c.cmd("ATRN odmr.test").startswith("450 4.7.1")
    c.close()
    c = Customer(stack.odmr_port, CUSTOMER)
    c.login_tls()
    assert c.cmd("ATRN odmr.test").startswith("250")
    assert [t.rcpts for t in c.serve()] == [["kept@odmr.test"]]


def test_a_customer_that_hangs_up_loses_nothing_and_gets_nothing_twice(stack):
    for n in (1, 2, 3):
        send25(stack, [f"drop{n}@odmr.test"], f"odmr-drop-{n}")
    assert wait_for(lambda: all(held(stack, f"drop{n}@odmr.test") for n in (1, 2, 3)))
    c = Customer(stack.odmr_port, CUSTOMER, drop_at_data=2)
    c.login_tls()
    assert c.cmd("ATRN odmr.test").startswith("250")
    assert [t.rcpts for t in c.serve()] == [["drop1@odmr.test"]]
    left = lambda: sorted(m["recipients"][0]["address"] for m in queued(stack, "odmr.test"))  # noqa: E731
    assert wait_for(lambda: left() == ["drop2@odmr.test", "drop3@odmr.test"])
    c = Customer(stack.odmr_port, CUSTOMER)
    c.login_tls()
    assert c.cmd("ATRN odmr.test").startswith("250")
    assert [t.rcpts for t in c.serve()] == [["drop2@odmr.test"], ["drop3@odmr.test"]]
    assert wait_for(lambda: left() == [])


def test_a_recipient_the_customer_refuses_bounces_and_a_4xx_stays(stack):
    send25(stack, ["gone@odmr.test", "later@odmr.test", "fine@odmr.test"], "odmr-mixed")
    assert wait_for(lambda: held(stack, "fine@odmr.test"))
    c = Customer(stack.odmr_port, CUSTOMER,
                 rcpt_replies={"gone@odmr.test": "550 5.1.1 no such user",
                               "later@odmr.test": "451 4.3.0 try later"})
    c.login_tls()
    assert c.cmd("ATRN odmr.test").startswith("250")
    assert [t.rcpts for t in c.serve()] == [["fine@odmr.test"]]
    # The 4xx stays queued (held again), the 5xx is final; the DSN for it comes once the
    # message is done, after the next ATRN takes the other.
    statuses = lambda: {r["address"]: r["status"] for m in queued(stack, "odmr.test")  # noqa: E731
                        for r in m["recipients"]}
    assert wait_for(lambda: statuses() == {"gone@odmr.test": "failed",
                                           "later@odmr.test": "pending",
                                           "fine@odmr.test": "sent"})
    c = Customer(stack.odmr_port, CUSTOMER)
    c.login_tls()
    assert c.cmd("ATRN odmr.test").startswith("250")
    assert [t.rcpts for t in c.serve()] == [["later@odmr.test"]]
    assert wait_for(lambda: any(b"gone@odmr.test" in m and b"5.1.1" in m
                                for m in mailbox(stack, "bob@example.com")))
    assert wait_for(lambda: not queued(stack, "odmr.test"))


def test_nothing_went_wrong_on_the_way(stack):
    log = stack.log("up")
    assert "Traceback" not in log and "Exception" not in log
