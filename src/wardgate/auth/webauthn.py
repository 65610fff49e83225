"""WebAuthn (passkeys and security keys): a thin, typed layer over py_webauthn.

Sans-network: options go out and browser responses come in as plain JSON-able dicts (the WebAuthn
Level 3 JSON forms, binary fields base64url without padding). Challenges and credentials live in
the ResourceStore:

  /secrets/users/<user>/webauthn_handle          {"handle"}: the user's stable random 32-byte id
  /secrets/webauthn/handles/<b64url handle>       {"user"}: userHandle -> user (passwordless)
  /secrets/users/<user>/mfa/<device>              the credential, stored as an MFA device
  /secrets/webauthn/credentials/<b64url cred id>  {"user", "device"}: credential id -> device
  /state/users/<user>/webauthn_register           the pending registration challenge
  /state/webauthn/login/<b64url challenge>        a pending sign-in challenge ({"user"} or "")

Challenges expire after five minutes and are used once: verifying a response deletes its
challenge whether or not the response is good. Every verification failure raises
AuthenticationError (WebAuthnError) with a message a person can act on; malformed input raises
BadParameterError.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import webauthn
from webauthn.helpers import (
    base64url_to_bytes,
    bytes_to_base64url,
    parse_authentication_credential_json,
    parse_client_data_json,
    parse_registration_credential_json,
)
from webauthn.helpers.cose import COSEAlgorithmIdentifier
from webauthn.helpers.exceptions import WebAuthnException
from webauthn.helpers.structs import (
    AuthenticationCredential,
    AuthenticatorSelectionCriteria,
    AuthenticatorTransport,
    ClientDataType,
    PublicKeyCredentialDescriptor,
    RegistrationCredential,
    ResidentKeyRequirement,
    UserVerificationRequirement,
)

from wardgate.audit.events import Emitter
from wardgate.auth.storage import ResourceStore
from wardgate.errors import (
    AlreadyExistsError,
    AuthenticationError,
    BadParameterError,
    CompareFailedError,
    NotFoundError,
)

CHALLENGE_TTL = 300.0  # seconds a challenge stays valid
TIMEOUT_MS = int(CHALLENGE_TTL * 1000)  # the browser's hint, matching the challenge's life
HANDLE_BYTES = 32
MAX_CREDENTIAL_ID = 1023  # bytes; WebAuthn caps credential ids there
ALGORITHMS = [
    COSEAlgorithmIdentifier.ECDSA_SHA_256,
    COSEAlgorithmIdentifier.EDDSA,
    COSEAlgorithmIdentifier.RSASSA_PKCS1_v1_5_SHA_256,
]


@dataclass
class WebAuthnConfig:
    """The relying party: `rp_id` is the proxy's host name, `origins` like https://host:3080."""

    rp_id: str
    rp_name: str
    origins: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class VerifiedLogin:
    user: str
    device: str
    user_verified: bool


class WebAuthnError(AuthenticationError):
    """A response that did not verify; `reason` is the short form for the audit log."""

    def __init__(self, message: str, *, reason: str, user: str = "", device: str = "") -> None:
        super().__init__(message)
        self.reason = reason
        self.user = user
        self.device = device
        self.audited = False  # set once the failure has been written to the audit log


# ---------------------------------------------------------------- key layout


def handle_key(user: str) -> str:
    return f"/secrets/users/{user}/webauthn_handle"


def handle_index_key(handle: bytes) -> str:
    return "/secrets/webauthn/handles/" + bytes_to_base64url(handle)


def device_key(user: str, device: str) -> str:
    return f"/secrets/users/{user}/mfa/{device}"


def credential_index_key(credential_id: str) -> str:
    return "/secrets/webauthn/credentials/" + credential_id


def register_challenge_key(user: str) -> str:
    return f"/state/users/{user}/webauthn_register"


def login_challenge_key(challenge: bytes) -> str:
    return "/state/webauthn/login/" + bytes_to_base64url(challenge)


async def user_credentials(store: ResourceStore, user: str) -> list[tuple[str, dict[str, Any]]]:
    """(device name, record) of every WebAuthn device the user has."""
    prefix = f"/secrets/users/{user}/mfa/"
    return [
        (key[len(prefix) :], rec)
        for key, rec in await store.list_records(prefix)
        if rec.get("type") == "webauthn"
    ]


