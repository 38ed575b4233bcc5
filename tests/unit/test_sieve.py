"""The Sieve language without sockets: syntax errors with exact positions, what each test and
action decides, the limits, the implicit keep; and the pure parts around it (vacation rules,
rspamd verdicts, SRS, loops)."""

from __future__ import annotations

import email
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mda.vacation import reply, why_not
from mta import spamcheck
from mta.forwarding import ForgedSrs, Srs, is_srs, loops
from sieve import Context, Limits, SieveError, SieveRuntimeError, check, compile_script, evaluate
from sieve.grammar import parse
from sieve.interpreter import INBOX, Vacation, glob_to_regex, normalize_folder

MSG = (b"From: Alice <alice@origin.test>\nTo: bob@example.com\nCc: x@y.test\n"
       b"Subject: =?utf-8?q?caf=C3=A9?= [list] news\nMessage-ID: <m1@origin.test>\n"
       b"Content-Type: multipart/alternative; boundary=b\n\n--b\nContent-Type: text/plain\n\n"
       b"The secret code\n--b\nContent-Type: text/html\n\n<p>html only</p>\n--b--\n")


def run(script: str, message: bytes = MSG, sender: str = "alice@origin.test",
        rcpt: str = "bob+tag@example.com", limits: Limits | None = None):
    nodes, required = compile_script(script)
    return evaluate(nodes, required, Context(message, sender, rcpt), limits)


@pytest.mark.parametrize("script,where", [
    ('keep', "line 1, column 5"),
    ('if true {\n  keep;\n', "line 3, column 1"),
    ('if true { keep; }\nelse { discard; }\nelse { keep; }', "line 3, column 1"),
    ('require "fileinto";\nfileinto;', "line 2, column 1"),
    ('redirect "a@b" "c@d";', "line 1, column 16"),
    ('if header :is ["a", ] "x" { keep; }', "line 1, column 21"),
    ('keep; require "fileinto";', "line 1, column 7"),
    ('text:\nno end', "line 1, column 1"),
    ('if size :over 10Q { keep; }', "line 1, column 17"),
    ('if header :comparator "i;unicode" "a" "b" { keep; }', "line 1, column 4"),
])
def test_syntax_errors_name_the_line_and_column(script, where):
    with pytest.raises(SieveError) as e:
        compile_script(script)
    assert str(e.value).startswith(where), str(e.value)


def test_implicit_keep_and_what_cancels_it():
    assert run("").folders == {INBOX: []}
    assert run('require "fileinto"; fileinto "A";').folders == {"A": []}
    assert run('require ["fileinto", "copy"]; fileinto :copy "A";').folders == {"A": [], INBOX: []}
    assert run("discard;").folders == {} and run("discard;").discarded
    out = run('redirect "x@remote.test";')
    assert out.folders == {} and out.redirects == ["x@remote.test"]
    assert run('require "fileinto"; fileinto "A"; keep; fileinto "A";').folders == {
        "A": [], INBOX: []}  # once per folder


def test_tests_and_match_types():
    assert run('require "fileinto"; if header :contains "subject" "café" { fileinto "C"; }'
               ).folders == {"C": []}  # RFC 2047 decoded
    assert run('if address :domain :is "from" "ORIGIN.test" { discard; }').discarded
    assert run('require "envelope"; if envelope :localpart :is "to" "bob+tag" { discard; }'
               ).discarded
    assert run('require ["envelope", "subaddress"]; if envelope :detail "to" "tag" '
               '{ discard; }').discarded
    assert not run('require ["envelope", "subaddress"]; if envelope :detail "to" "tag" '
                   '{ discard; }', rcpt="bob@example.com").discarded
    assert run('if header :matches "subject" "*list?*" { discard; }').discarded
    assert not run('if header :comparator "i;octet" :contains "subject" "LIST" { discard; }'
                   ).discarded
    assert run('require "regex"; if header :regex "message-id" "^<m[0-9]@" { discard; }'
               ).discarded
    assert run('if allof (exists "cc", not exists "bcc", size :under 1K) { discard; }'
               ).discarded
    assert run('if anyof (false, size :over 10M) { keep; } else { discard; }').discarded
    assert run('require "body"; if body :text :contains "secret" { discard; }').discarded
    assert run('require "body"; if body :text :contains "html only" { discard; }'
               ).discarded  # :text reads the HTML part's text...
    assert not run('require "body"; if body :text :contains "<p>" { discard; }').discarded
    assert run('require "body"; if body :raw :contains "<p>" { discard; }').discarded
    assert run('require "body"; if body :content "text/html" :contains "html only" '
               '{ discard; }').discarded


def test_variables_flags_and_vacation():
    out = run('require ["variables", "fileinto", "imap4flags"];\n'
              'if header :matches "from" "* <*@*>" { set :lower "who" "${1}"; }\n'
              'addflag "\\\\Seen"; addflag "\\\\flagged";\n'
              'fileinto "People/${who}";\n')
    assert out.folders == {"People/alice": ["\\Seen", "\\Flagged"]}
    out = run('require "vacation"; vacation :days 100 :subject "Away" :addresses '
              '["bob@example.com"] "Back soon.";')
    assert out.vacation is not None and out.vacation.days == 30  # capped
    assert out.folders == {INBOX: []}  # vacation does not cancel the implicit keep


