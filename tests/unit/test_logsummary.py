"""`pochta log summary`: the log's lines counted per day, whatever wrote them."""
# ruff: noqa: E501  (log lines are as long as they are)

from __future__ import annotations

from admin.logs import parse_line, summarize

OURS = """\
2026-12-04T23:59:58 mta[10]: 0661e3b90f306b10bd11: from=<a@x.test> size=100 nrcpt=2 client=1.2.3.4 proto=ESMTPS
2026-12-04T23:59:59 queue[11]: 0661e3b90f306b10bd11: to=<bob@example.com> relay=mda delay=0.10 attempts=1 status=sent (250 2.1.5 <bob@example.com> delivered)
2026-12-04T23:59:59 queue[11]: 0661e3b90f306b10bd11: to=<x@far.test> relay=mx.far.test[1.2.3.5]:25 delay=0.20 attempts=1 status=deferred (451 4.4.1 cannot connect)
2026-12-05T00:00:01 mta[10]: 1.2.3.6: unknown recipient <nobody@example.com>
2026-12-05T00:00:02 mta[10]: 1.2.3.6: relay denied to <a@elsewhere.test>
2026-12-05T00:00:03 mta[10]: 1.2.3.7: greylisted from=<a@b.test> to=<bob@example.com>
2026-12-05T00:00:04 mta[10]: 0661e3b90f306b10bd12: from=<> size=50 nrcpt=1 client=local proto=ESMTP
2026-12-05T00:00:05 queue[11]: 0661e3b90f306b10bd12: to=<x@far.test> relay=dns delay=1.00 attempts=1 status=bounced (550 5.1.2 no such domain)
Traceback (most recent call last):
not ours at all
"""

SYSLOG = """\
Dec  5 10:00:00 mx pochta-mta[10]: 0661e3b90f306b10bd13: from=<c@y.test> size=10 nrcpt=1 client=1.2.3.4 proto=ESMTP
2026-12-05T10:00:01.123456+00:00 mx pochta-queue[11]: 0661e3b90f306b10bd13: to=<amy@example.com> relay=mda delay=0.10 attempts=1 status=sent (250 ok)
"""


def test_our_lines_are_counted_per_day():
    days = summarize(OURS.splitlines(), year=2026)
    assert list(days) == ["2026-12-04", "2026-12-05"]
    d4, d5 = days["2026-12-04"], days["2026-12-05"]
    assert (d4.received, d4.received_bytes, d4.delivered, d4.deferred) == (1, 100, 1, 1)
    assert d4.senders["a@x.test"] == 1 and d4.recipient_domains["example.com"] == 1
    assert (d5.received, d5.bounced, d5.delivered) == (1, 1, 0)
    assert d5.senders["<>"] == 1
    assert d5.rejected == {"unknown recipient": 1, "relay denied": 1, "greylisted": 1}


def test_syslog_lines_are_counted_too():
    days = summarize(SYSLOG.splitlines(), year=2026)
    assert list(days) == ["2026-12-05"]
    assert (days["2026-12-05"].received, days["2026-12-05"].delivered) == (1, 1)


def test_lines_of_others_are_skipped():
    assert parse_line("Dec  5 10:00:00 mx postfix/smtpd[1]: connect from x", 2026) is None
    assert parse_line("", 2026) is None
    assert summarize(["garbage", "\x00\xff"], year=2026) == {}
