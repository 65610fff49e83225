"""The proxy's web handler: the JSON API `ward` (and later the web UI) use on the one port.

Login goes to the auth service over the proxy's own mutual-TLS client, carrying the user's
address so the audit log names the real client, not the proxy.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from wardgate import __version__
from wardgate.api.client import AuthClient
from wardgate.errors import BadParameterError, WardgateError

log = logging.getLogger(__name__)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

SECURITY_HEADERS = {
    "Strict-Transport-Security": "max-age=31536000",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


class ProxyWeb:
    def __init__(
        self,
        auth: AuthClient,
        *,
        cluster_name: str,
        public_addr: str,
        host_ca_pems: list[str],
        second_factor: str,
    ) -> None:
        self.auth = auth
        self.cluster_name = cluster_name
        self.public_addr = public_addr
        self.host_ca_pems = host_ca_pems
        self.second_factor = second_factor
        self.app = web.Application(middlewares=[self._errors], client_max_size=1 << 20)
        self.app.router.add_get("/webapi/ping", self.ping)
        self.app.router.add_post("/webapi/sessions", self.create_session)
        self.app.router.add_get("/", self.index)

    @web.middleware
    async def _errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            resp = await handler(request)
        except WardgateError as exc:
            resp = web.json_response({"error": {"code": exc.code, "message": str(exc)}}, status=exc.status)
        except web.HTTPException as exc:
            resp = web.json_response(
                {"error": {"code": "not_found" if exc.status == 404 else "http", "message": exc.reason}},
                status=exc.status,
            )
        except (json.JSONDecodeError, UnicodeDecodeError):
            resp = web.json_response(
                {"error": {"code": "bad_parameter", "message": "request body is not valid JSON"}}, status=400
            )
        except Exception:
            log.exception("web %s %s failed", request.method, request.path)
            resp = web.json_response(
                {"error": {"code": "internal", "message": "internal error: see the proxy log"}}, status=500
            )
        resp.headers.update(SECURITY_HEADERS)
        return resp

    async def index(self, request: web.Request) -> web.Response:
        return web.Response(
            text=f"Wardgate proxy for cluster {self.cluster_name}.\n"
            f"Log in with: ward login --proxy={self.public_addr}\n"
        )

    async def ping(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "cluster_name": self.cluster_name,
                "proxy_public_addr": self.public_addr,
                "server_version": __version__,
                "auth": {"second_factor": self.second_factor, "connectors": []},
                "host_ca_pems": self.host_ca_pems,
            }
        )

    async def create_session(self, request: web.Request) -> web.Response:
        body: Any = await request.json()
        if not isinstance(body, dict):
            raise BadParameterError("request body must be a JSON object")
        fields = ("user", "password", "otp", "ssh_public_key", "tls_public_key", "ttl")
        forwarded = {k: body.get(k, "") for k in fields}
        forwarded["client_addr"] = request.remote or ""
        return web.json_response(await self.auth.login(**forwarded))