def test_limits_and_runtime_errors():
    many = "".join(f'redirect "r{i}@remote.test";\n' for i in range(5))
    with pytest.raises(SieveRuntimeError, match="more than 4 redirects"):
        run(many)
    with pytest.raises(SieveRuntimeError, match="took too long"):
        run('require "regex"; if header :regex "subject" "(a|aa)+c" { keep; }',
            message=b"Subject: " + b"a" * 35 + b"b\n\nx\n",
            limits=Limits(regex_seconds=0.05))
    # :matches backtracks too: many stars against a long header are cut the same way.
    with pytest.raises(SieveRuntimeError, match="took too long"):
        run('if header :matches "subject" "*a*a*a*a*a*a*a*a*a*a*a*c" { keep; }',
            message=b"Subject: " + b"a" * 3000 + b"\n\nx\n",
            limits=Limits(regex_seconds=0.05))
    with pytest.raises(SieveError, match="needs require \"regex\""):
        compile_script('require "variables"; set :quoteregex "a" "b";')
    with pytest.raises(SieveError, match="has no tag :encodeurl"):
        compile_script('require "variables"; set :encodeurl "a" "b";')
    with pytest.raises(SieveRuntimeError, match="reject together"):
        run('require ["reject", "fileinto"]; fileinto "A"; reject "no";')


def test_helpers():
    assert glob_to_regex("a*b?\\*") == "a(.*?)b(.)\\*"
    assert normalize_folder("INBOX") == INBOX and normalize_folder("INBOX/Sub") == "Sub"
    assert normalize_folder("A.B") == "A/B"
    assert check('keep;') == "" and check('keep').startswith("line 1")


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_any_text_compiles_or_fails_cleanly(text):
    try:
        parse(text)
        compile_script(text)
    except SieveError as e:
        assert e.line >= 1 and e.column >= 1


def test_vacation_rules():
    headers = email.message_from_bytes(MSG)
    own = {"bob@example.com"}
    assert why_not(headers, "alice@origin.test", own, own) == ""
    assert why_not(headers, "", own, own) == "null sender"
    assert "program" in why_not(headers, "MAILER-DAEMON@origin.test", own, own)
    assert "user" in why_not(headers, "bob@example.com", own, own)
    listed = email.message_from_bytes(b"List-Id: <x>\n" + MSG)
    assert "List" in why_not(listed, "alice@origin.test", own, own)
    auto = email.message_from_bytes(b"Auto-Submitted: auto-replied\n" + MSG)
    assert "Auto-Submitted" in why_not(auto, "alice@origin.test", own, own)
    assert "not named" in why_not(headers, "alice@origin.test", {"z@e.test"}, {"z@e.test"})
    text = reply(Vacation("Away.", 7, None, None, (), False, "h"), "bob@example.com",
                 "alice@origin.test", headers, "mx.example.com", 0.0)
    assert b"Auto-Submitted: auto-replied" in text and b"In-Reply-To: <m1@origin.test>" in text
    assert b"References: <m1@origin.test>" in text and b"\r\n\r\nAway." in text


def test_rspamd_verdicts():
    v = spamcheck.parse_verdict(b'{"action": "reject", "score": 20, "required_score": 15, '
                                b'"symbols": {"GTUBE": {}}, "messages": {"smtp_message": "Gtube"}}')
    d = spamcheck.decide(v, True, "mx")
    assert d.reply is not None and d.reply.startswith("550 5.7.1") and "Gtube" in d.reply
    for action in ("soft reject", "greylist"):
        d = spamcheck.decide(spamcheck.Verdict(action, 5, 15), True, "mx")
        assert d.reply is not None and d.reply.startswith("451 4.7.1")
    d = spamcheck.decide(spamcheck.Verdict("add header", 7, 15, ["X"]), True, "mx")
    assert d.reply is None and b"X-Spam-Flag: YES" in d.header and d.result == "spam"
    assert spamcheck.decide(None, True, "mx").reply is None
    assert spamcheck.decide(None, False, "mx").reply.startswith("451 4.7.1")
    with pytest.raises(spamcheck.SpamCheckError):
        spamcheck.parse_verdict(b"<html>")


def test_srs_round_trip_and_forgeries():
    srs = Srs(key="k" * 32)
    addr = srs.forward("Alice@origin.test", "example.com")
    assert is_srs(addr) and addr.endswith("@example.com")
    assert srs.reverse(addr) == "alice@origin.test"
    assert srs.reverse(addr.lower()) == "alice@origin.test"  # hashes compare case-insensitively
    with pytest.raises(ForgedSrs):
        Srs(key="other" * 8).reverse(addr)
    assert srs.forward("", "example.com") == ""
    # Forwarded again by another forwarder that uses SRS: SRS1, reversed to the first one's.
    first_hop = Srs(key="j" * 32).forward("alice@origin.test", "fwd1.test")
    again = srs.forward(first_hop, "example.com")
    assert again.upper().startswith("SRS1=") and again.endswith("@example.com")
    assert srs.reverse(again) == first_hop.lower()
    # Older than the 21 days a bounce may take: refused (the library's clock, moved on).
    srs._srs._time_fn = lambda: time.time() + 22 * 86400
    with pytest.raises(ForgedSrs):
        srs.reverse(addr)
    assert loops(b"Delivered-To: bob@example.com\nSubject: x", "BOB@example.com")
    assert loops(b"Received: x\n" * 51, "a@b")
    assert not loops(b"Received: x\nSubject: y", "a@b")
