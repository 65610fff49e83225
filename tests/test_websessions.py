"""Web sessions on the auth service: who may create and read them, expiry, and their secrets."""

from __future__ import annotations

import pytest

from tests.conftest import ADMIN, FakeClock
from tests.test_auth_server import PASSWORD, events, register
from wardgate.auth import totp
from wardgate.auth.certs import verify_ssh_user_cert, verify_tls_identity
from wardgate.auth.identity import Identity
from wardgate.auth.server import AuthServer
from wardgate.auth.websessions import PREFIX, token_matches
from wardgate.errors import AccessDeniedError, AuthenticationError

PROXY = Identity(user="proxy-1", system_role="proxy", host_id="proxy-1")


async def sign_in(auth: AuthServer, clock: FakeClock, secret: str, user: str = "alice"):
    rec, token = await auth.create_web_session(
        PROXY,
        user=user,
        password=PASSWORD,
        otp=totp.current_code(secret, clock()),
        remote_addr="192.0.2.7:5555",
    )
    clock.advance(30)
    return rec, token


async def test_session_carries_user_certificates_and_only_hashes(auth: AuthServer, clock: FakeClock) -> None:
    secret = await register(auth, clock)
    rec, token = await sign_in(auth, clock, secret)
    assert token_matches(token, rec.token_hash) and not token_matches(token + "x", rec.token_hash)
    ident = verify_tls_identity(rec.tls_cert, auth.ca_certs("user"), now=auth.now())
    assert ident.user == "alice" and set(ident.logins) == {"root", "ubuntu"}
    assert verify_ssh_user_cert(rec.ssh_cert, auth.ca_ssh_keys("user"), now=auth.now()).user == "alice"
    # The backend holds neither the session id nor the token in the clear.
    (key, data), = await auth.store.list_records(PREFIX)
    assert rec.id not in key and token not in str(data)
    assert (await auth.get_web_session(PROXY, rec.id)).user == "alice"
    login = (await events(auth, "user.login"))[0]
    assert login["success"] and login["remote_addr"] == "192.0.2.7:5555"


async def test_only_a_proxy_may_create_or_read_web_sessions(auth: AuthServer, clock: FakeClock) -> None:
    secret = await register(auth, clock)
    rec, _ = await sign_in(auth, clock, secret)
    alice = Identity(user="alice", roles=("access",))
    for caller in (ADMIN, alice, Identity(user="n", system_role="node", host_id="n")):
        with pytest.raises(AccessDeniedError, match="only a proxy"):
            await auth.get_web_session(caller, rec.id)
    with pytest.raises(AccessDeniedError):
        await auth.create_web_session(alice, user="alice", password=PASSWORD, otp="000000")


async def test_expired_session_is_refused_and_removed(auth: AuthServer, clock: FakeClock) -> None:
    secret = await register(auth, clock)
    rec, _ = await sign_in(auth, clock, secret)
    clock.advance((rec.expires - auth.now()).total_seconds() + 1)
    with pytest.raises(AuthenticationError, match=r"expired|ended"):
        await auth.get_web_session(PROXY, rec.id)
    assert await auth.store.list_records(PREFIX) == []


async def test_reset_and_delete_end_the_users_sessions(auth: AuthServer, clock: FakeClock) -> None:
    secret = await register(auth, clock)
    rec, _ = await sign_in(auth, clock, secret)
    await auth.reset_user(ADMIN, "alice")
    with pytest.raises(AuthenticationError):
        await auth.get_web_session(PROXY, rec.id)
    bob_secret = await register(auth, clock, "bob")
    bob, _ = await sign_in(auth, clock, bob_secret, "bob")
    await auth.delete_resource(ADMIN, "user", "bob")
    with pytest.raises(AuthenticationError):
        await auth.get_web_session(PROXY, bob.id)


async def test_sign_out_is_audited_and_idempotent(auth: AuthServer, clock: FakeClock) -> None:
    secret = await register(auth, clock)
    rec, _ = await sign_in(auth, clock, secret)
    await auth.delete_web_session(PROXY, rec.id)
    await auth.delete_web_session(PROXY, rec.id)
    assert [e["user"] for e in await events(auth, "user.logout")] == ["alice"]


async def test_malformed_session_ids_are_refused_cleanly(auth: AuthServer) -> None:
    for bad in ("", "x" * 500):
        with pytest.raises(Exception, match=r"malformed|ended"):
            await auth.get_web_session(PROXY, bad)


async def test_session_mfa_certificate_needs_a_fresh_factor(auth: AuthServer, clock: FakeClock) -> None:
    from tests.test_auth_server import keys

    secret = await register(auth, clock)
    alice = Identity(user="alice", roles=("access",))
    with pytest.raises(AuthenticationError):
        await auth.session_mfa_certs(alice, otp="000000", **keys())
    certs = await auth.session_mfa_certs(alice, otp=totp.current_code(secret, clock()), **keys())
    assert certs.identity.mfa_verified == "otp"
    assert certs.ttl.total_seconds() == 60
    with pytest.raises(AccessDeniedError):
        await auth.session_mfa_certs(PROXY, otp="1", **keys())
