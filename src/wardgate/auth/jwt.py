"""ES256 JSON Web Tokens signed with the cluster's JWT CA, and the JWKS apps verify them with.

Apps behind the proxy learn who the user is from a `Wardgate-Jwt-Assertion` header: a short JWT
with `sub`, `username`, `roles`, `traits`, `iss` (the cluster), `aud` (the app's URI), `iat`,
`nbf` and `exp`. The public keys are served at `/.well-known/jwks.json` on the proxy. Written on
`cryptography` directly: the format is small and fixed (compact JWS, ES256 only).
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
from collections.abc import Mapping, Sequence
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature

from wardgate.errors import AuthenticationError, BadParameterError
from wardgate.keys import load_private_key, load_public_key_pem

ALGORITHM = "ES256"
LEEWAY = 30
"""Seconds of clock skew accepted on `nbf`/`exp`."""


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (ValueError, TypeError):
        raise AuthenticationError("malformed JWT: bad base64url") from None


def _p256_public(pem: str) -> ec.EllipticCurvePublicKey:
    pub = load_public_key_pem(pem)
    if not isinstance(pub, ec.EllipticCurvePublicKey) or not isinstance(pub.curve, ec.SECP256R1):
        raise BadParameterError("a JWT key must be an ECDSA P-256 key")
    return pub


def key_id(public_key_pem: str) -> str:
    """A stable `kid`: the RFC 7638 thumbprint of the JWK."""
    jwk = public_jwk(public_key_pem, with_kid=False)
    canonical = json.dumps({k: jwk[k] for k in ("crv", "kty", "x", "y")}, separators=(",", ":"))
    return b64url(hashlib.sha256(canonical.encode()).digest())


def public_jwk(public_key_pem: str, *, with_kid: bool = True) -> dict[str, str]:
    nums = _p256_public(public_key_pem).public_numbers()
    jwk = {
        "kty": "EC",
        "crv": "P-256",
        "x": b64url(nums.x.to_bytes(32, "big")),
        "y": b64url(nums.y.to_bytes(32, "big")),
        "use": "sig",
        "alg": ALGORITHM,
    }
    if with_kid:
        jwk["kid"] = key_id(public_key_pem)
    return jwk


def jwks(public_key_pems: Sequence[str]) -> dict[str, list[dict[str, str]]]:
    return {"keys": [public_jwk(p) for p in public_key_pems]}


def sign(private_key_pem: str, claims: Mapping[str, Any]) -> str:
    key = load_private_key(private_key_pem)
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise BadParameterError("a JWT signing key must be an ECDSA P-256 key")
    from wardgate.keys import public_key_pem

    header = {"alg": ALGORITHM, "typ": "JWT", "kid": key_id(public_key_pem(key.public_key()))}
    signing_input = (
        b64url(json.dumps(header, separators=(",", ":")).encode())
        + "."
        + b64url(json.dumps(dict(claims), separators=(",", ":"), sort_keys=True).encode())
    )
    r, s = decode_dss_signature(key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256())))
    return signing_input + "." + b64url(r.to_bytes(32, "big") + s.to_bytes(32, "big"))


def user_claims(
    *,
    username: str,
    roles: Sequence[str],
    traits: Mapping[str, Sequence[str]],
    issuer: str,
    audience: str,
    ttl: int,
    now: float | None = None,
) -> dict[str, Any]:
    at = int(now if now is not None else time.time())
    return {
        "sub": username,
        "username": username,
        "roles": list(roles),
        "traits": {k: list(v) for k, v in traits.items()},
        "iss": issuer,
        "aud": audience,
        "iat": at,
        "nbf": at - 1,
        "exp": at + ttl,
    }


def verify(
    token: str,
    public_key_pems: Sequence[str],
    *,
    audience: str | None = None,
    issuer: str | None = None,
    now: float | None = None,
) -> dict[str, Any]:
    """The claims of a valid token; AuthenticationError saying what is wrong otherwise."""
    parts = token.split(".")
    if len(parts) != 3:
        raise AuthenticationError("malformed JWT: expected three dot-separated parts")
    try:
        header = json.loads(b64url_decode(parts[0]))
        claims = json.loads(b64url_decode(parts[1]))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise AuthenticationError("malformed JWT: header or claims are not JSON") from None
    if not isinstance(header, dict) or header.get("alg") != ALGORITHM or not isinstance(claims, dict):
        raise AuthenticationError(f"JWT must be signed with {ALGORITHM}")
    sig = b64url_decode(parts[2])
    if len(sig) != 64:
        raise AuthenticationError("malformed JWT signature")
    der = encode_dss_signature(int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big"))
    signed = (parts[0] + "." + parts[1]).encode()
    for pem in public_key_pems:
        if header.get("kid") not in (None, key_id(pem)):
            continue
        try:
            _p256_public(pem).verify(der, signed, ec.ECDSA(hashes.SHA256()))
            break
        except InvalidSignature:
            continue
    else:
        raise AuthenticationError("JWT signature does not verify against the cluster's keys")
    at = now if now is not None else time.time()
    if not isinstance(claims.get("exp"), int) or claims["exp"] + LEEWAY < at:
        raise AuthenticationError("JWT has expired")
    if isinstance(claims.get("nbf"), int) and claims["nbf"] - LEEWAY > at:
        raise AuthenticationError("JWT is not valid yet")
    if audience is not None and claims.get("aud") != audience:
        raise AuthenticationError(f"JWT is for {claims.get('aud')!r}, not {audience!r}")
    if issuer is not None and claims.get("iss") != issuer:
        raise AuthenticationError(f"JWT was issued by {claims.get('iss')!r}, not {issuer!r}")
    return claims
