"""Inbound email authentication on the MTA: SPF (RFC 7208), DKIM (RFC 6376), DMARC (RFC 7489).

pyspf and dkimpy do the protocol work; this module feeds them our configured resolver, decides
DMARC from their results, and writes one ``Authentication-Results`` header (RFC 8601, authres)
with our hostname as authserv-id. Incoming Authentication-Results that claim our authserv-id
are forgeries and are removed. A DNS failure never turns into a 5xx: it is "temperror", and
the config says whether that means accept or 451.

Everything here is synchronous (pyspf and dkimpy block on DNS); the session runs it in a thread.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from email.utils import getaddresses

import authres
import authres.dmarc
import dkim
import dns.exception
import dns.resolver
import spf
from publicsuffixlist import PublicSuffixList

from mta.dns import configured
from mta.policy import header_fields, header_section
from mta.smtp import replies

log = logging.getLogger("pochta.auth")

_psl = PublicSuffixList()


def org_domain(domain: str) -> str:
    """The organizational domain (RFC 7489 §3.2) via the Public Suffix List."""
    return _psl.privatesuffix(domain.lower().rstrip(".")) or domain.lower()


def aligned(a: str, b: str, strict: bool) -> bool:
    a, b = a.lower().rstrip("."), b.lower().rstrip(".")
    return a == b if strict else org_domain(a) == org_domain(b)


@dataclass
class DMARCRecord:
    policy: str = "none"
    subdomain_policy: str | None = None
    adkim_strict: bool = False
    aspf_strict: bool = False


def parse_dmarc(txt: str) -> DMARCRecord | None:
    tags = {}
    for part in txt.split(";"):
        k, _, v = part.strip().partition("=")
        tags[k.strip().lower()] = v.strip()
    if tags.get("v") != "DMARC1" or tags.get("p", "").lower() not in ("none", "quarantine",
                                                                          "reject"):
        return None
    sp = tags.get("sp", "").lower()
    return DMARCRecord(tags["p"].lower(), sp if sp in ("none", "quarantine", "reject") else None,
                       tags.get("adkim", "r").lower() == "s", tags.get("aspf", "r").lower() == "s")


def dmarc_result(from_domain: str, record: DMARCRecord | None, spf_result: str, spf_domain: str,
                 dkim_pass_domains: list[str]) -> str:
    if record is None:
        return "none"
    if spf_result == "pass" and aligned(spf_domain, from_domain, record.aspf_strict):
        return "pass"
    if any(aligned(d, from_domain, record.adkim_strict) for d in dkim_pass_domains):
        return "pass"
    return "fail"


_AR_NAME = re.compile(rb"(?im)^authentication-results[ \t]*:")
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DOMAIN = re.compile(rf"{_LABEL}(?:\.{_LABEL})*\.?\Z")
_ADDRESS_LITERAL = re.compile(r"\[(?:[0-9.]{7,15}|IPv6:[0-9A-Fa-f:.]{2,45})\]\Z")


def raw_fields(head: bytes) -> list[bytes]:
    """A header section split into fields, each with its continuation lines and CRLFs."""
    fields: list[bytes] = []
    for line in head.split(b"\r\n")[:-1] if head.endswith(b"\r\n") else head.split(b"\r\n"):
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += line + b"\r\n"
        else:
            fields.append(line + b"\r\n")
    return fields


def authserv_id_of(value: bytes) -> bytes:
    """The authserv-id an Authentication-Results value claims (RFC 8601 §2.2), lower case:
    unfolded, comments dropped (nested ones too), up to the version or the first ";"."""
    text = value.replace(b"\r\n", b"")
    while True:  # innermost comments first: "(a (b) c)" goes in two passes
        stripped = re.sub(rb"\((?:[^()\\]|\\.)*\)", b" ", text)
        if stripped == text:
            break
        text = stripped
    token = re.split(rb"[ \t;]", text.strip(b" \t"), maxsplit=1)[0]
    return token.strip(b'"').rstrip(b".").lower()


def strip_forged_results(message: bytes, authserv_id: str) -> bytes:
    """Remove every Authentication-Results field that claims our authserv-id (RFC 8601 §5),
    however it is folded, commented or versioned; other fields are kept byte for byte."""
    end = message.find(b"\r\n\r\n")
    head, body = (message, b"") if end < 0 else (message[: end + 2], message[end + 2:])
    if not _AR_NAME.search(head):
        return message  # the common case: one scan of the header section
    ours = authserv_id.encode().rstrip(b".").lower()
    kept = []
    for f in raw_fields(head):
        name, colon, value = f.partition(b":")
        if colon and name.rstrip(b" \t").lower() == b"authentication-results" \
                and authserv_id_of(value) == ours:
            continue
        kept.append(f)
    return b"".join(kept) + body


def pvalue(value: str | None) -> str | None:
    """``value`` if it is safe as an RFC 8601 property value (a domain, an address literal
    or local@domain), else None: a client's HELO or a signature's d= must never read as
    results of ours (``x@y;dkim=pass`` is left unquoted by authres)."""
    if not value:
        return None
    local, at, domain = value.rpartition("@")
    if at and not (local and re.fullmatch(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]+", local)):
        return None
    return value if _DOMAIN.match(domain) or _ADDRESS_LITERAL.match(domain) else None


@dataclass
class Verdict:
    header: bytes
    reply: str | None = None  # a refusal, or None to accept
    results: dict[str, str] = field(default_factory=dict)


class InboundChecks:
    def __init__(self, hostname: str, resolver: str, *, spf_enabled: bool = True,
                 dkim_enabled: bool = True, dmarc_enabled: bool = True,
                 dmarc_enforce: bool = False, temperror: str = "accept",
                 timeout: float = 5.0) -> None:
        self.hostname = hostname
        self.spf_enabled = spf_enabled
        self.dkim_enabled = dkim_enabled
        self.dmarc_enabled = dmarc_enabled
        self.dmarc_enforce = dmarc_enforce
        self.temperror = temperror
        self.timeout = timeout
        r = self.resolver = configured(dns.resolver.Resolver, resolver, timeout)
        # pyspf asks dnspython's default resolver: in this process that is ours.
        dns.resolver.default_resolver = r

    def _txt(self, name: bytes | str, timeout: float = 5.0) -> bytes | None:
        """dkimpy's dnsfunc: the TXT record at name, or None."""
        qname = name.decode() if isinstance(name, bytes) else name
        try:
            answer = self.resolver.resolve(qname, "TXT")
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return None
        return b"".join(answer[0].strings)

    def _dmarc_record(self, domain: str) -> tuple[DMARCRecord | None, bool]:
        """(record, is_temperror); the org domain's record applies to subdomains."""
        candidates = [domain]
        org = org_domain(domain)
        if org != domain:
            candidates.append(org)
        for i, d in enumerate(candidates):
            try:
                answer = self.resolver.resolve(f"_dmarc.{d}", "TXT")
            except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
                continue
            except dns.exception.DNSException:
                return None, True
            for rr in answer:
                rec = parse_dmarc(b"".join(rr.strings).decode("utf-8", "replace"))
                if rec is not None:
                    if i > 0 and rec.subdomain_policy:
                        rec.policy = rec.subdomain_policy
                    return rec, False
        return None, False

    def _spf(self, ip: str, identity: str, helo: str) -> str:
        try:
            result, _explanation = spf.check2(i=ip, s=identity, h=helo, timeout=self.timeout,
                                              querytime=self.timeout)
            return str(result)
        except Exception as e:  # pyspf raises a variety of errors on odd input
            log.warning("SPF check of %s for %s failed: %s", ip, identity, e)
            return "temperror"

    def check(self, ip: str, helo: str, mail_from: str, message: bytes,
              verify_dkim: bool = True) -> Verdict:
        """``message`` may be only the header section (``verify_dkim`` False: too large)."""
        results: dict[str, str] = {}
        ar: list[authres.AuthenticationResult] = []
        temperror = False
        spf_domain = mail_from.rpartition("@")[2] if mail_from else helo
        spf_res = "none"
        if self.spf_enabled:
            # RFC 7208 §2.3/2.4: the HELO identity is checked on its own; MAIL FROM's result
            # is the one DMARC uses (the HELO one when the sender is <>).
            helo = pvalue(helo) or ""  # not a domain: no HELO identity to check or report
            helo_res = self._spf(ip, f"postmaster@{helo}", helo) if helo else "none"
            spf_res = self._spf(ip, mail_from, helo) if mail_from else helo_res
            temperror |= "temperror" in (spf_res, helo_res)
            results["spf"], results["spf_helo"] = spf_res, helo_res
            if mail_from:
                ar.append(authres.SPFAuthenticationResult(result=spf_res,
                                                          smtp_mailfrom=pvalue(mail_from)))
            if helo:
                ar.append(authres.SPFAuthenticationResult(result=helo_res, smtp_helo=helo))
        dkim_pass: list[str] = []
        if self.dkim_enabled:
            sigs = re.findall(rb"(?im)^dkim-signature:", message.split(b"\r\n\r\n", 1)[0])
            if not sigs:
                results["dkim"] = "none"
                ar.append(authres.DKIMAuthenticationResult(result="none"))
            elif not verify_dkim:
                results["dkim"] = "neutral"
                ar.append(authres.DKIMAuthenticationResult(
                    result="neutral", result_comment="message too large to verify here"))
            else:
                d = dkim.DKIM(message, timeout=int(self.timeout))
                for i in range(len(sigs)):
                    try:
                        ok = d.verify(idx=i, dnsfunc=self._txt)
                        res = "pass" if ok else "fail"
                    except dkim.DnsTimeoutError:
                        res, temperror = "temperror", True
                    except dns.exception.DNSException:
                        res, temperror = "temperror", True
                    except dkim.ValidationError:
                        res = "fail"  # e.g. body hash mismatch: the signature does not verify
                    except dkim.DKIMException:
                        res = "permerror"  # malformed signature or key
                    sig = d.signature_fields if hasattr(d, "signature_fields") else {}
                    dom = (sig.get(b"d") or b"").decode("ascii", "replace")
                    if res == "pass":
                        dkim_pass.append(dom)
                    results.setdefault("dkim", res)
                    if res == "pass":
                        results["dkim"] = "pass"
                    ar.append(authres.DKIMAuthenticationResult(
                        result=res, header_d=pvalue(dom),
                        header_s=pvalue((sig.get(b"s") or b"").decode("ascii", "replace"))))
        reply = None
        if self.dmarc_enabled:
            # Fields as readers see them: "From : x" is a From too (mta/policy.py).
            froms = [a for name, value in header_fields(header_section(message))
                     if name == "from" for _, a in getaddresses([value]) if a]
            domains = {a.rpartition("@")[2].lower() for a in froms}
            if len(domains) == 1 and pvalue(next(iter(domains))):
                from_domain = domains.pop()
                record, dns_failed = self._dmarc_record(from_domain)
                if dns_failed:
                    result, temperror = "temperror", True
                else:
                    result = dmarc_result(from_domain, record,
                                          spf_res, spf_domain, dkim_pass)
                    if result == "fail" and temperror:
                        result = "temperror"  # a DNS failure may have hidden a pass: never 5xx
                results["dmarc"] = result
                policy = record.policy if record else "none"
                ar.append(authres.dmarc.DMARCAuthenticationResult(
                    result=result, header_from=from_domain,
                    result_comment=f"p={policy.upper()}" if record else None))
                if result == "fail" and policy == "reject" and self.dmarc_enforce:
                    reply = replies.DMARC_REJECT.format(domain=from_domain)
        if reply is None and temperror and self.temperror == "defer":
            reply = replies.AUTHCHECK_TEMPERROR
        header = authres.AuthenticationResultsHeader(authserv_id=self.hostname, results=ar)
        return Verdict(str(header).encode("utf-8") + b"\r\n", reply, results)
