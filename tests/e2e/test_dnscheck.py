"""`pochta check DOMAIN`: the published DNS (a stub here) against what `pochta dns` prints."""

from __future__ import annotations

import re

from tests.support.fakes import FakeDNS
from tests.support.stack import Stack


def publish(dns: FakeDNS, dkim_name: str, dkim_txt: str, *, good: bool) -> None:
    dns.add("example.com", "MX", "10 mx.pochta.test." if good else "10 mx.other.test.")
    dns.add("mx.pochta.test", "A", "127.0.0.7")
    dns.add("7.0.0.127.in-addr.arpa", "PTR", "mx.pochta.test." if good else "host-7.isp.test.")
    dns.add("example.com", "TXT", '"v=spf1 mx -all"' if good else '"v=spf1 -all"')
    dns.add(dkim_name, "TXT", dkim_txt if good else '"v=DKIM1; k=rsa; p=AAAA"')
    if good:
        dns.add("_dmarc.example.com", "TXT", '"v=DMARC1; p=quarantine"')


def test_a_domain_published_as_pochta_dns_says_checks_out_and_a_wrong_one_is_told(tmp_path):
    good_dns, bad_dns = FakeDNS(), FakeDNS()
    try:
        s = Stack(tmp_path, delivery={"resolver": good_dns.address})
        s.setup_users("example.com", "bob@example.com")
        s.pochta("dkim", "keygen", "example.com", "--selector", "s1")
        zone = s.pochta("dns", "example.com").stdout
        m = re.search(r"^(s1\._domainkey\.example\.com)\. IN TXT (.+)$", zone, re.M)
        assert m, zone
        # Our MTA-STS policy (testing: no public certificate yet) with an id of its content,
        # and the TLS-RPT address.
        sts = re.search(r'^_mta-sts\.example\.com\. IN TXT "v=STSv1; id=([0-9a-f]{20})"$',
                        zone, re.M)
        assert sts and ";   mode: testing" in zone and ";   mx: mx.pochta.test" in zone, zone
        assert '_smtp._tls.example.com. IN TXT "v=TLSRPTv1; rua=mailto:postmaster@example.com"' \
            in zone
        publish(good_dns, m.group(1), m.group(2), good=True)
        publish(bad_dns, m.group(1), m.group(2), good=False)

        r = s.pochta("check", "example.com")
        lines = r.stdout.splitlines()
        assert [ln.split()[:2] for ln in lines[:-1]] == [
            ["OK", "MX"], ["OK", "A/AAAA"], ["OK", "PTR"], ["OK", "SPF"], ["OK", "DKIM"],
            ["OK", "DMARC"]], r.stdout
        assert lines[-1] == "example.com: all good"

        s.settings["delivery"]["resolver"] = bad_dns.address
        s.write()
        r = s.pochta("check", "example.com", check=False)
        assert r.returncode == 1
        wrong = {ln.split()[1]: ln for ln in r.stdout.splitlines() if ln.startswith("WRONG")}
        assert set(wrong) == {"MX", "PTR", "SPF", "DKIM", "DMARC"}, r.stdout
        assert "publish: example.com. IN MX 10 mx.pochta.test." in wrong["MX"]
        assert "set the PTR of 127.0.0.7 to mx.pochta.test" in wrong["PTR"]
        assert 'publish: example.com. IN TXT "v=spf1 mx -all"' in wrong["SPF"]
        assert "another key" in wrong["DKIM"] and m.group(2) in wrong["DKIM"]
        assert "_dmarc.example.com. IN TXT" in wrong["DMARC"]
        assert r.stdout.splitlines()[-1] == "example.com: 5 to fix"

        r = s.pochta("check", "nothere.test", check=False)
        assert r.returncode == 1 and "not a domain of ours" in r.stderr
    finally:
        good_dns.close()
        bad_dns.close()