async def delete_credentials(store: ResourceStore, user: str) -> list[str]:
    """Forget all of a user's WebAuthn devices and their index entries; returns the device names."""
    gone = []
    for device, rec in await user_credentials(store, user):
        await delete_credential_record(store, user, device, rec)
        gone.append(device)
    return gone


async def delete_credential_record(store: ResourceStore, user: str, device: str, rec: dict[str, Any]) -> None:
    cred_id = str(rec.get("credential_id", ""))
    if cred_id:
        idx = await store.get_record(credential_index_key(cred_id))
        if idx is not None and idx[0].get("user") == user:
            await store.delete_record(credential_index_key(cred_id))
    await store.delete_record(device_key(user, device))


async def forget_user(store: ResourceStore, user: str) -> None:
    """Credentials, their index and the user handle (for deleting a user)."""
    await delete_credentials(store, user)
    rec = await store.get_record(handle_key(user))
    if rec is not None:
        try:
            handle = base64url_to_bytes(rec[0]["handle"])
        except (KeyError, ValueError, TypeError):
            handle = b""
        if handle:
            idx = await store.get_record(handle_index_key(handle))
            if idx is not None and idx[0].get("user") == user:
                await store.delete_record(handle_index_key(handle))
        await store.delete_record(handle_key(user))


# ---------------------------------------------------------------- parsing


def _as_dict(response: Any, what: str) -> dict[str, Any]:
    if isinstance(response, str | bytes):
        try:
            response = json.loads(response)
        except ValueError:
            raise BadParameterError(f"the {what} is not valid JSON") from None
    if not isinstance(response, dict):
        raise BadParameterError(f"the {what} must be a JSON object (PublicKeyCredential.toJSON())")
    return response


def _parse_registration(response: Any) -> tuple[RegistrationCredential, dict[str, Any]]:
    raw = _as_dict(response, "passkey or security key registration")
    try:
        cred = parse_registration_credential_json(raw)
    except Exception as exc:  # py_webauthn raises several types (and binascii errors) on bad input
        raise BadParameterError(
            "the passkey or security key registration is malformed "
            f"(expected RegistrationResponseJSON): {_short(exc)}"
        ) from None
    _check_id(cred.raw_id)
    return cred, raw


def _parse_authentication(response: Any) -> AuthenticationCredential:
    raw = _as_dict(response, "passkey or security key response")
    try:
        cred = parse_authentication_credential_json(raw)
    except Exception as exc:
        raise BadParameterError(
            "the passkey or security key response is malformed "
            f"(expected AuthenticationResponseJSON): {_short(exc)}"
        ) from None
    _check_id(cred.raw_id)
    return cred


def _check_id(raw_id: bytes) -> None:
    if not raw_id or len(raw_id) > MAX_CREDENTIAL_ID:
        raise BadParameterError("the credential id is empty or too long")


def _client_data(client_data_json: bytes) -> tuple[bytes, str, str]:
    """(challenge, type, origin) from clientDataJSON."""
    try:
        cd = parse_client_data_json(client_data_json)
    except Exception as exc:
        raise BadParameterError(f"clientDataJSON is malformed: {_short(exc)}") from None
    if not isinstance(cd.origin, str) or not cd.challenge:
        raise BadParameterError("clientDataJSON is malformed: origin and challenge are required")
    return cd.challenge, str(cd.type), cd.origin


def _short(exc: BaseException) -> str:
    return str(exc).split(". See __cause__")[0][:200] or type(exc).__name__


def _transports(values: Any) -> list[AuthenticatorTransport] | None:
    out = []
    for v in values or []:
        try:
            out.append(AuthenticatorTransport(v))
        except ValueError:
            continue
    return out or None


def _descriptor(rec: dict[str, Any]) -> PublicKeyCredentialDescriptor:
    return PublicKeyCredentialDescriptor(
        id=base64url_to_bytes(rec["credential_id"]), transports=_transports(rec.get("transports"))
    )


# ---------------------------------------------------------------- the relying party


