"""`pochta dns DOMAIN` (the records to publish) and `pochta check DOMAIN` (what the DNS says
about them): MX, the A/AAAA of our host name, its reverse DNS (FCrDNS), SPF, DKIM, DMARC;
`pochta dns` also prints our MTA-STS policy and its TXT record, the TLS-RPT record, and the
TLSA records of our certificate's key (and of the key the next ACME certificate will have).

Look-ups go through ``[delivery] resolver`` when set (tests use a DNS stub), else the
system's resolver, as for delivery.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path

import dns.exception
import dns.resolver
import dns.reversename
import spf
import typer

from admin.context import UserError, context
from mta import dkimsign
from mta.dns import configured
from mta.mtasts import policy_id, published_policy
from store.addresses import ascii_domain
from store.config import Config


def split_txt(value: str) -> str:
    """A TXT value as quoted strings of at most 255 octets (RFC 1035 §3.3.14)."""
    return " ".join(f'"{value[i:i + 255]}"' for i in range(0, len(value), 255))


@dataclass(frozen=True)
class Wanted:
    """The records a domain of ours needs (values without quotes)."""

    domain: str  # A-labels
    host: str
    mx: str
    spf: str
    dmarc: str
    dkim_name: str | None  # None: no key yet
    dkim: str | None
    sts_policy: str = ""  # the policy file's text
    sts_id: str = ""
    tlsrpt: str = ""
    tlsa: tuple[tuple[str, str], ...] = ()  # (what, "3 1 1 <hex>")


def wanted(cfg: Config, name: str) -> Wanted:
    d, host = ascii_domain(name), cfg.hostname.rstrip(".")
    found = dkimsign.active(Path(cfg.dkim.keys_dir), name)
    policy = published_policy(host, cfg.acme.enabled)
    return Wanted(
        domain=d, host=host, mx=f"10 {host}.", spf="v=spf1 mx -all",
        dmarc=f"v=DMARC1; p=quarantine; adkim=r; aspf=r; rua=mailto:postmaster@{d}",
        dkim_name=f"{found[0]}._domainkey.{d}" if found else None,
        dkim=dkimsign.txt_record(found[1]) if found else None,
        sts_policy=policy, sts_id=policy_id(policy),
        tlsrpt=f"v=TLSRPTv1; rua=mailto:postmaster@{d}", tlsa=tuple(tlsa_records(cfg)))


def tlsa_records(cfg: Config) -> list[tuple[str, str]]:
    """DANE-EE SPKI SHA-256 (3 1 1, RFC 7671 §5.1) of our certificate's key, and of the key
    ACME keeps ready for the next certificate: publish both before a renewal."""
    import hashlib

    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    def spki(public_key: object) -> str:
        der = public_key.public_bytes(  # type: ignore[attr-defined]
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        return f"3 1 1 {hashlib.sha256(der).hexdigest()}"

    out = []
    try:
        cert = x509.load_pem_x509_certificate(Path(cfg.tls.cert).read_bytes())
        out.append(("the certificate in use", spki(cert.public_key())))
    except (OSError, ValueError):
        pass
    from admin.acme import acme_dir

    try:
        key = serialization.load_pem_private_key(
            (acme_dir(cfg) / "next-key.pem").read_bytes(), password=None)
        out.append(("the next ACME certificate's key", spki(key.public_key())))
    except (OSError, ValueError, TypeError):
        pass
    return out


def zone_lines(w: Wanted, name: str) -> list[str]:
    lines = [
        f"; DNS records for {name}, served by {w.host}",
        f"{w.host}. IN A <public IPv4 address of {w.host}>   ; and AAAA for IPv6; PTR to {w.host}",
        f"{w.domain}. IN MX {w.mx}",
        f'{w.domain}. IN TXT "{w.spf}"',
    ]
    if w.dkim_name and w.dkim:
        lines.append(f"{w.dkim_name}. IN TXT {split_txt(w.dkim)}")
    else:
        lines.append(f"; no DKIM key yet: run 'pochta dkim keygen {name}'")
    lines.append(f'_dmarc.{w.domain}. IN TXT "{w.dmarc}"')
    mode = "enforce" if "mode: enforce" in w.sts_policy else "testing"
    lines += [
        f"; MTA-STS (RFC 8461), mode {mode}"
        + ("" if mode == "enforce" else " until the certificate is from a public CA ([acme])"),
        f'_mta-sts.{w.domain}. IN TXT "v=STSv1; id={w.sts_id}"',
        f"mta-sts.{w.domain}. IN CNAME {w.host}.   ; served by [mta_sts] listen, or a web "
        "server of yours",
        f"; https://mta-sts.{w.domain}/.well-known/mta-sts.txt (text/plain) holds:",
        *(f";   {line}" for line in w.sts_policy.strip().splitlines()),
        f'_smtp._tls.{w.domain}. IN TXT "{w.tlsrpt}"   ; TLS reports (RFC 8460): '
        "pochta tls-reports",
    ]
    if w.tlsa:
        lines.append(f"; DANE (RFC 7672): only in a DNSSEC-signed zone of {w.host}")
        lines += [f"_25._tcp.{w.host}. IN TLSA {value}   ; {what}" for what, value in w.tlsa]
    return lines


def _domain_of_ours(ctx: typer.Context, domain: str) -> str:
    c = context(ctx)
    name = c.directory.domain_arg(domain)
    if not c.directory.is_local_domain(name):
        raise UserError(f"domain {name} is not a domain of ours (pochta domain add {name})")
    return name


def dns_records(ctx: typer.Context, domain: str) -> None:
    """Print every DNS record DOMAIN needs (MX, SPF, DKIM, DMARC, the A record of hostname)."""
    name = _domain_of_ours(ctx, domain)
    typer.echo("\n".join(zone_lines(wanted(context(ctx).config, name), name)))


# -- check ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Finding:
    what: str
    ok: bool
    detail: str  # what the DNS says; when not ok, what to publish


class Lookup:
    """Answers as lists of strings; [] for none; DNSTrouble for a failure to ask."""

    def __init__(self, cfg: Config) -> None:
        self.r = configured(dns.resolver.Resolver, cfg.delivery.resolver, 5.0)

    def __call__(self, name: str, rtype: str) -> list[str]:
        try:
            answer = self.r.resolve(name, rtype)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return []
        except dns.exception.DNSException as e:
            raise DNSTrouble(f"{rtype} {name}: {e}") from None
        if rtype == "TXT":
            return [b"".join(rr.strings).decode("utf-8", "replace") for rr in answer]
        return [rr.to_text() for rr in answer]


class DNSTrouble(Exception):
    pass


def _norm(txt: str) -> str:
    return "".join(txt.split()).rstrip(";").lower()


def check_mx(w: Wanted, ask: Lookup) -> Finding:
    mx = ask(w.domain, "MX")
    hosts = {m.split()[-1].rstrip(".").lower() for m in mx}
    if w.host.lower() in hosts:
        return Finding("MX", True, ", ".join(sorted(mx)))
    return Finding("MX", False, f"{'found ' + ', '.join(mx) if mx else 'no MX'}; publish: "
                                f"{w.domain}. IN MX {w.mx}")


def our_addresses(w: Wanted, ask: Lookup) -> list[str]:
    return ask(w.host, "A") + ask(w.host, "AAAA")


def check_address(w: Wanted, ips: list[str]) -> Finding:
    if ips:
        return Finding("A/AAAA", True, f"{w.host}: {', '.join(ips)}")
    return Finding("A/AAAA", False, f"{w.host} has no address; publish: {w.host}. IN A "
                                    "<its public IPv4> (and AAAA for IPv6)")


def check_reverse(w: Wanted, ips: list[str], ask: Lookup) -> list[Finding]:
    """FCrDNS: each address's PTR names our host, and that name resolves back to it."""
    out = []
    for ip in ips:
        names = [n.rstrip(".").lower() for n in ask(dns.reversename.from_address(ip).to_text(),
                                                    "PTR")]
        back = {str(ipaddress.ip_address(a)) for n in names if n == w.host.lower()
                for a in ask(n, "AAAA" if ":" in ip else "A")}
        if w.host.lower() in names and str(ipaddress.ip_address(ip)) in back:
            out.append(Finding("PTR", True, f"{ip} -> {w.host} -> {ip}"))
        else:
            out.append(Finding("PTR", False, f"{ip} -> {', '.join(names) or 'no PTR'}; set the "
                                             f"PTR of {ip} to {w.host} (your hosting "
                                             "provider's panel)"))
    return out


