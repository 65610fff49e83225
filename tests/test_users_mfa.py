"""UserManager with WebAuthn and MFA device management, on the memory backend with a fake clock."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import pytest

from tests.conftest import FakeClock
from tests.softauthn import SoftAuthenticator, b64url
from wardgate.audit.events import MemoryEmitter
from wardgate.auth import totp
from wardgate.auth.storage import ResourceStore
from wardgate.auth.users import AuthPreference, UserManager
from wardgate.auth.webauthn import WebAuthnConfig, WebAuthnError
from wardgate.backend.memory import MemoryBackend
from wardgate.errors import (
    AlreadyExistsError,
    AuthenticationError,
    BadParameterError,
    LockedError,
    NotFoundError,
)

PASSWORD = "correct horse battery"
RP_ID = "localhost"
ORIGIN = "https://localhost:3080"
CONFIG = WebAuthnConfig(RP_ID, "test.example", [ORIGIN])

Factory = Callable[..., UserManager]


@pytest.fixture
async def store(clock: FakeClock) -> AsyncIterator[ResourceStore]:
    backend = MemoryBackend(clock=clock)
    yield ResourceStore(backend)
    await backend.close()


@pytest.fixture
def audit() -> MemoryEmitter:
    return MemoryEmitter()


@pytest.fixture
def make(store: ResourceStore, audit: MemoryEmitter, clock: FakeClock) -> Factory:
    def factory(second_factor: str = "webauthn", **kw) -> UserManager:
        kw.setdefault("webauthn", CONFIG)
        prefs = AuthPreference(second_factor=second_factor, **kw)
        return UserManager(store, audit, prefs, cluster_name="test.example", clock=clock)

    return factory


async def invite(um: UserManager, name: str = "alice") -> str:
    _, inv = await um.create(name, roles=["access"], traits={}, created_by="admin")
    return inv.token


async def register_key(um: UserManager, name: str = "alice", **kw) -> SoftAuthenticator:
    token = await invite(um, name)
    info = await um.begin_registration(token)
    key = SoftAuthenticator(RP_ID, ORIGIN)
    await um.complete_registration(token, PASSWORD, webauthn_response=key.create(info["webauthn"]), **kw)
    return key


async def register_otp(um: UserManager, clock: FakeClock, name: str = "alice") -> str:
    token = await invite(um, name)
    info = await um.begin_registration(token)
    await um.complete_registration(token, PASSWORD, totp.current_code(info["totp_secret"], clock()))
    clock.advance(30)
    return info["totp_secret"]


async def login_key(um: UserManager, key: SoftAuthenticator, name: str = "alice", **kw):
    opts = (await um.begin_login_challenge(name, PASSWORD))["webauthn"]
    return await um.authenticate(name, PASSWORD, webauthn_response=key.get(opts, **kw))


# ---------------------------------------------------------------- registration


async def test_invite_with_webauthn_only(make: Factory, audit: MemoryEmitter) -> None:
    um = make("webauthn")
    token = await invite(um)
    info = await um.begin_registration(token)
    assert info["second_factor"] == "webauthn" and "totp_secret" not in info and "totp_qr_svg" not in info
    assert info["webauthn"]["authenticatorSelection"]["residentKey"] == "preferred"
    with pytest.raises(BadParameterError, match="requires a passkey or security key"):
        await um.complete_registration(token, PASSWORD, "123456")
    key = SoftAuthenticator(RP_ID, ORIGIN)
    user = await um.complete_registration(token, PASSWORD, webauthn_response=key.create(info["webauthn"]))
    assert user.spec.mfa_devices == ["passkey"] and user.spec.has_password
    assert (await um.get("alice")).spec.mfa_devices == ["passkey"]
    [dev] = await um.mfa_devices("alice")
    assert dev["name"] == "passkey" and dev["type"] == "webauthn" and dev["last_used"] is None
    ok = [e for e in audit.named("user.register") if e["success"]]
    assert ok and ok[0]["device"] == "passkey"


async def test_invite_with_second_factor_on_offers_both(make: Factory, clock: FakeClock) -> None:
    um = make("on")
    token = await invite(um)
    info = await um.begin_registration(token)
    assert info["totp_uri"].startswith("otpauth://totp/")
    assert info["totp_qr_svg"].startswith("<svg") and "</svg>" in info["totp_qr_svg"]
    assert info["webauthn"]["user"]["name"] == "alice"
    key = SoftAuthenticator(RP_ID, ORIGIN)
    user = await um.complete_registration(
        token, PASSWORD, webauthn_response=key.create(info["webauthn"]), device_name="laptop"
    )
    assert user.spec.mfa_devices == ["laptop"]
    # another user of the same cluster picks OTP
    await register_otp(um, clock, "bob")
    assert (await um.get("bob")).spec.mfa_devices == ["otp"]


async def test_passwordless_cluster_registers_passkeys(make: Factory) -> None:
    um = make("webauthn", passwordless=True)
    info = await um.begin_registration(await invite(um))
    assert info["webauthn"]["authenticatorSelection"]["residentKey"] == "required"
    assert info["webauthn"]["authenticatorSelection"]["userVerification"] == "required"


async def test_otp_cluster_has_no_webauthn_options_and_refuses_attestations(
    make: Factory, clock: FakeClock
) -> None:
    um = make("otp")
    token = await invite(um)
    info = await um.begin_registration(token)
    assert info["webauthn"] is None and info["totp_qr_svg"].startswith("<svg")
    with pytest.raises(BadParameterError, match="does not register passkeys"):
        await um.complete_registration(token, PASSWORD, webauthn_response={"id": "x"})


async def test_webauthn_unconfigured_is_a_clear_error(make: Factory) -> None:
    um = make("webauthn", webauthn=None)
    with pytest.raises(BadParameterError, match=r"proxy_service\.public_addr"):
        await um.begin_registration(await invite(um))
    on = make("on", webauthn=None)  # "on" falls back to OTP at registration
    info = await on.begin_registration(await invite(on, "bob"))
    assert info["webauthn"] is None and info["totp_secret"]
    with pytest.raises(BadParameterError, match=r"proxy_service\.public_addr"):
        await on.begin_passwordless()


async def test_registration_attestation_for_wrong_origin_is_refused_and_audited(
    make: Factory, audit: MemoryEmitter
) -> None:
    um = make("webauthn")
    token = await invite(um)
    info = await um.begin_registration(token)
    key = SoftAuthenticator(RP_ID, ORIGIN)
    with pytest.raises(AuthenticationError, match="not this cluster's address"):
        await um.complete_registration(
            token, PASSWORD, webauthn_response=key.create(info["webauthn"], origin="https://evil.example")
        )
    failed = [e for e in audit.named("user.register") if not e["success"]]
    assert failed[-1]["error"] == "unexpected origin" and failed[-1]["code"] == "W1006W"
    assert not (await um.get("alice")).spec.has_password


# ---------------------------------------------------------------- login


async def test_login_with_password_and_security_key(make: Factory, audit: MemoryEmitter) -> None:
    um = make("webauthn")
    key = await register_key(um)
    user = await login_key(um, key)
    assert user.name == "alice"
    ok = [e for e in audit.named("user.login") if e["success"]]
    assert ok[-1]["method"] == "webauthn"
    [dev] = await um.mfa_devices("alice")
    assert dev["last_used"]


async def test_webauthn_cluster_without_assertion_says_use_the_web_ui(make: Factory) -> None:
    um = make("webauthn")
    await register_key(um)
    for password in (PASSWORD, "a wrong password"):
        with pytest.raises(AuthenticationError, match="requires a passkey or security key: sign in through"):
            await um.authenticate("alice", password, "123456")


async def test_login_assertion_replay_and_foreign_challenge_refused(make: Factory) -> None:
    um = make("webauthn")
    key = await register_key(um)
    bob_key = await register_key(um, "bob")
    opts = (await um.begin_login_challenge("alice", PASSWORD))["webauthn"]
    answer = key.get(opts)
    await um.authenticate("alice", PASSWORD, webauthn_response=answer)
    with pytest.raises(AuthenticationError, match="already used"):
        await um.authenticate("alice", PASSWORD, webauthn_response=answer)
    # bob answers a challenge issued for alice and tries it as himself
    opts = (await um.begin_login_challenge("alice", PASSWORD))["webauthn"]
    bob_answer = bob_key.get(opts, credential_id=bob_key.credentials[0].credential_id)
    with pytest.raises(AuthenticationError, match="different sign-in"):
        await um.authenticate("bob", PASSWORD, webauthn_response=bob_answer)
    # or bob's key for alice's account
    opts = (await um.begin_login_challenge("alice", PASSWORD))["webauthn"]
    bob_answer = bob_key.get(opts, credential_id=bob_key.credentials[0].credential_id)
    with pytest.raises(AuthenticationError, match="not registered for this user"):
        await um.authenticate("alice", PASSWORD, webauthn_response=bob_answer)


async def test_login_wrong_origin_and_cloned_key_refused(make: Factory, audit: MemoryEmitter) -> None:
    um = make("webauthn")
    key = await register_key(um)
    with pytest.raises(AuthenticationError, match="not this cluster's address"):
        await login_key(um, key, origin="https://localhost:9999")
    clone = key.clone()
    await login_key(um, key)
    with pytest.raises(WebAuthnError, match="possible cloned authenticator"):
        await login_key(um, clone)
    errors = [e["error"] for e in audit.named("user.login") if not e["success"]]
    assert errors == ["unexpected origin", "possible cloned authenticator"]
    assert audit.named("mfa.verify")[-1]["error"] == "possible cloned authenticator"


async def test_begin_login_challenge_checks_password_and_devices(make: Factory, clock: FakeClock) -> None:
    um = make("on")
    await register_key(um)
    with pytest.raises(AuthenticationError, match="invalid username or password"):
        await um.begin_login_challenge("alice", "not the password")
    with pytest.raises(AuthenticationError, match="invalid username or password"):
        await um.begin_login_challenge("nobody", PASSWORD)
    await register_otp(um, clock, "bob")
    with pytest.raises(AuthenticationError, match="no passkey or security key is registered for this user"):
        await um.begin_login_challenge("bob", PASSWORD)
    with pytest.raises(BadParameterError, match="does not use passkeys"):
        await make("otp").begin_login_challenge("alice", PASSWORD)


async def test_second_factor_on_accepts_either(make: Factory, clock: FakeClock) -> None:
    um = make("on")
    key = await register_key(um)
    secret = await um.begin_add_device("alice", "totp", "phone", webauthn_response=await _answer(um, key))
    await um.finish_add_device("alice", "phone", otp_code=totp.current_code(secret["totp_secret"], clock()))
    clock.advance(30)
    assert (await login_key(um, key)).name == "alice"
    code = totp.current_code(secret["totp_secret"], clock())
    assert (await um.authenticate("alice", PASSWORD, code)).name == "alice"
    with pytest.raises(AuthenticationError, match="a second factor is required"):
        await um.authenticate("alice", PASSWORD)


async def test_otp_cluster_refuses_assertions(make: Factory, clock: FakeClock) -> None:
    um = make("otp")
    await register_otp(um, clock)
    with pytest.raises(AuthenticationError, match="only one-time codes"):
        await um.authenticate("alice", PASSWORD, webauthn_response={"id": "x"})


async def test_failed_assertions_count_toward_lockout(make: Factory, audit: MemoryEmitter) -> None:
    um = make("webauthn", max_attempts=3)
    key = await register_key(um)
    with pytest.raises(AuthenticationError):
        await login_key(um, key, origin="https://evil.example")
    with pytest.raises(BadParameterError):  # malformed counts too
        await um.authenticate("alice", PASSWORD, webauthn_response={"id": 1})
    with pytest.raises(AuthenticationError, match="invalid username or password"):
        await um.begin_login_challenge("alice", "wrong password!!")
    assert audit.named("user.locked")
    with pytest.raises(LockedError, match="locked until"):
        await um.begin_login_challenge("alice", PASSWORD)


# ---------------------------------------------------------------- passwordless


async def test_passwordless_sign_in(make: Factory, audit: MemoryEmitter) -> None:
    um = make("webauthn", passwordless=True)
    key = await register_key(um)
    opts = (await um.begin_passwordless())["webauthn"]
    assert not opts.get("allowCredentials") and opts["userVerification"] == "required"
    user = await um.authenticate_passwordless(key.get(opts))
    assert user.name == "alice"
    assert audit.named("user.login")[-1]["method"] == "passwordless"


async def test_passwordless_off_is_refused(make: Factory) -> None:
    um = make("webauthn", passwordless=False)
    with pytest.raises(BadParameterError, match="passwordless sign-in is not enabled"):
        await um.begin_passwordless()
    with pytest.raises(BadParameterError, match="passwordless sign-in is not enabled"):
        await um.authenticate_passwordless({"id": "x"})


async def test_passwordless_needs_user_verification_and_handle(make: Factory) -> None:
    um = make("webauthn", passwordless=True)
    key = await register_key(um)
    with pytest.raises(AuthenticationError, match="did not verify you"):
        await um.authenticate_passwordless(key.get((await um.begin_passwordless())["webauthn"], uv=False))
    with pytest.raises(AuthenticationError, match="did not identify its user"):
        await um.authenticate_passwordless(
            key.get((await um.begin_passwordless())["webauthn"], user_handle=False)
        )


async def test_passwordless_refuses_non_discoverable_and_unknown_credentials(make: Factory) -> None:
    um = make("webauthn", passwordless=True)
    key = await register_key(um)
    # a server-side (non-discoverable) credential added as a plain security key
    opts = (
        await um.begin_add_device("alice", "webauthn", "usbkey", webauthn_response=await _answer(um, key))
    )["webauthn"]
    usb = SoftAuthenticator(RP_ID, ORIGIN)
    await um.finish_add_device("alice", "usbkey", webauthn_response=usb.create(opts, resident=False))
    cid = usb.credentials[0].credential_id
    with pytest.raises(AuthenticationError, match="not a passkey"):
        await um.authenticate_passwordless(
            usb.get((await um.begin_passwordless())["webauthn"], credential_id=cid)
        )
    stranger = SoftAuthenticator(RP_ID, ORIGIN)
    stranger.create({**opts, "excludeCredentials": []})
    with pytest.raises(AuthenticationError, match="not registered"):
        await um.authenticate_passwordless(stranger.get((await um.begin_passwordless())["webauthn"]))


async def test_passwordless_respects_lockout(make: Factory, store: ResourceStore) -> None:
    um = make("webauthn", passwordless=True, max_attempts=2)
    key = await register_key(um)
    for _ in range(2):
        with pytest.raises(AuthenticationError):
            await um.authenticate("alice", "not the password", webauthn_response={})
    with pytest.raises(LockedError):
        await um.authenticate_passwordless(key.get((await um.begin_passwordless())["webauthn"]))


async def test_malformed_json_is_a_bad_parameter(make: Factory) -> None:
    um = make("webauthn", passwordless=True)
    key = await register_key(um)
    await um.begin_passwordless()
    for bad in (
        "{",
        [],
        {"id": "AA", "rawId": "AA", "type": "public-key", "response": {"clientDataJSON": 5}},
    ):
        with pytest.raises(BadParameterError):
            await um.authenticate_passwordless(bad)
        with pytest.raises(BadParameterError):
            await um.verify_mfa("alice", webauthn_response=bad)
    assert key.credentials


# ---------------------------------------------------------------- MFA checks and devices


async def _answer(um: UserManager, key: SoftAuthenticator, name: str = "alice") -> dict:
    challenge = await um.mfa_challenge(name)
    assert challenge["webauthn"] is not None
    return key.get(challenge["webauthn"])


async def test_mfa_challenge_and_verify(make: Factory, clock: FakeClock, audit: MemoryEmitter) -> None:
    um = make("on")
    secret = await register_otp(um, clock)
    assert await um.mfa_challenge("alice") == {"otp": True, "webauthn": None}
    assert await um.verify_mfa("alice", otp_code=totp.current_code(secret, clock())) == "otp"
    with pytest.raises(AuthenticationError, match="one-time code"):
        await um.verify_mfa("alice", otp_code=totp.current_code(secret, clock()))  # replay
    with pytest.raises(AuthenticationError, match="confirm with a second factor"):
        await um.verify_mfa("alice")
    clock.advance(30)
    begin = await um.begin_add_device(
        "alice", "webauthn", "yubikey", otp_code=totp.current_code(secret, clock())
    )
    key = SoftAuthenticator(RP_ID, ORIGIN)
    await um.finish_add_device("alice", "yubikey", webauthn_response=key.create(begin["webauthn"]))
    challenge = await um.mfa_challenge("alice")
    assert challenge["otp"] is True
    assert [c["id"] for c in challenge["webauthn"]["allowCredentials"]] == [
        b64url(key.credentials[0].credential_id)
    ]
    assert await um.verify_mfa("alice", webauthn_response=key.get(challenge["webauthn"])) == "yubikey"
    codes = {(e["success"], e["code"]) for e in audit.named("mfa.verify")}
    assert codes == {(True, "W1012I"), (False, "W1012W")}
    # a webauthn-only cluster does not offer the OTP device
    assert (await make("webauthn").mfa_challenge("alice"))["otp"] is False


async def test_add_device_needs_an_existing_factor(make: Factory, clock: FakeClock) -> None:
    um = make("on")
    key = await register_key(um)
    with pytest.raises(AuthenticationError, match="confirm with a second factor"):
        await um.begin_add_device("alice", "totp", "phone")
    with pytest.raises(AuthenticationError):
        await um.begin_add_device("alice", "totp", "phone", otp_code="123456")
    with pytest.raises(AlreadyExistsError, match="already exists"):
        await um.begin_add_device("alice", "totp", "passkey", webauthn_response=await _answer(um, key))
    with pytest.raises(BadParameterError, match="device name"):
        await um.begin_add_device("alice", "totp", "no spaces/please")
    with pytest.raises(BadParameterError, match="unknown device type"):
        await um.begin_add_device("alice", "sms", "phone")
    begin = await um.begin_add_device("alice", "totp", "phone", webauthn_response=await _answer(um, key))
    assert begin["totp_qr_svg"].startswith("<svg") and begin["totp_uri"].startswith("otpauth://")
    with pytest.raises(BadParameterError, match="first"):
        await um.finish_add_device("alice", "other-name", otp_code="123456")
    with pytest.raises(AuthenticationError, match="new authenticator is not valid"):
        await um.finish_add_device("alice", "phone", otp_code="000000")
    out = await um.finish_add_device(
        "alice", "phone", otp_code=totp.current_code(begin["totp_secret"], clock())
    )
    assert out["name"] == "phone" and out["type"] == "totp" and out["added"]
    assert (await um.get("alice")).spec.mfa_devices == ["passkey", "phone"]
    assert [d["name"] for d in await um.mfa_devices("alice")] == ["passkey", "phone"]


async def test_pending_device_expires(make: Factory, clock: FakeClock) -> None:
    um = make("off")
    token = await invite(um)
    await um.begin_registration(token)
    await um.complete_registration(token, PASSWORD)
    begin = await um.begin_add_device("alice", "totp", "phone")  # no devices yet: nothing to prove
    clock.advance(301)
    with pytest.raises(BadParameterError, match="expires after 5 minutes"):
        await um.finish_add_device(
            "alice", "phone", otp_code=totp.current_code(begin["totp_secret"], clock())
        )


async def test_add_passkey_device_and_delete_devices(
    make: Factory, clock: FakeClock, store: ResourceStore, audit: MemoryEmitter
) -> None:
    um = make("webauthn")
    key = await register_key(um)
    with pytest.raises(BadParameterError, match="last device"):
        await um.delete_device("alice", "passkey", webauthn_response=await _answer(um, key))
    begin = await um.begin_add_device("alice", "passkey", "phone", webauthn_response=await _answer(um, key))
    assert begin["webauthn"]["authenticatorSelection"]["residentKey"] == "required"
    assert len(begin["webauthn"]["excludeCredentials"]) == 1
    phone = SoftAuthenticator(RP_ID, ORIGIN)
    added = await um.finish_add_device("alice", "phone", webauthn_response=phone.create(begin["webauthn"]))
    assert added["type"] == "webauthn"
    with pytest.raises(BadParameterError, match="only passkeys"):
        await um.begin_add_device("alice", "totp", "app")
    with pytest.raises(NotFoundError):
        await um.delete_device("alice", "nope", webauthn_response=await _answer(um, key))
    with pytest.raises(AuthenticationError):
        await um.delete_device("alice", "passkey")  # no factor
    await um.delete_device("alice", "passkey", webauthn_response=await _answer(um, phone))
    assert (await um.get("alice")).spec.mfa_devices == ["phone"]
    assert len(await store.list_records("/secrets/webauthn/credentials/")) == 1
    with pytest.raises(AuthenticationError, match="not registered for this user"):
        await login_key(um, key, credential_id=key.credentials[0].credential_id)
    assert [e["success"] for e in audit.named("mfa.delete")][-1] is True
    assert [(e["device"], e["code"]) for e in audit.named("mfa.add")] == [
        ("phone", "W1010I"),
        ("app", "W1010W"),
    ]


async def test_off_cluster_may_remove_the_last_device(make: Factory, clock: FakeClock) -> None:
    on = make("on")
    secret = await register_otp(on, clock)
    off = make("off")
    await off.delete_device("alice", "otp", otp_code=totp.current_code(secret, clock()))
    assert await off.mfa_devices("alice") == []
    assert (await off.authenticate("alice", PASSWORD)).spec.mfa_devices == []


async def test_change_password_with_security_key(make: Factory) -> None:
    um = make("webauthn")
    key = await register_key(um)
    with pytest.raises(AuthenticationError):
        await um.change_password("alice", PASSWORD, "a brand new password")
    await um.change_password(
        "alice", PASSWORD, "a brand new password", webauthn_response=await _answer(um, key)
    )
    opts = (await um.begin_login_challenge("alice", "a brand new password"))["webauthn"]
    await um.authenticate("alice", "a brand new password", webauthn_response=key.get(opts))


async def test_reset_clears_credentials(make: Factory, store: ResourceStore) -> None:
    um = make("webauthn", passwordless=True)
    key = await register_key(um)
    await um.reset("alice", by="admin")
    assert await store.list_records("/secrets/webauthn/credentials/") == []
    assert await um.mfa_devices("alice") == []
    with pytest.raises(AuthenticationError, match="not registered"):
        await um.authenticate_passwordless(key.get((await um.begin_passwordless())["webauthn"]))
    with pytest.raises(AuthenticationError, match="invalid username or password"):
        await um.begin_login_challenge("alice", PASSWORD)


async def test_delete_user_clears_indexes(make: Factory, store: ResourceStore) -> None:
    um = make("webauthn")
    await register_key(um)
    await um.delete("alice", by="admin")
    assert await store.list_records("/secrets/webauthn/") == []


async def test_existing_otp_flow_unchanged(make: Factory, clock: FakeClock) -> None:
    um = make("otp", webauthn=None)
    secret = await register_otp(um, clock)
    assert (await um.authenticate("alice", PASSWORD, totp.current_code(secret, clock()))).name == "alice"
    with pytest.raises(BadParameterError, match=r"public_addr"):
        await um.begin_passwordless()
