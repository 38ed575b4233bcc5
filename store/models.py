"""SQLAlchemy 2 models of the directory: domains, users and aliases.

Addresses are stored normalised (see ``store.addresses``): lower-case local part, U-label domain.
An alias row maps one source to one target; several rows give a list. A source ``@domain`` is
the domain's catch-all.
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

# Named constraints keep alembic migrations identical on SQLite and PostgreSQL.
NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class Domain(Base):
    __tablename__ = "domains"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(255), unique=True)
    created: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    users: Mapped[list[User]] = relationship(back_populates="domain")
    aliases: Mapped[list[Alias]] = relationship(back_populates="domain")


class User(Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    address: Mapped[str] = mapped_column(String(320), unique=True)
    domain_id: Mapped[int] = mapped_column(ForeignKey("domains.id"), index=True)
    password_hash: Mapped[str] = mapped_column(String(255))
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    quota_bytes: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    # SCRAM-SHA-256 (RFC 7677) keys, as Dovecot stores them: "iterations,salt,StoredKey,
    # ServerKey" (base64); made when the password is set or next used with PLAIN/LOGIN.
    scram_sha256: Mapped[str | None] = mapped_column(String(512), nullable=True)
    created: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    domain: Mapped[Domain] = relationship(back_populates="users")


class Alias(Base):
    __tablename__ = "aliases"
    __table_args__ = (UniqueConstraint("source", "target", name="uq_aliases_source_target"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    source: Mapped[str] = mapped_column(String(320), index=True)
    target: Mapped[str] = mapped_column(String(320))
    domain_id: Mapped[int] = mapped_column(ForeignKey("domains.id"), index=True)
    created: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    domain: Mapped[Domain] = relationship(back_populates="aliases")


class Greylist(Base):
    """A greylisting triplet: sha256 of (client network, sender, recipient)."""

    __tablename__ = "greylist"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    first_seen: Mapped[float] = mapped_column(Float)  # unix time
    last_seen: Mapped[float] = mapped_column(Float, index=True)
    passed: Mapped[bool] = mapped_column(Boolean, default=False)


class RelayDomain(Base):
    """A domain we are backup MX (or relay) for: its mail is queued and passed on, to ``to``
    ("host[:port]") or else to its MX hosts better than ours. ``hold``: nothing is attempted
    until released (ETRN, ``pochta queue flush --domain``)."""

    __tablename__ = "relay_domains"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(255), unique=True)
    to: Mapped[str] = mapped_column(String(300), default="")
    hold: Mapped[bool] = mapped_column(Boolean, default=False)
    odmr_user: Mapped[str] = mapped_column(String(320), default="")
    created: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class RelayRecipient(Base):
    """When a relay domain has any, only these recipients are accepted for it (a backup MX
    must not accept what the primary would refuse: that is backscatter)."""

    __tablename__ = "relay_recipients"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    address: Mapped[str] = mapped_column(String(320), unique=True)
    relay_domain_id: Mapped[int] = mapped_column(ForeignKey("relay_domains.id"), index=True)
    created: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class TLSPolicy(Base):
    """The administrator's TLS policy for mail to one domain (`pochta tls-policy`), over what
    MTA-STS and DANE would say: none, may, encrypt, verify or dane."""

    __tablename__ = "tls_policies"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    domain: Mapped[str] = mapped_column(String(255), unique=True)
    policy: Mapped[str] = mapped_column(String(16))
    created: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class MtaStsPolicy(Base):
    """A recipient domain's MTA-STS policy as last fetched (RFC 8461 §5: cached for max_age,
    shared by every host and restart)."""

    __tablename__ = "mta_sts_policies"

    domain: Mapped[str] = mapped_column(String(255), primary_key=True)
    policy_id: Mapped[str] = mapped_column(String(32))
    mode: Mapped[str] = mapped_column(String(16))
    mx: Mapped[str] = mapped_column(String(4000))  # patterns, one per line
    max_age: Mapped[int] = mapped_column(Integer)
    fetched: Mapped[float] = mapped_column(Float)  # unix time


class TLSReportCount(Base):
    """TLS-RPT (RFC 8460) results of one day for one recipient domain's policy: successful
    sessions, or failures of one type at one MX (a report's failure-details)."""

    __tablename__ = "tls_report_counts"
    __table_args__ = (UniqueConstraint("day", "domain", "policy_type", "result", "mx",
                                       name="uq_tls_report_counts_key"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    day: Mapped[str] = mapped_column(String(10), index=True)  # YYYY-MM-DD, UTC
    domain: Mapped[str] = mapped_column(String(255))
    policy_type: Mapped[str] = mapped_column(String(16))  # sts, tlsa, no-policy-found
    policy_string: Mapped[str] = mapped_column(String(4000), default="")
    result: Mapped[str] = mapped_column(String(64))  # "success" or an RFC 8460 result-type
    mx: Mapped[str] = mapped_column(String(255), default="")  # receiving-mx-hostname
    count: Mapped[int] = mapped_column(Integer, default=0)


class SieveScript(Base):
    """A user's Sieve script (RFC 5228); at most one per user is active, the one the MDA runs.
    Kept in the database, so every host, ManageSieve and `pochta export` see the same."""

    __tablename__ = "sieve_scripts"
    __table_args__ = (UniqueConstraint("address", "name", name="uq_sieve_scripts_address_name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    address: Mapped[str] = mapped_column(String(320), index=True)  # the user's mailbox
    name: Mapped[str] = mapped_column(String(255))
    content: Mapped[str] = mapped_column(Text)
    active: Mapped[bool] = mapped_column(Boolean, default=False)
    updated: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class VacationReply(Base):
    """When a user's vacation action last answered one sender (RFC 5230 §4.2: at most once per
    sender, handle and period). ``key``: sha256 of user, sender and handle."""

    __tablename__ = "vacation_replies"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    address: Mapped[str] = mapped_column(String(320), index=True)
    sent: Mapped[float] = mapped_column(Float, index=True)  # unix time
