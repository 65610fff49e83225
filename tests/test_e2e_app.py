"""Application access end to end: real upstreams behind a real `wardgate start`.

The cluster's proxy is published as `wardgate.localhost:PORT`, so apps default to
`<name>.wardgate.localhost` (Chromium resolves `*.localhost` to the loopback address itself; curl
is told with `--resolve`, which `ward app config` adds when the name does not resolve). Upstreams:
our aiohttp app (tests/upstream_app.py: whoami, redirects, uploads, WebSocket echo), nginx serving
static files, and a throw-away Redis as a TCP app. A second process serves an app only through
its reverse tunnel. Clients: curl with the app certificate, `ward proxy app` with redis-cli and
an aiohttp WebSocket client, Chromium clicking the app in the web UI.
"""

from __future__ import annotations

import asyncio
import json
import re
import shlex
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import webui
from tests.appservers import Server, have_nginx, have_redis, nginx, redis, upstream_app
from tests.cluster import (
    BIN,
    PASSWORD,
    SSHCluster,
    audit,
    current_code,
    free_port,
    joined_agent,
    login,
    wait_port,
    ward,
    ward_env,
    wardctl,
)

pytestmark = pytest.mark.skipif(not (have_nginx() and have_redis()), reason="needs nginx and Redis")

browser = webui.browser  # the fixtures: one Chromium for the module, a context per page
make_page = webui.make_page

PUBLIC = "wardgate.localhost"
ROLES = """kind: role
version: v1
metadata: {name: app-dev}
spec:
  allow:
    logins: [root]
    app_labels: {env: dev}
  deny:
    app_labels: {tier: secret}
"""
STATIC_PAGE = b"<!doctype html><title>Static</title><h1>served by nginx</h1>"


class AppCluster:
    """One process: auth + proxy + ssh + app service publishing `web` (aiohttp), `static`
    (nginx), `cache` (Redis over TCP), `vault` (env=dev but tier=secret: denied) and `ops`
    (env=prod: not granted)."""

    def __init__(self, root: Path) -> None:
        self.upstream: Server | None = None
        self.static: Server | None = None
        self.redis: Server | None = None
        self.cluster: SSHCluster | None = None
        try:
            self.upstream = upstream_app()
            self.static = nginx({"index.html": STATIC_PAGE})
            self.redis = redis()
            up = f"http://127.0.0.1:{self.upstream.port}"
            apps = f"""app_service:
  enabled: true
  apps:
    - {{name: web, uri: "{up}", labels: {{env: dev}}, description: The aiohttp upstream}}
    - {{name: static, uri: "http://127.0.0.1:{self.static.port}", labels: {{env: dev}}}}
    - {{name: cache, uri: "tcp://127.0.0.1:{self.redis.port}", labels: {{env: dev}}}}
    - {{name: vault, uri: "{up}", labels: {{env: dev, tier: secret}}}}
    - {{name: ops, uri: "{up}", labels: {{env: prod}}}}
  resources:
    - labels: {{team: web}}
"""
            self.cluster = SSHCluster(root / "cluster", public_host=PUBLIC, extra=apps)
            wardctl(self.cluster.data_dir, "create", "-f", "-", stdin=ROLES)
        except BaseException:
            self.stop()
            raise

    @property
    def c(self) -> SSHCluster:
        assert self.cluster is not None
        return self.cluster

    def host(self, app: str) -> str:
        return f"{app}.{PUBLIC}"

    def url(self, app: str, path: str = "/") -> str:
        return f"https://{self.host(app)}:{self.c.proxy_port}{path}"

    def seen(self) -> list[str]:
        """What reached the aiohttp upstream, in order."""
        import urllib.request

        assert self.upstream is not None
        with urllib.request.urlopen(f"http://127.0.0.1:{self.upstream.port}/seen") as r:
            return json.loads(r.read())

    def stop(self) -> None:
        for s in (self.cluster, self.upstream, self.static, self.redis):
            if s is not None:
                s.stop()


@pytest.fixture(scope="module")
def apps(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AppCluster]:
    a = AppCluster(tmp_path_factory.mktemp("apps"))
    yield a
    a.stop()


