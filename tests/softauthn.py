"""A software WebAuthn authenticator (and browser) for tests: real ES256 keys, real CBOR.

`SoftAuthenticator.create()` answers PublicKeyCredentialCreationOptionsJSON with a
RegistrationResponseJSON ("none" attestation, flags UP|UV|AT) and `get()` answers
PublicKeyCredentialRequestOptionsJSON with an AuthenticationResponseJSON, the shapes a browser's
`PublicKeyCredential.toJSON()` produces. py_webauthn verifies them for real.

Knobs for the failure cases: `origin=` / `rp_id=` (answer for another site), `uv=False` (no user
verification), `counter=` (report a given signature counter, e.g. an old one), `user_handle=False`
(leave userHandle out), `clone()` (a copy with the same keys and counters), `resident=` (whether
create() stores a discoverable credential), `credential_id=` (create: use this id; get: answer
with this credential whatever the options allow).
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import os
import struct
from dataclasses import dataclass
from typing import Any

import cbor2
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

UP, UV, AT = 0x01, 0x04, 0x40
AAGUID = bytes.fromhex("5f1c0a2e8d6b4c3f9a7e1b2c3d4e5f60")


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class NoCredentialError(Exception):
    """What a browser reports as NotAllowedError / InvalidStateError."""


@dataclass
class SoftCredential:
    credential_id: bytes
    key: ec.EllipticCurvePrivateKey
    rp_id: str
    user_handle: bytes
    resident: bool
    sign_count: int = 0


class SoftAuthenticator:
    def __init__(self, rp_id: str, origin: str, *, aaguid: bytes = AAGUID) -> None:
        self.rp_id = rp_id
        self.origin = origin
        self.aaguid = aaguid
        self.credentials: list[SoftCredential] = []

    def clone(self) -> SoftAuthenticator:
        """Another authenticator holding the same keys and counters (a cloned security key)."""
        twin = SoftAuthenticator(self.rp_id, self.origin, aaguid=self.aaguid)
        twin.credentials = [copy.copy(c) for c in self.credentials]
        return twin

    # ---- helpers

    def _client_data(self, kind: str, challenge: str, origin: str | None) -> bytes:
        return json.dumps(
            {"type": kind, "challenge": challenge, "origin": origin or self.origin, "crossOrigin": False},
            separators=(",", ":"),
        ).encode()

    @staticmethod
    def _cose_key(key: ec.EllipticCurvePrivateKey) -> bytes:
        nums = key.public_key().public_numbers()
        return cbor2.dumps(
            {1: 2, 3: -7, -1: 1, -2: nums.x.to_bytes(32, "big"), -3: nums.y.to_bytes(32, "big")}
        )

    # ---- navigator.credentials.create()

    def create(
        self,
        options: dict[str, Any],
        *,
        origin: str | None = None,
        rp_id: str | None = None,
        uv: bool = True,
        resident: bool | None = None,
        credential_id: bytes | None = None,
    ) -> dict[str, Any]:
        assert any(p["alg"] == -7 for p in options["pubKeyCredParams"]), "ES256 must be offered"
        rp = rp_id or options["rp"].get("id") or self.rp_id
        excluded = {unb64url(c["id"]) for c in options.get("excludeCredentials", [])}
        if any(c.credential_id in excluded for c in self.credentials):
            raise NoCredentialError("InvalidStateError: this authenticator is already registered")
        want = (options.get("authenticatorSelection") or {}).get("residentKey", "preferred")
        if resident is None:
            resident = want != "discouraged"
        if want == "required" and not resident:
            raise NoCredentialError("NotAllowedError: a discoverable credential was required")
        key = ec.generate_private_key(ec.SECP256R1())
        cred = SoftCredential(
            credential_id or os.urandom(16), key, rp, unb64url(options["user"]["id"]), resident, sign_count=0
        )
        if resident:
            # a resident key replaces any other of the same user at the same site
            self.credentials = [
                c
                for c in self.credentials
                if not (c.resident and c.rp_id == rp and c.user_handle == cred.user_handle)
            ]
        self.credentials.append(cred)
        flags = UP | AT | (UV if uv else 0)
        auth_data = (
            hashlib.sha256(rp.encode()).digest()
            + bytes([flags])
            + struct.pack(">I", cred.sign_count)
            + self.aaguid
            + struct.pack(">H", len(cred.credential_id))
            + cred.credential_id
            + self._cose_key(key)
        )
        att_obj = cbor2.dumps({"fmt": "none", "attStmt": {}, "authData": auth_data})
        client_data = self._client_data("webauthn.create", options["challenge"], origin)
        return {
            "id": b64url(cred.credential_id),
            "rawId": b64url(cred.credential_id),
            "type": "public-key",
            "authenticatorAttachment": "platform",
            "response": {
                "clientDataJSON": b64url(client_data),
                "attestationObject": b64url(att_obj),
                "transports": ["internal", "hybrid"],
                "publicKeyAlgorithm": -7,
            },
            "clientExtensionResults": {"credProps": {"rk": resident}},
        }

    # ---- navigator.credentials.get()

    def _pick(self, options: dict[str, Any], rp: str, credential_id: bytes | None) -> SoftCredential:
        allowed = [unb64url(c["id"]) for c in options.get("allowCredentials") or []]
        if credential_id is not None:
            found = [c for c in self.credentials if c.credential_id == credential_id]
        elif allowed:
            found = [c for c in self.credentials if c.credential_id in allowed]
        else:
            found = [c for c in self.credentials if c.resident and c.rp_id == rp]
        if not found:
            raise NoCredentialError("NotAllowedError: no credential for this site")
        return found[-1]

    def get(
        self,
        options: dict[str, Any],
        *,
        user_handle: bool = True,
        origin: str | None = None,
        rp_id: str | None = None,
        uv: bool = True,
        counter: int | None = None,
        credential_id: bytes | None = None,
    ) -> dict[str, Any]:
        rp = options.get("rpId") or self.rp_id
        cred = self._pick(options, rp, credential_id)
        if counter is None:
            cred.sign_count += 1
            count = cred.sign_count
        else:
            count = counter
        flags = UP | (UV if uv else 0)
        auth_data = hashlib.sha256((rp_id or cred.rp_id).encode()).digest() + bytes([flags])
        auth_data += struct.pack(">I", count)
        client_data = self._client_data("webauthn.get", options["challenge"], origin)
        signature = cred.key.sign(auth_data + hashlib.sha256(client_data).digest(), ec.ECDSA(hashes.SHA256()))
        return {
            "id": b64url(cred.credential_id),
            "rawId": b64url(cred.credential_id),
            "type": "public-key",
            "authenticatorAttachment": "platform",
            "response": {
                "clientDataJSON": b64url(client_data),
                "authenticatorData": b64url(auth_data),
                "signature": b64url(signature),
                "userHandle": b64url(cred.user_handle) if user_handle else None,
            },
            "clientExtensionResults": {},
        }
