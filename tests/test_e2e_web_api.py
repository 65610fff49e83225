"""The web API end to end: a real `wardgate start`, signed in the way the browser UI does it.

Covers the web-security contract (cookie flags, bearer token as CSRF defence, Origin checks,
headers, server-side sign-out) and that the API shows a user only what their roles allow.
The browser itself drives the same API in `test_e2e_web.py`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.cluster import PASSWORD, WEB_COOKIE, WebClient, WebCluster, audit, current_code, wardctl


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebCluster]:
    c = WebCluster(tmp_path_factory.mktemp("web-api"))
    yield c
    c.stop()


@pytest.fixture
def alice(cluster: WebCluster, request: pytest.FixtureRequest) -> tuple[str, str]:
    """A fresh access user per test (each TOTP code signs in once): (name, TOTP secret)."""
    name = "alice-" + request.node.name.removeprefix("test_").replace("_", "-")[:30]
    return name, cluster.add_user(name, "access", "root")


async def test_pages_carry_strict_security_headers(cluster: WebCluster) -> None:
    async with WebClient(cluster) as web:
        async with web.http.get(web.base + "/web/login") as resp:
            assert resp.status == 200
            assert "text/html" in resp.headers["Content-Type"]
            csp = resp.headers["Content-Security-Policy"]
            body = await resp.text()
        script_src = next(p for p in csp.split(";") if p.strip().startswith("script-src"))
        tokens = script_src.split()[1:]
        assert "'unsafe-inline'" not in tokens and "'unsafe-eval'" not in tokens
        assert "frame-ancestors 'none'" in csp
        assert resp.headers["X-Frame-Options"] == "DENY"
        assert resp.headers["Referrer-Policy"] == "no-referrer"
        assert resp.headers["Strict-Transport-Security"].startswith("max-age=")
        assert "<script>" not in body.replace(" ", "")  # every script is a file
        status, data = await web.call("GET", "/webapi/ping")
        assert status == 200
        assert data["auth"]["second_factor"] == "otp"
        assert data["auth"]["webauthn_rp_id"] == "localhost"


async def test_sign_in_sets_a_host_only_secure_cookie(cluster: WebCluster, alice: tuple[str, str]) -> None:
    async with WebClient(cluster) as web:
        async with web.http.post(
            web.base + "/webapi/sessions/web",
            json={"user": alice[0], "password": PASSWORD, "otp": current_code(alice[1], time.time() + 30)},
        ) as resp:
            assert resp.status == 201, await resp.text()
            raw = resp.headers.getall("Set-Cookie")
            data = await resp.json()
        cookie = next(c for c in raw if c.startswith(WEB_COOKIE + "="))
        attrs = {a.strip().split("=")[0].lower() for a in cookie.split(";")[1:]}
        assert {"secure", "httponly", "path"} <= attrs
        assert "samesite=lax" in cookie.lower()
        assert "domain" not in attrs
        assert data["user"] == alice[0] and data["token"] and data["idle_timeout"] == 1800


async def test_wrong_password_is_refused_with_a_message(cluster: WebCluster, alice: tuple[str, str]) -> None:
    async with WebClient(cluster) as web:
        status, data = await web.call(
            "POST", "/webapi/sessions/web", {"user": alice[0], "password": "wrong password!", "otp": "123456"}
        )
        assert status == 401
        assert data["error"]["message"] == "invalid username or password"
    failures = audit(cluster.data_dir, "--type", "user.login", "--user", alice[0])
    assert any(not e["success"] and e["error"] == "invalid username or password" for e in failures)


async def test_calls_need_both_cookie_and_bearer(cluster: WebCluster, alice: tuple[str, str]) -> None:
    async with WebClient(cluster) as web:
        await web.sign_in(*alice)
        status, data = await web.call("GET", "/webapi/sessions/web")
        assert status == 200
        assert data["user"] == alice[0] and data["cluster_name"] == "ssh.example"
        assert data["capabilities"]["nodes"] and not data["capabilities"]["users"]

        status, data = await web.call("GET", "/webapi/sessions/web", bearer=False)
        assert status == 401 and "bearer token" in data["error"]["message"]

        status, data = await web.call("GET", "/webapi/nodes", bearer=False, Authorization="Bearer forged")
        assert status == 401

        cookie = web.cookie()
        web.http.cookie_jar.clear()
        status, data = await web.call("GET", "/webapi/sessions/web")
        assert status == 401 and "not signed in" in data["error"]["message"]

        # Another client holding only the cookie (what a cross-site request carries) gets nothing.
        async with WebClient(cluster) as thief:
            thief.http.cookie_jar.update_cookies({WEB_COOKIE: cookie})
            status, _ = await thief.call("GET", "/webapi/nodes")
            assert status == 401


async def test_sign_in_from_a_foreign_origin_is_refused(cluster: WebCluster, alice: tuple[str, str]) -> None:
    async with WebClient(cluster) as web:
        status, data = await web.call(
            "POST",
            "/webapi/sessions/web",
            {"user": alice[0], "password": PASSWORD, "otp": current_code(alice[1], time.time() + 30)},
            Origin="https://evil.example",
        )
        assert status == 403 and "evil.example" in data["error"]["message"]


async def test_servers_list_shows_only_what_roles_allow(cluster: WebCluster, tmp_path: Path) -> None:
    (tmp_path / "prod.yaml").write_text(
        "kind: role\nversion: v1\nmetadata: {name: prod-only}\n"
        "spec:\n  allow:\n    logins: [root]\n    node_labels: {env: prod}\n"
    )
    wardctl(cluster.data_dir, "create", "-f", str(tmp_path / "prod.yaml"))
    carol = await asyncio.to_thread(cluster.add_user, "carol", "prod-only", "root")
    dave = await asyncio.to_thread(cluster.add_user, "dave", "access", "root,nobody")
    async with WebClient(cluster) as web:
        await web.sign_in("carol", carol)
        status, data = await web.call("GET", "/webapi/nodes")
        assert status == 200 and data["items"] == []
    async with WebClient(cluster) as web:
        await web.sign_in("dave", dave)
        status, data = await web.call("GET", "/webapi/nodes")
        (node,) = data["items"]
        assert node["name"] == "main-node" and node["labels"]["env"] == "dev"
        assert sorted(node["logins"]) == ["nobody", "root"]
        status, data = await web.call("GET", "/webapi/nodes?labels=env=prod")
        assert data["items"] == []
        status, data = await web.call("GET", "/webapi/nodes?search=MAIN")
        assert [n["name"] for n in data["items"]] == ["main-node"]
        status, data = await web.call("GET", "/webapi/nodes?labels=env")
        assert status == 400 and "key=value" in data["error"]["message"]
        # An access user may not read the audit log or the users.
        assert (await web.call("GET", "/webapi/events"))[0] == 403
        assert (await web.call("GET", "/webapi/users"))[0] == 403


async def test_sign_out_ends_the_session_on_the_server(cluster: WebCluster, alice: tuple[str, str]) -> None:
    async with WebClient(cluster) as web:
        await web.sign_in(*alice)
        cookie, token = web.cookie(), web.token
        status, _ = await web.call("DELETE", "/webapi/sessions/web")
        assert status == 200
        async with WebClient(cluster) as replay:
            replay.http.cookie_jar.update_cookies({WEB_COOKIE: cookie})
            replay.token = token
            status, data = await replay.call("GET", "/webapi/sessions/web")
            assert status == 401 and "sign in again" in data["error"]["message"]
    assert audit(cluster.data_dir, "--type", "user.logout", "--user", alice[0])


async def test_renew_rotates_cookie_and_token(cluster: WebCluster, alice: tuple[str, str]) -> None:
    async with WebClient(cluster) as web:
        first = await web.sign_in(*alice)
        old_cookie, old_token = web.cookie(), web.token
        status, data = await web.call("POST", "/webapi/sessions/web/renew")
        assert status == 200
        assert data["token"] != old_token and web.cookie() != old_cookie
        assert data["expires"] == first["expires"]  # the absolute expiry does not move
        web.token = data["token"]
        assert (await web.call("GET", "/webapi/sessions/web"))[0] == 200
        async with WebClient(cluster) as old:
            old.http.cookie_jar.update_cookies({WEB_COOKIE: old_cookie})
            old.token = old_token
            assert (await old.call("GET", "/webapi/sessions/web"))[0] == 401


async def test_editor_manages_users_and_roles(cluster: WebCluster, tmp_path: Path) -> None:
    ed = await asyncio.to_thread(cluster.add_user, "eddie", "editor,auditor,access", "root")
    async with WebClient(cluster) as web:
        await web.sign_in("eddie", ed)
        status, data = await web.call("GET", "/webapi/sessions/web")
        assert data["capabilities"]["users"] and data["capabilities"]["roles"]
        assert data["capabilities"]["audit"]

        status, data = await web.call(
            "POST", "/webapi/users", {"name": "frank", "roles": ["access"], "traits": {"logins": ["root"]}}
        )
        assert status == 201, data
        assert data["invite_url"].startswith(f"https://localhost:{cluster.proxy_port}/web/invite/")
        status, data = await web.call("GET", "/webapi/users")
        frank = next(u for u in data["items"] if u["name"] == "frank")
        assert frank["status"] == "invited" and frank["roles"] == ["access"]

        broken = "kind: role\nversion: v1\n  bad: [\n"
        status, data = await web.call("POST", "/webapi/roles", {"yaml": broken})
        assert status == 400 and data["error"]["line"] is not None
        yaml_text = "kind: role\nversion: v1\nmetadata:\n  name: ops\nspec:\n  allow:\n    loginz: [root]\n"
        status, data = await web.call("POST", "/webapi/roles", {"yaml": yaml_text})
        assert status == 400 and data["error"]["line"] == 7 and "loginz" in data["error"]["message"]
        good = yaml_text.replace("loginz", "logins")
        status, data = await web.call("POST", "/webapi/roles", {"yaml": good})
        assert status == 201 and data["name"] == "ops"
        status, data = await web.call("PUT", "/webapi/roles/other", {"yaml": good})
        assert status == 400 and "editing 'other'" in data["error"]["message"]
        status, data = await web.call("GET", "/webapi/roles")
        ops = yaml.safe_load(next(r["yaml"] for r in data["items"] if r["name"] == "ops"))
        assert ops["spec"]["allow"]["logins"] == ["root"]

        lock = {"message": "on leave", "ttl": "1h"}
        status, data = await web.call("POST", "/webapi/users/frank/lock", lock)
        assert status == 201 and data["spec"]["target"]["user"] == "frank"
        status, data = await web.call("GET", "/webapi/events?type=lock.create&limit=5")
        assert status == 200 and data["items"][0]["event"] == "lock.create"


async def test_jwks_publishes_the_clusters_jwt_key(cluster: WebCluster) -> None:
    from wardgate.auth import jwt

    async with WebClient(cluster) as web, web.http.get(web.base + "/.well-known/jwks.json") as resp:
        assert resp.status == 200
        data = await resp.json()
    (key,) = data["keys"]
    assert key["kty"] == "EC" and key["crv"] == "P-256" and key["alg"] == "ES256"
    assert len(jwt.b64url_decode(key["x"])) == 32 and key["kid"]


APPS = """kind: role
version: v1
metadata: {name: app-user}
spec:
  allow:
    app_labels: {env: dev}
