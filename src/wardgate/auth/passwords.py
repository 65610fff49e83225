"""Password hashing (argon2id), verification and the password policy.

Verification never raises on a wrong password or a damaged hash: callers only need a yes/no, and
an exception path would be a second, faster code path an attacker could time. Nothing here logs
or echoes a password.
"""

from __future__ import annotations

from argon2 import PasswordHasher, Type
from argon2.exceptions import InvalidHashError, VerificationError

from wardgate.errors import BadParameterError

# argon2id, 32 MiB, 3 passes, 2 lanes: ~30 ms per check on an idle 2-core host (~60 ms when the
# other core is busy), so a login stays under 100 ms while every offline guess costs the same
# memory-hard work. Changing these makes `needs_rehash` true for existing hashes, which callers
# then redo after the next successful login.
TIME_COST = 3
MEMORY_COST_KIB = 32768
PARALLELISM = 2

MAX_PASSWORD_LENGTH = 1024

_hasher = PasswordHasher(
    time_cost=TIME_COST,
    memory_cost=MEMORY_COST_KIB,
    parallelism=PARALLELISM,
    hash_len=32,
    salt_len=16,
    type=Type.ID,
)

# Hash of a random password nobody kept, with the parameters above (a test checks they match).
# Checking a login for a missing user against it costs what a real check costs.
DUMMY_HASH = (
    "$argon2id$v=19$m=32768,t=3,p=2$nY27ZmLLbYEHcsMDSJtfKw$RGr42cyCKkQGDzDZRnHNEhjmMLpt8k1odixJFzZzAi0"
)


def hash_password(password: str) -> str:
    """Hash with a fresh random salt; the result embeds the parameters, so it verifies forever."""
    return _hasher.hash(password)


def _verify(stored_hash: object, password: str) -> bool | None:
    """True/False for a usable hash; None when the stored hash is not an argon2 hash at all."""
    if not isinstance(stored_hash, str) or not isinstance(password, str):
        return None
    try:
        return _hasher.verify(stored_hash, password)
    except VerificationError:  # wrong password (or a hash that decodes but cannot match)
        return False
    except (InvalidHashError, ValueError, TypeError):
        return None


def verify_password(stored_hash: str, password: str) -> bool:
    """Whether `password` matches; False for a mismatch or a hash that cannot be read."""
    return _verify(stored_hash, password) is True


def verify_password_or_dummy(stored_hash: str | None, password: str) -> bool:
    """Check a login so that a missing user (or a damaged hash) costs as long as a real check.

    Without this, "no such user" answers in microseconds and "wrong password" in ~45 ms, which
    tells an attacker which user names exist.
    """
    if stored_hash is not None:
        result = _verify(stored_hash, password)
        if result is not None:
            return result
    _verify(DUMMY_HASH, password if isinstance(password, str) else "")
    return False


def needs_rehash(stored_hash: str) -> bool:
    """Whether the hash was made with other parameters (or cannot be read) and should be redone."""
    try:
        return _hasher.check_needs_rehash(stored_hash)
    except (InvalidHashError, ValueError, TypeError):
        return True


def check_password_policy(password: str, *, min_length: int = 12, username: str = "") -> None:
    """Refuse passwords that are trivially guessable; the message says what to change."""
    if not isinstance(password, str):
        raise BadParameterError("password must be a string")
    if len(password) > MAX_PASSWORD_LENGTH:
        raise BadParameterError(f"password is too long: use at most {MAX_PASSWORD_LENGTH} characters")
    if not password.strip():
        raise BadParameterError("password must not be empty or only whitespace")
    if len(password) < min_length:
        raise BadParameterError(f"password is too short: use at least {min_length} characters")
    if username and password.strip().casefold() == username.strip().casefold():
        raise BadParameterError("password must not be the same as the user name")
