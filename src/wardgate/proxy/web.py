"""The proxy's web handler: the browser UI, its JSON API, and the calls `ward` makes.

Security headers go on every answer (a strict Content-Security-Policy: no inline scripts), and
every error is JSON a person can act on. Static files come from the package (`wardgate/web/`);
any `/web/...` page path gets the single-page app's `index.html`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from wardgate import __version__
from wardgate.api.client import AuthClient
from wardgate.api.codec import ParseError
from wardgate.auth import jwt
from wardgate.errors import BadParameterError, WardgateError

log = logging.getLogger(__name__)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
WEB_ROOT = Path(__file__).resolve().parent.parent / "web"

CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'self'",
        "script-src 'self' 'wasm-unsafe-eval'",  # asciinema-player's terminal is WebAssembly
        "style-src 'self' 'unsafe-inline'",  # xterm.js sets element styles; no inline scripts
        "img-src 'self' data:",
        "connect-src 'self'",
        "frame-ancestors 'none'",
        "base-uri 'none'",
        "form-action 'self'",
        "object-src 'none'",
    ]
)
SECURITY_HEADERS = {
    "Strict-Transport-Security": "max-age=31536000; includeSubDomains",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "Cross-Origin-Opener-Policy": "same-origin",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=()",
}


def error_json(code: str, message: str, status: int, **extra: Any) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message, **extra}}, status=status)


class ProxyWeb:
    def __init__(
        self,
        auth: AuthClient,
        *,
        cluster_name: str,
        public_addr: str,
        host_ca_pems: list[str],
        second_factor: str,
        passwordless: bool = False,
        webauthn_rp_id: str = "",
        jwt_public_keys: Callable[[], list[str]] = list,
    ) -> None:
        self.auth = auth
        self.cluster_name = cluster_name
        self.public_addr = public_addr
        self.host_ca_pems = host_ca_pems
        self.second_factor = second_factor
        self.passwordless = passwordless
        self.webauthn_rp_id = webauthn_rp_id
        self.jwt_public_keys = jwt_public_keys
        self.app = web.Application(middlewares=[self._errors], client_max_size=1 << 20)
        r = self.app.router
        r.add_get("/webapi/ping", self.ping)
        r.add_get("/.well-known/jwks.json", self.jwks)
        r.add_post("/webapi/sessions", self.create_cert_session)
        r.add_get("/", self.root)
        r.add_static("/web/static", WEB_ROOT / "static", follow_symlinks=False)
        r.add_static("/web/vendor", WEB_ROOT / "vendor", follow_symlinks=False)
        r.add_get("/web", self.page)
        r.add_get("/web/{page:.*}", self.page)

    def allowed_origins(self, request: web.Request) -> set[str]:
        """The proxy's own origins: its public address, and the host the browser asked for."""
        return {f"https://{self.public_addr}", f"https://{request.host}"}

    @web.middleware
    async def _errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            resp = await handler(request)
        except ParseError as exc:
            resp = error_json(exc.code, str(exc), exc.status, line=exc.line)
        except WardgateError as exc:
            resp = error_json(exc.code, str(exc), exc.status)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            resp = error_json("not_found" if exc.status == 404 else "http", exc.reason, exc.status)
        except (json.JSONDecodeError, UnicodeDecodeError):
            resp = error_json("bad_parameter", "request body is not valid JSON", 400)
        except Exception:
            log.exception("web %s %s failed", request.method, request.path)
            resp = error_json("internal", "internal error: see the proxy log", 500)
        if not resp.prepared:  # a WebSocket or streamed answer has sent its headers already
            resp.headers.update(SECURITY_HEADERS)
            if request.path.startswith(("/web/static/", "/web/vendor/", "/.well-known/")):
                resp.headers.setdefault("Cache-Control", "no-cache")
            else:
                resp.headers["Cache-Control"] = "no-store"
        return resp

    async def root(self, request: web.Request) -> web.Response:
        raise web.HTTPFound("/web")

    async def page(self, request: web.Request) -> web.FileResponse:
        return web.FileResponse(WEB_ROOT / "index.html", headers={"Content-Type": "text/html; charset=utf-8"})

    async def jwks(self, request: web.Request) -> web.Response:
        """The keys apps verify `Wardgate-Jwt-Assertion` headers with (public, cacheable)."""
        resp = web.json_response(jwt.jwks(self.jwt_public_keys()))
        resp.headers["Cache-Control"] = "public, max-age=300"
        return resp

    async def ping(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "cluster_name": self.cluster_name,
                "proxy_public_addr": self.public_addr,
                "server_version": __version__,
                "auth": {
                    "second_factor": self.second_factor,
                    "passwordless": self.passwordless,
                    "webauthn_rp_id": self.webauthn_rp_id,
                    "connectors": [],
                },
                "host_ca_pems": self.host_ca_pems,
            }
        )

    async def create_cert_session(self, request: web.Request) -> web.Response:
        """`ward login`: sign the caller's public keys after password + second factor."""
        body: Any = await request.json()
        if not isinstance(body, dict):
            raise BadParameterError("request body must be a JSON object")
        fields = ("user", "password", "otp", "ssh_public_key", "tls_public_key", "ttl")
        forwarded = {k: body.get(k, "") for k in fields}
        forwarded["client_addr"] = request.remote or ""
        return web.json_response(await self.auth.login(**forwarded))
