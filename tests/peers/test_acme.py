"""Certificates from an ACME CA: pebble (Let's Encrypt's test CA) on loopback, its
validations answered by `pochta up`'s http-01 responder; a CA that cannot be reached."""

from __future__ import annotations

import hashlib
import json

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from tests.support.fakes import FakeDNS
from tests.support.pebble import Pebble, available
from tests.support.smtp import starttls_certificate
from tests.support.stack import Stack, free_port

pytestmark = pytest.mark.skipif(not available(), reason="pebble (Debian: pebble) not installed")


def certificate_check(s: Stack) -> dict:
    r = s.pochta("status", "--json", check=False)
    return next(c for c in json.loads(r.stdout)["checks"] if c["name"] == "certificate")


def test_up_obtains_a_certificate_from_the_ca_and_serves_it(tmp_path):
    dns = FakeDNS()
    dns.add("mx.pochta.test", "A", "127.0.0.1")
    http_port = free_port()
    pebble = Pebble(tmp_path / "pebble", dns.address, http_port)
    s = Stack(tmp_path / "pochta", acme={
        "directory": pebble.directory, "email": "postmaster@example.com",
        "http_listen": f"127.0.0.1:{http_port}", "ca_file": pebble.ca_file})
    try:
        s.setup_users("example.com", "bob@example.com")
        s.start("up")
        cert = starttls_certificate(s.mta_port)
        issuer = cert.issuer.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
        assert "Pebble" in issuer
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert sans.get_values_for_type(x509.DNSName) == ["mx.pochta.test"]
        assert starttls_certificate(s.msa_port).serial_number == cert.serial_number
        key = s.base / "acme" / "key.pem"
        assert key.stat().st_mode & 0o777 == 0o600
        check = certificate_check(s)
        assert check["state"] == "ok" and "succeeded" in check["detail"], check
        assert "self-signed" not in check["detail"]
        # DANE: the TLSA of the key in use, and of the next certificate's key, made ahead.
        zone = s.pochta("dns", "example.com").stdout
        tlsa = [ln for ln in zone.splitlines() if " IN TLSA " in ln]
        spki = cert.public_key().public_bytes(serialization.Encoding.DER,
                                              serialization.PublicFormat.SubjectPublicKeyInfo)
        assert len(tlsa) == 2 and tlsa[0].startswith("_25._tcp.mx.pochta.test. IN TLSA 3 1 1 ")
        assert hashlib.sha256(spki).hexdigest() in tlsa[0] and "next" in tlsa[1]
        assert "mode: enforce" in zone  # a public CA's certificate (pebble's here)
    finally:
        s.stop_all()
        pebble.stop()
        dns.close()


def test_an_unreachable_ca_leaves_a_working_certificate_and_status_says_so(tmp_path):
    s = Stack(tmp_path, acme={"directory": f"https://127.0.0.1:{free_port()}/dir",
                              "email": "postmaster@example.com",
                              "http_listen": f"127.0.0.1:{free_port()}"})
    try:
        s.setup_users("example.com", "bob@example.com")
        s.start("up")
        cert = starttls_certificate(s.mta_port)  # a stand-in: STARTTLS still works
        assert cert.issuer == cert.subject
        check = certificate_check(s)
        assert check["state"] == "warn" and "failed" in check["detail"], check
        assert "ACME: no certificate (the current one stays in use)" in s.log("up")
    finally:
        s.stop_all()


def test_acme_and_a_configured_certificate_are_refused_together(tmp_path):
    s = Stack(tmp_path, acme={"email": "postmaster@example.com"},
              tls={"cert": "/etc/ssl/c.pem", "key": "/etc/ssl/k.pem"})
    r = s.pochta("status", check=False)
    assert r.returncode != 0 and r.stderr.count("\n") == 1 and "[acme] email" in r.stderr
