"""Identity encode/decode and certificate verification: the one place that decides who a cert is.

Formats (stable: clients and agents of other versions read them):

* X.509: the whole `Identity` is canonical JSON (sorted keys, no spaces, UTF-8, RFC 3339 UTC
  times, `None` fields omitted) wrapped in a DER UTF8String, in one non-critical extension
  under `IDENTITY_OID`. The subject (CN = user or host id, O = roles or system role) is only
  for humans and for tools like `openssl x509 -text`; the extension is authoritative.
* SSH user certs: principals are the logins; extensions `user@wardgate`, `roles@wardgate`
  (JSON list), `traits@wardgate` (JSON object), `cluster@wardgate`, `route-to-cluster@wardgate`
  and `mfa-verified@wardgate` (omitted when empty), beside the standard `permit-*` ones.
  Certificates a proxy gets on a user's behalf also carry `impersonated-by@wardgate` (the
  proxy's host id).
  Values follow OpenSSH's convention: a non-empty value is itself an SSH string inside the
  extension's data field (cryptography writes and reads it that way; `ssh-keygen -L` shows
  it). asyncssh keeps only the extensions it knows, so services decode ours through
  `verify_ssh_user_cert`, which accepts asyncssh certificate objects.
* SSH host certs: principals are the names the host answers to; extensions
  `system-role@wardgate`, `host-id@wardgate`, `cluster@wardgate`. Host certs never carry
  critical options (the OpenSSH client refuses a host cert that has any) but extensions are
  ignored by OpenSSH, so sshd can present them and `ssh` accepts them with `@cert-authority`.
  The key id is `<host_id>.<cluster>` for logs.
"""

from __future__ import annotations

import base64
import json
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import asdict, fields, is_dataclass, replace
from datetime import UTC, datetime
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from cryptography.hazmat.primitives.serialization import ssh

from wardgate.api.resources import SYSTEM_ROLES
from wardgate.auth.identity import Identity
from wardgate.errors import AuthenticationError, BadParameterError
from wardgate.keys import load_ssh_public_key, load_x509

__all__ = [
    "EXT_CLUSTER",
    "EXT_HOST_ID",
    "EXT_IMPERSONATED_BY",
    "EXT_MFA_VERIFIED",
    "EXT_ROLES",
    "EXT_ROUTE_TO_CLUSTER",
    "EXT_SYSTEM_ROLE",
    "EXT_TRAITS",
    "EXT_USER",
    "IDENTITY_OID",
    "NO_LOGIN_PREFIX",
    "der_utf8_string",
    "identity_from_json",
    "identity_to_json",
    "load_x509",
    "rfc3339",
    "verify_ssh_host_cert",
    "verify_ssh_user_cert",
    "verify_tls_identity",
]

IDENTITY_OID = x509.ObjectIdentifier("2.25.26305181432948985045671319141975175213")
"""`2.25.<uuid>` (uuid4 13ca3193-cb91-4590-bd2d-d906e28db02d): ours without registering an arc."""

EXT_USER = "user@wardgate"
EXT_ROLES = "roles@wardgate"
EXT_TRAITS = "traits@wardgate"
EXT_CLUSTER = "cluster@wardgate"
EXT_ROUTE_TO_CLUSTER = "route-to-cluster@wardgate"
EXT_MFA_VERIFIED = "mfa-verified@wardgate"
EXT_SYSTEM_ROLE = "system-role@wardgate"
EXT_HOST_ID = "host-id@wardgate"
EXT_IMPERSONATED_BY = "impersonated-by@wardgate"
"""In a short-lived user certificate the auth service issued to a proxy on a user's behalf (to
log in to an agentless OpenSSH node): the host id of that proxy."""

NO_LOGIN_PREFIX = "-wardgate-nologin-"
"""An SSH cert with no principals is valid for *every* login, so a user with no logins gets
one unusable principal `-wardgate-nologin-<random>` instead; decoding drops it."""

_MAX_IDENTITY_BYTES = 64 * 1024

