"""`ward login`: make key pairs here, have the cluster certify them, keep them in `~/.ward`.

The private keys never leave this machine: only the public halves travel, inside the same
TLS session that carries the password, which was verified against the pinned host CA.
"""

from __future__ import annotations

import contextlib
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.serialization import ssh

from wardgate.api.client import ConnectionFailed
from wardgate.client.profile import Credentials, NotLoggedInError, Profile, ProfileStore, normalize_proxy
from wardgate.client.proxyclient import ProxyClient, ProxyInfo, discover_proxy, web_context
from wardgate.durations import format_duration, parse_duration
from wardgate.errors import AuthenticationError, BadParameterError, WardgateError
from wardgate.keys import (
    generate_ssh_key,
    generate_tls_key,
    load_x509,
    private_key_pem,
    public_key_pem,
    ssh_private_key_openssh,
    ssh_public_key_line,
)


def parse_ttl(text: str | None) -> timedelta | None:
    """`--ttl 8h` → timedelta; empty means the cluster's default (12 h, capped by roles)."""
    if not text:
        return None
    try:
        ttl = parse_duration(text)
    except ValueError as exc:
        raise BadParameterError(f"--ttl: {exc}") from None
    if ttl <= timedelta(0):
        raise BadParameterError("--ttl must be positive")
    return ttl


async def discover(
    proxy: str, *, ca_pin: str = "", insecure: bool = False, home: Path | str | None = None
) -> ProxyInfo:
    """Ping the proxy, trusting it by pin, by `--insecure`, or by the CA saved at an earlier login."""
    addr = normalize_proxy(proxy)
    trusted: list[str] | None = None
    if not ca_pin and not insecure:
        try:
            trusted = ProfileStore(home).load(addr).host_ca_pems()
        except NotLoggedInError:
            trusted = None
    try:
        return await discover_proxy(addr, ca_pin=ca_pin, insecure=insecure, trusted_pems=trusted)
    except ConnectionFailed as exc:
        if trusted and "verify" in str(exc):
            raise ConnectionFailed(
                f"{exc}; if the cluster's CA changed, log in again with --ca-pin from `wardctl status`"
            ) from None
        raise


def _check_second_factor(info: ProxyInfo) -> None:
    if info.second_factor == "webauthn":
        raise BadParameterError(
            f"cluster {info.cluster_name} requires a security key (WebAuthn) to log in, "
            "which `ward login` cannot use yet: log in through the web UI"
        )


async def login(
    proxy: str,
    user: str,
    password: str,
    otp: str = "",
    *,
    ttl: timedelta | str | None = None,
    ca_pin: str = "",
    insecure: bool = False,
    home: Path | str | None = None,
    info: ProxyInfo | None = None,
) -> Profile:
    """Log in and save the profile (made current). Pass `info` from `discover` to skip a second ping."""
    addr = normalize_proxy(proxy)
    if info is None:
        info = await discover(addr, ca_pin=ca_pin, insecure=insecure, home=home)
    _check_second_factor(info)
    if isinstance(ttl, str):
        ttl = parse_ttl(ttl)
    ssh_key = generate_ssh_key()
    tls_key = generate_tls_key()
    body: dict[str, Any] = {
        "user": user,
        "password": password,
        "otp": otp,
        "ssh_public_key": ssh_public_key_line(ssh_key),
        "tls_public_key": public_key_pem(tls_key),
        "ttl": format_duration(ttl) if ttl else "",
    }
    try:
        async with ProxyClient(addr, web_context(info.host_ca_pems)) as c:
            resp = await c.create_session(**body)
    except (AuthenticationError, BadParameterError) as exc:
        raise type(exc)(f"login failed: {exc}") from None

    tls_cert_pem = str(resp.get("tls_cert") or "")
    ssh_cert_line = str(resp.get("ssh_cert") or "").strip()
    if not tls_cert_pem or not ssh_cert_line:
        raise WardgateError(f"the proxy at {addr} answered the login without certificates")
    tls_cert = load_x509(tls_cert_pem)
    if public_key_pem(tls_cert.public_key()) != public_key_pem(tls_key):
        raise WardgateError("the cluster returned an X.509 certificate for a different key: not saving it")
    try:
        cert = ssh.load_ssh_public_identity(ssh_cert_line.encode())
    except (ValueError, TypeError) as exc:
        raise WardgateError(f"the cluster returned an unreadable SSH certificate: {exc}") from None
    ours = ssh_public_key_line(ssh_key)
    if not isinstance(cert, ssh.SSHCertificate) or ssh_public_key_line(cert.public_key()) != ours:
        raise WardgateError("the cluster returned an SSH certificate for a different key: not saving it")
    valid_until = min(tls_cert.not_valid_after_utc, datetime.fromtimestamp(cert.valid_before, UTC))

    host_ca_pems = [str(p) for p in resp.get("host_ca_pems") or []] or info.host_ca_pems
    profile = Profile(
        proxy=addr,
        user=str(resp.get("user") or user),
        cluster=str(resp.get("cluster_name") or info.cluster_name),
        valid_until=valid_until,
        roles=[str(r) for r in resp.get("roles") or []],
        logins=[str(x) for x in resp.get("logins") or []],
        ttl=str(resp.get("ttl") or ""),
        ca_pin=ca_pin,
    )
    creds = Credentials(
        ssh_key_openssh=ssh_private_key_openssh(ssh_key),
        ssh_public_line=ssh_public_key_line(ssh_key, profile.user if profile.user.isascii() else ""),
        ssh_cert_line=ssh_cert_line,
        tls_cert_pem=tls_cert_pem,
        tls_key_pem=private_key_pem(tls_key),
        host_ca_pems=host_ca_pems,
        host_ca_ssh_keys=[str(k) for k in resp.get("host_ca_ssh_keys") or []],
    )
    store = ProfileStore(home)
    if not profile.ca_pin:
        # Keep the pin of the first login, so `ward status` can still show what we trusted.
        with contextlib.suppress(NotLoggedInError):
            profile.ca_pin = store.load(addr).ca_pin
    return store.save(profile, creds)
