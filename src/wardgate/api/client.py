"""Typed async client for the auth API, used by `wardctl`, `ward` and remote services."""

from __future__ import annotations

import json
import ssl
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any

import aiohttp
from cryptography import x509

from wardgate.api.codec import resource_from_dict, resource_to_dict
from wardgate.api.events import ResourceEvent, ResourceEventType
from wardgate.api.identityfile import IdentityFile, server_trusting_context
from wardgate.api.resources import Resource, resolve_kind
from wardgate.errors import ERRORS_BY_CODE, AuthenticationError, BadParameterError, WardgateError
from wardgate.keys import tls_ca_pin


class ConnectionFailed(WardgateError):
    code = "connection_failed"
    status = 503


class AuthClient:
    """One HTTPS session to the auth API. Use `async with AuthClient(...) as c:`."""

    peer = "auth server"
    """What error messages call the other end (subclasses talking to the proxy say so)."""
    default_port = 3025
    unreachable_hint = "is wardgate running?"

    def __init__(self, addr: str, ssl_context: ssl.SSLContext, *, timeout: float = 30.0) -> None:
        self.addr = addr
        self.base = f"https://{_host_port(addr, self.default_port)}"
        self._ssl = ssl_context
        self._timeout = aiohttp.ClientTimeout(total=None, sock_connect=timeout, sock_read=None)
        self._session: aiohttp.ClientSession | None = None
        self.request_timeout = timeout

    @classmethod
    def from_identity(cls, ident: IdentityFile, addr: str = "", *, alpn: str = "") -> AuthClient:
        addr = addr or ident.auth_server
        if not addr:
            raise BadParameterError("no auth server address: pass --auth-server HOST:PORT")
        cert = ident.certificate
        expires = cert.not_valid_after_utc
        if expires <= datetime.now(expires.tzinfo):
            raise AuthenticationError(
                f"your certificate expired at {expires:%Y-%m-%d %H:%M:%S} UTC: log in again "
                "(`ward login`) or restart wardgate to renew the admin identity"
            )
        return cls(addr, ident.client_ssl_context(alpn))

    @classmethod
    async def discover_trust(
        cls, addr: str, *, ca_pin: str = "", insecure: bool = False, alpn: str = ""
    ) -> list[str]:
        """First contact: fetch the cluster's host CA, check it against the pin, return its PEMs.

        `alpn="ward-auth"` reaches the auth API through a proxy's one port."""
        if not ca_pin and not insecure:
            raise BadParameterError(
                "pass --ca-pin (from `wardctl status`) to trust this cluster, or --insecure for a dev setup"
            )
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE  # pin checked below against the chain the server signed with
        if alpn:
            ctx.set_alpn_protocols([alpn])
        async with cls(addr, ctx) as c:
            ping = await c.ping()
        pems: list[str] = ping.get("host_ca_pems") or []
        check_ca_pin(pems, ca_pin)
        # Reconnect verifying against that CA, so the pin binds the TLS session we use next.
        verified = server_trusting_context(pems)
        if alpn:
            verified.set_alpn_protocols([alpn])
        async with cls(addr, verified) as c:
            await c.ping()
        return pems

    async def __aenter__(self) -> AuthClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _sess(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=self._ssl, limit=16), timeout=self._timeout
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _request(
        self,
        method: str,
        path: str,
        *,
        body: dict[str, Any] | None = None,
        params: Any = None,
        data: bytes | None = None,
    ) -> tuple[int, bytes]:
        try:
            async with self._sess().request(
                method,
                self.base + path,
                json=body,
                data=data,
                params=params,
                timeout=aiohttp.ClientTimeout(total=self.request_timeout),
            ) as resp:
                return resp.status, await resp.read()
        except aiohttp.ClientConnectorCertificateError as exc:
            raise ConnectionFailed(
                f"cannot verify the {self.peer} at {self.addr}: {exc.certificate_error}"
            ) from None
        except aiohttp.ClientSSLError as exc:
            raise ConnectionFailed(ssl_hint(self.addr, exc, self.peer)) from None
        except (aiohttp.ClientConnectionError, TimeoutError) as exc:
            raise ConnectionFailed(
                f"cannot reach the {self.peer} at {self.addr} ({exc or type(exc).__name__}): "
                f"{self.unreachable_hint}"
            ) from None

    def _raise_for(self, status: int, raw: bytes) -> None:
        if status < 400:
            return
        try:
            err = (json.loads(raw) if raw else {}).get("error") or {}
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            raise WardgateError(f"unexpected answer from {self.addr} (HTTP {status})") from None
        cls = ERRORS_BY_CODE.get(err.get("code", ""), WardgateError)
        raise cls(err.get("message") or f"HTTP {status}")

    async def call(
        self, method: str, path: str, body: dict[str, Any] | None = None, params: Any = None
    ) -> dict[str, Any]:
        status, raw = await self._request(method, path, body=body, params=params)
        self._raise_for(status, raw)
        try:
            return json.loads(raw) if raw else {}
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise WardgateError(f"unexpected answer from {self.addr} (HTTP {status})") from None

    async def call_bytes(self, method: str, path: str, data: bytes | None = None) -> bytes:
        """For binary bodies (session recordings)."""
        status, raw = await self._request(method, path, data=data)
        self._raise_for(status, raw)
        return raw

    # ---- public calls

    async def ping(self) -> dict[str, Any]:
        return await self.call("GET", "/v1/ping")

    async def join(self, **body: Any) -> dict[str, Any]:
        return await self.call("POST", "/v1/join", body)

    async def begin_registration(self, token: str) -> dict[str, Any]:
        return await self.call("POST", "/v1/invites/begin", {"token": token})

    async def complete_registration(self, token: str, password: str, otp: str = "") -> dict[str, Any]:
        return await self.call(
            "POST", "/v1/invites/complete", {"token": token, "password": password, "otp": otp}
        )

    async def login(self, **body: Any) -> dict[str, Any]:
        return await self.call("POST", "/v1/login", body)

    # ---- authenticated

    async def status(self) -> dict[str, Any]:
        return await self.call("GET", "/v1/status")

    async def whoami(self) -> dict[str, Any]:
        return await self.call("GET", "/v1/whoami")

    async def list_resources(self, kind: str) -> list[Resource]:
        data = await self.call("GET", f"/v1/resources/{resolve_kind(kind)}")
        return [resource_from_dict(d) for d in data["items"]]

    async def get_resource(self, kind: str, name: str) -> Resource:
        return resource_from_dict(await self.call("GET", f"/v1/resources/{resolve_kind(kind)}/{name}"))

    async def put_resource(self, res: Resource, *, force: bool = False) -> Resource:
        data = await self.call("POST", "/v1/resources", {"resource": resource_to_dict(res), "force": force})
        return resource_from_dict(data)

    async def delete_resource(self, kind: str, name: str) -> None:
        await self.call("DELETE", f"/v1/resources/{resolve_kind(kind)}/{name}")

    async def create_user(
        self, name: str, roles: Sequence[str], traits: dict[str, list[str]]
    ) -> dict[str, Any]:
        return await self.call("POST", "/v1/users", {"name": name, "roles": list(roles), "traits": traits})

    async def reset_user(self, name: str) -> dict[str, Any]:
        return await self.call("POST", f"/v1/users/{name}/reset")

    async def unlock_user(self, name: str) -> None:
        await self.call("POST", f"/v1/users/{name}/unlock")

    async def create_token(self, roles: Sequence[str], ttl: str) -> dict[str, Any]:
        return await self.call("POST", "/v1/tokens", {"roles": list(roles), "ttl": ttl})

    async def create_lock(self, target: dict[str, str], ttl: str = "", message: str = "") -> Resource:
        data = await self.call("POST", "/v1/locks", {"target": target, "ttl": ttl, "message": message})
        return resource_from_dict(data)

    async def export_ca(self, ca_type: str) -> dict[str, Any]:
        return await self.call("GET", f"/v1/cas/{ca_type}")

    async def sign_user(self, **body: Any) -> dict[str, Any]:
        return await self.call("POST", "/v1/certs/user", body)

    async def sign_host(self, **body: Any) -> dict[str, Any]:
        return await self.call("POST", "/v1/certs/host", body)

    async def agentless_host_cert(self, node: str, ssh_public_key: str) -> dict[str, Any]:
        """Proxy only: a host certificate for `ssh_public_key` valid for an agentless node's names
        → `ssh_cert`, `principals`, `expires`, `host_ca_ssh_keys`."""
        return await self.call(
            "POST", "/v1/certs/agentless-host", {"node": node, "ssh_public_key": ssh_public_key}
        )

    async def impersonate_ssh_cert(
        self, *, user: str, login: str, node: str, ssh_public_key: str, mfa_verified: str = ""
    ) -> dict[str, Any]:
        """Proxy only: a short-lived user certificate for one login on one agentless node, to log
        in there on the user's behalf → `ssh_cert`, `user`, `logins`, `expires`."""
        body = {"user": user, "login": login, "node": node, "ssh_public_key": ssh_public_key}
        if mfa_verified:
            body["mfa_verified"] = mfa_verified
        return await self.call("POST", "/v1/certs/impersonate", body)

    # ---- web sessions (the proxy, for browsers)

    async def webauthn_login_begin(self, **body: Any) -> dict[str, Any]:
        """`user`+`password`, or `passwordless=True` → `webauthn` request options."""
        return await self.call("POST", "/v1/webauthn/login/begin", body)

    async def create_web_session(self, **body: Any) -> dict[str, Any]:
        """Proxy only: sign a browser in → the session (id, token, keys, certificates)."""
        return await self.call("POST", "/v1/web/sessions", body)

    async def register_web_session(self, **body: Any) -> dict[str, Any]:
        """Proxy only: accept an invitation and sign the new user in."""
        return await self.call("POST", "/v1/web/register", body)

    async def get_web_session(self, session_id: str) -> dict[str, Any]:
        return await self.call("POST", "/v1/web/sessions/get", {"session_id": session_id})

    async def delete_web_session(self, session_id: str) -> None:
        await self.call("POST", "/v1/web/sessions/delete", {"session_id": session_id})

    async def renew_web_session(self, session_id: str) -> dict[str, Any]:
        return await self.call("POST", "/v1/web/sessions/renew", {"session_id": session_id})

    # ---- the caller's own second factors

    async def mfa_challenge(self) -> dict[str, Any]:
        """→ `otp` (bool) and `webauthn` (request options or None) for the caller's devices."""
        return await self.call("POST", "/v1/mfa/challenge", {})

    async def mfa_devices(self) -> list[dict[str, Any]]:
        return list((await self.call("GET", "/v1/mfa/devices")).get("items") or [])

    async def mfa_add_begin(self, **body: Any) -> dict[str, Any]:
        return await self.call("POST", "/v1/mfa/devices/begin", body)

    async def mfa_add_finish(self, **body: Any) -> dict[str, Any]:
        return await self.call("POST", "/v1/mfa/devices", body)

    async def mfa_delete(self, name: str, **body: Any) -> None:
        await self.call("DELETE", f"/v1/mfa/devices/{name}", body)

    async def change_password(self, **body: Any) -> None:
        await self.call("PUT", "/v1/password", body)

    async def session_mfa_certs(self, **body: Any) -> dict[str, Any]:
        """`ssh_public_key`/`tls_public_key` + `otp` or `webauthn` → one-minute MFA-verified certs."""
        return await self.call("POST", "/v1/certs/session-mfa", body)

    async def heartbeat(self, res: Resource) -> Resource:
        return resource_from_dict(
            await self.call("POST", "/v1/nodes/heartbeat", {"resource": resource_to_dict(res)})
        )

    async def visible_nodes(self) -> list[dict[str, Any]]:
        """Nodes the caller's roles may see, each with the logins allowed there."""
        data = await self.call("GET", "/v1/nodes/visible")
        return list(data.get("nodes") or [])

    async def db_heartbeat(self, res: Resource) -> Resource:
        return resource_from_dict(
            await self.call("POST", "/v1/db/heartbeat", {"resource": resource_to_dict(res)})
        )

    async def visible_databases(self) -> list[dict[str, Any]]:
        """Databases the caller may see (served right now), with the db users their roles name."""
        return list((await self.call("GET", "/v1/databases/visible")).get("databases") or [])

    async def db_user_cert(self, **body: Any) -> dict[str, Any]:
        """`db`, `db_user`, `db_name`, `tls_public_key` → a certificate routed to that database."""
        return await self.call("POST", "/v1/certs/db-user", body)

    async def db_client_cert(self, db_user: str, tls_public_key: str) -> dict[str, Any]:
        """Database services only: a db-CA client certificate for `db_user` → `tls_cert`, `ca_pem`."""
        return await self.call(
            "POST", "/v1/certs/db-client", {"db_user": db_user, "tls_public_key": tls_public_key}
        )

    async def db_server_cert(
        self, hosts: Sequence[str], tls_public_key: str, ttl: str = ""
    ) -> dict[str, Any]:
        body = {"hosts": list(hosts), "tls_public_key": tls_public_key, "ttl": ttl}
        return await self.call("POST", "/v1/certs/db-server", body)

    # ---- applications

    async def app_heartbeat(self, res: Resource) -> Resource:
        """App services: register a configured `app` (spec.host_id = ours) or ourselves (`app_service`)."""
        return resource_from_dict(
            await self.call("POST", "/v1/app/heartbeat", {"resource": resource_to_dict(res)})
        )

    async def visible_apps(self) -> list[dict[str, Any]]:
        """Apps served right now that the caller may open: `name`, `description`, `labels`,
        `uri_kind` (http or tcp), `public_addr`, `require_session_mfa`."""
        return list((await self.call("GET", "/v1/apps/visible")).get("apps") or [])

    async def app_user_cert(self, **body: Any) -> dict[str, Any]:
        """`app`, `tls_public_key` (+ `otp`/`webauthn` when roles require MFA) → a certificate routed
        to that app, like `db_user_cert`, plus `route_to_app` {name, public_addr, session_id}."""
        return await self.call("POST", "/v1/certs/app-user", body)

    async def create_app_session(self, **body: Any) -> dict[str, Any]:
        """As the user's web session: `app`, `web_session_id` (+ `otp`/`webauthn`) → `token` (one
        use, 60 s), `session_id`, `public_addr`, `expires`."""
        return await self.call("POST", "/v1/app-sessions", body)

    async def exchange_app_session(self, token: str) -> dict[str, Any]:
        """App services: spend a token → `secret` (the cookie), `session_id`, `user`, `app`,
        `public_addr`, `cert`, `expires`."""
        return await self.call("POST", "/v1/app-sessions/exchange", {"token": token})

    async def get_app_session(self, secret: str) -> dict[str, Any]:
        """App services: the session a cookie names; NotFoundError once it has ended."""
        return await self.call("POST", "/v1/app-sessions/get", {"secret": secret})

    async def app_jwt(self, cert: str, app: str) -> dict[str, Any]:
        """App services: the `Wardgate-Jwt-Assertion` for a user certificate routed to `app`
        → `jwt`, `expires`."""
        return await self.call("POST", "/v1/app/jwt", {"cert": cert, "app": app})

    async def explain(self, user: str, node: str, login: str) -> dict[str, Any]:
        return await self.call("POST", "/v1/access/explain", {"user": user, "node": node, "login": login})

    async def active_sessions(self) -> list[dict[str, Any]]:
        """Live sessions the caller may see (own, or joinable, or all with session list rights)."""
        return list((await self.call("GET", "/v1/sessions/active")).get("items") or [])

    async def find_session(self, sid: str) -> dict[str, Any]:
        return await self.call("GET", f"/v1/sessions/{sid}")

    async def upload_recording(self, sid: str, data: bytes) -> None:
        await self.call_bytes("PUT", f"/v1/recordings/{sid}", data)

    async def get_recording(self, sid: str) -> bytes:
        return await self.call_bytes("GET", f"/v1/recordings/{sid}")

    async def list_recordings(self) -> list[dict[str, Any]]:
        return (await self.call("GET", "/v1/recordings"))["recordings"]

    async def emit_events(self, events: Sequence[dict[str, Any]]) -> None:
        await self.call("POST", "/v1/events", {"events": list(events)})

    async def search_events(
        self,
        *,
        since: datetime | None = None,
        until: datetime | None = None,
        types: Sequence[str] = (),
        user: str = "",
        sid: str = "",
        limit: int = 100,
        cursor: str | None = None,
    ) -> tuple[list[dict[str, Any]], str | None]:
        params: list[tuple[str, str]] = [("limit", str(limit))]
        if since:
            params.append(("since", since.isoformat()))
        if until:
            params.append(("until", until.isoformat()))
        params += [("type", t) for t in types]
        if user:
            params.append(("user", user))
        if sid:
            params.append(("sid", sid))
        if cursor:
            params.append(("cursor", cursor))
        data = await self.call("GET", "/v1/events", params=params)
        return data["events"], data.get("cursor")

    @asynccontextmanager
    async def watch(self, kinds: Sequence[str]) -> AsyncIterator[AsyncIterator[ResourceEvent]]:
        """Snapshot + live changes, as ResourceCache.run wants them."""
        resp = await self._sess().get(
            self.base + "/v1/watch",
            params={"kinds": ",".join(kinds)},
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=60),
        )
        try:
            if resp.status >= 400:
                data = await resp.json()
                err = data.get("error") or {}
                raise ERRORS_BY_CODE.get(err.get("code", ""), WardgateError)(
                    err.get("message", "watch failed")
                )

            async def events() -> AsyncIterator[ResourceEvent]:
                async for raw in resp.content:
                    line = json.loads(raw)
                    if line["type"] == "ping":
                        continue
                    res = resource_from_dict(line["resource"]) if line.get("resource") else None
                    if res is not None:
                        res.metadata.revision = line.get("revision")
                    yield ResourceEvent(
                        ResourceEventType(line["type"]),
                        line.get("kind", ""),
                        line.get("name", ""),
                        line.get("revision", 0),
                        res,
                    )

            yield events()
        finally:
            resp.close()


def check_ca_pin(ca_pems: Sequence[str], ca_pin: str) -> None:
    """Refuse CAs that do not match the pin (an empty pin means the caller chose --insecure)."""
    if not ca_pin:
        return
    cas = [x509.load_pem_x509_certificate(p.encode()) for p in ca_pems]
    if not any(tls_ca_pin(ca) == ca_pin.strip() for ca in cas):
        raise AuthenticationError(
            "the server's CA does not match --ca-pin: you may be talking to an impostor; "
            "check the pin with `wardctl status` on the auth server"
        )


def _host_port(addr: str, default_port: int = 3025) -> str:
    return addr if ":" in addr.rsplit("]", 1)[-1] else f"{addr}:{default_port}"


def ssl_hint(addr: str, exc: Exception, peer: str = "auth server") -> str:
    text = str(exc)
    if "expired" in text:
        return f"the {peer} at {addr} refused our certificate: it has expired; log in again"
    if "unknown ca" in text or "certificate verify failed" in text or "bad certificate" in text:
        return f"TLS with {addr} failed ({text}): not a certificate of this cluster, or a wrong pin"
    return f"TLS with {addr} failed: {text}"