def check_spf(w: Wanted, ips: list[str], ask: Lookup) -> Finding:
    records = [t for t in ask(w.domain, "TXT") if t.lower().startswith("v=spf1")]
    if len(records) != 1:
        return Finding("SPF", False, f"{len(records)} SPF records (RFC 7208 wants one); "
                                     f'publish: {w.domain}. IN TXT "{w.spf}"')
    failing = []
    for ip in ips:
        result, _ = spf.check2(i=ip, s=f"postmaster@{w.domain}", h=w.host, timeout=5)
        if result != "pass":
            failing.append(f"{ip}: {result}")
    if failing:
        return Finding("SPF", False, f"{records[0]!r} does not pass us ({'; '.join(failing)}); "
                                     f'publish: {w.domain}. IN TXT "{w.spf}"')
    return Finding("SPF", True, records[0])


def check_dkim(w: Wanted, name: str, ask: Lookup) -> Finding:
    if not w.dkim_name or not w.dkim:
        return Finding("DKIM", False, f"no key yet: pochta dkim keygen {name}, then publish "
                                      "what pochta dns prints")
    found = ask(w.dkim_name, "TXT")
    if any(_norm(t) == _norm(w.dkim) for t in found):
        return Finding("DKIM", True, f"{w.dkim_name} matches our key")
    return Finding("DKIM", False, f"{w.dkim_name}: {'another key' if found else 'no record'}; "
                                  f"publish: {w.dkim_name}. IN TXT {split_txt(w.dkim)}")


