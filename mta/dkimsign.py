"""DKIM keys and signing (RFC 6376, RFC 8463) for mail submitted through the MSA.

Keys live under ``<data_dir>/dkim/<domain>/<selector>.key`` (PEM, mode 0600); the file
``<data_dir>/dkim/<domain>/selector`` names the one in use, so a new key can be published in
DNS before it is switched on. Signatures are relaxed/relaxed over a fixed header list, with
From, Subject, To, Cc, Date and Message-ID "oversigned" (listed once more than they occur) so
that nobody can add a second one after us.
"""

from __future__ import annotations

import base64
import logging
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING

import dkim

from store import addresses
from store.fsio import atomic_write, ensure_dir

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

log = logging.getLogger("pochta.dkim")

SIGNED_HEADERS = [b"from", b"reply-to", b"subject", b"date", b"to", b"cc", b"message-id",
                  b"in-reply-to", b"references", b"mime-version", b"content-type",
                  b"content-transfer-encoding", b"list-id", b"list-unsubscribe"]
OVERSIGNED = [b"from", b"subject", b"to", b"cc", b"date", b"message-id", b"reply-to"]
_SELECTOR = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")


class DKIMError(Exception):
    pass


def default_selector() -> str:
    return time.strftime("p%Y%m")


def key_dir(keys_root: Path, domain: str) -> Path:
    return keys_root / addresses.ascii_domain(domain)


def generate(keys_root: Path, domain: str, selector: str, algorithm: str = "rsa") -> str:
    """Make and activate a key; return the DNS TXT record value to publish."""
    # cryptography costs a process ~8 MB of memory: only those that make or load keys pay.
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
    if not _SELECTOR.match(selector):
        raise DKIMError(f"selector {selector!r}: use lower-case letters, digits and '-'")
    folder = ensure_dir(key_dir(keys_root, domain), 0o700)
    path = folder / f"{selector}.key"
    if path.exists():
        raise DKIMError(f"a key for selector {selector} of {domain} exists already ({path})")
    if algorithm == "rsa":
        key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey = rsa.generate_private_key(65537, 2048)
    elif algorithm == "ed25519":
        key = ed25519.Ed25519PrivateKey.generate()
    else:
        raise DKIMError(f"algorithm {algorithm!r}: use rsa or ed25519")
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    atomic_write(path, pem, mode=0o600)
    atomic_write(folder / "selector", selector.encode() + b"\n", mode=0o600)
    return txt_record(path)


def txt_record(key_path: Path) -> str:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    if isinstance(key, ed25519.Ed25519PrivateKey):
        raw = key.public_key().public_bytes(serialization.Encoding.Raw,
                                            serialization.PublicFormat.Raw)
        return f"v=DKIM1; k=ed25519; p={base64.b64encode(raw).decode()}"
    der = key.public_key().public_bytes(serialization.Encoding.DER,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)
    return f"v=DKIM1; k=rsa; p={base64.b64encode(der).decode()}"


def active(keys_root: Path, domain: str) -> tuple[str, Path] | None:
    folder = key_dir(keys_root, domain)
    try:
        selector = (folder / "selector").read_text().strip()
    except FileNotFoundError:
        return None
    path = folder / f"{selector}.key"
    return (selector, path) if path.exists() else None


class Signer:
    def __init__(self, keys_root: str | Path) -> None:
        self.root = Path(keys_root)
        self._keys: dict[str, tuple[float, str, bytes, bool]] = {}  # domain -> (mtime, sel, key, ed)

    def _key(self, domain: str) -> tuple[str, bytes, bool] | None:
        found = active(self.root, domain)
        if found is None:
            return None
        selector, path = found
        mtime = path.stat().st_mtime
        cached = self._keys.get(domain)
        if cached is None or cached[0] != mtime or cached[1] != selector:
            from cryptography.hazmat.primitives import serialization
            from cryptography.hazmat.primitives.asymmetric import ed25519

            pem = path.read_bytes()
            is_ed = isinstance(serialization.load_pem_private_key(pem, password=None),
                               ed25519.Ed25519PrivateKey)
            if is_ed:  # dkimpy takes the raw 32-byte seed, base64, for ed25519
                k = serialization.load_pem_private_key(pem, password=None)
                assert isinstance(k, ed25519.Ed25519PrivateKey)
                pem = base64.b64encode(k.private_bytes(serialization.Encoding.Raw,
                                                       serialization.PrivateFormat.Raw,
                                                       serialization.NoEncryption()))
            cached = (mtime, selector, pem, is_ed)
            self._keys[domain] = cached
        return cached[1], cached[2], cached[3]

    def sign(self, message: bytes, domain: str) -> bytes:
        """The DKIM-Signature header (CRLF-terminated) for ``message``, or b"" without a key."""
        found = self._key(domain)
        if found is None:
            return b""
        selector, key, is_ed = found
        present = {h.split(b":", 1)[0].strip().lower()
                   for h in re.findall(rb"(?m)^[^\s:]+:", message.split(b"\r\n\r\n", 1)[0])}
        headers = [h for h in SIGNED_HEADERS if h in present] + \
            [h for h in OVERSIGNED if h in present]
        try:
            sig = dkim.sign(message, selector.encode(), addresses.ascii_domain(domain).encode(),
                            key, canonicalize=(b"relaxed", b"relaxed"), include_headers=headers,
                            signature_algorithm=b"ed25519-sha256" if is_ed else b"rsa-sha256")
        except dkim.DKIMException as e:
            log.error("DKIM signing for %s failed: %s", domain, e)
            return b""
        return sig