@pytest.fixture(scope="module")
def dana(apps: AppCluster, tmp_path_factory: pytest.TempPathFactory) -> Path:
    home = tmp_path_factory.mktemp("dana-ward")
    login(apps.c, home, "dana", apps.c.add_user("dana", "app-dev", "root"))
    return home


def run_ward(home: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return ward(home, *args, timeout=timeout)


def curl_argv(home: Path, app: str) -> list[str]:
    """`ward app config APP` (the curl line it prints) as argv, without the URL."""
    out = run_ward(home, "app", "config", app)
    assert out.returncode == 0, out.stderr
    argv = shlex.split(out.stdout.strip().splitlines()[-1])
    assert argv[0] == "curl", out.stdout
    return [a for a in argv if not a.startswith("https://")]


def curl(argv: list[str], url: str, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([*argv, "-sS", *extra, url], capture_output=True, text=True, timeout=60)


def events(apps: AppCluster, kind: str, user: str, timeout: float = 10) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        found = [e for e in audit(apps.c.data_dir, "--type", kind) if e.get("user") == user]
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.3)


def jwks(apps: AppCluster) -> list[str]:
    """The proxy's published JWT keys, as PEM."""
    import urllib.request

    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    from wardgate.auth.jwt import b64url_decode

    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    url = f"https://127.0.0.1:{apps.c.proxy_port}/.well-known/jwks.json"
    with urllib.request.urlopen(url, context=ctx) as r:
        keys = json.loads(r.read())["keys"]
    out = []
    for k in keys:
        x, y = (int.from_bytes(b64url_decode(k[c]), "big") for c in ("x", "y"))
        pub = ec.EllipticCurvePublicNumbers(x, y, ec.SECP256R1()).public_key()
        out.append(pub.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo).decode())
    return out


