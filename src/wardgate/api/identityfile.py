"""Identity files: a private key, its certificates and the cluster CA, in one PEM file.

Written by `wardgate start` for the local administrator (`<data_dir>/admin.identity`), by
`wardctl auth sign --user` for bots, and read by `wardctl` and services to call the auth API.
Comment lines at the top carry where to find the auth service.
"""

from __future__ import annotations

import contextlib
import os
import re
import ssl
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509

from wardgate.errors import BadParameterError

_BLOCK = re.compile(r"-----BEGIN ([A-Z ]+)-----.+?-----END \1-----\n?", re.S)


@dataclass
class IdentityFile:
    key_pem: str
    cert_pem: str
    ca_pems: list[str] = field(default_factory=list)
    ssh_cert: str = ""
    auth_server: str = ""
    cluster: str = ""

    def dumps(self) -> str:
        lines = ["# Wardgate identity file: a credential, keep it private (mode 0600)."]
        if self.auth_server:
            lines.append(f"# auth_server: {self.auth_server}")
        if self.cluster:
            lines.append(f"# cluster: {self.cluster}")
        if self.ssh_cert:
            lines.append(f"# ssh_cert: {self.ssh_cert.strip()}")
        body = "\n".join(lines) + "\n" + self.key_pem.strip() + "\n" + self.cert_pem.strip() + "\n"
        body += "".join(p.strip() + "\n" for p in self.ca_pems)
        return body

    def save(self, path: str | os.PathLike[str]) -> None:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_suffix(p.suffix + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(self.dumps())
        os.replace(tmp, p)

    @classmethod
    def loads(cls, text: str, source: str = "identity file") -> IdentityFile:
        meta: dict[str, str] = {}
        for line in text.splitlines():
            if line.startswith("# ") and ": " in line:
                k, _, v = line[2:].partition(": ")
                meta[k.strip()] = v.strip()
        keys, certs = [], []
        for m in _BLOCK.finditer(text):
            (keys if "PRIVATE KEY" in m.group(1) else certs if m.group(1) == "CERTIFICATE" else []).append(
                m.group(0)
            )
        if len(keys) != 1 or not certs:
            raise BadParameterError(
                f"{source} is not a Wardgate identity file: it needs one private key and a certificate"
            )
        return cls(
            key_pem=keys[0],
            cert_pem=certs[0],
            ca_pems=certs[1:],
            ssh_cert=meta.get("ssh_cert", ""),
            auth_server=meta.get("auth_server", ""),
            cluster=meta.get("cluster", ""),
        )

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> IdentityFile:
        try:
            text = Path(path).read_text()
        except FileNotFoundError:
            raise BadParameterError(f"identity file {path} not found") from None
        except OSError as exc:
            raise BadParameterError(f"cannot read identity file {path}: {exc.strerror}") from None
        return cls.loads(text, str(path))

    @property
    def certificate(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.cert_pem.encode())

    def client_ssl_context(self, alpn: str = "") -> ssl.SSLContext:
        """Mutual TLS towards the auth service (or, with `alpn`, a proxy route): our cert out,
        only the cluster CA trusted in."""
        ctx = server_trusting_context(self.ca_pems)
        if alpn:
            ctx.set_alpn_protocols([alpn])
        load_key_pair(ctx, self.cert_pem, self.key_pem)
        return ctx


def server_trusting_context(ca_pems: list[str]) -> ssl.SSLContext:
    """Trust the cluster's CA and nothing else (not the system bundle: loading it costs ~18 ms a
    connection, and with hostname checks off it would let any public certificate pass)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = False  # we pin the cluster CA and check the host role in the cert instead
    ctx.verify_mode = ssl.CERT_REQUIRED
    if not ca_pems:
        raise BadParameterError("no cluster CA to trust: the identity file carries no CA certificate")
    ctx.load_verify_locations(cadata="".join(ca_pems))
    return ctx


def load_key_pair(ctx: ssl.SSLContext, cert_pem: str, key_pem: str) -> None:
    """ssl only loads key pairs from files: write them to a private temp dir for a moment."""
    with tempfile.TemporaryDirectory(prefix="wardgate-") as d:
        path = os.path.join(d, "pair.pem")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(cert_pem.strip() + "\n" + key_pem.strip() + "\n")
        try:
            ctx.load_cert_chain(path)
        finally:
            with contextlib.suppress(OSError):
                os.unlink(path)
