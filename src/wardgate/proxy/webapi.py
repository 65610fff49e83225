"""The JSON API the web UI uses (docs/web-api.md): sign-in, invitations, and everything after.

Signed-in calls need the session cookie *and* the bearer token (CSRF defence); each is made to
the auth API with the user's own web-session certificate, so the user's roles decide what comes
back. Only the capability flags and the server list's filters are computed here.
"""

from __future__ import annotations

import gzip
import re
from collections.abc import Callable
from datetime import datetime
from typing import Any
from urllib.parse import urlencode

from aiohttp import web

from wardgate.api.cache import ResourceCache
from wardgate.api.codec import ParseError, dump_yaml, load_resources, resource_to_dict
from wardgate.api.resources import App, Role, User
from wardgate.auth.rbac import AccessChecker
from wardgate.errors import AccessDeniedError, BadParameterError, NotFoundError
from wardgate.proxy.app import AppProxy, host_of
from wardgate.proxy.websession import COOKIE, WebSession, WebSessions

# What each navigation entry needs (kind, verb) in the user's roles.
CAPABILITIES: dict[str, tuple[str, str]] = {
    "recordings": ("session", "list"),
    "audit": ("event", "list"),
    "users": ("user", "list"),
    "roles": ("role", "list"),
}
MAX_EVENTS_PAGE = 500
APP_STATE_RE = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
"""The app service's state value: URL-safe, so it goes back into the redirect unchanged."""
MAX_APP_PATH = 2048


class SessionMFARequiredError(AccessDeniedError):
    """The app wants a second factor for this session: the page asks for one and tries again."""

    code = "mfa_required"


def bearer_token(request: web.Request) -> str:
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


async def json_body(request: web.Request) -> dict[str, Any]:
    if not request.can_read_body:
        return {}
    data = await request.json()
    if not isinstance(data, dict):
        raise BadParameterError("request body must be a JSON object")
    return data


def _webauthn(d: dict[str, Any]) -> dict[str, Any] | None:
    v = d.get("webauthn")
    if v is not None and not isinstance(v, dict):
        raise BadParameterError("webauthn must be the credential as a JSON object")
    return v


def _factor(d: dict[str, Any]) -> dict[str, Any]:
    """The second-factor fields a request may carry, passed on as they are."""
    out: dict[str, Any] = {"otp": str(d.get("otp", ""))}
    if (w := _webauthn(d)) is not None:
        out["webauthn"] = w
    return out


