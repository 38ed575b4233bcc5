"""DANE (RFC 7672, RFC 6698): matching the chain a TLS peer presented against its TLSA
records, after a handshake that verified nothing (PKIX for MTA-STS and the ``verify`` policy
is OpenSSL's, in the handshake: mta/courier/remote.py). Pure functions of the certificates,
the names and the time.
"""

from __future__ import annotations

import hashlib
import ssl
from dataclasses import dataclass
from datetime import datetime

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

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


def _names(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    return san.value.get_values_for_type(x509.DNSName)


def chain_error(chain: list[bytes], anchor: int, hostname: str,
                now: datetime | None = None) -> str | None:
    """Whether ``chain[0]`` is issued, through ``chain[1:anchor]``, by ``chain[anchor]`` as
    a trust anchor (OpenSSL's verification, a partial chain allowed), valid now and naming
    ``hostname`` in its subjectAltName (a left-most "*" matching one label, RFC 6125)."""
    from OpenSSL import crypto

    from mta.mtasts import mx_matches

    certs = [x509.load_der_x509_certificate(c) for c in chain[: anchor + 1]]
    store = crypto.X509Store()
    store.add_cert(crypto.X509.from_cryptography(certs[anchor]))
    store.set_flags(crypto.X509StoreFlags.PARTIAL_CHAIN)
    if now is not None:
        store.set_time(now)
    context = crypto.X509StoreContext(store, crypto.X509.from_cryptography(certs[0]),
                                      [crypto.X509.from_cryptography(c)
                                       for c in certs[1:anchor]])
    try:
        context.verify_certificate()
    except crypto.X509StoreContextError as e:
        return f"chain to the TLSA trust anchor not valid: {e}"
    if not any(mx_matches(name, hostname) for name in _names(certs[0])):
        return f"certificate does not name {hostname}"
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
                if tlsa_matches(r, der) and chain_error(chain, i, hostname, now) is None:
                    return None
    except ValueError as e:
        return f"unreadable certificate: {e}"
    return f"no TLSA record of {hostname} matches the certificate"
