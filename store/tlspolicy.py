"""Outbound TLS state in the database, shared by every host and restart: the administrator's
per-domain TLS policies (`pochta tls-policy`), the MTA-STS policies fetched (RFC 8461 §5:
cached for their max_age), and the day's TLS-RPT counts (RFC 8460) until they are reported."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import delete, select
from sqlalchemy.exc import SQLAlchemyError

from store.db import Database
from store.directory import Directory
from store.models import MtaStsPolicy, TLSPolicy, TLSReportCount

POLICIES = ("none", "may", "encrypt", "verify", "dane")


class TLSPolicyError(ValueError):
    """A request the admin must correct, in one line."""


@dataclass(frozen=True)
class StsPolicy:
    id: str  # the TXT record's id when this policy was fetched
    mode: str  # "enforce", "testing" or "none"
    mx: tuple[str, ...]  # host name patterns, "*.example.net" matching one label
    max_age: int  # seconds
    fetched: float  # unix time

    @property
    def expires(self) -> float:
        return self.fetched + self.max_age

    def text(self) -> str:
        """The policy string of a TLS-RPT report (RFC 8460 §4.4: the policy's lines)."""
        return "\n".join(["version: STSv1", f"mode: {self.mode}",
                          *(f"mx: {m}" for m in self.mx), f"max_age: {self.max_age}"])


@dataclass(frozen=True)
class ReportCount:
    day: str
    domain: str
    policy_type: str
    policy_string: str
    result: str
    mx: str
    count: int


class TLSPolicyStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    # -- the administrator's policies ---------------------------------------------------------

    _domain = staticmethod(Directory.domain_arg)  # a DirectoryError for a malformed name

    def add(self, domain: str, policy: str) -> str:
        name = self._domain(domain)
        if policy not in POLICIES:
            raise TLSPolicyError(f"unknown policy {policy!r}: expected one of "
                                 + ", ".join(POLICIES))
        with self.db.transaction() as s:
            row = s.scalar(select(TLSPolicy).where(TLSPolicy.domain == name))
            if row is None:
                s.add(TLSPolicy(domain=name, policy=policy))
            else:
                row.policy = policy
        return name

    def remove(self, domain: str) -> None:
        name = self._domain(domain)
        with self.db.transaction() as s:
            row = s.scalar(select(TLSPolicy).where(TLSPolicy.domain == name))
            if row is None:
                raise TLSPolicyError(f"no TLS policy for {name}")
            s.delete(row)

    def all(self) -> list[tuple[str, str]]:
        with self.db.transaction() as s:
            return [(r.domain, r.policy) for r in
                    s.scalars(select(TLSPolicy).order_by(TLSPolicy.domain))]

    def get(self, domain: str) -> str | None:
        with self.db.transaction() as s:
            return s.scalar(select(TLSPolicy.policy).where(TLSPolicy.domain == domain))

    # -- MTA-STS cache ------------------------------------------------------------------------

    def sts_get(self, domain: str) -> StsPolicy | None:
        with self.db.transaction() as s:
            r = s.get(MtaStsPolicy, domain)
            if r is None:
                return None
            return StsPolicy(r.policy_id, r.mode, tuple(m for m in r.mx.split("\n") if m),
                             r.max_age, r.fetched)

    def sts_put(self, domain: str, p: StsPolicy) -> None:
        with self.db.transaction() as s:
            r = s.get(MtaStsPolicy, domain)
            if r is None:
                r = MtaStsPolicy(domain=domain)
                s.add(r)
            r.policy_id, r.mode, r.mx = p.id, p.mode, "\n".join(p.mx)[:4000]
            r.max_age, r.fetched = p.max_age, p.fetched

    def sts_forget(self, domain: str) -> None:
        with self.db.transaction() as s:
            s.execute(delete(MtaStsPolicy).where(MtaStsPolicy.domain == domain))

    # -- TLS-RPT counts -----------------------------------------------------------------------

    def count(self, day: str, domain: str, policy_type: str, policy_string: str, result: str,
              mx: str = "", n: int = 1) -> None:
        for attempt in (1, 2):  # two hosts may insert the same key at once: then add to it
            try:
                with self.db.transaction() as s:
                    row = s.scalar(select(TLSReportCount).where(
                        TLSReportCount.day == day, TLSReportCount.domain == domain,
                        TLSReportCount.policy_type == policy_type,
                        TLSReportCount.result == result, TLSReportCount.mx == mx))
                    if row is None:
                        s.add(TLSReportCount(day=day, domain=domain, policy_type=policy_type,
                                             policy_string=policy_string[:4000], result=result,
                                             mx=mx[:255], count=n))
                    else:
                        row.count += n
                        row.policy_string = policy_string[:4000]
                return
            except SQLAlchemyError:
                if attempt == 2:
                    raise

    def counts(self, before_day: str | None = None) -> list[ReportCount]:
        """The counts of the days before ``before_day`` (all when None), oldest first."""
        with self.db.transaction() as s:
            q = select(TLSReportCount).order_by(TLSReportCount.day, TLSReportCount.domain,
                                                TLSReportCount.id)
            if before_day is not None:
                q = q.where(TLSReportCount.day < before_day)
            return [ReportCount(r.day, r.domain, r.policy_type, r.policy_string, r.result,
                                r.mx, r.count) for r in s.scalars(q)]

    def forget_counts(self, day: str, domain: str) -> None:
        with self.db.transaction() as s:
            s.execute(delete(TLSReportCount).where(TLSReportCount.day == day,
                                                   TLSReportCount.domain == domain))