SSHCertInput = str | bytes | ssh.SSHCertificate | Any
"""An OpenSSH cert line, its wire blob, a cryptography `SSHCertificate`, or an asyncssh certificate."""


def rfc3339(dt: datetime) -> str:
    """`2026-01-02T03:04:05Z` (fraction only when present): the one time format we emit."""
    dt = _utc(dt)
    base = dt.strftime("%Y-%m-%dT%H:%M:%S")
    return f"{base}.{dt.microsecond:06d}Z" if dt.microsecond else f"{base}Z"


def _utc(dt: datetime) -> datetime:
    return dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt.astimezone(UTC)


def _now(now: datetime | None) -> datetime:
    return _utc(now) if now is not None else datetime.now(UTC)


# ---------------------------------------------------------------- identity JSON codec


def identity_to_json(identity: Identity) -> bytes:
    """Canonical JSON of the whole identity: the same identity always gives the same bytes."""
    out: dict[str, Any] = {}
    for f in fields(Identity):
        value = getattr(identity, f.name)
        if value is None:
            continue
        if isinstance(value, datetime):
            out[f.name] = rfc3339(value)
        elif isinstance(value, tuple):
            out[f.name] = list(value)
        elif isinstance(value, dict):
            out[f.name] = {k: list(v) for k, v in value.items()}
        elif is_dataclass(value) and not isinstance(value, type):
            out[f.name] = asdict(value)
        else:
            out[f.name] = value
    return json.dumps(out, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def _malformed(field: str, expected: str) -> AuthenticationError:
    return AuthenticationError(f"malformed identity: {field!r} must be {expected}")


def _dec_str(name: str, v: Any) -> str:
    if not isinstance(v, str):
        raise _malformed(name, "a string")
    return v


def _dec_str_tuple(name: str, v: Any) -> tuple[str, ...]:
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise _malformed(name, "a list of strings")
    return tuple(v)


def _dec_traits(name: str, v: Any) -> dict[str, list[str]]:
    if not isinstance(v, dict) or not all(
        isinstance(vals, list) and all(isinstance(x, str) for x in vals) for vals in v.values()
    ):
        raise _malformed(name, "an object of string lists")
    return {k: list(vals) for k, vals in v.items()}


def _dec_time(name: str, v: Any) -> datetime:
    if not isinstance(v, str):
        raise _malformed(name, "an RFC 3339 time")
    try:
        dt = datetime.fromisoformat(v)
    except ValueError:
        raise _malformed(name, "an RFC 3339 time") from None
    if dt.tzinfo is None:
        raise _malformed(name, "an RFC 3339 time with a zone")
    return dt.astimezone(UTC)


def _dec_route(cls: type) -> Callable[[str, Any], Any]:
    names = {f.name for f in fields(cls)}

    def dec(name: str, v: Any) -> Any:
        if not isinstance(v, dict):
            raise _malformed(name, "an object")
        kwargs = {}
        for k, x in v.items():
            if k in names:
                kwargs[k] = _dec_str(f"{name}.{k}", x)
        return cls(**kwargs)

    return dec


def _decoder_for(name: str, hint: Any) -> Callable[[str, Any], Any]:
    """Pick a decoder from the field's type, so a new Identity field cannot be silently dropped."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is str:
        return _dec_str
    if origin is tuple and args == (str, Ellipsis):
        return _dec_str_tuple
    if origin is dict and args == (str, list[str]):
        return _dec_traits
    if origin in (types.UnionType, typing.Union) and type(None) in args and len(args) == 2:
        inner = next(a for a in args if a is not type(None))
        if inner is datetime:
            return _dec_time
        if is_dataclass(inner):
            return _dec_route(inner)
    raise TypeError(f"Identity.{name} has type {hint!r}, which auth/certs.py cannot decode: extend it")


_FIELD_DECODERS: dict[str, Callable[[str, Any], Any]] = {
    name: _decoder_for(name, hint) for name, hint in typing.get_type_hints(Identity).items()
}


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def identity_from_json(data: bytes | str) -> Identity:
    """Decode `identity_to_json` output; unknown keys are ignored (newer issuers), bad types refused."""
    if len(data) > _MAX_IDENTITY_BYTES:
        raise AuthenticationError("malformed identity: larger than 64 KiB")
    try:
        obj = json.loads(data, object_pairs_hook=_no_duplicates)
    except (ValueError, RecursionError) as e:
        raise AuthenticationError(f"malformed identity: not JSON ({e})") from None
    if not isinstance(obj, dict):
        raise AuthenticationError("malformed identity: not a JSON object")
    kwargs = {k: dec(k, obj[k]) for k, dec in _FIELD_DECODERS.items() if k in obj}
    if not kwargs.get("user"):
        raise AuthenticationError("malformed identity: no user")
    return Identity(**kwargs)


# ---------------------------------------------------------------- DER wrapper of the extension


def der_utf8_string(data: bytes) -> bytes:
    """DER UTF8String around `data`: RFC 5280 wants extnValue to hold DER, not raw bytes."""
    n = len(data)
    if n < 0x80:
        length = bytes([n])
    else:
        size = n.to_bytes((n.bit_length() + 7) // 8, "big")
        length = bytes([0x80 | len(size)]) + size
    return b"\x0c" + length + data


def _from_der_utf8_string(der: bytes) -> bytes:
    if len(der) < 2 or der[0] != 0x0C:
        raise ValueError("identity extension is not a UTF8String")
    first = der[1]
    if first < 0x80:
        n, start = first, 2
    else:
        width = first & 0x7F
        if width == 0 or width > 4 or len(der) < 2 + width:
            raise ValueError("bad DER length in identity extension")
        n, start = int.from_bytes(der[2 : 2 + width], "big"), 2 + width
        if n < 0x80 or der[2] == 0:
            raise ValueError("non-minimal DER length in identity extension")
    if len(der) != start + n:
        raise ValueError("identity extension length does not match its content")
    return der[start:]


# ---------------------------------------------------------------- X.509


def _load_x509_for_auth(cert: x509.Certificate | str | bytes) -> x509.Certificate:
    if isinstance(cert, x509.Certificate):
        return cert
    if not isinstance(cert, str | bytes | bytearray | memoryview):
        raise AuthenticationError(f"malformed certificate: unsupported type {type(cert).__name__}")
    try:
        return load_x509(bytes(cert) if not isinstance(cert, str) else cert)
    except BadParameterError as e:
        raise AuthenticationError(f"malformed certificate: {e}") from None


def _issuer_of(cert: x509.Certificate, trusted: Sequence[x509.Certificate]) -> x509.Certificate | None:
    for ca in trusted:
        try:
            cert.verify_directly_issued_by(ca)
        except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
            continue
        return ca
    return None


def verify_tls_identity(
    cert: x509.Certificate | str | bytes,
    trusted: Sequence[x509.Certificate],
    *,
    now: datetime | None = None,
) -> Identity:
    """Who this client certificate says its holder is, if one of `trusted` signed it and it is current.

    Checked: issuer and signature against the trusted CA certs (and that CA's own validity),
    the validity window, that it is not itself a CA, and the identity extension, whose expiry
    may not outlast the certificate.
    """
    c = _load_x509_for_auth(cert)
    at = _now(now)
    try:
        bc = c.extensions.get_extension_for_class(x509.BasicConstraints).value
        is_ca = bc.ca
    except x509.ExtensionNotFound:
        is_ca = False
    except ValueError as e:
        raise AuthenticationError(f"malformed certificate: {e}") from None
    if is_ca:
        raise AuthenticationError("certificate is a CA certificate, not an identity")
    ca = _issuer_of(c, trusted)
    if ca is None:
        raise AuthenticationError("certificate is not signed by a trusted Wardgate CA")
    if at > ca.not_valid_after_utc:
        raise AuthenticationError(f"certificate's CA expired at {rfc3339(ca.not_valid_after_utc)}")
    not_before, not_after = c.not_valid_before_utc, c.not_valid_after_utc
    if at < not_before:
        raise AuthenticationError(f"certificate is not valid before {rfc3339(not_before)}")
    if at > not_after:
        raise AuthenticationError(f"certificate expired at {rfc3339(not_after)}")
    try:
        ext = c.extensions.get_extension_for_oid(IDENTITY_OID).value
    except x509.ExtensionNotFound:
        raise AuthenticationError("certificate carries no Wardgate identity") from None
    except ValueError as e:
        raise AuthenticationError(f"malformed certificate: {e}") from None
    if not isinstance(ext, x509.UnrecognizedExtension):
        raise AuthenticationError("malformed certificate: identity extension has an unexpected type")
    try:
        payload = _from_der_utf8_string(ext.value)
    except ValueError as e:
        raise AuthenticationError(f"malformed identity: {e}") from None
    identity = identity_from_json(payload)
    if identity.expires is None:
        return replace(identity, expires=not_after)
    if identity.expires > not_after:
        raise AuthenticationError(
            f"malformed identity: it expires at {rfc3339(identity.expires)}, "
            f"after its certificate ({rfc3339(not_after)})"
        )
    return identity


# ---------------------------------------------------------------- SSH


def _load_ssh_cert(cert: SSHCertInput) -> ssh.SSHCertificate:
    if isinstance(cert, ssh.SSHCertificate):
        return cert
    export = getattr(cert, "export_certificate", None)
    if callable(export):  # asyncssh.SSHCertificate
        data = export("openssh")
    elif isinstance(cert, str | bytes):
        data = cert
    else:
        raise AuthenticationError(f"malformed certificate: unsupported type {type(cert).__name__}")
    raw = data.encode() if isinstance(data, str) else bytes(data)
    if raw[:1] == b"\x00":  # SSH wire blob, as asyncssh hands to validate_public_key
        raw = _blob_to_line(raw)
    raw = raw.strip()
    try:
        obj = ssh.load_ssh_public_identity(raw)
    except (ValueError, TypeError, UnsupportedAlgorithm) as e:
        raise AuthenticationError(f"malformed certificate: not an OpenSSH certificate ({e})") from None
    if not isinstance(obj, ssh.SSHCertificate):
        raise AuthenticationError("malformed certificate: a plain SSH public key, not a certificate")
    return obj


def _blob_to_line(blob: bytes) -> bytes:
    """`<type> <base64>` from a wire-format certificate (whose first field is its type name)."""
    n = int.from_bytes(blob[:4], "big")
    if not 0 < n <= 64 or len(blob) < 4 + n:
        raise AuthenticationError("malformed certificate: not an SSH certificate blob")
    return blob[4 : 4 + n] + b" " + base64.b64encode(blob)


def _ssh_key_blob(key: PublicKeyTypes) -> bytes:
    return key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)


def _check_ssh(
    cert: ssh.SSHCertificate,
    want: ssh.SSHCertificateType,
    trusted_ca_keys: Sequence[str | PublicKeyTypes],
    now: datetime | None,
) -> None:
    if cert.type != want:
        got = "host" if cert.type == ssh.SSHCertificateType.HOST else "user"
        raise AuthenticationError(f"certificate is a {got} certificate, expected a {want.name.lower()} one")
    trusted = {_ssh_key_blob(load_ssh_public_key(k) if isinstance(k, str) else k) for k in trusted_ca_keys}
    try:
        signer = _ssh_key_blob(cert.signature_key())
    except (ValueError, TypeError, UnsupportedAlgorithm) as e:
        raise AuthenticationError(f"malformed certificate: {e}") from None
    if signer not in trusted:
        raise AuthenticationError("certificate is not signed by a trusted Wardgate CA")
    try:
        cert.verify_cert_signature()
    except (InvalidSignature, ValueError, TypeError, UnsupportedAlgorithm):
        raise AuthenticationError("certificate is not signed by a trusted Wardgate CA") from None
    if cert.critical_options:
        names = ", ".join(sorted(k.decode("ascii", "replace") for k in cert.critical_options))
        raise AuthenticationError(f"certificate has critical options Wardgate does not support: {names}")
    ts = int(_now(now).timestamp())
    if ts < cert.valid_after:
        raise AuthenticationError(f"certificate is not valid before {_ssh_time(cert.valid_after)}")
    if ts >= cert.valid_before:
        raise AuthenticationError(f"certificate expired at {_ssh_time(cert.valid_before)}")


def _ssh_time(ts: int) -> str:
    try:
        return rfc3339(datetime.fromtimestamp(ts, UTC))
    except (OverflowError, ValueError, OSError):
        return "forever"


def _expiry(cert: ssh.SSHCertificate) -> datetime | None:
    try:
        return datetime.fromtimestamp(cert.valid_before, UTC)
    except (OverflowError, ValueError, OSError):
        return None


def _text(cert: ssh.SSHCertificate, name: str) -> str:
    raw = cert.extensions.get(name.encode("ascii"), b"")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise AuthenticationError(f"malformed identity: extension {name} is not UTF-8") from None


def _json_ext(cert: ssh.SSHCertificate, name: str, decode: Callable[[str, Any], Any], empty: str) -> Any:
    text = _text(cert, name) or empty
    try:
        value = json.loads(text)
    except ValueError:
        raise AuthenticationError(f"malformed identity: extension {name} is not JSON") from None
    return decode(name, value)


def _principals(cert: ssh.SSHCertificate) -> tuple[str, ...]:
    try:
        return tuple(p.decode("utf-8") for p in cert.valid_principals)
    except UnicodeDecodeError:
        raise AuthenticationError("malformed certificate: principal is not UTF-8") from None


def verify_ssh_user_cert(
    cert: SSHCertInput,
    trusted_ca_keys: Sequence[str | PublicKeyTypes],
    *,
    now: datetime | None = None,
) -> Identity:
    """The identity in an SSH user certificate signed by one of `trusted_ca_keys` and current now."""
    c = _load_ssh_cert(cert)
    _check_ssh(c, ssh.SSHCertificateType.USER, trusted_ca_keys, now)
    user = _text(c, EXT_USER)
    if not user:
        raise AuthenticationError("certificate carries no Wardgate identity")
    return Identity(
        user=user,
        roles=_json_ext(c, EXT_ROLES, _dec_str_tuple, "[]"),
        traits=_json_ext(c, EXT_TRAITS, _dec_traits, "{}"),
        logins=tuple(p for p in _principals(c) if not p.startswith(NO_LOGIN_PREFIX)),
        cluster=_text(c, EXT_CLUSTER),
        route_to_cluster=_text(c, EXT_ROUTE_TO_CLUSTER),
        mfa_verified=_text(c, EXT_MFA_VERIFIED),
        expires=_expiry(c),
    )


def verify_ssh_host_cert(
    cert: SSHCertInput,
    trusted_ca_keys: Sequence[str | PublicKeyTypes],
    *,
    now: datetime | None = None,
) -> Identity:
    """The service identity (system role, host id, principals) in an SSH host certificate."""
    c = _load_ssh_cert(cert)
    _check_ssh(c, ssh.SSHCertificateType.HOST, trusted_ca_keys, now)
    host_id, role = _text(c, EXT_HOST_ID), _text(c, EXT_SYSTEM_ROLE)
    if not host_id or not role:
        raise AuthenticationError("certificate carries no Wardgate identity")
    if role not in SYSTEM_ROLES:
        raise AuthenticationError(f"malformed identity: unknown system role {role!r}")
    return Identity(
        user=host_id,
        cluster=_text(c, EXT_CLUSTER),
        system_role=role,
        host_id=host_id,
        principals=_principals(c),
        expires=_expiry(c),
    )
