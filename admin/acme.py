"""Certificates from an ACME CA (Let's Encrypt by default) with certbot's ``acme`` library.

On when ``[acme] email`` is set. ``pochta up`` (or ``serve mta`` run on its own) answers the
http-01 challenges on ``[acme] http_listen`` (or writes them under ``webroot`` for a web
server that is already there), obtains the certificate at start when it is missing and
renews it at two thirds of its lifetime. Files under ``<data_dir>/acme/``: ``account.key``,
``key.pem`` (0600, the service user's: a reload needs no root) and ``cert.pem`` (the full
chain), which ``[tls]`` then points at; ``state.json`` says how the last attempt went
(`pochta status` shows it). A failed attempt leaves the certificate in use as it is and is
tried again within the hour; with none at all, a self-signed one serves meanwhile.
"""

from __future__ import annotations

import contextlib
import datetime
import http.server
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from store.config import Config, parse_address
from store.fsio import atomic_write, ensure_dir

log = logging.getLogger("pochta.acme")

CHECK_INTERVAL = 3600.0  # seconds between looks at the certificate's age
CHALLENGE_PATH = "/.well-known/acme-challenge/"


def acme_dir(cfg: Config) -> Path:
    return Path(cfg.data_dir) / "acme"


def names_of(cfg: Config) -> list[str]:
    """The certificate's names; with ``[mta_sts] listen``, also ``mta-sts.<domain>`` of each
    of our domains (a domain added later brings a new certificate at the next look)."""
    names = list(cfg.acme.names) or [cfg.hostname]
    if cfg.mta_sts.listen:
        names += [n for n in (f"mta-sts.{d}" for d in _our_domains(cfg)) if n not in names]
    return names


def _our_domains(cfg: Config) -> list[str]:
    from store.addresses import ascii_domain
    from store.db import Database
    from store.directory import Directory, DirectoryUnavailable

    db = Database(cfg.database_url)
    try:
        return [ascii_domain(d) for d, _, _ in Directory(db).list_domains()]
    except DirectoryUnavailable as e:
        log.warning("ACME: our domains unknown (%s): no mta-sts names this time", e)
        return []
    finally:
        db.dispose()


# -- when ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CertInfo:
    not_before: datetime.datetime
    not_after: datetime.datetime
    names: frozenset[str]
    self_signed: bool


def cert_info(pem: bytes) -> CertInfo:
    from cryptography import x509

    cert = x509.load_pem_x509_certificate(pem)
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = frozenset(n.lower() for n in sans.get_values_for_type(x509.DNSName))
    except x509.ExtensionNotFound:
        names = frozenset()
    return CertInfo(cert.not_valid_before_utc, cert.not_valid_after_utc, names,
                    cert.issuer == cert.subject)


def renewal_due(info: CertInfo | None, names: list[str], now: datetime.datetime) -> bool:
    """Missing, self-signed, for other names, or two thirds through its lifetime."""
    if info is None or info.self_signed or info.names != {n.lower() for n in names}:
        return True
    return now >= info.not_before + (info.not_after - info.not_before) * 2 / 3


def current(cfg: Config) -> CertInfo | None:
    try:
        return cert_info(Path(cfg.tls.cert).read_bytes())
    except (OSError, ValueError):
        return None


# -- the http-01 responder --------------------------------------------------------------------


class Challenges:
    """Tokens being validated: served on http_listen, or written under webroot."""

    def __init__(self, webroot: str = "") -> None:
        self.webroot = Path(webroot) if webroot else None
        self.tokens: dict[str, str] = {}
        self.lock = threading.Lock()

    def add(self, token: str, validation: str) -> None:
        with self.lock:
            self.tokens[token] = validation
        if self.webroot is not None:
            folder = ensure_dir(self.webroot / CHALLENGE_PATH.strip("/"), 0o755)
            atomic_write(folder / token, validation.encode(), mode=0o644)

    def remove(self, token: str) -> None:
        with self.lock:
            self.tokens.pop(token, None)
        if self.webroot is not None:
            with contextlib.suppress(OSError):
                (self.webroot / CHALLENGE_PATH.strip("/") / token).unlink()

    def get(self, token: str) -> str | None:
        with self.lock:
            return self.tokens.get(token)


