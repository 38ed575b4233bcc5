"""The outbound resolver keeps answers for their TTL, and no longer."""

import asyncio

from mta.dns import Resolver
from tests.support.fakes import FakeDNS


def test_answers_are_kept_for_their_ttl_only():
    dns = FakeDNS()
    try:
        dns.add("kept.test", "MX", "10 mx.kept.test.")
        dns.add("mx.kept.test", "A", "127.0.0.5")

        async def main() -> None:
            r = Resolver(dns.address)
            dns.ttl = 0  # what the tests use: every look-up asks
            await r.route("kept.test")
            dns.replace("mx.kept.test", "A", "127.0.0.6")
            assert [h.ip for h in await r.route("kept.test")] == ["127.0.0.6"]
            assert dns.asked[("mx.kept.test.", "A")] == 2

            r = Resolver(dns.address)
            dns.ttl = 300
            await r.route("kept.test")
            dns.replace("mx.kept.test", "A", "127.0.0.7")
            for _ in range(3):  # within the TTL: the old answer, not a question
                assert [h.ip for h in await r.route("kept.test")] == ["127.0.0.6"]
            assert dns.asked[("mx.kept.test.", "A")] == 3
            assert dns.asked[("kept.test.", "MX")] == 3

        asyncio.run(main())
    finally:
        dns.close()


def test_no_such_record_is_remembered_for_the_soa_minimum_only():
    import dns.message
    import dns.rrset

    from mta.dns import negative_ttl

    q = dns.message.make_query("x.test", "AAAA")
    r = dns.message.make_response(q)
    assert negative_ttl(r) == 0.0  # no SOA: not at all
    r.authority.append(dns.rrset.from_text("test.", 600, "IN", "SOA",
                                           "ns.test. hostmaster.test. 1 60 60 60 30"))
    assert negative_ttl(r) == 30.0