---
kind: role
version: v1
metadata: {name: app-mfa}
spec:
  options: {require_session_mfa: true}
  allow:
    app_labels: {env: dev}
---
kind: app
version: v1
metadata: {name: grafana, labels: {env: dev}, description: "Dashboards <b>bold</b>"}
spec: {uri: "http://127.0.0.1:9"}
---
kind: app
version: v1
metadata: {name: pg, labels: {env: dev}}
spec: {uri: "tcp://127.0.0.1:9"}
---
kind: app
version: v1
metadata: {name: payroll, labels: {env: prod}}
spec: {uri: "http://127.0.0.1:9"}
---
kind: app_service
version: v1
metadata: {name: web-api-apps, expires: "EXPIRES"}
spec: {apps: [grafana, pg, payroll]}
"""


@pytest.fixture(scope="module")
def published_apps(cluster: WebCluster, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Apps `wardctl create`d, served by an app service whose heartbeat is written by hand."""
    from datetime import UTC, datetime, timedelta

    path = tmp_path_factory.mktemp("apps") / "apps.yaml"
    path.write_text(APPS.replace("EXPIRES", (datetime.now(UTC) + timedelta(hours=1)).isoformat()))
    wardctl(cluster.data_dir, "create", "-f", str(path))


async def visible_apps(web: WebClient, count: int) -> list[dict]:
    """The apps list, once the proxy's watch has brought it `count` of them."""
    deadline = time.monotonic() + 10
    while True:
        status, data = await web.call("GET", "/webapi/sites/ssh.example/apps")
        assert status == 200, data
        if len(data["items"]) == count or time.monotonic() > deadline:
            return data["items"]
        await asyncio.sleep(0.2)


