"""auth/webauthn.py against a software authenticator: py_webauthn verifies real signatures."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.conftest import FakeClock
from tests.softauthn import SoftAuthenticator, b64url, unb64url
from wardgate.audit.events import MemoryEmitter
from wardgate.auth.storage import ResourceStore
from wardgate.auth.webauthn import (
    WebAuthn,
    WebAuthnConfig,
    WebAuthnError,
    credential_index_key,
    delete_credentials,
    device_key,
    forget_user,
    handle_index_key,
    handle_key,
)
from wardgate.backend.memory import MemoryBackend
from wardgate.errors import AlreadyExistsError, AuthenticationError, BadParameterError

RP_ID = "localhost"
ORIGIN = "https://localhost:3080"


@pytest.fixture
async def store(clock: FakeClock) -> AsyncIterator[ResourceStore]:
    backend = MemoryBackend(clock=clock)
    yield ResourceStore(backend)
    await backend.close()


@pytest.fixture
def audit() -> MemoryEmitter:
    return MemoryEmitter()


@pytest.fixture
def rp(store: ResourceStore, clock: FakeClock, audit: MemoryEmitter) -> WebAuthn:
    return WebAuthn(store, WebAuthnConfig(RP_ID, "Wardgate test", [ORIGIN]), clock=clock, audit=audit)


async def enrol(rp: WebAuthn, user: str = "alice", device: str = "key1", **kw) -> SoftAuthenticator:
    token = SoftAuthenticator(RP_ID, ORIGIN)
    await rp.finish_registration(user, device, token.create(await rp.registration_options(user, **kw)))
    return token


async def test_registration_options_shape_and_stable_user_handle(rp: WebAuthn, store: ResourceStore) -> None:
    opts = await rp.registration_options("alice")
    assert opts["rp"] == {"id": RP_ID, "name": "Wardgate test"}
    assert opts["authenticatorSelection"]["residentKey"] == "preferred"
    assert opts["authenticatorSelection"]["userVerification"] == "preferred"
    assert [p["alg"] for p in opts["pubKeyCredParams"]] == [-7, -8, -257]
    assert opts["attestation"] == "none" and opts["extensions"] == {"credProps": True}
    handle = unb64url(opts["user"]["id"])
    assert len(handle) == 32
    again = await rp.registration_options("alice", passkey=True)
    assert unb64url(again["user"]["id"]) == handle, "the user handle is stable"
    assert again["authenticatorSelection"]["residentKey"] == "required"
    assert again["authenticatorSelection"]["userVerification"] == "required"
    assert await rp.user_for_handle(handle) == "alice"
    assert (await store.get_record(handle_index_key(handle)))[0] == {"user": "alice"}


async def test_register_stores_device_and_index_and_excludes_it_next_time(
    rp: WebAuthn, store: ResourceStore
) -> None:
    token = await enrol(rp, passkey=True)
    cred_id = b64url(token.credentials[0].credential_id)
    rec, _ = await store.get_record(device_key("alice", "key1"))
    assert rec["type"] == "webauthn" and rec["credential_id"] == cred_id
    assert rec["sign_count"] == 0 and rec["last_used"] is None and rec["discoverable"] is True
    assert rec["transports"] == ["internal", "hybrid"]
    assert rec["aaguid"] == "5f1c0a2e-8d6b-4c3f-9a7e-1b2c3d4e5f60"
    assert (await store.get_record(credential_index_key(cred_id)))[0] == {"user": "alice", "device": "key1"}
    opts = await rp.registration_options("alice")
    assert [c["id"] for c in opts["excludeCredentials"]] == [cred_id]


async def test_registration_challenge_is_one_use(rp: WebAuthn) -> None:
    token = SoftAuthenticator(RP_ID, ORIGIN)
    answer = token.create(await rp.registration_options("alice"))
    await rp.finish_registration("alice", "key1", answer)
    with pytest.raises(WebAuthnError, match="expired or was already used"):
        await rp.finish_registration("alice", "key2", answer)


async def test_registration_refuses_wrong_origin_and_rp_id_and_burns_the_challenge(rp: WebAuthn) -> None:
    token = SoftAuthenticator(RP_ID, ORIGIN)
    opts = await rp.registration_options("alice")
    with pytest.raises(WebAuthnError, match="not this cluster's address"):
        await rp.finish_registration("alice", "k", token.create(opts, origin="https://evil.example"))
    with pytest.raises(WebAuthnError, match="already used"):
        await rp.finish_registration("alice", "k", token.create(opts))
    with pytest.raises(WebAuthnError, match="RP ID mismatch"):
        await rp.finish_registration(
            "alice", "k", token.create(await rp.registration_options("alice"), rp_id="evil.example")
        )


async def test_passkey_registration_needs_user_verification(rp: WebAuthn) -> None:
    token = SoftAuthenticator(RP_ID, ORIGIN)
    with pytest.raises(WebAuthnError, match="did not verify you"):
        await rp.finish_registration(
            "alice", "k", token.create(await rp.registration_options("alice", passkey=True), uv=False)
        )


async def test_same_authenticator_cannot_register_twice(rp: WebAuthn) -> None:
    token = await enrol(rp)
    taken = token.credentials[0].credential_id
    other = SoftAuthenticator(RP_ID, ORIGIN)
    answer = other.create(await rp.registration_options("bob"), credential_id=taken)
    with pytest.raises(AlreadyExistsError, match="already registered"):
        await rp.finish_registration("bob", "k", answer)


async def test_sign_in_updates_counter_and_last_use(rp: WebAuthn, store: ResourceStore) -> None:
    token = await enrol(rp)
    opts = await rp.authentication_options("alice")
    assert opts["rpId"] == RP_ID and opts["userVerification"] == "preferred"
    assert [c["id"] for c in opts["allowCredentials"]] == [b64url(token.credentials[0].credential_id)]
    verified = await rp.verify_authentication(token.get(opts), user="alice")
    assert (verified.user, verified.device, verified.user_verified) == ("alice", "key1", True)
    rec, _ = await store.get_record(device_key("alice", "key1"))
    assert rec["sign_count"] == 1 and rec["last_used"]


async def test_sign_in_challenge_is_one_use_and_bound_to_user(rp: WebAuthn) -> None:
    token = await enrol(rp)
    bob_token = await enrol(rp, "bob")
    answer = token.get(await rp.authentication_options("alice"))
    await rp.verify_authentication(answer, user="alice")
    with pytest.raises(WebAuthnError, match="already used"):
        await rp.verify_authentication(answer, user="alice")
    # bob answers a challenge issued for alice (and the refusal burns it)
    alice_opts = await rp.authentication_options("alice")
    with pytest.raises(WebAuthnError, match="different sign-in"):
        await rp.verify_authentication(
            bob_token.get(alice_opts, credential_id=bob_token.credentials[0].credential_id), user="bob"
        )
    with pytest.raises(WebAuthnError, match="already used"):
        await rp.verify_authentication(token.get(alice_opts), user="alice")


async def test_challenge_that_was_never_issued_or_expired(rp: WebAuthn, clock: FakeClock) -> None:
    token = await enrol(rp)
    opts = await rp.authentication_options("alice")
    forged = dict(opts, challenge=b64url(b"x" * 32))
    with pytest.raises(WebAuthnError, match="unknown, expired"):
        await rp.verify_authentication(token.get(forged), user="alice")
    clock.advance(301)
    with pytest.raises(WebAuthnError, match="unknown, expired"):
        await rp.verify_authentication(token.get(opts), user="alice")


async def test_wrong_origin_rp_id_and_bad_signature_are_refused(rp: WebAuthn) -> None:
    token = await enrol(rp)
    with pytest.raises(WebAuthnError, match="not this cluster's address"):
        await rp.verify_authentication(
            token.get(await rp.authentication_options("alice"), origin="https://localhost:4443"), user="alice"
        )
    with pytest.raises(WebAuthnError, match="RP ID"):
        await rp.verify_authentication(
            token.get(await rp.authentication_options("alice"), rp_id="example.com"), user="alice"
        )
    answer = token.get(await rp.authentication_options("alice"))
    sig = bytearray(unb64url(answer["response"]["signature"]))
    sig[-1] ^= 1
    answer["response"]["signature"] = b64url(bytes(sig))
    with pytest.raises(WebAuthnError, match="signature is not valid"):
        await rp.verify_authentication(answer, user="alice")


async def test_counter_regression_is_refused_and_audited(
    rp: WebAuthn, audit: MemoryEmitter, store: ResourceStore
) -> None:
    token = await enrol(rp)
    clone = token.clone()
    await rp.verify_authentication(token.get(await rp.authentication_options("alice")), user="alice")
    await rp.verify_authentication(token.get(await rp.authentication_options("alice")), user="alice")
    with pytest.raises(WebAuthnError, match="possible cloned authenticator"):
        await rp.verify_authentication(clone.get(await rp.authentication_options("alice")), user="alice")
    with pytest.raises(WebAuthnError, match="possible cloned authenticator"):
        await rp.verify_authentication(
            token.get(await rp.authentication_options("alice"), counter=2), user="alice"
        )
    events = audit.named("mfa.verify")
    assert len(events) == 2 and events[0]["code"] == "W1012W"
    assert events[0]["error"] == "possible cloned authenticator" and events[0]["device"] == "key1"
    assert (await store.get_record(device_key("alice", "key1")))[0]["sign_count"] == 2


async def test_zero_counters_are_accepted(rp: WebAuthn) -> None:
    """Authenticators without a counter always report 0; that is not a regression."""
    token = await enrol(rp)
    for _ in range(2):
        await rp.verify_authentication(
            token.get(await rp.authentication_options("alice"), counter=0), user="alice"
        )


async def test_unknown_credential(rp: WebAuthn) -> None:
    await enrol(rp)
    stranger = SoftAuthenticator(RP_ID, ORIGIN)
    stranger.create(await rp.registration_options("mallory"))  # never finished: not stored
    with pytest.raises(WebAuthnError, match="not registered"):
        await rp.verify_authentication(
            stranger.get(
                await rp.authentication_options("alice"), credential_id=stranger.credentials[0].credential_id
            ),
            user="alice",
        )
    assert issubclass(WebAuthnError, AuthenticationError)


async def test_user_without_credentials_gets_a_clear_error(rp: WebAuthn) -> None:
    with pytest.raises(AuthenticationError, match="no passkey or security key is registered"):
        await rp.authentication_options("nobody")


async def test_passwordless_checks_handle_uv_and_discoverable(rp: WebAuthn) -> None:
    passkey = await enrol(rp, passkey=True)
    opts = await rp.authentication_options(None)
    assert "allowCredentials" not in opts or opts["allowCredentials"] == []
    assert opts["userVerification"] == "required"
    assert (await rp.verify_authentication(passkey.get(opts), user=None)).user == "alice"
    with pytest.raises(WebAuthnError, match="did not verify you"):
        await rp.verify_authentication(
            passkey.get(await rp.authentication_options(None), uv=False), user=None
        )
    with pytest.raises(WebAuthnError, match="did not identify its user"):
        await rp.verify_authentication(
            passkey.get(await rp.authentication_options(None), user_handle=False), user=None
        )
    key = SoftAuthenticator(RP_ID, ORIGIN)
    await rp.finish_registration(
        "bob", "key", key.create(await rp.registration_options("bob"), resident=False)
    )
    with pytest.raises(WebAuthnError, match="not a passkey"):
        await rp.verify_authentication(
            key.get(await rp.authentication_options(None), credential_id=key.credentials[0].credential_id),
            user=None,
        )


async def test_passwordless_challenge_cannot_serve_a_user_login(rp: WebAuthn) -> None:
    passkey = await enrol(rp, passkey=True)
    with pytest.raises(WebAuthnError, match="different sign-in"):
        await rp.verify_authentication(passkey.get(await rp.authentication_options(None)), user="alice")


@pytest.mark.parametrize(
    "bad",
    [
        "not json",
        "[]",
        {},
        {"id": "x", "rawId": "x", "type": "public-key", "response": {}},
        {
            "id": "AAAA",
            "rawId": "AAAA",
            "type": "public-key",
            "response": {"clientDataJSON": "!!!", "authenticatorData": "AA", "signature": "AA"},
        },
        {
            "id": "AAAA",
            "rawId": "AAAA",
            "type": "public-key",
            "response": {"clientDataJSON": b64url(b"{nope"), "authenticatorData": "AA", "signature": "AA"},
        },
        42,
    ],
)
async def test_malformed_assertions_are_bad_parameters(rp: WebAuthn, bad: object) -> None:
    await enrol(rp)
    with pytest.raises(BadParameterError):
        await rp.verify_authentication(bad, user="alice")


async def test_malformed_authenticator_data_is_a_bad_parameter(rp: WebAuthn) -> None:
    token = await enrol(rp)
    answer = token.get(await rp.authentication_options("alice"))
    answer["response"]["authenticatorData"] = b64url(b"short")
    with pytest.raises(BadParameterError, match="malformed"):
        await rp.verify_authentication(answer, user="alice")


async def test_malformed_attestations_are_bad_parameters(rp: WebAuthn) -> None:
    token = SoftAuthenticator(RP_ID, ORIGIN)
    answer = token.create(await rp.registration_options("alice"))
    with pytest.raises(BadParameterError):
        await rp.finish_registration("alice", "k", {"id": "AA"})
    answer["response"]["attestationObject"] = b64url(b"\xa1garbage")
    with pytest.raises(BadParameterError, match="malformed"):
        await rp.finish_registration("alice", "k", answer)


async def test_device_name_taken(rp: WebAuthn) -> None:
    await enrol(rp)
    token = SoftAuthenticator(RP_ID, ORIGIN)
    with pytest.raises(AlreadyExistsError, match="already exists"):
        await rp.finish_registration("alice", "key1", token.create(await rp.registration_options("alice")))


async def test_delete_and_forget_clear_indexes(rp: WebAuthn, store: ResourceStore) -> None:
    token = await enrol(rp)
    await enrol(rp, device="key2")
    cred_id = b64url(token.credentials[0].credential_id)
    assert await rp.delete_credential("alice", "key1")
    assert await store.get_record(credential_index_key(cred_id)) is None
    assert sorted(await delete_credentials(store, "alice")) == ["key2"]
    assert await store.list_records("/secrets/webauthn/credentials/") == []
    handle = await rp.user_handle("alice")
    await forget_user(store, "alice")
    assert await store.get_record(handle_key("alice")) is None
    assert await rp.user_for_handle(handle) is None
