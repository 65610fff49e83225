"""JWTs for apps: signed with the cluster's JWT CA, verified against the JWKS (and by PyJWT-free
independent checks: the JWK thumbprint and the raw ECDSA signature)."""

from __future__ import annotations

import json
import time

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from wardgate.auth import jwt
from wardgate.auth.ca import new_cert_authority
from wardgate.errors import AuthenticationError


@pytest.fixture(scope="module")
def keys() -> tuple[str, str]:
    kp = new_cert_authority("jwt", "example.com").spec.active_keys[0]
    return kp.jwt_private_key_pem, kp.jwt_public_key_pem


def claims(**over: object) -> dict:
    base = jwt.user_claims(
        username="alice",
        roles=["access"],
        traits={"logins": ["root"]},
        issuer="example.com",
        audience="https://grafana.example.com:3080",
        ttl=60,
    )
    return {**base, **over}


def test_round_trip_and_claims(keys: tuple[str, str]) -> None:
    priv, pub = keys
    token = jwt.sign(priv, claims())
    got = jwt.verify(token, [pub], audience="https://grafana.example.com:3080", issuer="example.com")
    assert got["sub"] == got["username"] == "alice" and got["roles"] == ["access"]
    assert got["traits"] == {"logins": ["root"]} and got["exp"] - got["iat"] == 60


def test_signature_checks_out_with_the_published_jwk_alone(keys: tuple[str, str]) -> None:
    """What an app does: rebuild the key from the JWKS x/y and check the raw r||s signature."""
    priv, pub = keys
    token = jwt.sign(priv, claims())
    (jwk,) = jwt.jwks([pub])["keys"]
    header = json.loads(jwt.b64url_decode(token.split(".")[0]))
    assert header == {"alg": "ES256", "typ": "JWT", "kid": jwk["kid"]}
    x = int.from_bytes(jwt.b64url_decode(jwk["x"]), "big")
    y = int.from_bytes(jwt.b64url_decode(jwk["y"]), "big")
    key = ec.EllipticCurvePublicNumbers(x, y, ec.SECP256R1()).public_key()
    h, c, s = token.split(".")
    sig = jwt.b64url_decode(s)
    der = encode_dss_signature(int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big"))
    key.verify(der, f"{h}.{c}".encode(), ec.ECDSA(hashes.SHA256()))


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda t: t + "x", "signature|malformed"),
        (lambda t: ".".join([t.split(".")[0], jwt.b64url(b'{"sub":"x"}'), t.split(".")[2]]), "signature"),
        (lambda t: "e30." + t.split(".", 1)[1], "ES256"),
        (lambda t: "a.b", "three"),
    ],
)
def test_tampered_tokens_are_refused(keys: tuple[str, str], mutate, message: str) -> None:  # type: ignore[no-untyped-def]
    priv, pub = keys
    with pytest.raises(AuthenticationError, match=message):
        jwt.verify(mutate(jwt.sign(priv, claims())), [pub])


def test_expiry_audience_issuer_and_foreign_keys(keys: tuple[str, str]) -> None:
    priv, pub = keys
    old = jwt.sign(priv, claims(exp=int(time.time()) - 120))
    with pytest.raises(AuthenticationError, match="expired"):
        jwt.verify(old, [pub])
    token = jwt.sign(priv, claims())
    with pytest.raises(AuthenticationError, match="not 'https://other"):
        jwt.verify(token, [pub], audience="https://other.example.com")
    with pytest.raises(AuthenticationError, match="issued by"):
        jwt.verify(token, [pub], issuer="evil.example")
    other = new_cert_authority("jwt", "evil.example").spec.active_keys[0].jwt_public_key_pem
    with pytest.raises(AuthenticationError, match="does not verify"):
        jwt.verify(token, [other])