def serve_challenges(listen: str, challenges: Challenges) -> http.server.ThreadingHTTPServer:
    """Answer GET /.well-known/acme-challenge/<token>; 404 for anything else."""

    class Handler(http.server.BaseHTTPRequestHandler):
        server_version = "pochta"

        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            token = self.path[len(CHALLENGE_PATH):] if self.path.startswith(CHALLENGE_PATH) \
                else ""
            answer = challenges.get(token) if token and "/" not in token else None
            body = (answer or "not found\n").encode()
            self.send_response(200 if answer else 404)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    host, port = parse_address(listen, "acme.http_listen")
    server = http.server.ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="acme-http", daemon=True).start()
    return server


# -- obtaining --------------------------------------------------------------------------------


def _state(cfg: Config, **values: Any) -> None:
    path = acme_dir(cfg) / "state.json"
    try:
        state = json.loads(path.read_bytes())
    except (OSError, ValueError):
        state = {}
    state.update(values)
    with contextlib.suppress(OSError):
        atomic_write(path, json.dumps(state).encode(), mode=0o600)


def read_state(cfg: Config) -> dict[str, Any]:
    try:
        state = json.loads((acme_dir(cfg) / "state.json").read_bytes())
        return state if isinstance(state, dict) else {}
    except (OSError, ValueError):
        return {}


def _account_key(path: Path) -> Any:
    import josepy
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    if path.exists():
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    else:
        key = rsa.generate_private_key(65537, 2048)
        atomic_write(path, key.private_bytes(serialization.Encoding.PEM,
                                             serialization.PrivateFormat.PKCS8,
                                             serialization.NoEncryption()), mode=0o600)
    return josepy.JWKRSA(key=key)


def obtain(cfg: Config, challenges: Challenges, timeout: float = 120.0) -> None:
    """One ACME order for our names; the new key and chain replace the files in one step
    each (the key first: a process that reloads between the two fails to load a mismatched
    pair and keeps the old one, then loads both at the next look)."""
    from acme import challenges as acme_challenges
    from acme import client, crypto_util, errors, messages
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    folder = ensure_dir(acme_dir(cfg), 0o700)
    net = client.ClientNetwork(_account_key(folder / "account.key"), user_agent="pochta")
    if cfg.acme.ca_file:
        # requests takes a CA bundle's path where acme declares a bool (it passes it on).
        net.verify_ssl = cfg.acme.ca_file  # type: ignore[assignment]
    directory = client.ClientV2.get_directory(cfg.acme.directory, net)
    acme = client.ClientV2(directory, net=net)
    registration = messages.NewRegistration.from_data(email=cfg.acme.email,
                                                      terms_of_service_agreed=True)
    try:
        acme.new_account(registration)
    except errors.ConflictError as e:  # registered before: use that account
        net.account = messages.RegistrationResource(uri=e.location, body=messages.Registration())
    def new_key() -> bytes:
        return ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption())

    # The key of this certificate was made at the last renewal, so that its TLSA record
    # (`pochta dns`) could be published before it is used (DANE key rollover, RFC 7671 §8.1).
    next_path = folder / "next-key.pem"
    try:
        key_pem = next_path.read_bytes()
        serialization.load_pem_private_key(key_pem, password=None)
    except (OSError, ValueError, TypeError):
        key_pem = new_key()
    names = names_of(cfg)
    order = acme.new_order(crypto_util.make_csr(key_pem, names))
    tokens = []
    try:
        for authz in order.authorizations:
            if authz.body.status == messages.STATUS_VALID:
                continue
            http01 = next((c for c in authz.body.challenges
                           if isinstance(c.chall, acme_challenges.HTTP01)), None)
            if http01 is None:
                raise RuntimeError(f"no http-01 challenge offered for {authz.body.identifier.value}")
            response, validation = http01.response_and_validation(net.key)
            token = http01.chall.encode("token")
            challenges.add(token, validation)
            tokens.append(token)
            acme.answer_challenge(http01, response)
        deadline = datetime.datetime.now() + datetime.timedelta(seconds=timeout)
        order = acme.poll_and_finalize(order, deadline=deadline)
    finally:
        for token in tokens:
            challenges.remove(token)
    key_path, cert_path = Path(cfg.tls.key), Path(cfg.tls.cert)
    atomic_write(key_path, key_pem, mode=0o600)
    atomic_write(cert_path, order.fullchain_pem.encode(), mode=0o644)
    atomic_write(next_path, new_key(), mode=0o600)
    give_to_service(cfg, [folder, key_path, cert_path, folder / "account.key",
                          folder / "state.json", next_path])


