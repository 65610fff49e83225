"""Per-session MFA for `ward ssh`: a fresh second factor buys a one-minute certificate.

Roles with `require_session_mfa` refuse the login certificate for new sessions. Before starting
OpenSSH, `ward ssh` asks the auth service (through the proxy, as the user) for a certificate
marked MFA-verified for the same keys: the SSH one goes to OpenSSH first, the X.509 one is used
(and deleted) by the ProxyCommand's single connection to the proxy. Both expire in a minute.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from wardgate.client.profile import Profile, atomic_write
from wardgate.client.proxyclient import ProxyClient
from wardgate.errors import AuthenticationError, WardgateError
from wardgate.keys import load_private_key, public_key_pem


def needs_session_mfa(nodes: Sequence[dict[str, Any]], target: str) -> bool:
    for n in nodes:
        if target in (n.get("name"), n.get("hostname"), n.get("host_id")):
            return bool(n.get("require_session_mfa"))
    return False


async def session_mfa_options(profile: Profile, node: str, ask_code: Callable[[], str]) -> list[str]:
    """OpenSSH `-o` options carrying an MFA-verified certificate, or none when not needed."""
    async with ProxyClient.for_profile(profile) as client:
        try:
            nodes = await client.visible_nodes()
        except WardgateError:
            return []  # let the connection itself fail: the proxy says why and audits it
        if not needs_session_mfa(nodes, node):
            return []
        challenge = await client.mfa_challenge()
        if not challenge.get("otp"):
            raise AuthenticationError(
                "your roles require a second factor for every session and your only devices are "
                "passkeys or security keys: open the terminal from the web UI instead "
                f"(https://{profile.proxy}/web), or add an authenticator app there"
            )
        tls_key = load_private_key(profile.tls_key_path.read_bytes())
        certs = await client.session_mfa_certs(
            ssh_public_key=profile.pub_path.read_text().strip(),
            tls_public_key=public_key_pem(tls_key),
            otp=ask_code(),
        )
    # The proxy checks the TLS certificate (ProxyCommand, used once), the node the SSH one.
    atomic_write(profile.session_mfa_tls_path, certs["tls_cert"])
    path = profile.key_dir / "session-mfa-cert.pub"
    atomic_write(path, certs["ssh_cert"].strip() + "\n")
    return [f"CertificateFile={path}"]
