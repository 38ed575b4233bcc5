"""TLS for the listeners: the server context (TLS 1.2+) and a self-signed pair on first start."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import logging
import os
import ssl
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from store.config import Config, ConfigError
from store.fsio import atomic_write, ensure_dir

log = logging.getLogger("pochta.tls")


def make_self_signed(cert: Path, key: Path, hostname: str) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    private = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.UTC)
    sans: list[x509.GeneralName] = [x509.DNSName(hostname)]
    try:
        sans.append(x509.IPAddress(ipaddress.ip_address(hostname)))
    except ValueError:
        pass
    certificate = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(private.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .sign(private, hashes.SHA256()))
    ensure_dir(key.parent, 0o700)
    atomic_write(key, private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()), mode=0o600)
    atomic_write(cert, certificate.public_bytes(serialization.Encoding.PEM), mode=0o644)


def make_self_signed_apart(cert: Path, key: Path, hostname: str) -> None:
    """make_self_signed in a process of its own: the server that needs the pair at its first
    start does not keep cryptography's 8 MB for the rest of its life."""
    code = ("import sys; from pathlib import Path; from store.tlscert import make_self_signed; "
            "make_self_signed(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3])")
    try:
        done = subprocess.run([sys.executable, "-c", code, str(cert), str(key), hostname],
                              capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise ConfigError(f"cannot make a self-signed certificate in {cert.parent}: {e}"
                          ) from None
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise ConfigError(f"cannot make a self-signed certificate in {cert.parent}: {last}")


def server_context(cfg: Config) -> ssl.SSLContext:
    """The listeners' TLS context; makes the default self-signed pair when it is missing."""
    cert, key = Path(cfg.tls.cert), Path(cfg.tls.key)
    # Ours to make: the default pair, or a stand-in until ACME gets the real one.
    default_dirs = (Path(cfg.data_dir) / "tls", Path(cfg.data_dir) / "acme")
    if not cert.exists() and not key.exists() and cert.parent in default_dirs:
        make_self_signed_apart(cert, key, cfg.hostname)
        from store.privileges import give_state

        give_state(cfg)  # made as root: the dropped processes read it again at a reload
    for p, k in ((cert, "tls.cert"), (key, "tls.key")):
        if not p.exists():
            raise ConfigError(f"config key {k!r}: {p} does not exist")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cert, key)
    except (ssl.SSLError, OSError) as e:
        raise ConfigError(f"config keys 'tls.cert'/'tls.key': cannot load {cert}: {e}") from None
    return ctx


CERT_CHECK_INTERVAL = 60.0  # seconds between looks at the certificate files


def _stamp(cfg: Config) -> tuple[float, float]:
    return os.stat(cfg.tls.cert).st_mtime, os.stat(cfg.tls.key).st_mtime


def reload_certificate(ctx: ssl.SSLContext, cfg: Config) -> bool:
    """Load the configured pair into the running context: new handshakes use it, sessions
    already open keep theirs. A pair that does not load (a half-copied file, a key that does
    not match) is logged and the old one stays; False then."""
    try:
        ctx.load_cert_chain(cfg.tls.cert, cfg.tls.key)
    except (ssl.SSLError, OSError) as e:
        log.error("cannot load the certificate %s (the old one stays in use): %s", cfg.tls.cert, e)
        return False
    log.info("certificate %s loaded", cfg.tls.cert)
    return True


async def watch_certificate(ctx: ssl.SSLContext, config: Callable[[], Config],
                            stop: asyncio.Event, interval: float = CERT_CHECK_INTERVAL) -> None:
    """Reload the pair when its files change on disk (certbot, ACME, an admin's copy)."""
    seen: tuple[float, float] | None = None
    with contextlib.suppress(OSError):
        seen = _stamp(config())
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval)
        if stop.is_set():
            break
        try:
            now = _stamp(config())
        except OSError:
            continue  # being replaced: look again later
        if seen is None:
            seen = now  # what the context loaded at start
        elif now != seen and reload_certificate(ctx, config()):
            seen = now