def give_to_service(cfg: Config, paths: list[Path]) -> None:
    """Started as root (`pochta up`): the files to the service user, who reads the key."""
    from store.privileges import give, service_account

    account = service_account(cfg)
    if account is not None:
        give(paths, account)


def attempt(cfg: Config, challenges: Challenges) -> bool:
    """Obtain or renew now if due; logged and recorded for `pochta status` either way."""
    names = names_of(cfg)
    if not renewal_due(current(cfg), names, datetime.datetime.now(datetime.UTC)):
        return False
    log.info("ACME: requesting a certificate for %s from %s", ", ".join(names), cfg.acme.directory)
    try:
        obtain(cfg, challenges)
    except Exception as e:  # the network, the CA, a failed challenge: keep what we have
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        log.error("ACME: no certificate (the current one stays in use): %s", reason)
        _state(cfg, last_attempt=time.time(), last_error=reason)
        return False
    log.info("ACME: certificate for %s installed", ", ".join(names))
    _state(cfg, last_attempt=time.time(), last_error="", last_success=time.time())
    return True


class Renewer:
    """The responder and the renewal loop of one process (`up`, or `serve mta` alone)."""

    def __init__(self, cfg: Config, installed: Callable[[], None]) -> None:
        self.cfg = cfg
        self.installed = installed  # tell the listeners (a reload)
        self.challenges = Challenges(cfg.acme.webroot)
        self.server: http.server.ThreadingHTTPServer | None = None
        self.stopping = threading.Event()

    def listen(self) -> None:
        """Bind the http-01 port (as root, before privileges are dropped)."""
        if not self.cfg.acme.webroot:
            self.server = serve_challenges(self.cfg.acme.http_listen, self.challenges)

    def first(self) -> None:
        """At start: a certificate now if there is none (or it is due), else a self-signed
        one until the CA answers: the listeners need one to start."""
        attempt(self.cfg, self.challenges)
        if current(self.cfg) is None:
            from store.tlscert import make_self_signed

            make_self_signed(Path(self.cfg.tls.cert), Path(self.cfg.tls.key), self.cfg.hostname)
            give_to_service(self.cfg, [acme_dir(self.cfg), Path(self.cfg.tls.cert),
                                       Path(self.cfg.tls.key)])

    def start(self, interval: float = CHECK_INTERVAL) -> None:
        def loop() -> None:
            while not self.stopping.wait(interval):
                if attempt(self.cfg, self.challenges):
                    self.installed()

        threading.Thread(target=loop, name="acme", daemon=True).start()

    def stop(self) -> None:
        self.stopping.set()
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()


def state_summary(cfg: Config) -> tuple[bool, str]:
    """(healthy, text) of the last ACME attempt, for `pochta status`."""
    state = read_state(cfg)
    if not state:
        return True, "ACME: no attempt yet"
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(state.get("last_attempt", 0)))
    if state.get("last_error"):
        return False, f"ACME: last attempt {when} failed: {state['last_error']}"
    return True, f"ACME: last attempt {when} succeeded"
