"""The auth API: HTTPS + JSON over mutual TLS (default port 3025).

Each request's identity comes from the client certificate (verified by TLS against the
cluster CAs, then decoded); a few calls (ping, join, invite registration, login) are open
because the caller has no certificate yet, and those are rate-limited per address.
Errors are `{"error": {"code", "message"}}` with an HTTP status; the typed client turns them
back into the same exception classes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from aiohttp import web
from cryptography import x509
from pydantic import ValidationError

from wardgate import __version__
from wardgate.api.codec import ParseError, resource_from_dict, resource_to_dict
from wardgate.api.identityfile import load_key_pair
from wardgate.api.resources import LockTarget
from wardgate.auth.identity import Identity
from wardgate.auth.server import AuthServer, HostCerts, UserCerts
from wardgate.auth.websessions import WebSessionRecord
from wardgate.durations import format_duration, parse_duration
from wardgate.errors import (
    AuthenticationError,
    BadParameterError,
    LimitExceededError,
    WardgateError,
)

log = logging.getLogger(__name__)

PUBLIC_PATHS = {
    "/v1/ping",
    "/v1/join",
    "/v1/invites/begin",
    "/v1/invites/complete",
    "/v1/login",
    "/v1/webauthn/login/begin",
}
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
IDENTITY = web.RequestKey("identity", Identity)


class RateLimiter:
    """Token bucket per remote address for unauthenticated calls (password guessing, token spraying)."""

    def __init__(self, rate: float = 2.0, burst: int = 20) -> None:
        self.rate, self.burst = rate, burst
        self._buckets: dict[str, tuple[float, float]] = {}

    def check(self, key: str) -> None:
        now = time.monotonic()
        tokens, last = self._buckets.get(key, (float(self.burst), now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        if tokens < 1:
            raise LimitExceededError("too many requests from this address: wait a few seconds and retry")
        self._buckets[key] = (tokens - 1, now)
        if len(self._buckets) > 10000:
            self._buckets.clear()


def error_response(exc: WardgateError) -> web.Response:
    return web.json_response({"error": {"code": exc.code, "message": str(exc)}}, status=exc.status)


def _user_certs_json(c: UserCerts, auth: AuthServer) -> dict[str, Any]:
    return {
        "ssh_cert": c.ssh_cert,
        "tls_cert": c.tls_cert,
        "ttl": format_duration(c.ttl),
        "expires": c.identity.expires.isoformat() if c.identity.expires else None,
        "user": c.identity.user,
        "roles": list(c.identity.roles),
        "logins": list(c.identity.logins),
        **_trust_json(auth),
    }


def _host_certs_json(c: HostCerts, auth: AuthServer) -> dict[str, Any]:
    return {"host_id": c.host_id, "tls_cert": c.tls_cert, "ssh_cert": c.ssh_cert, **_trust_json(auth)}


def _trust_json(auth: AuthServer) -> dict[str, Any]:
    user_ca, host_ca = auth.ca("user"), auth.ca("host")
    return {
        "cluster_name": auth.cluster_name,
        "host_ca_pems": [k.tls_cert_pem for k in host_ca.spec.active_keys],
        "user_ca_pems": [k.tls_cert_pem for k in user_ca.spec.active_keys],
        "host_ca_ssh_keys": auth.ca_ssh_keys("host"),
        "user_ca_ssh_keys": auth.ca_ssh_keys("user"),
    }


class AuthAPI:
    def __init__(self, auth: AuthServer) -> None:
        self.auth = auth
        self.limiter = RateLimiter()
        self._ident_cache: dict[bytes, Identity] = {}
        self._runner: web.AppRunner | None = None
        self.port = 0
        self.app = self._build_app()

    # ------------------------------------------------------------------ wiring

    def _build_app(self) -> web.Application:
        app = web.Application(middlewares=[self._errors, self._authenticate], client_max_size=512 << 20)
        r = app.router
        r.add_get("/v1/ping", self.ping)
        r.add_post("/v1/join", self.join)
        r.add_post("/v1/invites/begin", self.invite_begin)
        r.add_post("/v1/invites/complete", self.invite_complete)
        r.add_post("/v1/login", self.login)
        r.add_post("/v1/webauthn/login/begin", self.webauthn_login_begin)
        r.add_post("/v1/web/sessions", self.create_web_session)
        r.add_post("/v1/web/register", self.register_web_session)
        r.add_post("/v1/web/sessions/get", self.get_web_session)
        r.add_post("/v1/web/sessions/delete", self.delete_web_session)
        r.add_post("/v1/web/sessions/renew", self.renew_web_session)
        r.add_post("/v1/mfa/challenge", self.mfa_challenge)
        r.add_get("/v1/mfa/devices", self.mfa_devices)
        r.add_post("/v1/mfa/devices/begin", self.mfa_add_begin)
        r.add_post("/v1/mfa/devices", self.mfa_add_finish)
        r.add_delete("/v1/mfa/devices/{name}", self.mfa_delete)
        r.add_put("/v1/password", self.change_password)
        r.add_post("/v1/certs/session-mfa", self.session_mfa_certs)
        r.add_get("/v1/status", self.status)
        r.add_get("/v1/whoami", self.whoami)
        r.add_get("/v1/resources/{kind}", self.list_resources)
        r.add_get("/v1/resources/{kind}/{name}", self.get_resource)
        r.add_post("/v1/resources", self.put_resource)
        r.add_delete("/v1/resources/{kind}/{name}", self.delete_resource)
        r.add_post("/v1/users", self.create_user)
        r.add_post("/v1/users/{name}/reset", self.reset_user)
        r.add_post("/v1/users/{name}/unlock", self.unlock_user)
        r.add_post("/v1/tokens", self.create_token)
        r.add_post("/v1/locks", self.create_lock)
        r.add_get("/v1/cas/{type}", self.export_ca)
        r.add_post("/v1/certs/user", self.sign_user)
        r.add_post("/v1/certs/host", self.sign_host)
        r.add_post("/v1/certs/agentless-host", self.sign_agentless_host)
        r.add_post("/v1/certs/impersonate", self.impersonate)
        r.add_post("/v1/nodes/heartbeat", self.heartbeat)
        r.add_post("/v1/db/heartbeat", self.db_heartbeat)
        r.add_get("/v1/databases/visible", self.visible_databases)
        r.add_post("/v1/certs/db-user", self.db_user_cert)
        r.add_post("/v1/certs/db-client", self.db_client_cert)
        r.add_post("/v1/certs/db-server", self.db_server_cert)
        r.add_post("/v1/app/heartbeat", self.app_heartbeat)
        r.add_get("/v1/apps/visible", self.visible_apps)
        r.add_post("/v1/certs/app-user", self.app_user_cert)
        r.add_post("/v1/app-sessions", self.create_app_session)
        r.add_post("/v1/app-sessions/exchange", self.exchange_app_session)
        r.add_post("/v1/app-sessions/get", self.get_app_session)
        r.add_post("/v1/app/jwt", self.app_jwt)
        r.add_get("/v1/nodes/visible", self.visible_nodes)
        r.add_post("/v1/access/explain", self.explain)
        r.add_post("/v1/events", self.emit_events)
        r.add_get("/v1/events", self.search_events)
        r.add_get("/v1/watch", self.watch)
        r.add_get("/v1/sessions/active", self.active_sessions)
        r.add_get("/v1/sessions/{sid}", self.find_session)
        r.add_get("/v1/recordings", self.list_recordings)
        r.add_get("/v1/recordings/{sid}", self.get_recording)
        r.add_put("/v1/recordings/{sid}", self.put_recording)
        return app

    def server_ssl_context(self, cert_pem: str, key_pem: str) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        load_key_pair(ctx, cert_pem, key_pem)
        cas = [k.tls_cert_pem for t in ("user", "host") for k in self.auth.ca(t).spec.active_keys]
        ctx.load_verify_locations(cadata="".join(cas))
        ctx.verify_mode = ssl.CERT_OPTIONAL
        return ctx

    async def start(self, host: str, port: int, ssl_ctx: ssl.SSLContext) -> int:
        self._runner = web.AppRunner(self.app, access_log=None, handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host or None, port, ssl_context=ssl_ctx, backlog=1024)
        await site.start()
        server = site._server  # the bound socket tells the real port when port=0
        if server is not None and server.sockets:  # type: ignore[union-attr]
            self.port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self.port

    async def close(self) -> None:
        if self._runner:
            await self._runner.cleanup()

    # ------------------------------------------------------------------ middlewares

    @web.middleware
    async def _errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except WardgateError as exc:
            return error_response(exc)
        except ValidationError as exc:
            first = exc.errors()[0]
            loc = ".".join(str(x) for x in first.get("loc", ()))
            return error_response(BadParameterError(f"{loc}: {first.get('msg')}"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            return error_response(BadParameterError("request body is not valid JSON"))
        except web.HTTPException:
            raise
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("auth API %s %s failed", request.method, request.path)
            return web.json_response(
                {"error": {"code": "internal", "message": "internal error: see the auth service log"}},
                status=500,
            )

    @web.middleware
    async def _authenticate(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in PUBLIC_PATHS:
            # A proxy forwarding logins is one address for many users: those are limited per
            # client address in the handler instead (see _client_addr).
            if not self._is_proxy(request):
                self.limiter.check(request.remote or "?")
            return await handler(request)
        ident = self._identity(request)
        request[IDENTITY] = ident
        return await handler(request)

    def _identity(self, request: web.Request) -> Identity:
        sslobj = request.transport.get_extra_info("ssl_object") if request.transport else None
        der = sslobj.getpeercert(binary_form=True) if sslobj else None
        if not der:
            raise AuthenticationError(
                "this call needs a client certificate: use `ward login` or the admin identity file"
            )
        ident = self._ident_cache.get(der)
        now = self.auth.now()
        if ident is None or (ident.expires and ident.expires <= now):
            ident = self.auth.identify(x509.load_der_x509_certificate(der))
            if len(self._ident_cache) > 4096:
                self._ident_cache.clear()
            self._ident_cache[der] = ident
        return ident

    # ------------------------------------------------------------------ helpers

    @staticmethod
    async def _body(request: web.Request) -> dict[str, Any]:
        data = await request.json() if request.can_read_body else {}
        if not isinstance(data, dict):
            raise BadParameterError("request body must be a JSON object")
        return data

    @staticmethod
    def _ttl(data: dict[str, Any], key: str = "ttl") -> timedelta | None:
        v = data.get(key)
        if v in (None, ""):
            return None
        try:
            return parse_duration(v)
        except ValueError as exc:
            raise BadParameterError(f"{key}: {exc}") from None

    # ------------------------------------------------------------------ public calls

    async def ping(self, request: web.Request) -> web.Response:
        trust = _trust_json(self.auth)
        return web.json_response(
            {
                "cluster_name": self.auth.cluster_name,
                "server_version": __version__,
                "second_factor": self.auth.cfg.prefs.second_factor,
                "passwordless": self.auth.cfg.prefs.passwordless,
                "webauthn_rp_id": self.auth.cfg.prefs.webauthn.rp_id if self.auth.cfg.prefs.webauthn else "",
                "server_time": datetime.now(UTC).isoformat(),
                "host_ca_pems": trust["host_ca_pems"],
            }
        )

    async def join(self, request: web.Request) -> web.Response:
        d = await self._body(request)
        certs = await self.auth.join(
            str(d.get("token", "")),
            system_role=str(d.get("role", "")),
            node_name=str(d.get("node_name", "")),
            host_id=str(d.get("host_id", "")),
            ssh_public_key=str(d.get("ssh_public_key", "")),
            tls_public_key=str(d.get("tls_public_key", "")),
            addresses=[str(a) for a in d.get("addresses", [])],
            remote_addr=request.remote or "",
        )
        return web.json_response(_host_certs_json(certs, self.auth))

    async def invite_begin(self, request: web.Request) -> web.Response:
        d = await self._body(request)
        return web.json_response(await self.auth.users.begin_registration(str(d.get("token", ""))))

    async def invite_complete(self, request: web.Request) -> web.Response:
        d = await self._body(request)
        user = await self.auth.users.complete_registration(
            str(d.get("token", "")), str(d.get("password", "")), str(d.get("otp", ""))
        )
        return web.json_response({"user": user.name, "roles": user.spec.roles})

    def _is_proxy(self, request: web.Request) -> bool:
        try:
            return self._identity(request).system_role == "proxy"
        except WardgateError:
            return False

    def _client_addr(self, request: web.Request, body: dict[str, Any]) -> str:
        """The user's address: the proxy's word for it when the proxy forwards the request."""
        if self._is_proxy(request):
            addr = str(body.get("client_addr") or request.remote or "")
            self.limiter.check(addr.rsplit(":", 1)[0] if addr.count(":") == 1 else addr)
            return addr
        return request.remote or ""

    async def login(self, request: web.Request) -> web.Response:
        d = await self._body(request)
        certs = await self.auth.login(
            str(d.get("user", "")),
            str(d.get("password", "")),
            str(d.get("otp", "")),
            ssh_public_key=str(d.get("ssh_public_key", "")),
            tls_public_key=str(d.get("tls_public_key", "")),
            ttl=self._ttl(d),
            remote_addr=self._client_addr(request, d),
        )
        return web.json_response(_user_certs_json(certs, self.auth))

    async def webauthn_login_begin(self, request: web.Request) -> web.Response:
        """The WebAuthn challenge for a sign-in: after the password, or passwordless."""
        d = await self._body(request)
        addr = self._client_addr(request, d)
        if d.get("passwordless"):
            return web.json_response(await self.auth.users.begin_passwordless())
        return web.json_response(
            await self.auth.users.begin_login_challenge(
                str(d.get("user", "")), str(d.get("password", "")), remote_addr=addr
            )
        )

    # ------------------------------------------------------------------ web sessions (proxy only)

    @staticmethod
    def _webauthn(d: dict[str, Any]) -> dict[str, Any] | None:
        v = d.get("webauthn")
        if v is None:
            return None
        if not isinstance(v, dict):
            raise BadParameterError("webauthn must be the credential as a JSON object")
        return v

    @staticmethod
    def _web_session_json(rec: WebSessionRecord, token: str = "") -> dict[str, Any]:
        out = rec.to_json()
        if token:
            out["token"] = token
        return out

    async def create_web_session(self, request: web.Request) -> web.Response:
        d = await self._body(request)
        rec, token = await self.auth.create_web_session(
            request[IDENTITY],
            user=str(d.get("user", "")),
            password=str(d.get("password", "")),
            otp=str(d.get("otp", "")),
            webauthn=self._webauthn(d),
            remote_addr=self._client_addr(request, d),
        )
        return web.json_response(self._web_session_json(rec, token), status=201)

    async def register_web_session(self, request: web.Request) -> web.Response:
        d = await self._body(request)
        self._client_addr(request, d)  # rate limit guesses at invitation tokens per user address
        rec, token = await self.auth.register_web_session(
            request[IDENTITY],
            str(d.get("token", "")),
            password=str(d.get("password", "")),
            otp=str(d.get("otp", "")),
            webauthn=self._webauthn(d),
            device_name=str(d.get("device_name", "")),
        )
        return web.json_response(self._web_session_json(rec, token), status=201)

    async def get_web_session(self, request: web.Request) -> web.Response:
        d = await self._body(request)
        rec = await self.auth.get_web_session(request[IDENTITY], str(d.get("session_id", "")))
        return web.json_response(self._web_session_json(rec))

    async def delete_web_session(self, request: web.Request) -> web.Response:
        d = await self._body(request)
        await self.auth.delete_web_session(request[IDENTITY], str(d.get("session_id", "")))
        return web.json_response({})

    async def renew_web_session(self, request: web.Request) -> web.Response:
        d = await self._body(request)
        rec, token = await self.auth.renew_web_session(request[IDENTITY], str(d.get("session_id", "")))
        return web.json_response(self._web_session_json(rec, token))

    # ------------------------------------------------------------------ the caller's own second factors

    async def mfa_challenge(self, request: web.Request) -> web.Response:
        name = self.auth.self_user(request[IDENTITY])
        return web.json_response(await self.auth.users.mfa_challenge(name))

    async def mfa_devices(self, request: web.Request) -> web.Response:
        name = self.auth.self_user(request[IDENTITY])
        return web.json_response({"items": await self.auth.users.mfa_devices(name)})

    async def mfa_add_begin(self, request: web.Request) -> web.Response:
        d = await self._body(request)
        name = self.auth.self_user(request[IDENTITY])
        out = await self.auth.users.begin_add_device(
            name,
            str(d.get("type", "")),
            str(d.get("name", "")),
            otp_code=str(d.get("otp", "")),
            webauthn_response=self._webauthn(d),
        )
        return web.json_response(out)

    async def mfa_add_finish(self, request: web.Request) -> web.Response:
        d = await self._body(request)
        name = self.auth.self_user(request[IDENTITY])
        out = await self.auth.users.finish_add_device(
            name, str(d.get("name", "")), otp_code=str(d.get("otp", "")), webauthn_response=self._webauthn(d)
        )
        return web.json_response(out, status=201)

    async def mfa_delete(self, request: web.Request) -> web.Response:
        d = await self._body(request)
        name = self.auth.self_user(request[IDENTITY])
        await self.auth.users.delete_device(
            name,
            request.match_info["name"],
            otp_code=str(d.get("otp", "")),
            webauthn_response=self._webauthn(d),
        )
        return web.json_response({})

    async def change_password(self, request: web.Request) -> web.Response:
        d = await self._body(request)
        name = self.auth.self_user(request[IDENTITY])
        await self.auth.users.change_password(
            name,
            str(d.get("old_password", "")),
            str(d.get("new_password", "")),
            otp_code=str(d.get("otp", "")),
            webauthn_response=self._webauthn(d),
        )
        return web.json_response({})

    async def session_mfa_certs(self, request: web.Request) -> web.Response:
        d = await self._body(request)
        certs = await self.auth.session_mfa_certs(
            request[IDENTITY],
            ssh_public_key=str(d.get("ssh_public_key", "")),
            tls_public_key=str(d.get("tls_public_key", "")),
            otp=str(d.get("otp", "")),
            webauthn=self._webauthn(d),
        )
        return web.json_response(_user_certs_json(certs, self.auth))

    # ------------------------------------------------------------------ authenticated calls

    async def status(self, request: web.Request) -> web.Response:
        self.auth.authorize(request[IDENTITY], "cert_authority", "read")
        return web.json_response(self.auth.status())

    async def whoami(self, request: web.Request) -> web.Response:
        ident: Identity = request[IDENTITY]
        return web.json_response(
            {
                "user": ident.user,
                "roles": list(ident.roles),
                "system_role": ident.system_role,
                "logins": list(ident.logins),
                "expires": ident.expires.isoformat() if ident.expires else None,
            }
        )

    async def list_resources(self, request: web.Request) -> web.Response:
        items = await self.auth.list_resources(request[IDENTITY], request.match_info["kind"])
        return web.json_response({"items": [resource_to_dict(r) for r in items]})

    async def get_resource(self, request: web.Request) -> web.Response:
        res = await self.auth.get_resource(
            request[IDENTITY], request.match_info["kind"], request.match_info["name"]
        )
        return web.json_response(resource_to_dict(res))

    async def put_resource(self, request: web.Request) -> web.Response:
        d = await self._body(request)
        try:
            res = resource_from_dict(d.get("resource") or {}, source="request")
        except ParseError as exc:
            raise BadParameterError(str(exc)) from None
        out = await self.auth.put_resource(request[IDENTITY], res, force=bool(d.get("force")))
        return web.json_response(resource_to_dict(out), status=201)

    async def delete_resource(self, request: web.Request) -> web.Response:
        await self.auth.delete_resource(
            request[IDENTITY], request.match_info["kind"], request.match_info["name"]
        )
        return web.json_response({})

    async def create_user(self, request: web.Request) -> web.Response:
        d = await self._body(request)
        traits = d.get("traits") or {}
        if not isinstance(traits, dict) or not all(isinstance(v, list) for v in traits.values()):
            raise BadParameterError("traits must map names to lists of strings")
        user, invite = await self.auth.create_user(
            request[IDENTITY], str(d.get("name", "")), roles=list(d.get("roles") or []), traits=traits
        )
        return web.json_response({"user": resource_to_dict(user), **self._invite_json(invite)}, status=201)

    def _invite_json(self, invite: Any) -> dict[str, Any]:
        addr = self.auth.cfg.public_addr
        return {
            "invite_token": invite.token,
            "invite_expires": invite.expires.isoformat(),
            "invite_url": f"https://{addr}/web/invite/{invite.token}" if addr else "",
        }

    async def reset_user(self, request: web.Request) -> web.Response:
        invite = await self.auth.reset_user(request[IDENTITY], request.match_info["name"])
        return web.json_response(self._invite_json(invite))

    async def unlock_user(self, request: web.Request) -> web.Response:
        self.auth.authorize(request[IDENTITY], "user", "update")
        await self.auth.users.unlock(request.match_info["name"], by=request[IDENTITY].user)
        return web.json_response({})

    async def create_token(self, request: web.Request) -> web.Response:
        d = await self._body(request)
        secret, tok = await self.auth.create_token(
            request[IDENTITY], d.get("roles") or [], self._ttl(d) or timedelta(minutes=30)
        )
        return web.json_response(
            {
                "token": secret,
                "name": tok.name,
                "roles": tok.spec.roles,  # type: ignore[attr-defined]
                "expires": tok.metadata.expires.isoformat() if tok.metadata.expires else None,
            },
            status=201,
        )

    async def create_lock(self, request: web.Request) -> web.Response:
        d = await self._body(request)
        target = LockTarget.model_validate(d.get("target") or {})
        lock = await self.auth.create_lock(
            request[IDENTITY], target, ttl=self._ttl(d), message=str(d.get("message", ""))
        )
        return web.json_response(resource_to_dict(lock), status=201)

    async def export_ca(self, request: web.Request) -> web.Response:
        ca_type = request.match_info["type"]
        if ca_type not in ("user", "host", "db"):
            raise BadParameterError("CA type must be user, host or db")
        ca = self.auth.ca(ca_type).without_secrets()
        return web.json_response(
            {
                "type": ca_type,
                "cluster_name": self.auth.cluster_name,
                "ssh_public_keys": [k.ssh_public_key for k in ca.spec.active_keys if k.ssh_public_key],
                "tls_cert_pems": [k.tls_cert_pem for k in ca.spec.active_keys if k.tls_cert_pem],
            }
        )

    async def sign_user(self, request: web.Request) -> web.Response:
        d = await self._body(request)
        certs = await self.auth.sign_for(
            request[IDENTITY],
            user=str(d.get("user", "")),
            ssh_public_key=str(d.get("ssh_public_key", "")),
            tls_public_key=str(d.get("tls_public_key", "")),
            ttl=self._ttl(d),
        )
        return web.json_response(_user_certs_json(certs, self.auth))

    async def sign_host(self, request: web.Request) -> web.Response:
        d = await self._body(request)
        certs = await self.auth.sign_host(
            request[IDENTITY],
            host_id=str(d.get("host_id", "")),
            node_name=str(d.get("node_name", "")),
            ssh_public_key=str(d.get("ssh_public_key", "")),
            tls_public_key=str(d.get("tls_public_key", "")),
            addresses=[str(a) for a in d.get("addresses", [])],
            ttl=self._ttl(d) or timedelta(days=30),
            system_role=str(d.get("role", "node")),
        )
        return web.json_response(_host_certs_json(certs, self.auth))

    async def sign_agentless_host(self, request: web.Request) -> web.Response:
        d = await self._body(request)
        cert, principals, expires = await self.auth.sign_agentless_host(
            request[IDENTITY],
            node=str(d.get("node", "")),
            ssh_public_key=str(d.get("ssh_public_key", "")),
        )
        return web.json_response(
            {
                "ssh_cert": cert,
                "principals": principals,
                "expires": expires.isoformat(),
                "host_ca_ssh_keys": self.auth.ca_ssh_keys("host"),
            }
        )

    async def impersonate(self, request: web.Request) -> web.Response:
        d = await self._body(request)
        cert, ident = await self.auth.impersonate_ssh(
            request[IDENTITY],
            user=str(d.get("user", "")),
            login=str(d.get("login", "")),
            node=str(d.get("node", "")),
            ssh_public_key=str(d.get("ssh_public_key", "")),
            mfa_verified=str(d.get("mfa_verified", "")),
        )
        return web.json_response(
            {
                "ssh_cert": cert,
                "user": ident.user,
                "logins": list(ident.logins),
                "expires": ident.expires.isoformat() if ident.expires else None,
            }
        )

    async def heartbeat(self, request: web.Request) -> web.Response:
        d = await self._body(request)
        res = resource_from_dict(d.get("resource") or {}, source="heartbeat")
        out = await self.auth.upsert_node(request[IDENTITY], res)  # type: ignore[arg-type]
        return web.json_response(resource_to_dict(out))

    async def db_heartbeat(self, request: web.Request) -> web.Response:
        d = await self._body(request)
        res = await self.auth.upsert_heartbeat(request[IDENTITY], resource_from_dict(d.get("resource") or {}))
        return web.json_response(resource_to_dict(res))

    async def visible_databases(self, request: web.Request) -> web.Response:
        ident: Identity = request[IDENTITY]
        items = self.auth.visible_databases(ident)
        mfa = self.auth.checker_for(ident).options.require_session_mfa and not ident.mfa_verified
        return web.json_response(
            {
                "databases": [
                    {
                        "name": db.name,
                        "description": db.metadata.description,
                        "protocol": db.spec.protocol,
                        "labels": db.metadata.labels,
                        "db_users": users,
                        "require_session_mfa": mfa,
                    }
                    for db, users in items
                ]
            }
        )

    async def db_user_cert(self, request: web.Request) -> web.Response:
        d = await self._body(request)
        certs = await self.auth.issue_db_cert(
            request[IDENTITY],
            db=str(d.get("db", "")),
            db_user=str(d.get("db_user", "")),
            db_name=str(d.get("db_name", "")),
            tls_public_key=str(d.get("tls_public_key", "")),
            otp=str(d.get("otp", "")),
            webauthn=self._webauthn(d),
        )
        return web.json_response(_user_certs_json(certs, self.auth))

    async def db_client_cert(self, request: web.Request) -> web.Response:
        d = await self._body(request)
        cert, ca = self.auth.sign_db_client(
            request[IDENTITY],
            db_user=str(d.get("db_user", "")),
            tls_public_key=str(d.get("tls_public_key", "")),
        )
        return web.json_response({"tls_cert": cert, "ca_pem": ca})

    async def db_server_cert(self, request: web.Request) -> web.Response:
        d = await self._body(request)
        cert, ca = self.auth.sign_db_server(
            request[IDENTITY],
            hosts=[str(h) for h in d.get("hosts") or []],
            tls_public_key=str(d.get("tls_public_key", "")),
            ttl=self._ttl(d) or timedelta(days=365),
        )
        return web.json_response({"tls_cert": cert, "ca_pem": ca})

    # ------------------------------------------------------------------ applications

    async def app_heartbeat(self, request: web.Request) -> web.Response:
        d = await self._body(request)
        res = await self.auth.upsert_heartbeat(request[IDENTITY], resource_from_dict(d.get("resource") or {}))
        return web.json_response(resource_to_dict(res))

    async def visible_apps(self, request: web.Request) -> web.Response:
        ident: Identity = request[IDENTITY]
        apps = self.auth.visible_apps(ident)
        mfa = (
            not ident.system_role
            and self.auth.checker_for(ident).options.require_session_mfa
            and not ident.mfa_verified
        )
        return web.json_response(
            {
                "apps": [
                    {
                        "name": app.name,
                        "description": app.metadata.description,
                        "labels": app.metadata.labels,
                        "uri_kind": app.uri_kind,
                        "public_addr": self.auth.app_public_addr(app),
                        "require_session_mfa": mfa,
                    }
                    for app in apps
                ]
            }
        )

    async def app_user_cert(self, request: web.Request) -> web.Response:
        d = await self._body(request)
        certs = await self.auth.issue_app_cert(
            request[IDENTITY],
            app=str(d.get("app", "")),
            tls_public_key=str(d.get("tls_public_key", "")),
            otp=str(d.get("otp", "")),
            webauthn=self._webauthn(d),
        )
        out = _user_certs_json(certs, self.auth)
        route = certs.identity.route_to_app
        if route is not None:
            out["route_to_app"] = {
                "name": route.name,
                "public_addr": route.public_addr,
                "session_id": route.session_id,
            }
        return web.json_response(out)

    async def create_app_session(self, request: web.Request) -> web.Response:
        d = await self._body(request)
        token, rec = await self.auth.create_app_session(
            request[IDENTITY],
            app=str(d.get("app", "")),
            web_session_id=str(d.get("web_session_id", "")),
            otp=str(d.get("otp", "")),
            webauthn=self._webauthn(d),
            remote_addr=request.remote or "",
        )
        return web.json_response(
            {
                "token": token,
                "session_id": rec.session_id,
                "public_addr": rec.public_addr,
                "expires": rec.expires.isoformat(),
            },
            status=201,
        )

    async def exchange_app_session(self, request: web.Request) -> web.Response:
        d = await self._body(request)
        secret, rec = await self.auth.exchange_app_session(request[IDENTITY], str(d.get("token", "")))
        return web.json_response({"secret": secret, **rec.public_json()})

    async def get_app_session(self, request: web.Request) -> web.Response:
        d = await self._body(request)
        rec = await self.auth.get_app_session(request[IDENTITY], str(d.get("secret", "")))
        return web.json_response(rec.public_json())

    async def app_jwt(self, request: web.Request) -> web.Response:
        d = await self._body(request)
        token, expires = self.auth.sign_app_jwt(
            request[IDENTITY], cert_pem=str(d.get("cert", "")), app=str(d.get("app", ""))
        )
        return web.json_response({"jwt": token, "expires": expires.isoformat()})

    async def visible_nodes(self, request: web.Request) -> web.Response:
        ident: Identity = request[IDENTITY]
        nodes = self.auth.visible_nodes(ident)
        mfa = not ident.system_role and self.auth.checker_for(ident).options.require_session_mfa
        return web.json_response(
            {
                "nodes": [
                    {
                        "name": n.name,
                        "hostname": n.spec.hostname,
                        "addr": n.spec.addr,
                        "labels": n.all_labels(),
                        "logins": logins,
                        "tunnel": n.spec.tunnel,
                        "host_id": n.spec.host_id,
                        "agentless": n.spec.agentless,
                        "require_session_mfa": mfa,
                    }
                    for n, logins in nodes
                ]
            }
        )

    async def explain(self, request: web.Request) -> web.Response:
        d = await self._body(request)
        dec = self.auth.explain_node_access(
            request[IDENTITY], str(d.get("user", "")), str(d.get("node", "")), str(d.get("login", ""))
        )
        return web.json_response(
            {
                "allowed": dec.allowed,
                "reason": dec.reason,
                "role": dec.role,
                "trace": list(dec.trace),
            }
        )

    async def emit_events(self, request: web.Request) -> web.Response:
        d = await self._body(request)
        events = d.get("events") or []
        if not isinstance(events, list):
            raise BadParameterError("events must be a list")
        await self.auth.emit_events(request[IDENTITY], events)
        return web.json_response({})

    async def search_events(self, request: web.Request) -> web.Response:
        q = request.query
        try:
            since = datetime.fromisoformat(q["since"]) if q.get("since") else None
            until = datetime.fromisoformat(q["until"]) if q.get("until") else None
            limit = int(q.get("limit", "100"))
        except ValueError as exc:
            raise BadParameterError(f"bad query parameter: {exc}") from None
        events, cursor = await self.auth.search_events(
            request[IDENTITY],
            since=since,
            until=until,
            types=[t for t in q.getall("type", []) if t],
            user=q.get("user", ""),
            sid=q.get("sid", ""),
            limit=limit,
            cursor=q.get("cursor") or None,
            order=q.get("order", "desc"),
        )
        return web.json_response({"events": events, "cursor": cursor})

    async def active_sessions(self, request: web.Request) -> web.Response:
        return web.json_response({"items": await self.auth.active_sessions(request[IDENTITY])})

    async def find_session(self, request: web.Request) -> web.Response:
        return web.json_response(await self.auth.find_session(request[IDENTITY], request.match_info["sid"]))

    async def put_recording(self, request: web.Request) -> web.Response:
        data = await request.read()
        await self.auth.store_recording(request[IDENTITY], request.match_info["sid"], data)
        return web.json_response({})

    async def get_recording(self, request: web.Request) -> web.Response:
        data = await self.auth.read_recording(request[IDENTITY], request.match_info["sid"])
        return web.Response(body=data, content_type="application/gzip")

    async def list_recordings(self, request: web.Request) -> web.Response:
        return web.json_response({"recordings": await self.auth.list_recordings(request[IDENTITY])})

    async def watch(self, request: web.Request) -> web.StreamResponse:
        kinds = [k for k in request.query.get("kinds", "").split(",") if k]
        if not kinds:
            raise BadParameterError("kinds: name the kinds to watch, e.g. ?kinds=role,lock")
        async with self.auth.watch(request[IDENTITY], kinds) as events:
            resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
            await resp.prepare(request)
            queue: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=10000)

            async def pump() -> None:
                try:
                    async for ev in events:
                        line = {
                            "type": ev.type.value,
                            "kind": ev.kind,
                            "name": ev.name,
                            "revision": ev.revision,
                        }
                        if ev.resource is not None:
                            line["resource"] = resource_to_dict(ev.resource)
                        queue.put_nowait(json.dumps(line).encode() + b"\n")
                finally:
                    with contextlib.suppress(asyncio.QueueFull):
                        queue.put_nowait(None)

            task = asyncio.create_task(pump())
            try:
                while True:
                    try:
                        chunk = await asyncio.wait_for(queue.get(), 15)
                    except TimeoutError:
                        chunk = b'{"type":"ping"}\n'
                    if chunk is None:
                        break
                    await resp.write(chunk)
            except (ConnectionResetError, asyncio.QueueFull):
                pass
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            return resp
