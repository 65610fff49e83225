"""Password hashing, verification, the dummy path for unknown users, and the policy."""

from __future__ import annotations

import pytest
from argon2 import PasswordHasher

from wardgate.auth import passwords
from wardgate.errors import BadParameterError

PW = "correct horse battery staple"


@pytest.fixture(scope="module")
def stored() -> str:
    return passwords.hash_password(PW)


def test_hash_is_argon2id_with_a_fresh_salt(stored):
    assert stored.startswith("$argon2id$")
    assert PW not in stored
    assert passwords.hash_password(PW) != stored


def test_verify_right_and_wrong(stored):
    assert passwords.verify_password(stored, PW) is True
    assert passwords.verify_password(stored, PW + " ") is False
    assert passwords.verify_password(stored, "") is False


@pytest.mark.parametrize(
    "garbage",
    ["", "garbage", "$argon2id$v=19$m=1,t=1,p=1$xx$yy", "$2b$12$abcdefghijklmnopqrstuv", None, 42],
)
def test_garbage_hash_is_false_not_an_error(garbage):
    assert passwords.verify_password(garbage, PW) is False
    assert passwords.verify_password_or_dummy(garbage, PW) is False


def test_needs_rehash(stored):
    assert passwords.needs_rehash(stored) is False
    weak = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1).hash(PW)
    assert passwords.needs_rehash(weak) is True
    assert passwords.verify_password(weak, PW) is True  # old hashes still work until upgraded
    assert passwords.needs_rehash("garbage") is True


def test_dummy_hash_uses_current_parameters():
    assert passwords.needs_rehash(passwords.DUMMY_HASH) is False


def test_unknown_user_and_damaged_hash_still_run_a_full_argon2_check(stored, monkeypatch):
    """No user enumeration: every path pays for one real argon2 verification."""
    assert passwords.verify_password_or_dummy(stored, PW) is True
    assert passwords.verify_password_or_dummy(stored, "nope") is False
    assert passwords.verify_password_or_dummy(None, PW) is False
    verified: list[str] = []
    real = passwords._hasher

    class Counting:
        def verify(self, h: str, pw: str) -> bool:
            verified.append(h)
            return real.verify(h, pw)

    monkeypatch.setattr(passwords, "_hasher", Counting())
    for stored_hash in (stored, None, "not-a-hash"):
        verified.clear()
        assert passwords.verify_password_or_dummy(stored_hash, "wrong password") is False
        assert sum(h.startswith("$argon2id$") for h in verified) == 1


@pytest.mark.parametrize(
    ("password", "kwargs", "message"),
    [
        ("short1", {}, "at least 12 characters"),
        ("abcdefg", {"min_length": 8}, "at least 8 characters"),
        ("", {}, "empty or only whitespace"),
        (" \t\n" * 10, {}, "empty or only whitespace"),
        ("x" * 1025, {}, "at most 1024 characters"),
        ("Administrator", {"username": "administrator"}, "same as the user name"),
        ("alice.example.com", {"username": "alice.example.com"}, "same as the user name"),
    ],
)
def test_policy_refuses_with_a_clear_message(password, kwargs, message):
    with pytest.raises(BadParameterError, match=message) as info:
        passwords.check_password_policy(password, **kwargs)
    if password.strip():
        assert password not in str(info.value)


def test_policy_accepts_reasonable_passwords():
    passwords.check_password_policy(PW)
    passwords.check_password_policy(PW, username="alice")
    passwords.check_password_policy("x" * 1024)
    passwords.check_password_policy("twelve chars", min_length=12)
