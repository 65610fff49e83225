"""CAs, signing and identity decode: round trips, refusals, and what real OpenSSH/asyncssh see."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import ipaddress
import json
import os
import re
import subprocess
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncssh
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import (
    Criticality,
    ExtensionPolicy,
    PolicyBuilder,
    Store,
    VerificationError,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from wardgate.auth.ca import CA_VALIDITY, CLOCK_SKEW, CertSigner, new_cert_authority
from wardgate.auth.certs import (
    IDENTITY_OID,
    NO_LOGIN_PREFIX,
    der_utf8_string,
    identity_from_json,
    identity_to_json,
    load_x509,
    verify_ssh_host_cert,
    verify_ssh_user_cert,
    verify_tls_identity,
)
from wardgate.auth.identity import Identity, RouteToApp, RouteToDatabase
from wardgate.errors import AuthenticationError, BadParameterError
from wardgate.keys import (
    generate_ssh_key,
    generate_tls_key,
    load_private_key,
    load_public_key_pem,
    load_ssh_public_key,
    load_x509_pem_list,
    private_key_pem,
    public_key_pem,
    ssh_fingerprint,
    ssh_public_key_line,
    tls_ca_pin,
)

SSH_KEYGEN = "/usr/bin/ssh-keygen"
CLUSTER = "example.com"
HOUR = timedelta(hours=1)


@pytest.fixture(scope="module")
def user_ca():
    return new_cert_authority("user", CLUSTER)


@pytest.fixture(scope="module")
def host_ca():
    return new_cert_authority("host", CLUSTER)


@pytest.fixture(scope="module")
def user_signer(user_ca) -> CertSigner:
    return CertSigner(user_ca)


@pytest.fixture(scope="module")
def host_signer(host_ca) -> CertSigner:
    return CertSigner(host_ca)


@pytest.fixture(scope="module")
def ssh_key() -> ed25519.Ed25519PrivateKey:
    return generate_ssh_key()


@pytest.fixture(scope="module")
def tls_key() -> ec.EllipticCurvePrivateKey:
    return generate_tls_key()


def full_identity(expires: datetime | None = None) -> Identity:
    return Identity(
        user="élodie@example.com",
        roles=("access", "dba"),
        traits={"logins": ["elodie", "root"], "db_users": ["app"], "empty": []},
        logins=("elodie", "root"),
        cluster=CLUSTER,
        route_to_cluster="leaf.example.com",
        route_to_db=RouteToDatabase(
            service_name="pg-main", protocol="postgres", username="app", database="shop"
        ),
        route_to_app=RouteToApp(name="grafana", public_addr="grafana.example.com", session_id="s-1"),
        kube_cluster="prod",
        kube_users=("elodie",),
        kube_groups=("system:masters", "dev"),
        mfa_verified="yubikey-5",
        expires=expires,
    )


def der(pem: str) -> bytes:
    return load_x509(pem).public_bytes(serialization.Encoding.DER)


def craft_cert(ca_resource, *, ext: bytes | None, not_after: datetime | None = None) -> x509.Certificate:
    """A certificate signed by the real CA key but with a hand-made identity extension."""
    kp = ca_resource.spec.active_keys[0]
    ca_cert, ca_key = load_x509(kp.tls_cert_pem), load_private_key(kp.tls_private_key_pem)
    now = datetime.now(UTC)
    b = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mallory")]))
        .issuer_name(ca_cert.subject)
        .public_key(generate_tls_key().public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(not_after or now + HOUR)
    )
    if ext is not None:
        b = b.add_extension(x509.UnrecognizedExtension(IDENTITY_OID, ext), critical=False)
    return b.sign(ca_key, hashes.SHA256())


def keygen_l(tmp_path: Path, line: str) -> str:
    f = tmp_path / "cert.pub"
    f.write_text(line + "\n")
    out = subprocess.run(
        [SSH_KEYGEN, "-L", "-f", str(f)], capture_output=True, text=True, check=True, timeout=10
    )
    return out.stdout


def flip_ssh_blob(line: str, needle: bytes) -> str:
    kind, b64 = line.split()[:2]
    blob = bytearray(base64.b64decode(b64))
    i = blob.index(needle)
    blob[i] ^= 0x01
    return f"{kind} {base64.b64encode(bytes(blob)).decode()}"


# ---------------------------------------------------------------- keys


def test_key_helpers_round_trip(tmp_path, ssh_key, tls_key):
    assert isinstance(tls_key.curve, ec.SECP256R1)
    assert load_private_key(private_key_pem(ssh_key)).public_key() == ssh_key.public_key()
    assert load_private_key(private_key_pem(tls_key)).public_key() == tls_key.public_key()
    openssh_pem = ssh_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    assert load_private_key(openssh_pem).public_key() == ssh_key.public_key()
    assert load_public_key_pem(public_key_pem(tls_key)) == tls_key.public_key()

    line = ssh_public_key_line(ssh_key, comment="alice@laptop")
    assert line.startswith("ssh-ed25519 AAAA")
    assert line.endswith(" alice@laptop")
    assert load_ssh_public_key(line) == ssh_key.public_key()

    pub = tmp_path / "k.pub"
    pub.write_text(line + "\n")
    out = subprocess.run([SSH_KEYGEN, "-l", "-f", str(pub)], capture_output=True, text=True, check=True)
    assert out.stdout.split()[1] == ssh_fingerprint(ssh_key.public_key()) == ssh_fingerprint(line)


@pytest.mark.parametrize(
    "bad", ["", "garbage", "ssh-ed25519 !!!notbase64", "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5"]
)
def test_key_loaders_refuse_garbage(bad):
    with pytest.raises(BadParameterError, match="OpenSSH public key"):
        load_ssh_public_key(bad)
    with pytest.raises(BadParameterError, match="private key"):
        load_private_key(bad or "-----BEGIN PRIVATE KEY-----\nxx\n-----END PRIVATE KEY-----\n")
    with pytest.raises(BadParameterError, match="PEM public key"):
        load_public_key_pem(bad)
    with pytest.raises(BadParameterError, match=r"X\.509"):
        load_x509(bad.encode() or b"\x30\x03\x02\x01")


def test_ssh_public_key_loader_refuses_a_certificate(user_signer, ssh_key):
    cert = user_signer.sign_ssh_user_cert(ssh_key.public_key(), Identity(user="a", logins=("a",)), ttl=HOUR)
    with pytest.raises(BadParameterError, match="got an SSH certificate"):
        load_ssh_public_key(cert)


def test_tls_ca_pin_matches_openssl(tmp_path, user_signer):
    ca_pem = tmp_path / "ca.pem"
    ca_pem.write_bytes(user_signer.tls_ca_cert.public_bytes(serialization.Encoding.PEM))
    pub = subprocess.run(
        ["openssl", "x509", "-pubkey", "-noout", "-in", str(ca_pem)], capture_output=True, check=True
    )
    spki = subprocess.run(
        ["openssl", "pkey", "-pubin", "-outform", "DER"], input=pub.stdout, capture_output=True, check=True
    )
    assert tls_ca_pin(user_signer.tls_ca_cert) == "sha256:" + hashlib.sha256(spki.stdout).hexdigest()


def test_load_x509_pem_list(user_signer, host_signer):
    pems = [
        s.tls_ca_cert.public_bytes(serialization.Encoding.PEM).decode() for s in (user_signer, host_signer)
    ]
    assert load_x509_pem_list("".join(pems)) == [user_signer.tls_ca_cert, host_signer.tls_ca_cert]
    assert load_x509_pem_list("") == []
    with pytest.raises(BadParameterError):
        load_x509_pem_list("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")


# ---------------------------------------------------------------- CAs


def test_new_cert_authorities_have_the_right_material():
    now = datetime(2030, 5, 1, 12, 0, tzinfo=UTC)
    for ca_type in ("user", "host"):
        ca = new_cert_authority(ca_type, CLUSTER, now=now)
        assert ca.kind == "cert_authority"
        assert ca.spec.type == ca_type
        assert ca.spec.cluster_name == CLUSTER
        kp = ca.spec.active_keys[0]
        assert kp.ssh_public_key.startswith("ssh-ed25519 ")
        assert isinstance(load_private_key(kp.ssh_private_key_pem), ed25519.Ed25519PrivateKey)
        assert not kp.jwt_private_key_pem
        cert = load_x509(kp.tls_cert_pem)
        assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == CLUSTER
        assert (
            cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value
            == f"Wardgate {ca_type} CA"
        )
        assert cert.issuer == cert.subject
        cert.verify_directly_issued_by(cert)
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
        assert bc.critical
        assert bc.value.ca
        assert bc.value.path_length == 0
        ku = cert.extensions.get_extension_for_class(x509.KeyUsage)
        assert ku.critical
        assert ku.value.key_cert_sign
        assert ku.value.crl_sign
        assert not ku.value.digital_signature
        assert cert.not_valid_after_utc - cert.not_valid_before_utc == CA_VALIDITY + CLOCK_SKEW
        assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
        stripped = ca.without_secrets().spec.active_keys[0]
        assert stripped.tls_cert_pem
        assert not stripped.tls_private_key_pem
        assert not stripped.ssh_private_key_pem

    db = new_cert_authority("db", CLUSTER).spec.active_keys[0]
    assert db.tls_cert_pem
    assert db.tls_private_key_pem
    assert not db.ssh_public_key
    jwt = new_cert_authority("jwt", CLUSTER).spec.active_keys[0]
    assert jwt.jwt_private_key_pem
    assert jwt.jwt_public_key_pem
    assert not jwt.tls_cert_pem
    assert not jwt.ssh_public_key
    assert load_private_key(jwt.jwt_private_key_pem).public_key() == load_public_key_pem(
        jwt.jwt_public_key_pem
    )


def test_ca_and_signer_refusals(user_ca):
    with pytest.raises(BadParameterError, match="unknown CA type"):
        new_cert_authority("root", CLUSTER)
    with pytest.raises(BadParameterError, match="cluster name"):
        new_cert_authority("user", "x" * 65)
    with pytest.raises(BadParameterError, match=r"no X\.509 private key"):
        CertSigner(user_ca.without_secrets())
    with pytest.raises(BadParameterError, match="signs tokens"):
        CertSigner(new_cert_authority("jwt", CLUSTER))
    other = new_cert_authority("user", CLUSTER)
    mixed = user_ca.model_copy(deep=True)
    mixed.spec.active_keys[0].tls_private_key_pem = other.spec.active_keys[0].tls_private_key_pem
    with pytest.raises(BadParameterError, match="does not match"):
        CertSigner(mixed)
    empty = user_ca.model_copy(deep=True)
    empty.spec.active_keys = []
    with pytest.raises(BadParameterError, match="no active keys"):
        CertSigner(empty)


def test_signer_uses_active_keys_0(user_ca, ssh_key, tls_key):
    rotated = user_ca.model_copy(deep=True)
    new = new_cert_authority("user", CLUSTER).spec.active_keys[0]
    rotated.spec.additional_trusted_keys = [rotated.spec.active_keys[0]]
    rotated.spec.active_keys = [new]
    signer = CertSigner(rotated)
    ident = Identity(user="alice", logins=("alice",))
    ssh_cert = signer.sign_ssh_user_cert(ssh_key.public_key(), ident, ttl=HOUR)
    assert verify_ssh_user_cert(ssh_cert, [new.ssh_public_key]).user == "alice"
    with pytest.raises(AuthenticationError, match="not signed by a trusted"):
        verify_ssh_user_cert(ssh_cert, [user_ca.spec.active_keys[0].ssh_public_key])
    tls = signer.sign_tls_cert(tls_key.public_key(), ident, ttl=HOUR)
    assert verify_tls_identity(tls, [load_x509(new.tls_cert_pem)]).user == "alice"
    with pytest.raises(AuthenticationError, match="not signed by a trusted"):
        verify_tls_identity(tls, [load_x509(user_ca.spec.active_keys[0].tls_cert_pem)])


# ---------------------------------------------------------------- identity JSON


def test_identity_json_is_canonical():
    exp = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
    ident = full_identity(exp)
    data = identity_to_json(ident)
    assert data == identity_to_json(replace(ident, traits=dict(reversed(list(ident.traits.items())))))
    assert b": " not in data
    assert b", " not in data
    assert b'"expires":"2030-01-02T03:04:05Z"' in data
    assert "élodie".encode() in data
    orders: list[list[str]] = []
    json.loads(data, object_pairs_hook=lambda pairs: orders.append([k for k, _ in pairs]) or dict(pairs))
    assert len(orders) == 4  # route_to_db, route_to_app, traits, the identity
    assert all(keys == sorted(keys) for keys in orders)
    assert identity_from_json(data) == ident
    bare = identity_to_json(Identity(user="bob"))
    assert b"route_to_db" not in bare
    assert b"expires" not in bare
    assert identity_from_json(bare) == Identity(user="bob")


def test_identity_json_ignores_unknown_keys_and_refuses_bad_types():
    assert identity_from_json(b'{"user":"bob","future_field":{"x":1}}') == Identity(user="bob")
    bad = [
        b"not json",
        b"[1,2]",
        b'{"roles":["a"]}',
        b'{"user":""}',
        b'{"user":5}',
        b'{"user":"bob","roles":"admin"}',
        b'{"user":"bob","roles":[1]}',
        b'{"user":"bob","traits":{"logins":"root"}}',
        b'{"user":"bob","traits":[]}',
        b'{"user":"bob","expires":"tomorrow"}',
        b'{"user":"bob","expires":"2030-01-01T00:00:00"}',
        b'{"user":"bob","route_to_db":"pg"}',
        b'{"user":"bob","route_to_db":{"service_name":7}}',
        b'{"user":"bob","user":"admin"}',
        b"\xff\xfe",
        b"[" * 100_000,
    ]
    for data in bad:
        with pytest.raises(AuthenticationError, match="malformed identity"):
            identity_from_json(data)


texts = st.text(max_size=20)


@settings(max_examples=60, deadline=None)
@given(
    user=st.text(min_size=1, max_size=30),
    roles=st.lists(texts, max_size=4).map(tuple),
    traits=st.dictionaries(texts, st.lists(texts, max_size=3), max_size=3),
    mfa=texts,
    ts=st.integers(min_value=0, max_value=4_000_000_000),
    us=st.integers(min_value=0, max_value=999_999),
)
def test_identity_json_round_trips(user, roles, traits, mfa, ts, us):
    exp = datetime.fromtimestamp(ts, UTC).replace(microsecond=us)
    ident = Identity(
        user=user,
        roles=roles,
        traits=traits,
        mfa_verified=mfa,
        expires=exp,
        route_to_app=RouteToApp(name=mfa),
    )
    assert identity_from_json(identity_to_json(ident)) == ident


# ---------------------------------------------------------------- TLS


def test_tls_identity_round_trip_all_fields(user_signer, tls_key):
    now = datetime.now(UTC).replace(microsecond=0)
    ident = full_identity(now + timedelta(hours=2, microseconds=5))
    pem = user_signer.sign_tls_cert(public_key_pem(tls_key), ident, ttl=timedelta(hours=3), now=now)
    cert = load_x509(pem)
    got = verify_tls_identity(pem, [user_signer.tls_ca_cert], now=now)
    assert got == replace(ident, expires=now + timedelta(hours=2))
    assert got.expires == cert.not_valid_after_utc
    assert verify_tls_identity(der(pem), [user_signer.tls_ca_cert], now=now) == got
    assert verify_tls_identity(cert, [user_signer.tls_ca_cert], now=now) == got

    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "élodie@example.com"
    assert [a.value for a in cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)] == [
        "access",
        "dba",
    ]
    assert cert.issuer == user_signer.tls_ca_cert.subject
    assert cert.not_valid_before_utc == now - CLOCK_SKEW
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    ext = cert.extensions.get_extension_for_oid(IDENTITY_OID)
    assert not ext.critical
    assert ext.value.value == der_utf8_string(identity_to_json(got))
    with pytest.raises(x509.ExtensionNotFound):
        cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ca_ski = user_signer.tls_ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ca_ski.digest

    # An independent RFC 5280 path validator (cryptography's, web-PKI profile) accepts the chain.
    # User certs name nobody in a SAN (the identity extension does), so that one rule is relaxed.
    ee = ExtensionPolicy.webpki_defaults_ee().may_be_present(
        x509.SubjectAlternativeName, Criticality.AGNOSTIC, None
    )
    verifier = (
        PolicyBuilder()
        .store(Store([user_signer.tls_ca_cert]))
        .time(now)
        .extension_policies(ca_policy=ExtensionPolicy.webpki_defaults_ca(), ee_policy=ee)
        .build_client_verifier()
    )
    assert verifier.verify(cert, []).chain == [cert, user_signer.tls_ca_cert]
    other = CertSigner(new_cert_authority("user", CLUSTER)).tls_ca_cert
    with pytest.raises(VerificationError):
        PolicyBuilder().store(Store([other])).time(now).extension_policies(
            ca_policy=ExtensionPolicy.webpki_defaults_ca(), ee_policy=ee
        ).build_client_verifier().verify(cert, [])


def test_tls_service_cert_is_a_server_cert_too(host_signer, tls_key):
    now = datetime.now(UTC)
    ident = Identity(
        user="h-123", cluster=CLUSTER, system_role="node", host_id="h-123", principals=("h-123", "node1")
    )
    pem = host_signer.sign_tls_cert(
        tls_key.public_key(),
        ident,
        ttl=HOUR,
        now=now,
        dns_names=["node1", "h-123.example.com"],
        ip_addresses=["127.0.0.1", "::1"],
    )
    cert = load_x509(pem)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "h-123"
    assert [a.value for a in cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)] == ["node"]
    eku = set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    assert eku == {ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH}
    got = verify_tls_identity(pem, [host_signer.tls_ca_cert], now=now)
    assert got.system_role == "node"
    assert got.host_id == "h-123"
    assert got.principals == ("h-123", "node1")
    store = Store([host_signer.tls_ca_cert])
    PolicyBuilder().store(store).time(now).build_server_verifier(x509.DNSName("node1")).verify(cert, [])
    PolicyBuilder().store(store).time(now).build_server_verifier(
        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))
    ).verify(cert, [])
    with pytest.raises(VerificationError):
        PolicyBuilder().store(store).time(now).build_server_verifier(x509.DNSName("other")).verify(cert, [])
    with pytest.raises(BadParameterError, match="bad certificate name"):
        host_signer.sign_tls_cert(tls_key.public_key(), ident, ttl=HOUR, ip_addresses=["not-an-ip"])


def test_tls_ttl_never_outlives_the_ca(user_signer, tls_key):
    ca_end = user_signer.tls_ca_cert.not_valid_after_utc
    now = ca_end - HOUR
    pem = user_signer.sign_tls_cert(
        tls_key.public_key(), Identity(user="a"), ttl=timedelta(hours=12), now=now
    )
    cert = load_x509(pem)
    assert cert.not_valid_after_utc == ca_end
    assert verify_tls_identity(pem, [user_signer.tls_ca_cert], now=now).expires == ca_end
    with pytest.raises(BadParameterError, match="already expired"):
        user_signer.sign_tls_cert(tls_key.public_key(), Identity(user="a"), ttl=HOUR, now=ca_end + HOUR)
    ca_start = user_signer.tls_ca_cert.not_valid_before_utc
    with pytest.raises(BadParameterError, match="not valid yet"):
        user_signer.sign_tls_cert(tls_key.public_key(), Identity(user="a"), ttl=HOUR, now=ca_start - HOUR)
    with pytest.raises(BadParameterError, match="TTL must be positive"):
        user_signer.sign_tls_cert(tls_key.public_key(), Identity(user="a"), ttl=timedelta(0))
    # The identity's own expiry caps the certificate too.
    start = datetime.now(UTC).replace(microsecond=0)
    short = user_signer.sign_tls_cert(
        tls_key.public_key(), Identity(user="a", expires=start + timedelta(minutes=5)), ttl=HOUR, now=start
    )
    assert load_x509(short).not_valid_after_utc == start + timedelta(minutes=5)


def test_tls_validity_window_is_enforced(user_signer, tls_key):
    now = datetime.now(UTC).replace(microsecond=0)
    pem = user_signer.sign_tls_cert(tls_key.public_key(), Identity(user="a"), ttl=HOUR, now=now)
    trusted = [user_signer.tls_ca_cert]
    assert verify_tls_identity(pem, trusted, now=now + HOUR).user == "a"  # notAfter is inclusive
    end = (now + HOUR).strftime("%Y-%m-%dT%H:%M:%SZ")
    with pytest.raises(AuthenticationError, match=f"certificate expired at {end}"):
        verify_tls_identity(pem, trusted, now=now + HOUR + timedelta(seconds=1))
    start = (now - CLOCK_SKEW).strftime("%Y-%m-%dT%H:%M:%SZ")
    with pytest.raises(AuthenticationError, match=f"not valid before {start}"):
        verify_tls_identity(pem, trusted, now=now - timedelta(minutes=2))


def test_tls_tampering_and_foreign_cas_are_refused(user_signer, host_signer, tls_key):
    trusted = [user_signer.tls_ca_cert]
    pem = user_signer.sign_tls_cert(tls_key.public_key(), Identity(user="alice", roles=("access",)), ttl=HOUR)
    raw = der(pem)

    forged = raw.replace(b'"user":"alice"', b'"user":"admin"')
    assert forged != raw
    with pytest.raises(AuthenticationError, match="not signed by a trusted Wardgate CA"):
        verify_tls_identity(forged, trusted)

    bad_sig = bytearray(raw)
    bad_sig[-3] ^= 0x40
    with pytest.raises(AuthenticationError, match="not signed by a trusted Wardgate CA"):
        verify_tls_identity(bytes(bad_sig), trusted)

    impostor = CertSigner(new_cert_authority("user", CLUSTER))  # same subject name, different key
    assert impostor.tls_ca_cert.subject == user_signer.tls_ca_cert.subject
    fake = impostor.sign_tls_cert(tls_key.public_key(), Identity(user="alice"), ttl=HOUR)
    with pytest.raises(AuthenticationError, match="not signed by a trusted Wardgate CA"):
        verify_tls_identity(fake, trusted)
    assert verify_tls_identity(fake, [*trusted, impostor.tls_ca_cert]).user == "alice"

    other_cluster = CertSigner(new_cert_authority("user", "evil.example"))
    with pytest.raises(AuthenticationError, match="not signed by a trusted Wardgate CA"):
        verify_tls_identity(
            other_cluster.sign_tls_cert(tls_key.public_key(), Identity(user="a"), ttl=HOUR), trusted
        )
    with pytest.raises(AuthenticationError, match="not signed by a trusted Wardgate CA"):
        verify_tls_identity(
            host_signer.sign_tls_cert(tls_key.public_key(), Identity(user="a"), ttl=HOUR), trusted
        )
    with pytest.raises(AuthenticationError, match="not signed by a trusted Wardgate CA"):
        verify_tls_identity(pem, [])
    with pytest.raises(AuthenticationError, match="CA certificate"):
        verify_tls_identity(user_signer.tls_ca_cert, trusted)


def test_tls_certs_without_a_valid_identity_are_refused(user_ca, user_signer):
    trusted = [user_signer.tls_ca_cert]
    with pytest.raises(AuthenticationError, match="carries no Wardgate identity"):
        verify_tls_identity(craft_cert(user_ca, ext=None), trusted)
    with pytest.raises(AuthenticationError, match="malformed identity"):
        verify_tls_identity(craft_cert(user_ca, ext=der_utf8_string(b"{not json")), trusted)
    with pytest.raises(AuthenticationError, match="malformed identity"):
        verify_tls_identity(craft_cert(user_ca, ext=b'{"user":"raw-json-not-der"}'), trusted)
    with pytest.raises(AuthenticationError, match="malformed identity"):
        verify_tls_identity(craft_cert(user_ca, ext=der_utf8_string(b'{"user":"a"}') + b"x"), trusted)
    late = identity_to_json(Identity(user="a", expires=datetime.now(UTC) + timedelta(days=30)))
    with pytest.raises(AuthenticationError, match="after its certificate"):
        verify_tls_identity(craft_cert(user_ca, ext=der_utf8_string(late)), trusted)
    long_json = identity_to_json(Identity(user="a", roles=tuple(f"role-{i}" for i in range(50))))
    assert len(long_json) > 256  # exercises the long DER length form
    got = verify_tls_identity(craft_cert(user_ca, ext=der_utf8_string(long_json)), trusted)
    assert len(got.roles) == 50
    assert got.expires is not None


@pytest.mark.parametrize(
    "garbage",
    [
        b"",
        b"\x00" * 10,
        b"-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----\n",
        b"\x30\x82\xff\xff",
        os.urandom(300),
        "not a cert",
        12345,
    ],
)
def test_tls_garbage_is_refused_cleanly(user_signer, garbage):
    with pytest.raises(AuthenticationError, match="malformed certificate"):
        verify_tls_identity(garbage, [user_signer.tls_ca_cert])  # type: ignore[arg-type]
    if isinstance(garbage, bytes | str):
        with pytest.raises(BadParameterError):
            load_x509(garbage)


# ---------------------------------------------------------------- SSH user certs


def test_ssh_user_cert_round_trip(user_signer, ssh_key):
    now = datetime.now(UTC).replace(microsecond=0)
    ident = replace(
        full_identity(), route_to_db=None, route_to_app=None, kube_cluster="", kube_users=(), kube_groups=()
    )
    line = user_signer.sign_ssh_user_cert(ssh_public_key_line(ssh_key), ident, ttl=HOUR, now=now)
    assert line.startswith("ssh-ed25519-cert-v01@openssh.com AAAA")
    assert len(line.split()) == 2
    ascii_line = user_signer.sign_ssh_user_cert(ssh_key.public_key(), Identity(user="bob"), ttl=HOUR)
    assert ascii_line.endswith(" bob")
    got = verify_ssh_user_cert(line, [user_signer.ssh_public_key], now=now)
    assert got == replace(ident, expires=now + HOUR)

    c = asyncssh.import_certificate(line)  # also checks the signature
    assert c.principals == ["elodie", "root"]
    assert c.options == {"permit-pty": True}
    assert verify_ssh_user_cert(c, [user_signer.ssh_public_key], now=now) == got
    assert verify_ssh_user_cert(c.public_data, [ssh_key_ca(user_signer)], now=now) == got  # wire blob


def ssh_key_ca(signer: CertSigner) -> ed25519.Ed25519PublicKey:
    return load_ssh_public_key(signer.ssh_public_key)  # type: ignore[return-value]


def test_ssh_user_cert_permissions_and_ssh_keygen_view(tmp_path, user_signer, ssh_key):
    now = datetime(2031, 3, 4, 5, 6, 7, tzinfo=UTC)
    ident = Identity(
        user="alice",
        roles=("access",),
        traits={"logins": ["alice"]},
        logins=("alice", "ubuntu"),
        route_to_cluster=CLUSTER,
        mfa_verified="dev-1",
    )
    line = user_signer.sign_ssh_user_cert(
        ssh_key.public_key(),
        ident,
        ttl=timedelta(hours=8),
        now=now,
        permit_port_forwarding=True,
        permit_agent_forwarding=True,
    )
    out = keygen_l(tmp_path, line)
    assert "Type: ssh-ed25519-cert-v01@openssh.com user certificate" in out
    assert 'Key ID: "alice"' in out
    assert re.search(r"Principals:\s+alice\s+ubuntu\s+Critical Options: \(none\)", out)
    start, end = now - CLOCK_SKEW, now + timedelta(hours=8)
    local = lambda d: datetime.fromtimestamp(d.timestamp()).strftime("%Y-%m-%dT%H:%M:%S")  # noqa: E731
    assert f"Valid: from {local(start)} to {local(end)}" in out
    ext_block = out.split("Extensions:")[1]
    for name in (
        "permit-pty",
        "permit-port-forwarding",
        "permit-agent-forwarding",
        "user@wardgate",
        "roles@wardgate",
        "traits@wardgate",
        "route-to-cluster@wardgate",
        "mfa-verified@wardgate",
    ):
        assert name in ext_block
    assert "permit-X11-forwarding" not in ext_block
    assert not re.search(r"^\s+cluster@wardgate", ext_block, re.M)  # empty cluster is left out
    # OpenSSH convention: a non-empty value is an SSH string inside the data ("alice" = 00000005 616c696365).
    assert "user@wardgate UNKNOWN OPTION: 00000005616c696365 (len 9)" in ext_block

    c = asyncssh.import_certificate(line)
    assert c.options == {"permit-pty": True, "permit-port-forwarding": True, "permit-agent-forwarding": True}
    got = verify_ssh_user_cert(c, [user_signer.ssh_public_key], now=now)
    assert got.mfa_verified == "dev-1"
    assert got.route_to_cluster == CLUSTER
    assert got.roles == ("access",)


def test_ssh_user_cert_without_logins_is_valid_for_no_login(tmp_path, user_signer, ssh_key):
    line = user_signer.sign_ssh_user_cert(
        ssh_key.public_key(), Identity(user="bot"), ttl=HOUR, permit_pty=False
    )
    principals = asyncssh.import_certificate(line).principals
    assert len(principals) == 1
    assert principals[0].startswith(NO_LOGIN_PREFIX)
    assert verify_ssh_user_cert(line, [user_signer.ssh_public_key]).logins == ()
    assert "Extensions: \n\t\troles@wardgate" in keygen_l(tmp_path, line).replace("        ", "\t")


def test_ssh_user_cert_refusals(user_signer, host_signer, ssh_key):
    now = datetime.now(UTC).replace(microsecond=0)
    ident = Identity(user="alice", logins=("alice",))
    trusted = [user_signer.ssh_public_key]
    line = user_signer.sign_ssh_user_cert(ssh_key.public_key(), ident, ttl=HOUR, now=now)

    end = (now + HOUR).strftime("%Y-%m-%dT%H:%M:%SZ")
    with pytest.raises(AuthenticationError, match=f"certificate expired at {end}"):
        verify_ssh_user_cert(line, trusted, now=now + HOUR)
    with pytest.raises(AuthenticationError, match="not valid before"):
        verify_ssh_user_cert(line, trusted, now=now - timedelta(minutes=2))
    assert verify_ssh_user_cert(line, trusted, now=now - timedelta(seconds=59)).user == "alice"

    with pytest.raises(AuthenticationError, match="not signed by a trusted Wardgate CA"):
        verify_ssh_user_cert(line, [host_signer.ssh_public_key])
    impostor = CertSigner(new_cert_authority("user", CLUSTER))
    with pytest.raises(AuthenticationError, match="not signed by a trusted Wardgate CA"):
        verify_ssh_user_cert(impostor.sign_ssh_user_cert(ssh_key.public_key(), ident, ttl=HOUR), trusted)

    tampered = flip_ssh_blob(line, b"alice")
    with pytest.raises(AuthenticationError, match="not signed by a trusted Wardgate CA"):
        verify_ssh_user_cert(tampered, trusted)
    with pytest.raises(asyncssh.KeyImportError):
        asyncssh.import_certificate(tampered)

    host_line = host_signer.sign_ssh_host_cert(
        ssh_key.public_key(), host_id="h", node_name="n", cluster=CLUSTER, system_role="node", ttl=HOUR
    )
    with pytest.raises(AuthenticationError, match="host certificate, expected a user"):
        verify_ssh_user_cert(host_line, [host_signer.ssh_public_key])
    with pytest.raises(BadParameterError, match="signed by the user CA"):
        host_signer.sign_ssh_user_cert(ssh_key.public_key(), ident, ttl=HOUR)
    with pytest.raises(BadParameterError, match="already expired"):
        user_signer.sign_ssh_user_cert(ssh_key.public_key(), replace(ident, expires=now), ttl=HOUR, now=now)

    for garbage in ("", "nonsense", ssh_public_key_line(ssh_key), b"\x00\x00\x00\x05abcde", line[:60], 42):
        with pytest.raises(AuthenticationError, match="malformed certificate"):
            verify_ssh_user_cert(garbage, trusted)


def test_ssh_user_cert_from_another_issuer_without_identity_is_refused(user_signer, user_ca, ssh_key):
    from cryptography.hazmat.primitives.serialization import ssh as cssh

    ca_key = load_private_key(user_ca.spec.active_keys[0].ssh_private_key_pem)
    now = int(datetime.now(UTC).timestamp())
    base = (
        cssh.SSHCertificateBuilder()
        .public_key(ssh_key.public_key())
        .type(cssh.SSHCertificateType.USER)
        .valid_principals([b"root"])
        .valid_after(now - 60)
        .valid_before(now + 600)
    )
    plain = base.sign(ca_key).public_bytes().decode()  # type: ignore[arg-type]
    with pytest.raises(AuthenticationError, match="carries no Wardgate identity"):
        verify_ssh_user_cert(plain, [user_signer.ssh_public_key])
    forced = base.add_critical_option(b"force-command", b"/bin/true").add_extension(b"user@wardgate", b"a")
    with pytest.raises(
        AuthenticationError, match="critical options Wardgate does not support: force-command"
    ):
        verify_ssh_user_cert(forced.sign(ca_key).public_bytes().decode(), [user_signer.ssh_public_key])  # type: ignore[arg-type]
    bad_roles = base.add_extension(b"user@wardgate", b"a").add_extension(b"roles@wardgate", b'"admin"')
    with pytest.raises(AuthenticationError, match="malformed identity"):
        verify_ssh_user_cert(bad_roles.sign(ca_key).public_bytes().decode(), [user_signer.ssh_public_key])  # type: ignore[arg-type]


# ---------------------------------------------------------------- SSH host certs


def test_ssh_host_cert_round_trip(tmp_path, host_signer, user_signer, ssh_key):
    now = datetime.now(UTC).replace(microsecond=0)
    line = host_signer.sign_ssh_host_cert(
        ssh_public_key_line(ssh_key),
        host_id="5f1c",
        node_name="db-1",
        cluster=CLUSTER,
        system_role="db",
        extra_principals=["10.0.0.5", "db-1"],
        ttl=timedelta(days=30),
        now=now,
    )
    got = verify_ssh_host_cert(line, [host_signer.ssh_public_key], now=now)
    assert got == Identity(
        user="5f1c",
        cluster=CLUSTER,
        system_role="db",
        host_id="5f1c",
        principals=("5f1c", "5f1c.example.com", "db-1", "10.0.0.5"),
        expires=now + timedelta(days=30),
    )
    c = asyncssh.import_certificate(line)
    assert c.principals == ["5f1c", "5f1c.example.com", "db-1", "10.0.0.5"]
    assert verify_ssh_host_cert(c, [host_signer.ssh_public_key], now=now) == got

    out = keygen_l(tmp_path, line)
    assert "Type: ssh-ed25519-cert-v01@openssh.com host certificate" in out
    assert 'Key ID: "5f1c.example.com"' in out
    assert "Critical Options: (none)" in out
    assert "system-role@wardgate" in out

    with pytest.raises(AuthenticationError, match="user certificate, expected a host"):
        verify_ssh_host_cert(
            user_signer.sign_ssh_user_cert(ssh_key.public_key(), Identity(user="a"), ttl=HOUR),
            [user_signer.ssh_public_key],
        )
    with pytest.raises(AuthenticationError, match="not signed by a trusted"):
        verify_ssh_host_cert(line, [user_signer.ssh_public_key])
    with pytest.raises(AuthenticationError, match="expired at"):
        verify_ssh_host_cert(line, [host_signer.ssh_public_key], now=now + timedelta(days=31))
    with pytest.raises(BadParameterError, match="unknown system role"):
        host_signer.sign_ssh_host_cert(
            ssh_key.public_key(), host_id="h", node_name="n", cluster=CLUSTER, system_role="root", ttl=HOUR
        )
    with pytest.raises(BadParameterError, match="signed by the host CA"):
        user_signer.sign_ssh_host_cert(
            ssh_key.public_key(), host_id="h", node_name="n", cluster=CLUSTER, system_role="node", ttl=HOUR
        )


async def test_openssh_client_accepts_host_and_user_certs(tmp_path, host_signer, user_signer):
    """Real `ssh` against an asyncssh server: host cert via @cert-authority, user cert via the user CA."""
    host_key, user_key = generate_ssh_key(), generate_ssh_key()
    host_cert = host_signer.sign_ssh_host_cert(
        host_key.public_key(),
        host_id="h1",
        node_name="node1",
        cluster=CLUSTER,
        system_role="node",
        extra_principals=["127.0.0.1"],
        ttl=HOUR,
    )
    user_cert = user_signer.sign_ssh_user_cert(
        user_key.public_key(), Identity(user="alice", roles=("access",), logins=("alice",)), ttl=HOUR
    )
    user_ca_key = asyncssh.import_public_key(user_signer.ssh_public_key)

    class Server(asyncssh.SSHServer):
        def begin_auth(self, username: str) -> bool:
            return True

        def public_key_auth_supported(self) -> bool:
            return True

        def validate_ca_key(self, username: str, key: asyncssh.SSHKey) -> bool:
            return key == user_ca_key

    server = await asyncssh.create_server(
        Server,
        "127.0.0.1",
        0,
        server_host_keys=[
            (asyncssh.import_private_key(private_key_pem(host_key)), asyncssh.import_certificate(host_cert))
        ],
        process_factory=lambda proc: proc.exit(0),
        password_auth=False,
        kbdint_auth=False,
    )
    port = server.sockets[0].getsockname()[1]
    key_file = tmp_path / "id"
    key_file.write_bytes(
        user_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        )
    )
    key_file.chmod(0o600)
    (tmp_path / "id-cert.pub").write_text(user_cert + "\n")

    async def ssh(ca_line: str) -> tuple[int, str]:
        known = tmp_path / "known_hosts"
        known.write_text(f"@cert-authority * {ca_line}\n")
        proc = await asyncio.create_subprocess_exec(
            "ssh",
            "-F",
            "/dev/null",
            "-p",
            str(port),
            "-i",
            str(key_file),
            "-o",
            f"CertificateFile={tmp_path / 'id-cert.pub'}",
            "-o",
            f"UserKnownHostsFile={known}",
            "-o",
            "GlobalKnownHostsFile=/dev/null",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            "BatchMode=yes",
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "ConnectTimeout=5",
            "alice@127.0.0.1",
            "true",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        _, err = await asyncio.wait_for(proc.communicate(), 10)
        return proc.returncode or 0, err.decode()

    try:
        rc, err = await ssh(host_signer.ssh_public_key)
        assert rc == 0, err
        rc, err = await ssh(user_signer.ssh_public_key)  # wrong CA for hosts: must not connect
        assert rc != 0
        assert "Host key verification failed" in err
    finally:
        server.close()
        await server.wait_closed()