class WebAuthn:
    def __init__(
        self,
        store: ResourceStore,
        config: WebAuthnConfig,
        *,
        clock: Callable[[], float] = time.time,
        audit: Emitter | None = None,
    ) -> None:
        if not config.rp_id or not config.origins:
            raise BadParameterError("WebAuthn needs an RP ID and at least one origin (https://host:port)")
        self.store = store
        self.config = config
        self.clock = clock
        self.audit = audit

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self.clock(), UTC)

    # ---- user handles

    async def user_handle(self, user: str) -> bytes:
        """The user's stable WebAuthn id, created (with its index entry) on first use."""
        rec = await self.store.get_record(handle_key(user))
        if rec is not None:
            return base64url_to_bytes(rec[0]["handle"])
        handle = secrets.token_bytes(HANDLE_BYTES)
        value = json.dumps({"handle": bytes_to_base64url(handle)}).encode()
        try:
            await self.store.backend.create(handle_key(user), value)
        except AlreadyExistsError:  # a concurrent call made one first: use it
            rec = await self.store.get_record(handle_key(user))
            assert rec is not None
            return base64url_to_bytes(rec[0]["handle"])
        await self.store.put_record(handle_index_key(handle), {"user": user})
        return handle

    async def user_for_handle(self, handle: bytes) -> str | None:
        rec = await self.store.get_record(handle_index_key(handle))
        return str(rec[0]["user"]) if rec else None

    async def credentials(self, user: str) -> list[tuple[str, dict[str, Any]]]:
        return await user_credentials(self.store, user)

    # ---- registration

    async def registration_options(
        self, user: str, *, passkey: bool = False, display_name: str = ""
    ) -> dict[str, Any]:
        """PublicKeyCredentialCreationOptions JSON; a passkey must be discoverable and verify the user."""
        handle = await self.user_handle(user)
        existing = await self.credentials(user)
        opts = webauthn.generate_registration_options(
            rp_id=self.config.rp_id,
            rp_name=self.config.rp_name or self.config.rp_id,
            user_name=user,
            user_id=handle,
            user_display_name=display_name or user,
            timeout=TIMEOUT_MS,
            authenticator_selection=AuthenticatorSelectionCriteria(
                resident_key=ResidentKeyRequirement.REQUIRED if passkey else ResidentKeyRequirement.PREFERRED,
                require_resident_key=passkey,
                user_verification=(
                    UserVerificationRequirement.REQUIRED if passkey else UserVerificationRequirement.PREFERRED
                ),
            ),
            exclude_credentials=[_descriptor(rec) for _, rec in existing],
            supported_pub_key_algs=ALGORITHMS,
        )
        await self.store.put_record(
            register_challenge_key(user),
            {"challenge": bytes_to_base64url(opts.challenge), "passkey": passkey},
            expires=self.clock() + CHALLENGE_TTL,
        )
        out: dict[str, Any] = json.loads(webauthn.options_to_json(opts))
        out["extensions"] = {"credProps": True}  # so the browser tells us whether it is discoverable
        return out

    async def finish_registration(self, user: str, device: str, response: Any) -> dict[str, Any]:
        """Verify an attestation for the user's pending challenge and store the credential."""
        cred, raw = _parse_registration(response)
        _, ctype, origin = _client_data(cred.response.client_data_json)
        key = register_challenge_key(user)
        rec = await self.store.get_record(key)
        deleted = await self.store.delete_record(key)  # one use, whatever happens next
        if rec is None or not deleted:
            raise WebAuthnError(
                "the passkey or security key registration has expired or was already used: start again",
                reason="unknown or expired registration challenge",
                user=user,
            )
        pending = rec[0]
        if ctype != ClientDataType.WEBAUTHN_CREATE.value:
            raise WebAuthnError(
                "this is not a registration response (expected navigator.credentials.create())",
                reason=f"wrong clientData type {ctype!r}",
                user=user,
            )
        self._check_origin(origin, user)
        try:
            verified = webauthn.verify_registration_response(
                credential=cred,
                expected_challenge=base64url_to_bytes(pending["challenge"]),
                expected_rp_id=self.config.rp_id,
                expected_origin=list(self.config.origins),
                require_user_verification=bool(pending.get("passkey")),
                supported_pub_key_algs=ALGORITHMS,
            )
        except WebAuthnException as exc:
            raise self._explain(exc, user=user) from None
        except Exception as exc:  # a structure py_webauthn did not expect: bad input, not a 500
            raise BadParameterError(f"the registration response is malformed: {_short(exc)}") from None

        cred_id = bytes_to_base64url(verified.credential_id)
        if await self.store.get_record(credential_index_key(cred_id)) is not None:
            raise AlreadyExistsError(
                "this passkey or security key is already registered: use it to sign in, or pick another"
            )
        if await self.store.get_record(device_key(user, device)) is not None:
            raise AlreadyExistsError(f'an MFA device named "{device}" already exists: choose another name')
        props = (raw.get("clientExtensionResults") or {}).get("credProps") or {}
        discoverable = bool(pending.get("passkey")) or (isinstance(props, dict) and props.get("rk") is True)
        record = {
            "type": "webauthn",
            "credential_id": cred_id,
            "public_key": bytes_to_base64url(verified.credential_public_key),
            "sign_count": verified.sign_count,
            "transports": [t.value for t in cred.response.transports or []],
            "aaguid": verified.aaguid,
            "added": self._now().isoformat(),
            "last_used": None,
            "discoverable": discoverable,
        }
        try:
            await self.store.backend.create(
                credential_index_key(cred_id), json.dumps({"user": user, "device": device}).encode()
            )
        except AlreadyExistsError:
            raise AlreadyExistsError("this passkey or security key is already registered") from None
        await self.store.put_record(device_key(user, device), record)
        return record

    # ---- sign-in

    async def authentication_options(self, user: str | None = None) -> dict[str, Any]:
        """PublicKeyCredentialRequestOptions JSON for `user`'s credentials, or, with no user,
        for passwordless sign-in (no allowCredentials; user verification required)."""
        if user:
            creds = await self.credentials(user)
            if not creds:
                raise AuthenticationError("no passkey or security key is registered for this user")
            allow = [_descriptor(rec) for _, rec in creds]
            uv = UserVerificationRequirement.PREFERRED
        else:
            allow, uv = [], UserVerificationRequirement.REQUIRED
        opts = webauthn.generate_authentication_options(
            rp_id=self.config.rp_id, timeout=TIMEOUT_MS, allow_credentials=allow, user_verification=uv
        )
        await self.store.put_record(
            login_challenge_key(opts.challenge),
            {"user": user or "", "uv_required": not user},
            expires=self.clock() + CHALLENGE_TTL,
        )
        return json.loads(webauthn.options_to_json(opts))

    async def verify_authentication(self, response: Any, *, user: str | None) -> VerifiedLogin:
        """Check an assertion against a challenge issued for `user` (None: passwordless).

        Updates the credential's sign counter and last use; refuses a counter that went back
        (a possible cloned authenticator) and audits that.
        """
        cred = _parse_authentication(response)
        challenge, ctype, origin = _client_data(cred.response.client_data_json)
        key = login_challenge_key(challenge)
        rec = await self.store.get_record(key)
        deleted = await self.store.delete_record(key)  # one use, whatever happens next
        if rec is None or not deleted:
            raise WebAuthnError(
                "this sign-in challenge is unknown, expired or already used: start signing in again",
                reason="unknown or expired challenge",
                user=user or "",
            )
        pending = rec[0]
        if pending.get("user", "") != (user or ""):
            raise WebAuthnError(
                "this challenge was issued for a different sign-in: start signing in again",
                reason="challenge issued for another user",
                user=user or "",
            )
        if ctype != ClientDataType.WEBAUTHN_GET.value:
            raise WebAuthnError(
                "this is not a sign-in response (expected navigator.credentials.get())",
                reason=f"wrong clientData type {ctype!r}",
                user=user or "",
            )
        self._check_origin(origin, user or "")

        cred_id = bytes_to_base64url(cred.raw_id)
        idx = await self.store.get_record(credential_index_key(cred_id))
        if idx is None or (user and idx[0].get("user") != user):
            raise WebAuthnError(
                "this passkey or security key is not registered for this user: "
                "use a registered one, or add it under your MFA devices",
                reason="unknown credential",
                user=user or "",
            )
        owner, device = str(idx[0]["user"]), str(idx[0]["device"])
        dkey = device_key(owner, device)
        drec = await self.store.get_record(dkey)
        if drec is None or drec[0].get("credential_id") != cred_id:
            raise WebAuthnError(
                "this passkey or security key is no longer registered",
                reason="unknown credential",
                user=owner,
            )
        stored = drec[0]

        handle = cred.response.user_handle
        if handle or user is None:  # an empty userHandle from a security key means "none"
            mapped = await self.user_for_handle(handle) if handle else None
            if mapped != owner:
                raise WebAuthnError(
                    "the passkey did not identify its user (userHandle): "
                    "use a passkey registered on this cluster, or sign in with your password",
                    reason="user handle missing or does not match the credential",
                    user=owner,
                    device=device,
                )
        if user is None and not stored.get("discoverable"):
            raise WebAuthnError(
                f'the device "{device}" is not a passkey (it is not discoverable): '
                "sign in with your password and use it as a second factor",
                reason="credential not discoverable",
                user=owner,
                device=device,
            )

        try:
            verified = webauthn.verify_authentication_response(
                credential=cred,
                expected_challenge=challenge,
                expected_rp_id=self.config.rp_id,
                expected_origin=list(self.config.origins),
                credential_public_key=base64url_to_bytes(stored["public_key"]),
                credential_current_sign_count=0,  # compared below, once the signature is known good
                require_user_verification=bool(pending.get("uv_required")),
            )
        except WebAuthnException as exc:
            raise self._explain(exc, user=owner, device=device) from None
        except Exception as exc:
            raise BadParameterError(f"the sign-in response is malformed: {_short(exc)}") from None

        await self._bump_counter(dkey, owner, device, verified.new_sign_count)
        return VerifiedLogin(owner, device, verified.user_verified)

    async def _bump_counter(self, key: str, user: str, device: str, new: int) -> None:
        while True:
            rec = await self.store.get_record(key)
            if rec is None:
                raise WebAuthnError(
                    "this passkey or security key was removed", reason="unknown credential", user=user
                )
            data, rev = rec
            stored = int(data.get("sign_count") or 0)
            if (stored or new) and new <= stored:
                err = WebAuthnError(
                    f'the security key "{device}" reported a signature counter that went back '
                    f"({new} after {stored}): possible cloned authenticator. Sign-in refused; "
                    "remove this device and tell your administrator",
                    reason="possible cloned authenticator",
                    user=user,
                    device=device,
                )
                if self.audit is not None:
                    await self.audit.emit(
                        "mfa.verify",
                        user=user,
                        success=False,
                        device=device,
                        error=err.reason,
                        stored_count=stored,
                        new_count=new,
                    )
                    err.audited = True
                raise err
            data["sign_count"] = new
            data["last_used"] = self._now().isoformat()
            try:
                await self.store.put_record(key, data, revision=rev)
                return
            except (CompareFailedError, NotFoundError):
                continue  # used concurrently: re-read, and the counter check decides

    # ---- management

    async def delete_credential(self, user: str, device: str) -> bool:
        rec = await self.store.get_record(device_key(user, device))
        if rec is None or rec[0].get("type") != "webauthn":
            return False
        await delete_credential_record(self.store, user, device, rec[0])
        return True

    # ---- errors

    def _check_origin(self, origin: str, user: str) -> None:
        if origin not in self.config.origins:
            raise WebAuthnError(
                f"the passkey or security key answered for {origin[:100]!r}, which is not this "
                f"cluster's address: open Wardgate at {' or '.join(self.config.origins)}",
                reason="unexpected origin",
                user=user,
            )

    def _explain(self, exc: WebAuthnException, *, user: str, device: str = "") -> Exception:
        detail = _short(exc)
        low = detail.lower()
        if "malformed" in low or "could not parse" in low:
            return BadParameterError(f"the WebAuthn response is malformed: {detail}")
        if "rp id" in low:
            msg = (
                f"the credential was made for a different site, not {self.config.rp_id!r} "
                "(RP ID mismatch): register it again on this cluster"
            )
            reason = "RP ID mismatch"
        elif "verification is required" in low:
            msg = (
                "the authenticator did not verify you (PIN, fingerprint or face): "
                "this sign-in needs user verification"
            )
            reason = "user verification missing"
        elif "not present" in low or "presence" in low:
            msg = "the authenticator did not confirm your presence: touch the key when it blinks and retry"
            reason = "user presence missing"
        elif "signature" in low:
            msg = (
                "the passkey or security key signature is not valid: try again, "
                "or remove the device and add it again"
            )
            reason = "invalid signature"
        elif "challenge" in low:
            msg = "the response answers a different challenge (an older attempt?): start again"
            reason = "challenge mismatch"
        elif "alg" in low:
            msg = "the authenticator uses an unsupported algorithm (use ES256, EdDSA or RS256)"
            reason = "unsupported algorithm"
        else:
            msg = f"the passkey or security key response could not be verified: {detail}"
            reason = detail
        return WebAuthnError(msg, reason=reason, user=user, device=device)
