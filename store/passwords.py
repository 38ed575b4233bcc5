"""Password hashing: argon2id through argon2-cffi. The only module that sees plaintext.

Hashes are stored in argon2-cffi's PHC form ``$argon2id$v=19$...``; Dovecot 2.3 verifies the
same string with the ``{ARGON2ID}`` scheme prefix, which ``pochta dovecot-config`` adds in SQL.
"""

from __future__ import annotations

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


def needs_rehash(stored_hash: str) -> bool:
    try:
        return _hasher.check_needs_rehash(stored_hash)
    except InvalidHashError:
        return True