class LocalAppProxy:
    """`ward proxy app NAME --port N` in the background."""

    def __init__(self, home: Path, name: str) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen(
            [str(BIN / "ward"), "proxy", "app", name, f"--port={self.port}"],
            env=ward_env(home),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        assert wait_port(self.port, time.monotonic() + 20), "ward proxy app did not listen"

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


# ---------------------------------------------------------------- listing and certificates


def test_ward_apps_ls_shows_what_the_roles_allow(apps: AppCluster, dana: Path) -> None:
    out = run_ward(dana, "apps", "ls")
    assert out.returncode == 0, out.stderr
    names = {
        line.split()[0] for line in out.stdout.splitlines()[1:] if line.strip() and not line.startswith("-")
    }
    assert {"web", "static", "cache"} <= names
    assert "vault" not in names and "ops" not in names  # denied by label, not granted
    data = json.loads(run_ward(dana, "apps", "ls", "--format=json").stdout)
    web = next(a for a in data if a["name"] == "web")
    assert web["public_addr"] == f"{apps.host('web')}:{apps.c.proxy_port}"
    refused = run_ward(dana, "app", "login", "vault")
    assert refused.returncode != 0 and "not found" in refused.stderr


def test_curl_with_the_app_certificate_gets_a_signed_identity(apps: AppCluster, dana: Path) -> None:
    from wardgate.auth.jwt import verify

    out = run_ward(dana, "app", "login", "web")
    assert out.returncode == 0, out.stderr
    argv = curl_argv(dana, "web")
    r = curl(argv, apps.url("web", "/whoami"), "-H", "Wardgate-Jwt-Assertion: forged.by.client")
    assert r.returncode == 0, r.stderr
    seen = json.loads(r.stdout)
    headers = {k.lower(): v for k, v in seen["headers"].items()}
    token = headers["wardgate-jwt-assertion"]
    assert "forged" not in token
    claims = verify(token, jwks(apps))
    assert claims["username"] == claims["sub"] == "dana"
    assert claims["roles"] == ["app-dev"]
    assert claims["exp"] - time.time() <= 5 * 60 + 5
    assert headers["host"] == f"127.0.0.1:{apps.upstream.port}"  # type: ignore[union-attr]
    assert headers["x-forwarded-host"].startswith(apps.host("web"))
    assert headers["x-forwarded-proto"] == "https"

    # An upload streams through (chunked) and comes back hashed; a redirect is rewritten.
    import hashlib

    body = bytes(range(256)) * 8192  # 2 MiB
    r = subprocess.run(
        [*argv, "-sS", "-H", "Transfer-Encoding: chunked", "--data-binary", "@-", apps.url("web", "/upload")],
        input=body,
        capture_output=True,
        timeout=60,
    )
    assert json.loads(r.stdout) == {"size": len(body), "sha256": hashlib.sha256(body).hexdigest()}
    r = curl(argv, apps.url("web", "/redirect"), "-o", "/dev/null", "-w", "%{redirect_url}")
    assert r.stdout == apps.url("web", "/landing")

    requests = events(apps, "app.session.request", "dana")
    assert any(
        e["path"] == "/upload" and e["method"] == "POST" and e["bytes_in"] == len(body) for e in requests
    )
    assert all("body" not in e for e in requests)


def test_without_a_certificate_or_session_nothing_reaches_the_app(apps: AppCluster, dana: Path) -> None:
    argv = [a for a in curl_argv(dana, "web") if True]
    # Keep --cacert/--resolve, drop the client certificate and key.
    anon: list[str] = []
    skip = False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in ("--cert", "--key"):
            skip = True
            continue
        anon.append(a)
    before = apps.seen()
    r = curl(anon, apps.url("web", "/whoami?anon=1"), "-o", "/dev/null", "-w", "%{http_code} %{redirect_url}")
    code, location = r.stdout.split(" ", 1)
    assert code == "302"
    assert location.startswith(f"https://{PUBLIC}:{apps.c.proxy_port}/web/launch/{apps.host('web')}?")
    r = curl(anon, apps.url("web", "/whoami?anon=2"), "-X", "POST", "-o", "/dev/null", "-w", "%{http_code}")
    assert r.stdout == "401"
    assert [s for s in apps.seen() if "anon" in s] == [] and len(apps.seen()) == len(before)


def test_nginx_static_files_through_ward_proxy_app(apps: AppCluster, dana: Path) -> None:
    assert run_ward(dana, "app", "login", "static").returncode == 0
    local = LocalAppProxy(dana, "static")
    try:
        r = subprocess.run(
            ["curl", "-sS", f"http://127.0.0.1:{local.port}/index.html"], capture_output=True, timeout=30
        )
        assert r.stdout == STATIC_PAGE, r.stderr
    finally:
        local.stop()


def test_redis_as_a_tcp_app(apps: AppCluster, dana: Path) -> None:
    assert run_ward(dana, "app", "login", "cache").returncode == 0
    local = LocalAppProxy(dana, "cache")
    try:

        def cli(*args: str) -> str:
            r = subprocess.run(
                ["redis-cli", "-p", str(local.port), *args], capture_output=True, text=True, timeout=30
            )
            assert r.returncode == 0, r.stderr
            return r.stdout.strip()

        assert cli("ping") == "PONG"
        assert cli("set", "greeting", "hello-through-wardgate") == "OK"
        assert cli("get", "greeting") == "hello-through-wardgate"
    finally:
        local.stop()
    starts = [e for e in events(apps, "app.session.start", "dana") if e.get("app") == "cache"]
    assert starts and starts[0]["success"]


# ---------------------------------------------------------------- WebSockets and revocation


def test_websocket_echo_and_a_lock_cuts_it_within_5_seconds(apps: AppCluster, tmp_path: Path) -> None:
    import aiohttp

    home = tmp_path / "wes"
    login(apps.c, home, "wes", apps.c.add_user("wes", "app-dev", "root"))
    assert run_ward(home, "app", "login", "web").returncode == 0
    local = LocalAppProxy(home, "web")

    async def go() -> tuple[str, float]:
        async with (
            aiohttp.ClientSession() as http,
            http.ws_connect(f"http://127.0.0.1:{local.port}/ws") as ws,
        ):
            await ws.send_str("hello")
            echoed = (await ws.receive(timeout=10)).data
            await asyncio.to_thread(
                wardctl, apps.c.data_dir, "lock", "--user=wes", "--ttl=1h", "--message=app-incident-7"
            )
            locked_at = time.monotonic()
            while True:
                msg = await ws.receive(timeout=15)
                if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                    return echoed, time.monotonic() - locked_at
                await ws.send_str("still here?")

    try:
        echoed, cut_after = asyncio.run(go())
    finally:
        local.stop()
    assert echoed == "echo: hello"
    assert cut_after < 5, f"the WebSocket lived {cut_after:.1f} s after the lock"
    ends = events(apps, "app.session.end", "wes")
    assert ends


# ---------------------------------------------------------------- bad input


def _raw_request(apps: AppCluster, home: Path, app: str, data: bytes) -> bytes:
    """Send raw bytes over TLS with the app certificate (what curl cannot be made to send)."""
    cfg = json.loads(run_ward(home, "app", "config", app, "--format=json").stdout)
    ctx = ssl.create_default_context(cafile=cfg["ca"])
    ctx.check_hostname = False
    ctx.load_cert_chain(cfg["cert"], cfg["key"])
    raw = socket.create_connection(("127.0.0.1", apps.c.proxy_port), timeout=15)
    with ctx.wrap_socket(raw, server_hostname=apps.host(app)) as s:
        s.sendall(data)
        chunks = []
        try:
            while chunk := s.recv(65536):
                chunks.append(chunk)
        except (TimeoutError, ssl.SSLError, ConnectionError):
            pass
        return b"".join(chunks)


def test_smuggling_and_oversized_headers_are_refused(apps: AppCluster, dana: Path) -> None:
    assert run_ward(dana, "app", "login", "web").returncode == 0
    host = apps.host("web").encode()
    cl_te = (
        b"POST /whoami?smuggle=1 HTTP/1.1\r\nHost: " + host + b"\r\nContent-Length: 4\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /whoami?smuggled=1 HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    dup_cl = (
        b"POST /whoami?smuggle=2 HTTP/1.1\r\nHost: " + host + b"\r\nContent-Length: 5\r\n"
        b"Content-Length: 40\r\n\r\nhello"
    )
    huge = b"GET /whoami?huge=1 HTTP/1.1\r\nHost: " + host + b"\r\nX-Big: " + b"a" * 70000 + b"\r\n\r\n"
    for raw in (cl_te, dup_cl, huge):
        answer = _raw_request(apps, dana, "web", raw)
        status = answer.split(b"\r\n", 1)[0]
        assert re.match(rb"HTTP/1\.1 (400|413|431)", status), answer[:300]
    assert [s for s in apps.seen() if "smuggl" in s or "huge" in s] == []
    # The proxy keeps serving.
    r = curl(curl_argv(dana, "web"), apps.url("web", "/small"))
    assert r.stdout == "ok\n"


def test_an_upstream_that_resets_gives_a_502_page(apps: AppCluster, dana: Path) -> None:
    assert run_ward(dana, "app", "login", "web").returncode == 0
    r = curl(curl_argv(dana, "web"), apps.url("web", "/reset"), "-w", "\n%{http_code}")
    body, code = r.stdout.rsplit("\n", 1)
    assert code == "502" and "<html" in body.lower()


def test_a_created_app_matching_the_selectors_is_served_at_once(apps: AppCluster, dana: Path) -> None:
    up = apps.upstream.port  # type: ignore[union-attr]
    app = f"""kind: app
version: v1
metadata: {{name: dyn, labels: {{env: dev, team: web}}, description: Created with wardctl}}
spec:
  uri: http://127.0.0.1:{up}
"""
    wardctl(apps.c.data_dir, "create", "-f", "-", stdin=app)
    deadline = time.monotonic() + 10  # well before the 30 s periodic heartbeat
    while "dyn" not in run_ward(dana, "apps", "ls").stdout:
        assert time.monotonic() < deadline, "the created app was not announced"
        time.sleep(0.5)
    assert run_ward(dana, "app", "login", "dyn").returncode == 0
    r = curl(curl_argv(dana, "dyn"), apps.url("dyn", "/small"))
    assert r.stdout == "ok\n", r.stderr
    wardctl(apps.c.data_dir, "rm", "app/dyn")
    deadline = time.monotonic() + 10
    while "dyn" in run_ward(dana, "apps", "ls").stdout:
        assert time.monotonic() < deadline, "the removed app is still listed"
        time.sleep(0.5)


# ---------------------------------------------------------------- reverse tunnel


def test_an_app_behind_a_reverse_tunnel(apps: AppCluster, dana: Path, tmp_path: Path) -> None:
    static = apps.static.port  # type: ignore[union-attr]
    agent = joined_agent(
        apps.c,
        tmp_path / "app-agent",
        "app",
        f"""app_service:
  enabled: true
  apps:
    - {{name: tunnelled, uri: "http://127.0.0.1:{static}", labels: {{env: dev}}}}
""",
    )
    try:
        deadline = time.monotonic() + 20
        while "tunnelled" not in run_ward(dana, "apps", "ls").stdout:
            assert time.monotonic() < deadline, agent.output()
            time.sleep(0.5)
        assert run_ward(dana, "app", "login", "tunnelled").returncode == 0
        r = curl(curl_argv(dana, "tunnelled"), apps.url("tunnelled", "/index.html"))
        assert r.stdout == STATIC_PAGE.decode(), r.stderr + agent.output()
    finally:
        agent.stop()


# ---------------------------------------------------------------- the browser


def test_click_the_app_in_the_web_ui_and_sign_out_ends_it(apps: AppCluster, make_page: Any) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from tests.webui import csp_violations, page_log, shot, sign_in, tid

    with ThreadPoolExecutor(1) as pool:  # Playwright's sync API runs an event loop in this thread
        secret = pool.submit(apps.c.add_user, "bella", "app-dev", "root").result()
    page = make_page()
    origin = f"https://{PUBLIC}:{apps.c.proxy_port}"
    sign_in(page, origin, "bella", PASSWORD, current_code(secret, time.time()))
    page.click(tid("nav-apps"))
    row = page.locator(f"{tid('app-row')}[data-name=web]")
    row.wait_for()
    assert page.locator(f"{tid('app-row')}[data-name=vault]").count() == 0
    shot(page, "apps")
    with page.context.expect_page() as new:
        row.locator(tid("app-launch")).click()
    app_page = new.value
    app_page.wait_for_selector("#hello")
    assert app_page.url.startswith(apps.url("web"))
    assert "Hello from the upstream app" in (app_page.text_content("#hello") or "")
    shot(app_page, "app-launched")
    cookies = {c["name"]: c for c in app_page.context.cookies(apps.url("web"))}
    app_cookie = cookies["__Host-wardgate_app"]
    assert app_cookie["secure"] and app_cookie["httpOnly"] and app_cookie["sameSite"] == "Lax"
    assert app_cookie["domain"] == apps.host("web")
    whoami = json.loads(app_page.goto(apps.url("web", "/whoami")).text())  # type: ignore[union-attr]
    headers = {k.lower(): v for k, v in whoami["headers"].items()}
    assert "wardgate_app" not in headers.get("cookie", "")  # the session cookie stays with us
    assert "wardgate-jwt-assertion" in headers
    starts = [e for e in events(apps, "app.session.start", "bella") if e.get("app") == "web"]
    assert starts and starts[0]["success"]

    # Signing out of the web UI ends the app session too.
    page.bring_to_front()
    page.click(tid("user-menu-button"))
    page.click(tid("signout"))
    page.wait_for_url(re.compile(r"/web/login"))
    deadline = time.monotonic() + 10
    while True:  # the app now sends the browser to the proxy, which asks it to sign in
        app_page.goto(apps.url("web", "/whoami"))
        if app_page.url.startswith(origin + "/web/"):
            break
        assert time.monotonic() < deadline, "the app session outlived sign-out"
        time.sleep(0.5)
    app_page.wait_for_selector(tid("login-form"))
    for p in (page, app_page):
        assert not csp_violations(p) and not page_log(p).errors, page_log(p).text()
