"""Checking a TLS peer's certificate after the handshake: PKIX for MTA-STS and the
``verify`` policy (RFC 8461 §4.2), TLSA matching for DANE (RFC 7672, RFC 6698).

Outbound STARTTLS always completes without verification (opportunistic TLS needs that); what a
policy requires is then checked here, on the chain the peer presented, with cryptography's
X.509 verifier. Pure functions of the certificates, the names and the time.
"""

from __future__ import annotations

import hashlib
import ssl
from dataclasses import dataclass
from datetime import UTC, datetime

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

DANE_TA, DANE_EE = 2, 3  # the usages RFC 7672 §3.1 allows for SMTP; 0 and 1 are unusable


@dataclass(frozen=True)
class Tlsa:
    usage: int
    selector: int  # 0: the whole certificate, 1: its SubjectPublicKeyInfo
    mtype: int  # 0: exact, 1: SHA-256, 2: SHA-512
    data: bytes

    @property
    def usable(self) -> bool:
        return self.usage in (DANE_TA, DANE_EE) and self.selector in (0, 1) and \
            self.mtype in (0, 1, 2) and bool(self.data)


def usable(records: list[Tlsa]) -> list[Tlsa]:
    """RFC 7672 §2.2: records with unknown parameters are ignored; none left: no DANE."""
    return [r for r in records if r.usable]


def peer_chain(obj: ssl.SSLObject | ssl.SSLSocket | None) -> list[bytes]:
    """The certificates the peer sent, leaf first (DER). Python 3.11 keeps the whole chain
    behind a private name (public from 3.13); the leaf alone if that is missing."""
    if obj is None:
        return []
    inner = getattr(obj, "_sslobj", None)
    get = getattr(inner, "get_unverified_chain", None)
    if get is not None:
        chain = get() or []
        der = getattr(ssl, "_ssl").ENCODING_DER  # noqa: B009 -- private: see above
        return [c.public_bytes(der) for c in chain]
    leaf = obj.getpeercert(binary_form=True)
    return [leaf] if leaf else []


def load_roots(ca_file: str = "") -> Store:
    """The trusted roots: ``[delivery] ca_file``, else the system's bundle."""
    path = ca_file or ssl.get_default_verify_paths().cafile or "/etc/ssl/certs/ca-certificates.crt"
    with open(path, "rb") as f:
        return Store(x509.load_pem_x509_certificates(f.read()))


def pkix_error(chain: list[bytes], hostname: str, roots: Store,
               now: datetime | None = None) -> str | None:
    """None if the chain leads to a trusted root and names ``hostname``; else why not."""
    if not chain:
        return "no certificate"
    try:
        certs = [x509.load_der_x509_certificate(c) for c in chain]
        verifier = PolicyBuilder().store(roots).time(now or datetime.now(UTC)) \
            .build_server_verifier(x509.DNSName(hostname))
        verifier.verify(certs[0], certs[1:])
    except (VerificationError, ValueError) as e:
        return f"certificate not valid for {hostname}: {e}"
    return None


def _selected(cert: x509.Certificate, der: bytes, selector: int) -> bytes:
    if selector == 0:
        return der
    return cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)


def tlsa_matches(record: Tlsa, der: bytes) -> bool:
    cert = x509.load_der_x509_certificate(der)
    data = _selected(cert, der, record.selector)
    if record.mtype == 1:
        data = hashlib.sha256(data).digest()
    elif record.mtype == 2:
        data = hashlib.sha512(data).digest()
    return data == record.data


def dane_error(chain: list[bytes], records: list[Tlsa], hostname: str,
               now: datetime | None = None) -> str | None:
    """RFC 7672 §3.1: DANE-EE matches the leaf (no name or date checks); DANE-TA matches a
    certificate of the chain that then issues the leaf, which must name ``hostname``."""
    if not chain:
        return "no certificate"
    try:
        for r in records:
            if r.usage == DANE_EE and tlsa_matches(r, chain[0]):
                return None
        for r in records:
            if r.usage != DANE_TA:
                continue
            for i, der in enumerate(chain[1:], start=1):
                if tlsa_matches(r, der):
                    anchor = x509.load_der_x509_certificate(der)
                    if pkix_error(chain[:i], hostname, Store([anchor]), now) is None:
                        return None
    except ValueError as e:
        return f"unreadable certificate: {e}"
    return f"no TLSA record of {hostname} matches the certificate"
