"""Password hashing: argon2id through argon2-cffi, and the SCRAM-SHA-256 keys (scramp).
The only module that sees plaintext.

Hashes are stored in argon2-cffi's PHC form ``$argon2id$v=19$...``; Dovecot 2.3 verifies the
same string with the ``{ARGON2ID}`` scheme prefix, which ``pochta dovecot-config`` adds in SQL.
SCRAM keys are stored as Dovecot's SCRAM-SHA-256 scheme writes them:
``iterations,salt,StoredKey,ServerKey`` (base64), so the same column serves both.
"""

from __future__ import annotations

import base64
from functools import cache

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

_hasher = PasswordHasher()  # argon2id, RFC 9106 low-memory profile


@cache
def _dummy_hash() -> str:
    # Verified against when the user does not exist, so failure takes the same time either way.
    return _hasher.hash("pochta dummy password for unknown users")


def hash_password(password: str) -> str:
    return _hasher.hash(password)


def verify_password(stored_hash: str | None, password: str) -> bool:
    try:
        return _hasher.verify(stored_hash or _dummy_hash(), password) and stored_hash is not None
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


SCRAM_ITERATIONS = 10000  # RFC 7677 §4: at least 4096


def scram_keys(password: str, iterations: int = SCRAM_ITERATIONS) -> str:
    from scramp import ScramMechanism

    salt, stored_key, server_key, count = ScramMechanism("SCRAM-SHA-256").make_auth_info(
        password, iteration_count=iterations)
    return ",".join([str(count)] + [base64.b64encode(v).decode()
                                    for v in (salt, stored_key, server_key)])


def parse_scram_keys(value: str) -> tuple[bytes, bytes, bytes, int]:
    """(salt, StoredKey, ServerKey, iterations), as scramp's auth_fn returns them;
    ValueError if ``value`` is not such a record."""
    count, salt, stored, server = value.split(",")
    return (base64.b64decode(salt, validate=True), base64.b64decode(stored, validate=True),
            base64.b64decode(server, validate=True), int(count))


def needs_rehash(stored_hash: str) -> bool:
    try:
        return _hasher.check_needs_rehash(stored_hash)
    except InvalidHashError:
        return True
