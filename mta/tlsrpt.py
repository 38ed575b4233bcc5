"""SMTP TLS Reporting (RFC 8460): the daily report on our TLS sessions to a policy domain,
and reading the reports others send us.

``build_report`` and ``report_message`` are pure. ``Reporter`` runs in the queue runner: once
a day (and at start) it turns the days before today's counts (store/tlspolicy.py, recorded by
the remote courier) into one report per domain, sent to each ``rua`` of
``_smtp._tls.<domain>``: ``mailto:`` through our own queue, DKIM-signed when we have a key for
our host's domain (RFC 8460 §5.3), ``https:`` by POST. The counts are claimed before sending:
a report is sent once, even from several hosts sharing the database.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
import logging
import secrets
import ssl
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime, make_msgid
from typing import Any
from urllib.parse import unquote, urlsplit

from mta.dkimsign import Signer
from mta.dns import Resolver, RouteError
from mta.envelope import Envelope, Recipient, new_id
from mta.spool import Spool
from mta.tlspolicy import https_request
from store import addresses
from store.tlspolicy import ReportCount, TLSPolicyStore

log = logging.getLogger("pochta.tlsrpt")

MEDIA_TYPE = "application/tlsrpt+gzip"  # RFC 8460 §5.3
CHECK_EVERY = 3600.0  # seconds between looks for days to report


def parse_rua(texts: list[str]) -> list[str]:
    """The ``rua`` URIs of the one ``v=TLSRPTv1`` TXT record (RFC 8460 §3); [] if none."""
    records = [t for t in texts if t.startswith("v=TLSRPTv1")]
    if len(records) != 1:
        return []
    for part in records[0].split(";"):
        key, eq, value = part.strip().partition("=")
        if key.strip() == "rua" and eq:
            return [u.strip() for u in value.split(",")
                    if u.strip().startswith(("mailto:", "https:"))]
    return []


def build_report(organization: str, contact: str, report_id: str, day: str, domain: str,
                 counts: list[ReportCount]) -> dict[str, Any]:
    """The JSON report (RFC 8460 §4.4) of one day's ``counts`` for ``domain``."""
    start = datetime.strptime(day, "%Y-%m-%d").replace(tzinfo=UTC)
    end = start + timedelta(days=1) - timedelta(seconds=1)
    policies: dict[tuple[str, str], dict[str, Any]] = {}
    for c in counts:
        entry = policies.get((c.policy_type, c.policy_string))
        if entry is None:
            lines = [ln for ln in c.policy_string.split("\n") if ln]
            policy: dict[str, Any] = {"policy-type": c.policy_type, "policy-string": lines,
                                      "policy-domain": domain}
            if c.policy_type == "sts":
                policy["mx-host"] = [ln[3:].strip() for ln in lines if ln.startswith("mx:")]
            entry = policies[(c.policy_type, c.policy_string)] = {
                "policy": policy,
                "summary": {"total-successful-session-count": 0,
                            "total-failure-session-count": 0},
                "failure-details": []}
        if c.result == "success":
            entry["summary"]["total-successful-session-count"] += c.count
        else:
            entry["summary"]["total-failure-session-count"] += c.count
            detail: dict[str, Any] = {"result-type": c.result, "failed-session-count": c.count}
            if c.mx:
                detail["receiving-mx-hostname"] = c.mx
            entry["failure-details"].append(detail)
    for entry in policies.values():
        if not entry["failure-details"]:
            del entry["failure-details"]
    return {"organization-name": organization,
            "date-range": {"start-datetime": start.strftime("%Y-%m-%dT%H:%M:%SZ"),
                           "end-datetime": end.strftime("%Y-%m-%dT%H:%M:%SZ")},
            "contact-info": contact, "report-id": report_id,
            "policies": list(policies.values())}


def report_file_name(submitter: str, domain: str, report: dict[str, Any]) -> str:
    """RFC 8460 §5.3: sender!policy-domain!begin!end!unique-id.json.gz (unix times)."""
    def ts(key: str) -> int:
        return int(datetime.strptime(report["date-range"][key], "%Y-%m-%dT%H:%M:%SZ")
                   .replace(tzinfo=UTC).timestamp())
    unique = "".join(ch for ch in report["report-id"] if ch.isalnum())[:20]
    return f"{submitter}!{domain}!{ts('start-datetime')}!{ts('end-datetime')}!{unique}.json.gz"


def report_message(submitter: str, sender: str, rcpt: str, domain: str,
                   report: dict[str, Any], now: float) -> bytes:
    """The report as mail (RFC 8460 §5.3): multipart/report; report-type="tlsrpt", the
    gzipped JSON as application/tlsrpt+gzip."""
    body = gzip.compress(json.dumps(report, separators=(",", ":")).encode(), mtime=0)
    b64 = base64.encodebytes(body).decode().replace("\n", "\r\n")
    boundary = f"tlsrpt-{secrets.token_hex(12)}"
    name = report_file_name(submitter, domain, report)
    head = (f"From: <{sender}>\r\nTo: <{rcpt}>\r\n"
            f"Date: {format_datetime(datetime.fromtimestamp(now, UTC))}\r\n"
            f"Subject: Report Domain: {domain} Submitter: {submitter} "
            f"Report-ID: <{report['report-id']}>\r\n"
            f"Message-ID: {make_msgid(domain=submitter)}\r\n"
            f"TLS-Report-Domain: {domain}\r\nTLS-Report-Submitter: {submitter}\r\n"
            "Auto-Submitted: auto-generated\r\nMIME-Version: 1.0\r\n"
            f'Content-Type: multipart/report; report-type="tlsrpt";\r\n\tboundary="{boundary}"'
            "\r\n\r\n")
    parts = (f"--{boundary}\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n"
             f"This is an aggregate TLS report from {submitter} for {domain}.\r\n\r\n"
             f"--{boundary}\r\nContent-Type: {MEDIA_TYPE}\r\n"
             "Content-Transfer-Encoding: base64\r\n"
             f'Content-Disposition: attachment;\r\n\tfilename="{name}"\r\n\r\n'
             f"{b64}\r\n--{boundary}--\r\n")
    return (head + parts).encode("ascii")


