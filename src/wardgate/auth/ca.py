"""Certificate authorities: creating them, and signing SSH and X.509 certificates with them.

A cluster has four CAs: `user` (signs people's SSH and TLS certs), `host` (signs services' SSH
host certs and TLS certs), `db` (signs certificates databases present or trust) and `jwt`
(signs app-access tokens; no certificates). Signing always uses `spec.active_keys[0]`;
`additional_trusted_keys` are only trusted, which is how rotation works. Formats of what goes
into the certificates are documented in `auth/certs.py`, which also reads them back.
"""

from __future__ import annotations

import ipaddress
import json
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import get_args

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from cryptography.hazmat.primitives.serialization import ssh
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from wardgate.api.resources import SYSTEM_ROLES, CAKeyPair, CAType, CertAuthority, CertAuthoritySpec, Metadata
from wardgate.auth.certs import (
    EXT_CLUSTER,
    EXT_HOST_ID,
    EXT_MFA_VERIFIED,
    EXT_ROLES,
    EXT_ROUTE_TO_CLUSTER,
    EXT_SYSTEM_ROLE,
    EXT_TRAITS,
    EXT_USER,
    IDENTITY_OID,
    NO_LOGIN_PREFIX,
    der_utf8_string,
    identity_to_json,
)
from wardgate.auth.identity import Identity
from wardgate.errors import BadParameterError
from wardgate.keys import (
    SSHPrivateKey,
    SSHPublicKey,
    generate_ssh_key,
    generate_tls_key,
    load_private_key,
    load_public_key_pem,
    load_ssh_public_key,
    load_x509,
    private_key_pem,
    public_key_pem,
    ssh_public_key_line,
)

CA_TYPES: tuple[str, ...] = get_args(CAType)
CA_VALIDITY = timedelta(days=3650)
CLOCK_SKEW = timedelta(seconds=60)
"""Certificates start this far in the past so a peer whose clock lags a little accepts them."""

_CN_MAX = 64  # RFC 5280 upper bound; cryptography refuses longer common names


def _now(now: datetime | None) -> datetime:
    if now is None:
        return datetime.now(UTC)
    return now.replace(tzinfo=UTC) if now.tzinfo is None else now.astimezone(UTC)


def _ca_name(ca_type: str, cluster_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, cluster_name),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, f"Wardgate {ca_type} CA"),
        ]
    )


def _self_signed_ca(
    key: ec.EllipticCurvePrivateKey, ca_type: str, cluster_name: str, now: datetime
) -> x509.Certificate:
    name = _ca_name(ca_type, cluster_name)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + CA_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .sign(key, hashes.SHA256())
    )


def new_cert_authority(ca_type: str, cluster_name: str, *, now: datetime | None = None) -> CertAuthority:
    """Generate a CA of `ca_type` for `cluster_name`, private keys included (store it, never show it).

    user/host: an Ed25519 SSH key and a self-signed P-256 X.509 CA; db: the X.509 CA only;
    jwt: a P-256 key pair. The X.509 CA is valid for ten years.
    """
    if ca_type not in CA_TYPES:
        raise BadParameterError(f"unknown CA type {ca_type!r}: expected one of {', '.join(CA_TYPES)}")
    if not 1 <= len(cluster_name) <= _CN_MAX or cluster_name.strip() != cluster_name:
        raise BadParameterError(
            f"cluster name {cluster_name!r} must be 1-{_CN_MAX} characters without surrounding spaces"
        )
    at = _now(now)
    kp = CAKeyPair()
    if ca_type in ("user", "host"):
        ssh_key = generate_ssh_key()
        kp.ssh_public_key = ssh_public_key_line(ssh_key)
        kp.ssh_private_key_pem = private_key_pem(ssh_key)
    if ca_type in ("user", "host", "db"):
        tls_key = generate_tls_key()
        cert = _self_signed_ca(tls_key, ca_type, cluster_name, at)
        kp.tls_cert_pem = cert.public_bytes(serialization.Encoding.PEM).decode("ascii")
        kp.tls_private_key_pem = private_key_pem(tls_key)
    if ca_type == "jwt":
        jwt_key = generate_tls_key()
        kp.jwt_public_key_pem = public_key_pem(jwt_key)
        kp.jwt_private_key_pem = private_key_pem(jwt_key)
    spec = CertAuthoritySpec(type=ca_type, cluster_name=cluster_name, active_keys=[kp])  # type: ignore[arg-type]
    return CertAuthority(metadata=Metadata(name=ca_type), spec=spec)