def check_dmarc(w: Wanted, ask: Lookup) -> Finding:
    records = [t for t in ask(f"_dmarc.{w.domain}", "TXT") if t.lower().startswith("v=dmarc1")]
    if len(records) == 1:
        return Finding("DMARC", True, records[0])
    return Finding("DMARC", False, f"{len(records)} DMARC records; publish: "
                                   f'_dmarc.{w.domain}. IN TXT "{w.dmarc}"')


def findings(cfg: Config, name: str, ask: Lookup) -> list[Finding]:
    w = wanted(cfg, name)
    out: list[Finding] = []
    ips: list[str] = []
    steps = [
        lambda: [check_mx(w, ask)],
        lambda: [check_address(w, ips)],
        lambda: check_reverse(w, ips, ask),
        lambda: [check_spf(w, ips, ask)],
        lambda: [check_dkim(w, name, ask)],
        lambda: [check_dmarc(w, ask)],
    ]
    labels = ["MX", "A/AAAA", "PTR", "SPF", "DKIM", "DMARC"]
    try:
        ips.extend(our_addresses(w, ask))
        address_trouble = None
    except DNSTrouble as e:
        address_trouble = Finding("A/AAAA", False, f"cannot ask the DNS: {e}")
    for label, step in zip(labels, steps, strict=True):
        if label == "A/AAAA" and address_trouble is not None:
            out.append(address_trouble)
            continue
        try:
            out.extend(step())
        except DNSTrouble as e:
            out.append(Finding(label, False, f"cannot ask the DNS: {e}"))
    return out


def check(ctx: typer.Context, domain: str) -> None:
    """DOMAIN's published DNS against what `pochta dns` says it must be; exit 1 if wrong."""
    name = _domain_of_ours(ctx, domain)
    cfg = context(ctx).config
    ask = Lookup(cfg)
    # pyspf asks dnspython's default resolver: make that ours (the stub in tests).
    dns.resolver.default_resolver = ask.r
    results = findings(cfg, name, ask)
    for f in results:
        typer.echo(f"{'OK' if f.ok else 'WRONG':<6} {f.what:<7} {f.detail}")
    wrong = sum(not f.ok for f in results)
    typer.echo(f"{name}: {'all good' if not wrong else f'{wrong} to fix'}")
    if wrong:
        raise typer.Exit(1)