@pytest.mark.usefixtures("published_apps")
async def test_apps_list_and_launch_answer_only_app_addresses(cluster: WebCluster) -> None:
    """The launch call redirects only to the public address of an app the user may open, with a
    local path; everything else is refused before the auth service is asked."""
    from urllib.parse import parse_qs, urlsplit

    erin = await asyncio.to_thread(cluster.add_user, "erin", "app-user", "root")
    port = cluster.proxy_port
    async with WebClient(cluster) as web:
        await web.sign_in("erin", erin)
        grafana, pg = await visible_apps(web, 2)
        assert grafana == {
            "name": "grafana",
            "description": "Dashboards <b>bold</b>",
            "labels": {"env": "dev"},
            "public_addr": f"grafana.localhost:{port}",
            "kind": "http",
            "launch_url": f"https://grafana.localhost:{port}/",
            "require_session_mfa": False,
        }
        assert pg["name"] == "pg" and pg["kind"] == "tcp" and pg["launch_url"] == ""
        status, data = await web.call("GET", "/webapi/sites/elsewhere/apps")
        assert status == 404 and "ssh.example" in data["error"]["message"]
        status, _ = await web.call("GET", "/webapi/sites/ssh.example/apps", bearer=False)
        assert status == 401

        good = {"fqdn": "grafana.localhost", "state": "s-Tate_1", "path": "/d/home?orgId=1&x=%2F"}
        status, data = await web.call("POST", "/webapi/sessions/app", good)
        assert status == 201, data
        url = urlsplit(data["redirect"])
        assert (url.scheme, url.netloc, url.path) == (
            "https",
            f"grafana.localhost:{port}",
            "/x-wardgate/auth",
        )
        query = parse_qs(url.query)
        assert query["state"] == ["s-Tate_1"] and query["path"] == ["/d/home?orgId=1&x=%2F"]
        assert len(query["token"][0]) >= 20
        status, data = await web.call(
            "POST", "/webapi/sessions/app", {**good, "fqdn": f"GRAFANA.localhost:{port}"}
        )
        assert status == 201 and data["redirect"].startswith(f"https://grafana.localhost:{port}/")

        refused = [
            ({"fqdn": "evil.example"}, 404, "no application you may open"),
            ({"fqdn": "payroll.localhost"}, 404, "no application you may open"),  # not granted
            ({"fqdn": "localhost"}, 404, "no application"),  # the proxy itself
            ({"fqdn": f"grafana.localhost:{port + 1}"}, 404, "no application"),
            ({"fqdn": "pg.localhost"}, 400, "ward proxy app pg"),
            ({"path": "//evil.example/"}, 400, "single /"),
            ({"path": "/\\evil.example"}, 400, "single /"),
            ({"path": "/\t/evil.example"}, 400, "single /"),
            ({"path": "https://evil.example/"}, 400, "single /"),
            ({"state": ""}, 400, "state"),
            ({"state": "a b"}, 400, "state"),
            ({"state": "x" * 129}, 400, "state"),
        ]
        for change, want_status, words in refused:
            status, data = await web.call("POST", "/webapi/sessions/app", {**good, **change})
            assert status == want_status and words in data["error"]["message"], (change, data)
        status, _ = await web.call("POST", "/webapi/sessions/app", good, bearer=False)
        assert status == 401
        status, _ = await web.call("POST", "/webapi/sessions/app", good, Origin="https://evil.example")
        assert status == 403
    created = audit(cluster.data_dir, "--type", "app.session.create", "--user", "erin")
    assert len(created) == 2 and all(e["success"] and e["app"] == "grafana" for e in created)


@pytest.mark.usefixtures("published_apps")
async def test_app_launch_asks_for_a_second_factor_when_roles_want_one(cluster: WebCluster) -> None:
    finn = await asyncio.to_thread(cluster.add_user, "finn", "app-mfa", "root")
    async with WebClient(cluster) as web:
        # Sign in with this step's code, so the next step's is left for the app session.
        status, data = await web.call(
            "POST",
            "/webapi/sessions/web",
            {"user": "finn", "password": PASSWORD, "otp": current_code(finn, time.time())},
            bearer=False,
        )
        assert status == 201, data
        web.token = data["token"]
        assert [a["require_session_mfa"] for a in await visible_apps(web, 2)] == [True, True]
        launch = {"fqdn": "grafana.localhost", "state": "st", "path": "/"}
        status, data = await web.call("POST", "/webapi/sessions/app", launch)
        assert status == 403 and data["error"]["code"] == "mfa_required"
        status, data = await web.call("POST", "/webapi/sessions/app", {**launch, "otp": "000000"})
        assert status == 401
        otp = current_code(finn, time.time() + 30)
        status, data = await web.call("POST", "/webapi/sessions/app", {**launch, "otp": otp})
        assert status == 201 and "token=" in data["redirect"], data