def read_report(message: bytes) -> dict[str, Any] | None:
    """The JSON of a TLS report mail (gzip or not), or None if it carries none."""
    import email
    import email.policy

    msg = email.message_from_bytes(message, policy=email.policy.default)
    for part in msg.walk():
        ctype = part.get_content_type()
        if ctype in (MEDIA_TYPE, "application/tlsrpt+json"):
            payload = part.get_payload(decode=True)
            if not isinstance(payload, bytes):
                continue
            try:
                raw = gzip.decompress(payload) if ctype == MEDIA_TYPE else payload
                data = json.loads(raw)
            except (OSError, ValueError, EOFError):
                return None
            return data if isinstance(data, dict) else None
    return None


class Reporter:
    """Sends the days before today's reports; claims each (day, domain) before sending."""

    def __init__(self, hostname: str, store: TLSPolicyStore, spool: Spool, resolver: Resolver,
                 enqueue: Callable[[Envelope], None], https: ssl.SSLContext,
                 signer: Signer | None = None, clock: Callable[[], float] = time.time) -> None:
        """``https``: the verifying TLS context for POSTs (the MTA-STS fetcher's)."""
        self.hostname = hostname
        self.store = store
        self.spool = spool
        self.resolver = resolver
        self.enqueue = enqueue
        self.signer = signer
        self.clock = clock
        self.https = https
        self.next_check = 0.0

    @property
    def sender(self) -> str:
        # Our host's parent domain (mx.example.org -> example.org), where postmaster lives.
        parts = self.hostname.split(".")
        domain = ".".join(parts[1:]) if len(parts) > 2 else self.hostname
        return f"noreply-tlsrpt@{domain}"

    async def run_once(self) -> None:
        """The runner starts this at most once per CHECK_EVERY (``next_check``)."""
        try:
            await self.send_pending()
        except Exception as e:  # the database, DNS: tried again in an hour
            log.warning("TLS reports not sent (tried again in an hour): %s",
                        str(e).splitlines()[0] if str(e) else type(e).__name__)

    async def send_pending(self) -> None:
        today = time.strftime("%Y-%m-%d", time.gmtime(self.clock()))
        counts = await asyncio.to_thread(self.store.counts, today)
        groups: dict[tuple[str, str], list[ReportCount]] = {}
        for c in counts:
            groups.setdefault((c.day, c.domain), []).append(c)
        for (day, domain), group in groups.items():
            name = addresses.ascii_domain(domain)
            try:
                rua = parse_rua(await self.resolver.txt(f"_smtp._tls.{name}"))
            except RouteError as e:
                log.info("TLS report for %s %s waits: %s", domain, day, e.text)
                continue
            # Claimed (deleted) before sending: sent once, even by several hosts.
            await asyncio.to_thread(self.store.forget_counts, day, domain)
            if not rua:
                continue  # the domain asks for no reports
            report = build_report(self.hostname, f"postmaster@{self.sender.split('@')[1]}",
                                  f"{day}.{domain}.{secrets.token_hex(6)}@{self.hostname}",
                                  day, domain, group)
            for uri in rua:
                try:
                    await self._send(uri, domain, report)
                    log.info("TLS report for %s %s sent to %s", domain, day, uri)
                except Exception as e:
                    log.warning("TLS report for %s %s to %s failed: %s", domain, day, uri, e)

    async def _send(self, uri: str, domain: str, report: dict[str, Any]) -> None:
        if uri.startswith("mailto:"):
            rcpt = unquote(uri[len("mailto:"):].split("?")[0])
            addresses.split(rcpt)  # an AddressError for a malformed one
            now = self.clock()
            data = report_message(self.hostname, self.sender, rcpt, domain, report, now)
            if self.signer is not None:
                data = await asyncio.to_thread(self.signer.sign, data,
                                               self.sender.split("@")[1]) + data
            env = Envelope(id=new_id(), created=now, mail_from="", size=len(data),
                           recipients=[Recipient(address=rcpt, original=rcpt,
                                                 next_attempt=now, notify=["NEVER"])],
                           client={"protocol": "local", "ip": "", "helo": ""},
                           dsn={"ret": None, "envid": None})
            await asyncio.to_thread(self.spool.put, env, data)
            self.enqueue(env)
            return
        url = urlsplit(uri)
        if not url.hostname:
            raise ValueError(f"no host in {uri}")
        body = gzip.compress(json.dumps(report).encode(), mtime=0)
        ips = await self.resolver.addresses(url.hostname)
        if not ips:
            raise OSError(f"no address for {url.hostname}")
        status, _, _ = await https_request(ips[0], url.port or 443, url.hostname, "POST",
                                           url.path or "/", self.https, body=body,
                                           content_type=MEDIA_TYPE)
        if not 200 <= status < 300:
            raise OSError(f"HTTP status {status}")