def _ssh_public(public_key: str | PublicKeyTypes) -> SSHPublicKey:
    if isinstance(public_key, str):
        return load_ssh_public_key(public_key)
    if not isinstance(public_key, ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
        kind = type(public_key).__name__
        raise BadParameterError(f"cannot certify a {kind} for SSH: use Ed25519, ECDSA or RSA")
    return public_key


def _tls_public(public_key: str | bytes | PublicKeyTypes) -> PublicKeyTypes:
    pub = load_public_key_pem(public_key) if isinstance(public_key, str | bytes) else public_key
    if not isinstance(pub, ec.EllipticCurvePublicKey | rsa.RSAPublicKey | ed25519.Ed25519PublicKey):
        raise BadParameterError(f"cannot certify a {type(pub).__name__} for TLS: use ECDSA, RSA or Ed25519")
    return pub


def _json(value: object) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def _ssh_window(now: datetime, ttl: timedelta, cap: datetime | None) -> tuple[int, int]:
    if ttl <= timedelta(0):
        raise BadParameterError(f"certificate TTL must be positive, got {ttl}")
    end = now + ttl
    if cap is not None:
        end = min(end, _now(cap))
    if end <= now:
        raise BadParameterError("the identity has already expired: nothing to sign")
    return int((now - CLOCK_SKEW).timestamp()), int(end.timestamp())


class CertSigner:
    """Signs with one CA's active key; built from a CertAuthority that still holds private keys."""

    def __init__(self, ca: CertAuthority) -> None:
        spec = ca.spec
        self.ca_type: str = spec.type
        self.cluster_name: str = spec.cluster_name
        if spec.type == "jwt":
            raise BadParameterError("the jwt CA signs tokens, not certificates")
        if not spec.active_keys:
            raise BadParameterError(f"the {spec.type} CA has no active keys")
        kp = spec.active_keys[0]
        if not kp.tls_cert_pem or not kp.tls_private_key_pem:
            raise BadParameterError(
                f"the {spec.type} CA has no X.509 private key: sign with the auth service's stored CA, "
                "not a public copy"
            )
        self.tls_ca_cert: x509.Certificate = load_x509(kp.tls_cert_pem)
        tls_key = load_private_key(kp.tls_private_key_pem)
        if public_key_pem(tls_key) != public_key_pem(self.tls_ca_cert.public_key()):
            raise BadParameterError(f"the {spec.type} CA's X.509 private key does not match its certificate")
        self._tls_key = tls_key
        self.ssh_public_key: str = ""
        self._ssh_key: SSHPrivateKey | None = None
        if spec.type in ("user", "host"):
            if not kp.ssh_private_key_pem:
                raise BadParameterError(f"the {spec.type} CA has no SSH private key")
            ssh_key = load_private_key(kp.ssh_private_key_pem)
            if not isinstance(ssh_key, SSHPrivateKey):
                kind = type(ssh_key).__name__
                raise BadParameterError(f"the {spec.type} CA's SSH key type {kind} cannot sign")
            line = ssh_public_key_line(ssh_key)
            if kp.ssh_public_key and load_ssh_public_key(kp.ssh_public_key) != ssh_key.public_key():
                raise BadParameterError(f"the {spec.type} CA's SSH private key does not match its public key")
            self._ssh_key, self.ssh_public_key = ssh_key, line

    # ------------------------------------------------------------ SSH

    def _need(self, ca_type: str, what: str) -> None:
        if self.ca_type != ca_type:
            raise BadParameterError(f"{what} are signed by the {ca_type} CA, not the {self.ca_type} CA")

    def sign_ssh_user_cert(
        self,
        public_key: str | PublicKeyTypes,
        identity: Identity,
        *,
        ttl: timedelta,
        permit_pty: bool = True,
        permit_port_forwarding: bool = False,
        permit_agent_forwarding: bool = False,
        permit_x11_forwarding: bool = False,
        extensions: Mapping[str, str] | None = None,
        now: datetime | None = None,
    ) -> str:
        """An OpenSSH user certificate line for `public_key`: principals = logins, identity in extensions.

        `extensions` adds `name@wardgate` extensions with text values (OpenSSH ignores unknown
        extensions, unlike critical options, so sshd still accepts the certificate)."""
        self._need("user", "SSH user certificates")
        assert self._ssh_key is not None
        if not identity.user:
            raise BadParameterError("cannot sign a certificate for an identity with no user")
        if any(not login for login in identity.logins):
            raise BadParameterError("logins must not be empty strings")
        pub = _ssh_public(public_key)
        valid_after, valid_before = _ssh_window(_now(now), ttl, identity.expires)
        principals = list(dict.fromkeys(identity.logins)) or [NO_LOGIN_PREFIX + secrets.token_hex(8)]
        exts: list[tuple[str, bytes]] = [(EXT_USER, identity.user.encode("utf-8"))]
        exts += [(EXT_ROLES, _json(list(identity.roles))), (EXT_TRAITS, _json(identity.traits))]
        for name, text in (
            (EXT_CLUSTER, identity.cluster),
            (EXT_ROUTE_TO_CLUSTER, identity.route_to_cluster),
            (EXT_MFA_VERIFIED, identity.mfa_verified),
        ):
            if text:
                exts.append((name, text.encode("utf-8")))
        for name, text in (extensions or {}).items():
            if not name.endswith("@wardgate") or any(name == n for n, _ in exts):
                raise BadParameterError(f"extension {name!r} is not a free name@wardgate extension")
            exts.append((name, text.encode("utf-8")))
        for name, granted in (
            ("permit-pty", permit_pty),
            ("permit-port-forwarding", permit_port_forwarding),
            ("permit-agent-forwarding", permit_agent_forwarding),
            ("permit-X11-forwarding", permit_x11_forwarding),
        ):
            if granted:
                exts.append((name, b""))
        builder = (
            ssh.SSHCertificateBuilder()
            .public_key(pub)
            .type(ssh.SSHCertificateType.USER)
            .serial(secrets.randbits(64))
            .key_id(identity.user.encode("utf-8"))
            .valid_principals([p.encode("utf-8") for p in principals])
            .valid_after(valid_after)
            .valid_before(valid_before)
        )
        for name, value in exts:
            builder = builder.add_extension(name.encode("ascii"), value)
        line = builder.sign(self._ssh_key).public_bytes().decode("ascii")
        # The user as comment helps people reading ~/.ward; asyncssh refuses non-ASCII comments.
        comment = identity.user if identity.user.isascii() and identity.user.isprintable() else ""
        return f"{line} {comment}" if comment and " " not in comment else line

    def sign_ssh_host_cert(
        self,
        public_key: str | PublicKeyTypes,
        *,
        host_id: str,
        node_name: str,
        cluster: str,
        system_role: str,
        extra_principals: Sequence[str] = (),
        ttl: timedelta,
        now: datetime | None = None,
    ) -> str:
        """An OpenSSH host certificate line: principals = host id, `<host id>.<cluster>`, node name, extras.

        The system role rides in the `system-role@wardgate` extension (OpenSSH ignores host cert
        extensions but refuses critical options, so this is the only safe place besides key id).
        """
        self._need("host", "SSH host certificates")
        assert self._ssh_key is not None
        if not host_id:
            raise BadParameterError("a host certificate needs a host id")
        if system_role not in SYSTEM_ROLES:
            raise BadParameterError(
                f"unknown system role {system_role!r}: expected one of {', '.join(SYSTEM_ROLES)}"
            )
        pub = _ssh_public(public_key)
        valid_after, valid_before = _ssh_window(_now(now), ttl, None)
        names = [host_id, f"{host_id}.{cluster}" if cluster else "", node_name, *extra_principals]
        principals = [p for p in dict.fromkeys(names) if p]
        builder = (
            ssh.SSHCertificateBuilder()
            .public_key(pub)
            .type(ssh.SSHCertificateType.HOST)
            .serial(secrets.randbits(64))
            .key_id(f"{host_id}.{cluster}".encode())
            .valid_principals([p.encode("utf-8") for p in principals])
            .valid_after(valid_after)
            .valid_before(valid_before)
            .add_extension(EXT_HOST_ID.encode("ascii"), host_id.encode("utf-8"))
            .add_extension(EXT_SYSTEM_ROLE.encode("ascii"), system_role.encode("ascii"))
        )
        if cluster:
            builder = builder.add_extension(EXT_CLUSTER.encode("ascii"), cluster.encode("utf-8"))
        return builder.sign(self._ssh_key).public_bytes().decode("ascii")

    # ------------------------------------------------------------ X.509

    def sign_tls_cert(
        self,
        public_key: str | bytes | PublicKeyTypes,
        identity: Identity,
        *,
        ttl: timedelta,
        now: datetime | None = None,
        dns_names: Sequence[str] = (),
        ip_addresses: Sequence[str] = (),
    ) -> str:
        """A PEM X.509 certificate carrying the whole identity; a server cert too when names are given.

        The end is the earliest of now+ttl, the identity's own expiry and the CA's expiry, and
        the embedded identity's `expires` is set to exactly that end.
        """
        if not identity.user:
            raise BadParameterError("cannot sign a certificate for an identity with no user")
        if ttl <= timedelta(0):
            raise BadParameterError(f"certificate TTL must be positive, got {ttl}")
        pub = _tls_public(public_key)
        at = _now(now).replace(microsecond=0)
        ca = self.tls_ca_cert
        not_before = max(at - CLOCK_SKEW, ca.not_valid_before_utc)
        not_after = min(_now(now) + ttl, ca.not_valid_after_utc)
        if identity.expires is not None:
            not_after = min(not_after, _now(identity.expires))
        not_after = not_after.replace(microsecond=0)
        if not_after <= at:
            raise BadParameterError("the identity (or the CA) has already expired: nothing to sign")
        if at < ca.not_valid_before_utc:
            raise BadParameterError("the CA is not valid yet: check the clock of the auth service")
        embedded = replace(identity, expires=not_after)

        cn = identity.host_id if identity.system_role and identity.host_id else identity.user
        orgs = identity.roles or ((identity.system_role,) if identity.system_role else ())
        attrs = [x509.NameAttribute(NameOID.COMMON_NAME, cn[:_CN_MAX])]
        attrs += [x509.NameAttribute(NameOID.ORGANIZATION_NAME, o[:_CN_MAX]) for o in orgs if o]

        sans: list[x509.GeneralName] = []
        try:
            sans += [x509.DNSName(d) for d in dict.fromkeys(dns_names) if d]
            sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in dict.fromkeys(ip_addresses) if ip]
        except ValueError as e:
            raise BadParameterError(f"bad certificate name: {e}") from None
        usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
        if sans:
            usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
        ca_ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value

        try:
            builder = (
                x509.CertificateBuilder()
                .subject_name(x509.Name(attrs))
                .issuer_name(ca.subject)
                .public_key(pub)
                .serial_number(x509.random_serial_number())
                .not_valid_before(not_before)
                .not_valid_after(not_after)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(
                    x509.KeyUsage(
                        digital_signature=True,
                        content_commitment=False,
                        key_encipherment=isinstance(pub, rsa.RSAPublicKey),
                        data_encipherment=False,
                        key_agreement=False,
                        key_cert_sign=False,
                        crl_sign=False,
                        encipher_only=False,
                        decipher_only=False,
                    ),
                    critical=True,
                )
                .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(pub), critical=False)  # type: ignore[arg-type]
                .add_extension(
                    x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
                )
                .add_extension(
                    x509.UnrecognizedExtension(IDENTITY_OID, der_utf8_string(identity_to_json(embedded))),
                    critical=False,
                )
            )
            if sans:
                builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        except ValueError as e:
            raise BadParameterError(f"cannot build certificate: {e}") from None
        eddsa = isinstance(self._tls_key, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey)
        algorithm = None if eddsa else hashes.SHA256()
        cert = builder.sign(self._tls_key, algorithm)  # type: ignore[arg-type]
        return cert.public_bytes(serialization.Encoding.PEM).decode("ascii")
