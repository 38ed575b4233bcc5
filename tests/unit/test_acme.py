"""When a certificate is renewed, and where http-01 answers go: no CA needed."""

from __future__ import annotations

import datetime

from admin.acme import CertInfo, Challenges, renewal_due

T0 = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
DAY = datetime.timedelta(days=1)


def info(names=("mx.example.com",), self_signed=False, days=90) -> CertInfo:
    return CertInfo(T0, T0 + days * DAY, frozenset(names), self_signed)


def test_renewal_at_two_thirds_of_the_lifetime():
    names = ["mx.example.com"]
    assert not renewal_due(info(), names, T0 + 59 * DAY)
    assert renewal_due(info(), names, T0 + 60 * DAY)
    assert not renewal_due(info(days=6), names, T0 + 3 * DAY)  # short-lived certificates too
    assert renewal_due(info(days=6), names, T0 + 4 * DAY)


def test_renewal_when_missing_self_signed_or_for_other_names():
    names = ["mx.example.com"]
    assert renewal_due(None, names, T0)
    assert renewal_due(info(self_signed=True), names, T0)
    assert renewal_due(info(), ["mx.example.com", "mail.example.com"], T0)
    assert not renewal_due(info(), ["MX.example.com"], T0)


def test_webroot_challenges_are_files_for_the_web_server(tmp_path):
    c = Challenges(str(tmp_path))
    c.add("tok-1", "tok-1.thumb")
    path = tmp_path / ".well-known" / "acme-challenge" / "tok-1"
    assert path.read_text() == "tok-1.thumb" and c.get("tok-1") == "tok-1.thumb"
    c.remove("tok-1")
    assert not path.exists() and c.get("tok-1") is None
