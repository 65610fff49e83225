"""Key generation and the few key encodings Wardgate speaks (PEM, OpenSSH lines, pins).

SSH keys are Ed25519 (small, fast, accepted by every OpenSSH since 6.5); TLS keys are ECDSA
P-256 (accepted by every TLS stack, unlike Ed25519 in browsers). Every loader turns garbage
into a `BadParameterError` that says what was expected, so callers never see a raw
cryptography exception.
"""

from __future__ import annotations

import base64
import hashlib

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes, PublicKeyTypes
from cryptography.hazmat.primitives.serialization import ssh

from wardgate.errors import BadParameterError

SSHPublicKey = ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey | rsa.RSAPublicKey
"""Public key types we accept in SSH (cryptography's SSH certificate builder supports these)."""
SSHPrivateKey = ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


def generate_ssh_key() -> ed25519.Ed25519PrivateKey:
    """A fresh Ed25519 key: what SSH CAs, hosts and `ward login` use."""
    return ed25519.Ed25519PrivateKey.generate()


def generate_tls_key() -> ec.EllipticCurvePrivateKey:
    """A fresh ECDSA P-256 key: what X.509 CAs and TLS certificates use."""
    return ec.generate_private_key(ec.SECP256R1())


def private_key_pem(key: PrivateKeyTypes) -> str:
    """Unencrypted PKCS#8 PEM: the storage format for every private key we keep."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode("ascii")


def load_private_key(pem: str | bytes) -> PrivateKeyTypes:
    """Load an unencrypted PKCS#8/PKCS#1/SEC1 PEM or an OpenSSH private key."""
    data = pem.encode() if isinstance(pem, str) else pem
    try:
        if b"-----BEGIN OPENSSH PRIVATE KEY-----" in data:
            return ssh.load_ssh_private_key(data, password=None)
        return serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as e:
        raise BadParameterError(f"not an unencrypted PEM or OpenSSH private key: {e}") from None


def _public(key_or_pub: PrivateKeyTypes | PublicKeyTypes) -> PublicKeyTypes:
    pub = getattr(key_or_pub, "public_key", None)
    return pub() if callable(pub) else key_or_pub  # type: ignore[return-value]


def ssh_public_key_line(key_or_pub: PrivateKeyTypes | PublicKeyTypes, comment: str = "") -> str:
    """The OpenSSH one-line form (`ssh-ed25519 AAAA… comment`), as in authorized_keys."""
    pub = _public(key_or_pub)
    try:
        line = pub.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    except (ValueError, TypeError) as e:
        raise BadParameterError(f"key type {type(pub).__name__} cannot be used with SSH: {e}") from None
    text = line.decode("ascii")
    return f"{text} {comment}" if comment else text


def load_ssh_public_key(line: str | bytes) -> SSHPublicKey:
    """Parse one OpenSSH public key line (comment allowed); certificates are refused here."""
    data = (line.encode() if isinstance(line, str) else line).strip()
    try:
        key = ssh.load_ssh_public_identity(data)
    except (ValueError, TypeError, UnsupportedAlgorithm) as e:
        preview = data[:40].decode("ascii", "replace")
        raise BadParameterError(
            f"not an OpenSSH public key line (expected 'ssh-ed25519 AAAA…', got {preview!r}): {e}"
        ) from None
    if isinstance(key, ssh.SSHCertificate):
        raise BadParameterError("expected an SSH public key, got an SSH certificate")
    if not isinstance(key, ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
        raise BadParameterError(f"unsupported SSH key type {type(key).__name__}: use Ed25519, ECDSA or RSA")
    return key


def ssh_fingerprint(pub: PrivateKeyTypes | PublicKeyTypes | str) -> str:
    """`SHA256:<unpadded base64>`, exactly what `ssh-keygen -l` prints, for logs and prompts."""
    key = load_ssh_public_key(pub) if isinstance(pub, str) else _public(pub)
    if not isinstance(key, ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
        raise BadParameterError(f"unsupported SSH key type {type(key).__name__}")
    digest = ssh.ssh_key_fingerprint(key, hashes.SHA256())
    return "SHA256:" + base64.b64encode(digest).decode("ascii").rstrip("=")


def public_key_pem(pub: PrivateKeyTypes | PublicKeyTypes) -> str:
    """SubjectPublicKeyInfo PEM: how clients send a TLS public key to be certified."""
    return (
        _public(pub)
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode("ascii")
    )


def load_public_key_pem(pem: str | bytes) -> PublicKeyTypes:
    """Parse a SubjectPublicKeyInfo PEM public key."""
    data = pem.encode() if isinstance(pem, str) else pem
    try:
        return serialization.load_pem_public_key(data)
    except (ValueError, TypeError, UnsupportedAlgorithm) as e:
        raise BadParameterError(f"not a PEM public key ('-----BEGIN PUBLIC KEY-----'): {e}") from None


def tls_ca_pin(cert: x509.Certificate) -> str:
    """`sha256:<hex>` of the CA's SubjectPublicKeyInfo DER: what a client pins on first contact.

    Pinning the key (not the certificate) keeps the pin valid when the CA certificate is
    re-issued with the same key.
    """
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return "sha256:" + hashlib.sha256(spki).hexdigest()


def load_x509(data: str | bytes) -> x509.Certificate:
    """One X.509 certificate from PEM or DER; garbage becomes a `BadParameterError`."""
    raw = data.encode() if isinstance(data, str) else bytes(data)
    try:
        if b"-----BEGIN" in raw:
            return x509.load_pem_x509_certificate(raw)
        return x509.load_der_x509_certificate(raw)
    except (ValueError, TypeError) as e:
        raise BadParameterError(f"not a PEM or DER X.509 certificate: {e}") from None


def load_x509_pem_list(pem: str | bytes) -> list[x509.Certificate]:
    """Every certificate in a PEM bundle (CA lists); blank input is an empty list."""
    raw = pem.encode() if isinstance(pem, str) else bytes(pem)
    if not raw.strip():
        return []
    try:
        return x509.load_pem_x509_certificates(raw)
    except (ValueError, TypeError) as e:
        raise BadParameterError(f"not a PEM bundle of X.509 certificates: {e}") from None


def ssh_private_key_openssh(key: PrivateKeyTypes) -> str:
    """OpenSSH's own private key format, which sshd's HostKey and ssh's -i read."""
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    ).decode()