def _label_filter(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise BadParameterError(f"label filter {part!r}: write it as key=value[,key2=value2]")
        out[key.strip()] = value.strip()
    return out


def _app_path(v: Any) -> str:
    """Where in the app to land: a path on the app's own host, never another site. Refused:
    `//host`, backslashes (browsers read a leading slash-backslash as `//`), and whitespace or
    control characters (browsers drop tabs and newlines, which could also make `//host`)."""
    if v is None or v == "":
        return "/"
    if not isinstance(v, str) or len(v) > MAX_APP_PATH:
        raise BadParameterError(f"path must be a path in the app of at most {MAX_APP_PATH} characters")
    if (
        not v.startswith("/")
        or v.startswith("//")
        or "\\" in v
        or any(c.isspace() or ord(c) < 32 or c == "\x7f" for c in v)
    ):
        raise BadParameterError(f"path {v[:80]!r} must be a path in the app, starting with a single /")
    return v


def _time(v: str, name: str) -> datetime | None:
    if not v:
        return None
    try:
        return datetime.fromisoformat(v.replace("Z", "+00:00"))
    except ValueError:
        raise BadParameterError(f"{name}: {v!r} is not an RFC 3339 time, like 2026-01-31T12:00:00Z") from None


class WebAPI:
    def __init__(
        self,
        *,
        sessions: WebSessions,
        cache: ResourceCache,
        cluster_name: str,
        second_factor: str,
        allowed_origins: Callable[[web.Request], set[str]],
        cookie_secure: bool = True,
        apps: AppProxy | None = None,
    ) -> None:
        self.sessions = sessions
        self.auth = sessions.auth
        self.cache = cache
        self.cluster_name = cluster_name
        self.second_factor = second_factor
        self.allowed_origins = allowed_origins
        self.cookie_secure = cookie_secure
        self.apps = apps
        """This proxy's app routing, for the public addresses it actually serves apps at."""

    def register(self, app: web.Application) -> None:
        r = app.router
        r.add_post("/webapi/mfa/login/begin", self.login_begin)
        r.add_post("/webapi/sessions/web", self.sign_in)
        r.add_get("/webapi/sessions/web", self.session_info)
        r.add_delete("/webapi/sessions/web", self.sign_out)
        r.add_post("/webapi/sessions/web/renew", self.renew)
        r.add_get("/webapi/invites/{token}", self.invite_info)
        r.add_post("/webapi/invites/{token}", self.invite_accept)
        r.add_get("/webapi/nodes", self.nodes)
        r.add_get("/webapi/sites/{cluster}/apps", self.list_apps)
        r.add_post("/webapi/sessions/app", self.create_app_session)
        r.add_get("/webapi/sessions/active", self.active_sessions)
        r.add_get("/webapi/recordings", self.recordings)
        r.add_get("/webapi/recordings/{sid}", self.recording)
        r.add_get("/webapi/events", self.events)
        r.add_get("/webapi/mfa/devices", self.mfa_devices)
        r.add_post("/webapi/mfa/challenge", self.mfa_challenge)
        r.add_post("/webapi/mfa/devices/begin", self.mfa_add_begin)
        r.add_post("/webapi/mfa/devices", self.mfa_add_finish)
        r.add_delete("/webapi/mfa/devices/{name}", self.mfa_delete)
        r.add_put("/webapi/password", self.change_password)
        r.add_get("/webapi/users", self.users)
        r.add_post("/webapi/users", self.invite_user)
        r.add_post("/webapi/users/{name}/reset", self.reset_user)
        r.add_post("/webapi/users/{name}/lock", self.lock_user)
        r.add_delete("/webapi/users/{name}", self.delete_user)
        r.add_get("/webapi/roles", self.roles)
        r.add_post("/webapi/roles", self.create_role)
        r.add_put("/webapi/roles/{name}", self.update_role)
        r.add_delete("/webapi/roles/{name}", self.delete_role)

    # ------------------------------------------------------------------ helpers

    async def session(self, request: web.Request) -> WebSession:
        return await self.sessions.authenticate(request.cookies.get(COOKIE, ""), bearer_token(request))

    def check_origin(self, request: web.Request) -> None:
        """Sign-in forms have no bearer token yet: refuse a browser posting from another site."""
        origin = request.headers.get("Origin")
        if origin is not None and origin not in self.allowed_origins(request):
            raise AccessDeniedError(f"requests from {origin} are not accepted: open the proxy's own page")

    def _signed_in(self, sess: WebSession, token: str, status: int = 201) -> web.Response:
        resp = web.json_response(
            {
                "token": token,
                "user": sess.user,
                "expires": sess.expires.isoformat(),
                "idle_timeout": int(self.sessions.idle_timeout.total_seconds()),
            },
            status=status,
        )
        resp.set_cookie(
            COOKIE,
            sess.id,
            path="/",
            secure=self.cookie_secure,
            httponly=True,
            samesite="Lax",
            max_age=max(0, int((sess.expires - self.sessions.now()).total_seconds())),
        )
        return resp

    def _checker(self, sess: WebSession) -> AccessChecker:
        return AccessChecker.for_identity(sess.identity, self.cache.as_dict("role"))  # type: ignore[arg-type]

    # ------------------------------------------------------------------ signing in

    async def login_begin(self, request: web.Request) -> web.Response:
        self.check_origin(request)
        d = await json_body(request)
        body: dict[str, Any] = {"client_addr": request.remote or ""}
        if d.get("passwordless"):
            body["passwordless"] = True
        else:
            body.update(user=str(d.get("user", "")), password=str(d.get("password", "")))
        return web.json_response(await self.auth.webauthn_login_begin(**body))

    async def sign_in(self, request: web.Request) -> web.Response:
        self.check_origin(request)
        d = await json_body(request)
        sess, token = await self.sessions.sign_in(
            user=str(d.get("user", "")),
            password=str(d.get("password", "")),
            client_addr=request.remote or "",
            **_factor(d),
        )
        return self._signed_in(sess, token)

    async def invite_info(self, request: web.Request) -> web.Response:
        return web.json_response(await self.auth.begin_registration(request.match_info["token"]))

    async def invite_accept(self, request: web.Request) -> web.Response:
        self.check_origin(request)
        d = await json_body(request)
        sess, token = await self.sessions.register(
            token=request.match_info["token"],
            password=str(d.get("password", "")),
            device_name=str(d.get("device_name", "")),
            client_addr=request.remote or "",
            **_factor(d),
        )
        return self._signed_in(sess, token)

    async def session_info(self, request: web.Request) -> web.Response:
        sess = await self.session(request)
        checker = self._checker(sess)
        caps = {"nodes": True, "sessions": True, "apps": True}
        for name, (kind, verb) in CAPABILITIES.items():
            caps[name] = checker.check_rule(kind, verb).allowed
        return web.json_response(
            {
                "user": sess.user,
                "roles": list(sess.identity.roles),
                "logins": list(sess.identity.logins),
                "expires": sess.expires.isoformat(),
                "idle_timeout": int(self.sessions.idle_timeout.total_seconds()),
                "cluster_name": self.cluster_name,
                "second_factor": self.second_factor,
                "capabilities": caps,
            }
        )

    async def sign_out(self, request: web.Request) -> web.Response:
        sess = await self.session(request)
        await self.sessions.sign_out(sess)
        resp = web.json_response({})
        resp.del_cookie(COOKIE, path="/", secure=self.cookie_secure, httponly=True, samesite="Lax")
        return resp

    async def renew(self, request: web.Request) -> web.Response:
        sess = await self.session(request)
        new, token = await self.sessions.renew(sess)
        return self._signed_in(new, token, status=200)

    # ------------------------------------------------------------------ resources and history

    async def nodes(self, request: web.Request) -> web.Response:
        sess = await self.session(request)
        search = request.query.get("search", "").strip().lower()
        labels = _label_filter(request.query.get("labels", ""))
        items = []
        for n in await sess.auth.visible_nodes():
            node_labels: dict[str, str] = n.get("labels") or {}
            if any(node_labels.get(k) != v for k, v in labels.items()):
                continue
            haystack = " ".join(
                [n.get("name", ""), n.get("hostname", ""), n.get("addr", "")]
                + [f"{k}={v}" for k, v in node_labels.items()]
            ).lower()
            if search and not all(word in haystack for word in search.split()):
                continue
            items.append(
                {
                    "name": n.get("name", ""),
                    "hostname": n.get("hostname", ""),
                    "addr": n.get("addr", ""),
                    "labels": node_labels,
                    "logins": n.get("logins") or [],
                    "tunnel": bool(n.get("tunnel")),
                    "agentless": bool(n.get("agentless")),
                }
            )
        return web.json_response({"items": items})

    # ------------------------------------------------------------------ applications

    def _app_public_addr(self, entry: dict[str, Any]) -> str:
        """Where this proxy serves the app: computed from its own cache when it has the app
        (what its router matches), else as the auth service said."""
        if self.apps is not None:
            found = self.cache.get("app", str(entry.get("name", "")))
            if isinstance(found, App):
                return self.apps.public_addr_of(found)
        return str(entry.get("public_addr") or "")

    async def _visible_apps(self, sess: WebSession) -> list[dict[str, Any]]:
        items = []
        for a in await sess.auth.visible_apps():
            kind = "tcp" if a.get("uri_kind") == "tcp" else "http"
            addr = self._app_public_addr(a)
            items.append(
                {
                    "name": str(a.get("name", "")),
                    "description": str(a.get("description") or ""),
                    "labels": a.get("labels") or {},
                    "public_addr": addr,
                    "kind": kind,
                    "launch_url": f"https://{addr}/" if kind == "http" and addr else "",
                    "require_session_mfa": bool(a.get("require_session_mfa")),
                }
            )
        return sorted(items, key=lambda i: i["name"])

    def _check_cluster(self, request: web.Request) -> None:
        cluster = request.match_info.get("cluster", self.cluster_name)
        if cluster != self.cluster_name:
            raise NotFoundError(f'cluster "{cluster}" not found: this proxy serves "{self.cluster_name}"')

    async def list_apps(self, request: web.Request) -> web.Response:
        sess = await self.session(request)
        self._check_cluster(request)
        return web.json_response({"items": await self._visible_apps(sess)})

    async def create_app_session(self, request: web.Request) -> web.Response:
        """The launch page: an app session for the signed-in user, and the one place to send the
        browser with its one-time token. That place is always the public address of an app the
        user may open (never what the request says), so this cannot be made an open redirect."""
        self.check_origin(request)
        sess = await self.session(request)
        d = await json_body(request)
        fqdn = d.get("fqdn")
        if not isinstance(fqdn, str) or not fqdn.strip() or len(fqdn) > 260:
            raise BadParameterError("fqdn must be the app's public host name, like grafana.proxy.example")
        state = d.get("state")
        if not isinstance(state, str) or not APP_STATE_RE.match(state):
            raise BadParameterError(
                "state must be the value the app gave (1 to 128 letters, digits, - and _): "
                "open the app again to start over"
            )
        path = _app_path(d.get("path"))
        wanted = fqdn.strip().rstrip(".").lower()
        wanted_host = host_of(wanted)
        app = next(
            (
                a
                for a in await self._visible_apps(sess)
                if a["public_addr"]
                and (
                    a["public_addr"] == wanted if ":" in wanted else host_of(a["public_addr"]) == wanted_host
                )
            ),
            None,
        )
        if app is None:
            raise NotFoundError(
                f"no application you may open is published at {wanted_host}: "
                "check the address, or pick the app from your list of applications"
            )
        if app["kind"] != "http":
            raise BadParameterError(
                f'"{app["name"]}" is a TCP application: connect with `ward proxy app {app["name"]} --port N`'
            )
        factor = _factor(d)
        if app["require_session_mfa"] and not factor["otp"] and "webauthn" not in factor:
            raise SessionMFARequiredError(
                f'your roles require a second factor to open "{app["name"]}": verify it is you to continue'
            )
        answer = await sess.auth.create_app_session(app=app["name"], web_session_id=sess.id, **factor)
        query = urlencode({"token": str(answer["token"]), "state": state, "path": path})
        return web.json_response(
            {"redirect": f"https://{app['public_addr']}/x-wardgate/auth?{query}", "app": app["name"]},
            status=201,
        )

    async def active_sessions(self, request: web.Request) -> web.Response:
        sess = await self.session(request)
        return web.json_response({"items": await sess.auth.active_sessions()})

    async def recordings(self, request: web.Request) -> web.Response:
        sess = await self.session(request)
        return web.json_response({"items": await sess.auth.list_recordings()})

    async def recording(self, request: web.Request) -> web.Response:
        sess = await self.session(request)
        raw = await sess.auth.get_recording(request.match_info["sid"])
        try:
            text = gzip.decompress(raw)
        except (OSError, EOFError):
            raise BadParameterError("the stored recording is damaged (not a gzip file)") from None
        return web.Response(body=text, content_type="application/x-asciicast", charset="utf-8")

    async def events(self, request: web.Request) -> web.Response:
        sess = await self.session(request)
        q = request.query
        try:
            limit = min(int(q.get("limit", "100")), MAX_EVENTS_PAGE)
        except ValueError:
            raise BadParameterError("limit must be a number") from None
        events, cursor = await sess.auth.search_events(
            since=_time(q.get("since", ""), "since"),
            until=_time(q.get("until", ""), "until"),
            types=[t for t in q.getall("type", []) if t],
            user=q.get("user", ""),
            sid=q.get("sid", ""),
            limit=max(1, limit),
            cursor=q.get("cursor") or None,
        )
        return web.json_response({"items": events, "cursor": cursor})

    # ------------------------------------------------------------------ the user's own account

    async def mfa_devices(self, request: web.Request) -> web.Response:
        sess = await self.session(request)
        return web.json_response({"items": await sess.auth.mfa_devices()})

    async def mfa_challenge(self, request: web.Request) -> web.Response:
        sess = await self.session(request)
        return web.json_response(await sess.auth.mfa_challenge())

    async def mfa_add_begin(self, request: web.Request) -> web.Response:
        sess = await self.session(request)
        d = await json_body(request)
        return web.json_response(
            await sess.auth.mfa_add_begin(
                type=str(d.get("type", "")), name=str(d.get("name", "")), **_factor(d)
            )
        )

    async def mfa_add_finish(self, request: web.Request) -> web.Response:
        sess = await self.session(request)
        d = await json_body(request)
        return web.json_response(
            await sess.auth.mfa_add_finish(name=str(d.get("name", "")), **_factor(d)), status=201
        )

    async def mfa_delete(self, request: web.Request) -> web.Response:
        sess = await self.session(request)
        d = await json_body(request)
        await sess.auth.mfa_delete(request.match_info["name"], **_factor(d))
        return web.json_response({})

    async def change_password(self, request: web.Request) -> web.Response:
        sess = await self.session(request)
        d = await json_body(request)
        await sess.auth.change_password(
            old_password=str(d.get("old_password", "")),
            new_password=str(d.get("new_password", "")),
            **_factor(d),
        )
        return web.json_response({})

    # ------------------------------------------------------------------ users and roles (editors)

    async def users(self, request: web.Request) -> web.Response:
        sess = await self.session(request)
        now = self.sessions.now()
        items = []
        for u in await sess.auth.list_resources("user"):
            assert isinstance(u, User)
            s = u.spec
            locked = s.status.locked_until is not None and s.status.locked_until > now
            items.append(
                {
                    "name": u.name,
                    "roles": s.roles,
                    "traits": s.traits,
                    "status": "locked" if locked else ("active" if s.has_password else "invited"),
                    "mfa_devices": s.mfa_devices,
                    "created": s.created.isoformat() if s.created else None,
                }
            )
        return web.json_response({"items": items})

    async def invite_user(self, request: web.Request) -> web.Response:
        sess = await self.session(request)
        d = await json_body(request)
        roles, traits = d.get("roles") or [], d.get("traits") or {}
        if not isinstance(roles, list) or not all(isinstance(r, str) for r in roles):
            raise BadParameterError("roles must be a list of role names")
        if not isinstance(traits, dict) or not all(isinstance(v, list) for v in traits.values()):
            raise BadParameterError('traits must map names to lists of strings, like {"logins": ["ubuntu"]}')
        out = await sess.auth.create_user(str(d.get("name", "")), roles, traits)
        return web.json_response(
            {
                "name": out["user"]["metadata"]["name"],
                "invite_url": out.get("invite_url", ""),
                "invite_expires": out.get("invite_expires"),
            },
            status=201,
        )

    async def reset_user(self, request: web.Request) -> web.Response:
        sess = await self.session(request)
        out = await sess.auth.reset_user(request.match_info["name"])
        return web.json_response({k: out.get(k) for k in ("invite_url", "invite_expires")})

    async def lock_user(self, request: web.Request) -> web.Response:
        sess = await self.session(request)
        d = await json_body(request)
        lock = await sess.auth.create_lock(
            {"user": request.match_info["name"]}, ttl=str(d.get("ttl", "")), message=str(d.get("message", ""))
        )
        return web.json_response(resource_to_dict(lock), status=201)

    async def delete_user(self, request: web.Request) -> web.Response:
        sess = await self.session(request)
        name = request.match_info["name"]
        if name == sess.user:
            raise BadParameterError("you cannot delete yourself: ask another editor")
        await sess.auth.delete_resource("user", name)
        return web.json_response({})

    async def roles(self, request: web.Request) -> web.Response:
        sess = await self.session(request)
        items = [{"name": r.name, "yaml": dump_yaml(r)} for r in await sess.auth.list_resources("role")]
        return web.json_response({"items": sorted(items, key=lambda i: i["name"])})

    @staticmethod
    def _parse_role(text: Any, name: str = "") -> Role:
        if not isinstance(text, str) or not text.strip():
            raise BadParameterError("send the role as YAML in the `yaml` field")
        found = load_resources(text, source="role")
        if len(found) != 1 or not isinstance(found[0], Role):
            raise ParseError("expected exactly one document of kind role", source="role", line=1)
        role = found[0]
        if name and role.name != name:
            raise BadParameterError(
                f"metadata.name is {role.name!r} but you are editing {name!r}: "
                "create a new role to use another name"
            )
        return role

    async def create_role(self, request: web.Request) -> web.Response:
        sess = await self.session(request)
        d = await json_body(request)
        out = await sess.auth.put_resource(self._parse_role(d.get("yaml")), force=False)
        return web.json_response({"name": out.name, "yaml": dump_yaml(out)}, status=201)

    async def update_role(self, request: web.Request) -> web.Response:
        sess = await self.session(request)
        d = await json_body(request)
        role = self._parse_role(d.get("yaml"), request.match_info["name"])
        out = await sess.auth.put_resource(role, force=True)
        return web.json_response({"name": out.name, "yaml": dump_yaml(out)})

    async def delete_role(self, request: web.Request) -> web.Response:
        sess = await self.session(request)
        await sess.auth.delete_resource("role", request.match_info["name"])
        return web.json_response({})
