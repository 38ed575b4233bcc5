"""DSNs from whatever a peer said: pure functions, no sockets."""

from __future__ import annotations

import email
import email.policy
import time

from hypothesis import given, settings
from hypothesis import strategies as st

from mta.dsn import build_dsn, final_reports
from mta.envelope import FAILED, SENT, Envelope, Recipient
from mta.reply import Reply, ascii_text, one_line
from mta.smtp.data import MAX_LINE, line_error

ORIGINAL = b"From: a@example.com\r\nSubject: hi\r\n\r\nbody\r\n"


def envelope(*recipients: Recipient, mail_from: str = "a@example.com") -> Envelope:
    return Envelope(id="0000000000000001abcd", created=time.time(), mail_from=mail_from,
                    recipients=list(recipients))


def test_one_line_joins_lines_and_drops_controls():
    assert one_line("550-a\n550 b") == "550-a / 550 b"
    assert one_line("x\r\ny\rz") == "x / y / z"
    assert one_line("bell\x07 esc\x1b[1m tab\tend") == "bell  esc [1m tab end"
    assert one_line("\udcff\udcfe bytes") == "\ufffd\ufffd bytes"  # surrogateescape'd bytes
    assert len(one_line("y" * 5000)) == 500


def test_ascii_text_escapes_as_rfc_6533():
    assert ascii_text("Grüße") == "Gr\\x{00FC}\\x{00DF}e"


def test_reply_text_is_always_one_line():
    r = Reply(550, "5.1.1 one\nline two\n")
    assert r.text == "5.1.1 one / line two" and "\n" not in r.line


peer_text = st.text(alphabet=st.characters(codec=None, exclude_categories=()), max_size=3000)


@settings(max_examples=300, deadline=None)
@given(peer_text, st.sampled_from(["", "héllo@exämple.com", "a@example.com"]))
def test_any_peer_reply_yields_a_dsn_our_mda_accepts(text, orcpt_addr):
    r = Recipient("x@remote.test", "x@remote.test", status=FAILED, last_reply=f"550 {text}",
                  last_relay="mx.remote.test[192.0.2.1]:25",
                  orcpt=f"rfc822;{orcpt_addr}" if orcpt_addr else None)
    data = build_dsn(envelope(r), final_reports(envelope(r)), ORIGINAL, "mx.example.com")
    assert line_error(data, MAX_LINE - 2) is None  # CRLF only, lines of <= 998 octets
    head = data.split(b"\r\n\r\n", 1)[0]
    assert head.isascii()
    report = email.message_from_bytes(data, policy=email.policy.default)
    part = next(p for p in report.walk() if p.get_content_type() == "message/delivery-status")
    status = part.as_bytes().split(b"\r\n\r\n", 1)[1] if b"\r\n\r\n" in part.as_bytes() else b""
    assert status.isascii()


def test_an_alias_is_reported_expanded_and_its_members_stay_private():
    members = [Recipient(m, "team@example.com", status=SENT, notify=["SUCCESS"],
                         last_relay="mda", last_reply="250 ok")
               for m in ("bob@example.com", "carol@example.com")]
    env = envelope(*members, mail_from="outsider@remote.test")
    reports = final_reports(env)
    assert len(reports) == 1
    data = build_dsn(env, reports, ORIGINAL, "mx.example.com").decode()
    assert "Action: expanded" in data and "Final-Recipient: rfc822; team@example.com" in data
    assert "bob@" not in data and "carol@" not in data


def test_the_same_report_gets_the_same_id_and_is_spooled_once(tmp_path):
    """A message that came back after a crash which followed its bounce bounces again: the
    report has the same queue id, so it is not queued twice, and the runner is told it may
    have been delivered already (the MDA then finds the first copy: XRETRY)."""
    import asyncio

    from mta.dsn import Bouncer, report_id
    from mta.spool import Spool

    r = Recipient("x@remote.test", "x@remote.test", status=FAILED, last_reply="550 no")
    env = envelope(r)
    first = report_id(env.id, final_reports(env))
    assert first == report_id(env.id, final_reports(env)) and first[:14] == env.id[:14]
    assert report_id(env.id, [(r, "delayed")]) != first

    class LocalSender:
        def is_local_domain(self, domain):
            return True

        def resolve(self, address):
            return [address]

    queued: list[tuple[str, bool]] = []
    spool = Spool(tmp_path)
    bouncer = Bouncer("mx.example.com", spool, LocalSender(),
                      enqueue=lambda dsn, maybe_sent: queued.append((dsn.id, maybe_sent)))
    asyncio.run(bouncer.bounce(env, ORIGINAL))
    asyncio.run(bouncer.bounce(env, ORIGINAL, maybe_sent=True))  # the same, after a crash
    assert spool.ids() == [first] and queued == [(first, False)]
    spool.remove(first)  # delivered meanwhile: made again, and the MDA is asked to look first
    asyncio.run(bouncer.bounce(env, ORIGINAL, maybe_sent=True))
    assert queued == [(first, False), (first, True)]


def test_a_long_non_ascii_reply_stays_within_line_limits():
    # Found by hypothesis: 500 characters of 2-byte UTF-8, or 8-character escapes, made lines
    # of 1000+ octets.
    text = "0" * 28 + "\xa0" * 39 + "ĞĦĪĬĭİıĲĳĺĻļŅŇŉōŎŕřŚŞş" * 30
    r = Recipient("x@remote.test", "x@remote.test", status=FAILED, last_reply=f"550 {text}",
                  last_relay="mx.remote.test[192.0.2.1]:25")
    data = build_dsn(envelope(r), final_reports(envelope(r)), ORIGINAL, "mx.example.com")
    assert line_error(data, MAX_LINE - 2) is None
    assert len(ascii_text(text)) <= 500
