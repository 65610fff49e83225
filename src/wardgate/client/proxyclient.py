"""Talking HTTPS to the proxy: its public web API (`/webapi/*`) and the auth API tunnelled by ALPN.

Both reuse `AuthClient`'s request and error handling; only the wording of connection errors
and the default port (3080) differ, so people are told to check the proxy, not the auth server.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field
from typing import Any

from wardgate.api.client import AuthClient, check_ca_pin
from wardgate.api.identityfile import server_trusting_context
from wardgate.client.profile import DEFAULT_PROXY_PORT, Profile
from wardgate.errors import BadParameterError, WardgateError

WEB_ALPN = "http/1.1"
AUTH_ALPN = "ward-auth"
SSH_ALPN = "ward-ssh"


class ProxyClient(AuthClient):
    """HTTPS to the proxy's one port; with ALPN `ward-auth` every AuthClient call reaches the auth API."""

    peer = "proxy"
    default_port = DEFAULT_PROXY_PORT
    unreachable_hint = (
        "check the address (HOST:PORT; the proxy's default port is 3080) "
        "and that the Wardgate proxy is running"
    )

    @classmethod
    def for_profile(cls, profile: Profile) -> ProxyClient:
        """Mutual TLS with the profile's certificate, routed to the auth API (after an expiry check)."""
        profile.require_valid()
        return cls(profile.proxy, profile.ssl_context(AUTH_ALPN))

    async def webapi_ping(self) -> dict[str, Any]:
        return await self.call("GET", "/webapi/ping")

    async def create_session(self, **body: Any) -> dict[str, Any]:
        return await self.call("POST", "/webapi/sessions", body)


@dataclass
class ProxyInfo:
    """What `/webapi/ping` told us, over a TLS session verified against the pinned host CA."""

    addr: str
    cluster_name: str
    host_ca_pems: list[str]
    second_factor: str = "otp"
    public_addr: str = ""
    server_version: str = ""
    connectors: list[Any] = field(default_factory=list)

    @property
    def needs_otp(self) -> bool:
        return self.second_factor in ("otp", "on")


def web_context(ca_pems: list[str]) -> ssl.SSLContext:
    ctx = server_trusting_context(ca_pems)
    ctx.set_alpn_protocols([WEB_ALPN])
    return ctx


async def discover_proxy(
    addr: str, *, ca_pin: str = "", insecure: bool = False, trusted_pems: list[str] | None = None
) -> ProxyInfo:
    """First contact (or re-contact) with a proxy; nothing secret is sent here.

    With a pin, the host CA the proxy advertises must match it; with `trusted_pems` (from an
    earlier login) the proxy must present a certificate from those CAs; `insecure` trusts
    whatever it says. Either way the final ping runs over a session verified against the CA,
    so the pin binds the connection the password later travels on.
    """
    if ca_pin or not trusted_pems:
        if not ca_pin and not insecure:
            raise BadParameterError(
                "pass --ca-pin (from `wardctl status`) to trust this cluster, or --insecure for a dev setup"
            )
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE  # the pin is checked below against the CA that signed the proxy
        ctx.set_alpn_protocols([WEB_ALPN])
        async with ProxyClient(addr, ctx) as c:
            first = await c.webapi_ping()
        pems = [str(p) for p in first.get("host_ca_pems") or []]
        if not pems:
            raise WardgateError(f"the proxy at {addr} did not send its cluster's CA: is it a Wardgate proxy?")
        check_ca_pin(pems, ca_pin)
    else:
        pems = trusted_pems
    async with ProxyClient(addr, web_context(pems)) as c:
        ping = await c.webapi_ping()
    auth = ping.get("auth") or {}
    return ProxyInfo(
        addr=addr,
        cluster_name=str(ping.get("cluster_name", "")),
        host_ca_pems=pems,
        second_factor=str(auth.get("second_factor", "otp")),
        public_addr=str(ping.get("proxy_public_addr", "")),
        server_version=str(ping.get("server_version", "")),
        connectors=list(auth.get("connectors") or []),
    )
