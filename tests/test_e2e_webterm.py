"""The browser terminal end to end: a real `wardgate start`, a user signed in through the web API,
and a WebSocket client speaking the terminal envelope (`protocols/webterm.py`) as the page does.

The node is real (a shell in a PTY), so what is asserted is what a person would see: command
output, `stty size` after a resize, the exit code, the reasons for refusals, and the audit log.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.cluster import (
    CLUSTER,
    STATIC_TOKEN,
    Process,
    WebClient,
    WebCluster,
    audit,
    current_code,
    openssh_server,
    wardctl,
)
from wardgate.protocols import webterm as wt

pytestmark = pytest.mark.slow

WS_PATH = f"/webapi/sites/{CLUSTER}/connect/ws"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebCluster]:
    c = WebCluster(tmp_path_factory.mktemp("webterm"))
    roles = """kind: role
metadata: {name: watcher}
spec:
  allow:
    join_sessions: [observer]
---
kind: role
metadata: {name: mfa-access}
spec:
  options:
    require_session_mfa: true
  allow:
    logins: ["{{internal.logins}}"]
    node_labels: {"*": "*"}
"""
    wardctl(c.data_dir, "create", "-f", "-", stdin=roles)
    yield c
    c.stop()


async def new_user(cluster: WebCluster, roles: str = "access", tag: str = "u") -> tuple[str, str]:
    """A fresh user (each TOTP code signs in once): (name, TOTP secret)."""
    name = f"{tag}-{uuid.uuid4().hex[:8]}"
    return name, await asyncio.to_thread(cluster.add_user, name, roles, "root")


def wait_audit(cluster: WebCluster, pred: Any, *args: str, timeout: float = 30) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        found = [e for e in audit(cluster.data_dir, *args) if pred(e)]
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.3)


class Term:
    """One browser terminal: the WebSocket, the frames it got, the output so far."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.output = bytearray()
        self.frames: list[wt.Frame] = []
        self.session: dict | None = None
        self.exit: dict | None = None
        self.error: str | None = None
        self.challenge: dict | None = None

    async def send(self, msg: bytes) -> None:
        await self.ws.send_bytes(msg)

    async def type(self, text: str) -> None:
        await self.send(wt.encode_data(text.encode()))

    async def next(self, timeout: float = 20) -> wt.Frame | None:
        """The next frame from the proxy, or None once the socket has closed."""
        msg = await self.ws.receive(timeout=timeout)
        if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING):
            return None
        assert msg.type == aiohttp.WSMsgType.BINARY, msg
        f = wt.decode(msg.data, from_browser=False)
        self.frames.append(f)
        if f.kind == wt.DATA:
            self.output += f.value
        elif f.kind == wt.SESSION:
            self.session = f.value
        elif f.kind == wt.EXIT:
            self.exit = f.value
        elif f.kind == wt.ERROR:
            self.error = f.value
        elif f.kind == wt.MFA:
            self.challenge = f.value
        return f

    async def until(self, pred: Any, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while not pred():
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(
                    f"timed out; output so far: {bytes(self.output)[-2000:]!r}, error {self.error}"
                )
            if await self.next(left) is None:
                if pred():
                    return
                raise AssertionError(
                    f"socket closed ({self.ws.close_code}); output: {bytes(self.output)[-2000:]!r}, "
                    f"error {self.error!r}"
                )

    async def expect(self, pattern: str, timeout: float = 20) -> re.Match[str]:
        rx = re.compile(pattern)
        await self.until(lambda: rx.search(self.output.decode(errors="replace")), timeout)
        m = rx.search(self.output.decode(errors="replace"))
        assert m is not None
        return m

    async def closed(self, timeout: float = 20) -> int | None:
        """Read to the end; the close code."""
        deadline = time.monotonic() + timeout
        while await self.next(max(0.1, deadline - time.monotonic())) is not None:
            pass
        return self.ws.close_code


async def open_term(
    web: WebClient,
    cluster: WebCluster,
    *,
    token: str | None = None,
    origin: str | None = None,
    autoclose: bool = True,
    **query: Any,
) -> Term:
    url = web.base.replace("https://", "wss://") + WS_PATH
    ws = await web.http.ws_connect(
        url,
        params={k: str(v) for k, v in query.items()},
        headers={"Origin": origin or cluster.origin},
        autoclose=autoclose,
    )
    term = Term(ws)
    if token != "":
        await term.send(wt.encode_text(wt.AUTH, web.token if token is None else token))
    return term


async def signed_in(cluster: WebCluster, name: str, secret: str) -> WebClient:
    web = WebClient(cluster)
    await web.sign_in(name, secret)
    return web


def next_code(secret: str, used_at: float) -> str:
    """A TOTP code from a later step than the one used at `used_at` (codes work once, in order)."""
    used_step = int(used_at // 30)
    while int((time.time() + 30) // 30) <= used_step:
        time.sleep(0.5)
    return current_code(secret, time.time() + 30)


# ---------------------------------------------------------------- a session, start to end


async def test_shell_runs_resizes_and_reports_the_exit(cluster: WebCluster) -> None:
    name, secret = await new_user(cluster, tag="alice")
    async with await signed_in(cluster, name, secret) as web:
        term = await open_term(web, cluster, node="main-node", login="root", cols=100, rows=30)
        await term.type("echo hello-$RANDOM-end\r")
        m = await term.expect(r"hello-(\d+)-end")
        assert m.group(1).isdigit()
        await term.type("stty size; echo TERM=$TERM web=$WARD_WEB\r")
        await term.expect(r"\b30 100\b")
        await term.expect(r"TERM=xterm-256color web=1")
        await term.send(wt.encode_resize(120, 40))
        await term.type("stty size\r")
        await term.expect(r"\b40 120\b")
        await term.type("echo sid=$WARD_SESSION_ID=\r")
        sid = (await term.expect(r"sid=([0-9a-f-]{36})="))[1]
        await term.until(lambda: term.session is not None)
        assert term.session == {
            "sid": sid,
            "node": "main-node",
            "login": "root",
            "mode": "peer",
            "cluster": CLUSTER,
        }
        await term.type("exit 3\r")
        assert await term.closed() == wt.CLOSE_NORMAL
        assert term.exit == {"code": 3, "signal": None}
        assert term.frames[-1].kind == wt.EXIT
    starts = wait_audit(cluster, lambda e: e.get("sid") == sid, "--type", "session.start")
    assert starts and starts[0]["user"] == name and starts[0]["login"] == "root"
    ends = wait_audit(cluster, lambda e: e.get("sid") == sid, "--type", "session.end")
    assert ends and ends[0]["exit_code"] == 3
    web_auth = wait_audit(
        cluster, lambda e: e.get("sid") == sid and e.get("protocol") == "web", "--type", "auth"
    )
    assert web_auth and web_auth[0]["success"] and web_auth[0]["user"] == name


async def test_keepalive_and_closing_the_browser_ends_the_session(cluster: WebCluster) -> None:
    name, secret = await new_user(cluster, tag="carol")
    async with await signed_in(cluster, name, secret) as web:
        term = await open_term(web, cluster, node="main-node", login="root")
        await term.send(wt.encode_ping())
        await term.until(lambda: any(f.kind == wt.PING for f in term.frames))
        await term.until(lambda: term.session is not None)
        sid = term.session["sid"]
        assert sid
        await term.type("echo still-$((1+1))-here\r")
        await term.expect("still-2-here")
        await term.ws.close()
    ends = wait_audit(cluster, lambda e: e.get("sid") == sid, "--type", "session.end")
    assert ends and ends[0]["user"] == name


# ---------------------------------------------------------------- refusals


async def test_the_token_must_come_first_and_be_right(cluster: WebCluster) -> None:
    name, secret = await new_user(cluster, tag="dave")
    async with await signed_in(cluster, name, secret) as web:
        wrong = await open_term(web, cluster, token="not-the-token", node="main-node", login="root")
        assert await wrong.closed() == wt.CLOSE_NOT_AUTHENTICATED
        assert wrong.error and "bearer token" in wrong.error
        data_first = await open_term(web, cluster, token="", node="main-node", login="root")
        await data_first.type("id\r")
        assert await data_first.closed() == wt.CLOSE_NOT_AUTHENTICATED
        started = time.monotonic()
        silent = await open_term(web, cluster, token="", node="main-node", login="root")
        assert await silent.closed() == wt.CLOSE_NO_TOKEN
        assert 4 < time.monotonic() - started < 15
        assert silent.error and "within 5s" in silent.error
        # The right token still works on the same web session.
        ok = await open_term(web, cluster, node="main-node", login="root")
        await ok.type("echo fine-$((2*3))\r")
        await ok.expect("fine-6")
        await ok.ws.close()
    refusals = wait_audit(
        cluster,
        lambda e: e["user"] == name and not e["success"] and e.get("protocol") == "web",
        "--type",
        "auth",
    )
    assert any("bearer token" in e.get("error", "") for e in refusals)


async def test_foreign_origin_or_no_cookie_is_refused_before_the_upgrade(cluster: WebCluster) -> None:
    name, secret = await new_user(cluster, tag="erin")
    async with await signed_in(cluster, name, secret) as web:
        url = web.base + WS_PATH + "?node=main-node&login=root"
        async with web.http.get(
            url,
            headers={
                "Origin": "https://evil.example",
                "Connection": "Upgrade",
                "Upgrade": "websocket",
                "Sec-WebSocket-Version": "13",
                "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
            },
        ) as resp:
            assert resp.status == 403
            body = await resp.json()
            assert body["error"]["code"] == "access_denied" and "Origin" in body["error"]["message"]
        with pytest.raises(aiohttp.WSServerHandshakeError) as info:
            await web.http.ws_connect(
                url.replace("https://", "wss://"), headers={"Origin": "https://evil.example"}
            )
        assert info.value.status == 403
        async with web.http.get(url, headers={"Origin": cluster.origin}) as resp:  # no upgrade asked
            assert resp.status == 400
            assert "WebSocket" in (await resp.json())["error"]["message"]
    async with WebClient(cluster) as anonymous:  # the right Origin, but no session cookie
        with pytest.raises(aiohttp.WSServerHandshakeError) as info:
            await anonymous.http.ws_connect(
                anonymous.base.replace("https://", "wss://") + WS_PATH, headers={"Origin": cluster.origin}
            )
        assert info.value.status == 401


async def test_denied_login_is_refused_with_the_reason_and_audited(cluster: WebCluster) -> None:
    name, secret = await new_user(cluster, tag="frank")
    async with await signed_in(cluster, name, secret) as web:
        term = await open_term(web, cluster, node="main-node", login="nobody")
        assert await term.closed() == wt.CLOSE_ACCESS_DENIED
        assert term.error and 'login "nobody"' in term.error
        missing = await open_term(web, cluster, node="no-such-node", login="root")
        assert await missing.closed() == wt.CLOSE_ACCESS_DENIED
        assert missing.error and 'node "no-such-node" not found' in missing.error
        bad = await open_term(web, cluster, node="main-node", login="root", cols=5000)
        assert await bad.closed() == wt.CLOSE_POLICY
        assert bad.error and "1 to 1000" in bad.error
        garbage = await open_term(web, cluster, node="main-node", login="root")
        await garbage.send(b"z-not-a-type")
        assert await garbage.closed() == wt.CLOSE_PROTOCOL_ERROR
        assert garbage.error and "unknown message type" in garbage.error
        # aiohttp drops the connection right after its close frame when a message is too big:
        # read that frame without answering it.
        huge = await open_term(web, cluster, node="main-node", login="root", autoclose=False)
        await huge.send(wt.encode_data(b"x" * wt.MAX_BROWSER_MESSAGE))
        assert await huge.closed() == aiohttp.WSCloseCode.MESSAGE_TOO_BIG
    refusals = wait_audit(
        cluster,
        lambda e: e["user"] == name and not e["success"] and e.get("login") == "nobody",
        "--type",
        "auth",
    )
    assert refusals and refusals[0]["protocol"] == "web" and refusals[0]["server"] == "main-node"


async def test_an_unreachable_node_says_so(cluster: WebCluster) -> None:
    from tests.cluster import free_port

    port = free_port()
    wardctl(cluster.data_dir, "nodes", "add", "--agentless", "--name=dead", f"--addr=127.0.0.1:{port}",
            "--labels=env=dev")  # fmt: skip
    name, secret = await new_user(cluster, tag="gina")
    async with await signed_in(cluster, name, secret) as web:
        deadline = time.monotonic() + 20
        while True:
            term = await open_term(web, cluster, node="dead", login="root")
            code = await term.closed()
            if "not found" not in (term.error or "") or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.3)  # the proxy's cache has not seen the node yet
        assert code == wt.CLOSE_BAD_GATEWAY, term.error
        assert term.error and "unreachable" in term.error and f"127.0.0.1:{port}" in term.error


# ---------------------------------------------------------------- other ways in


async def test_a_node_behind_a_reverse_tunnel(cluster: WebCluster, tmp_path: Path) -> None:
    edge = Process(
        tmp_path / "edge",
        f"""version: v1
wardgate:
  nodename: web-edge
  data_dir: {tmp_path / "edge-data"}
  proxy_server: {cluster.proxy}
  auth_token: {STATIC_TOKEN.split(":", 1)[1]}
  ca_pin: ["{cluster.pin}"]
auth_service:
  enabled: false
proxy_service:
  enabled: false
ssh_service:
  listen_addr: 127.0.0.1:0
  labels: {{env: edge}}
""",
    )
    try:
        name, secret = await new_user(cluster, tag="hank")
        async with await signed_in(cluster, name, secret) as web:
            deadline = time.monotonic() + 30
            while True:
                term = await open_term(web, cluster, node="web-edge", login="root")
                try:
                    await term.type("echo through-$((20+1))-tunnel\r")
                    await term.expect("through-21-tunnel", timeout=10)
                    break
                except AssertionError:
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.5)  # the node has not registered yet
            await term.until(lambda: term.session is not None)
            sid = term.session["sid"]
            assert sid and term.session["node"] == "web-edge"
            await term.type("kill -KILL $$\r")
            assert await term.closed() == wt.CLOSE_NORMAL
            assert term.exit == {"code": None, "signal": "KILL"}
            await asyncio.to_thread(edge.stop)  # the node stays listed for a while; its tunnel is gone
            gone = await open_term(web, cluster, node="web-edge", login="root")
            assert await gone.closed() == wt.CLOSE_BAD_GATEWAY
            assert gone.error and "no tunnel" in gone.error and "web-edge" in gone.error
        starts = wait_audit(cluster, lambda e: e.get("sid") == sid, "--type", "session.start")
        assert starts and starts[0]["user"] == name
    finally:
        edge.stop()


async def test_agentless_openssh_node_is_recorded_by_the_proxy(cluster: WebCluster, tmp_path: Path) -> None:
    with openssh_server(cluster, tmp_path / "sshd", name="legacy-web") as port:
        wardctl(cluster.data_dir, "nodes", "add", "--agentless", "--name=legacy-web",
                f"--addr=127.0.0.1:{port}", "--labels=env=dev")  # fmt: skip
        name, secret = await new_user(cluster, tag="ivan")
        async with await signed_in(cluster, name, secret) as web:
            deadline = time.monotonic() + 20
            while True:
                term = await open_term(web, cluster, node="legacy-web", login="root")
                await term.until(lambda t=term: t.session is not None or t.error is not None)
                if term.session is not None or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.3)
            assert term.session is not None, term.error
            sid = term.session["sid"]
            await term.type("echo agentless-$((50+5))-ok\r")
            await term.expect("agentless-55-ok")
            await term.type("exit 4\r")
            assert await term.closed() == wt.CLOSE_NORMAL
            assert term.exit == {"code": 4, "signal": None}
    ends = wait_audit(cluster, lambda e: e.get("sid") == sid, "--type", "session.end")
    assert ends and ends[0]["agentless"] and ends[0]["protocol"] == "web" and ends[0]["exit_code"] == 4
    deadline = time.monotonic() + 30
    recs: list[dict] = []
    while time.monotonic() < deadline and not recs:
        listed = wardctl(cluster.data_dir, "recordings", "ls", "--format", "json").stdout
        recs = [r for r in json.loads(listed) if r["sid"] == sid]
        time.sleep(0.3)
    assert recs, "the proxy did not upload the recording"


async def test_per_session_mfa(cluster: WebCluster) -> None:
    name, secret = await new_user(cluster, roles="mfa-access", tag="judy")
    async with await signed_in(cluster, name, secret) as web:
        signed_in_at = time.time()
        wrong = await open_term(web, cluster, node="main-node", login="root")
        await wrong.until(lambda: wrong.challenge is not None)
        assert wrong.challenge == {"otp": True, "webauthn": None}
        await wrong.send(wt.encode_json(wt.MFA, {"otp": "000000"}))
        assert await wrong.closed() == wt.CLOSE_ACCESS_DENIED
        assert wrong.error and "second factor not accepted" in wrong.error

        term = await open_term(web, cluster, node="main-node", login="root")
        await term.until(lambda: term.challenge is not None)
        code = await asyncio.to_thread(next_code, secret, signed_in_at + 30)
        await term.send(wt.encode_json(wt.MFA, {"otp": code}))
        await term.type("echo mfa-$((7*6))-passed\r")
        await term.expect("mfa-42-passed")
        await term.until(lambda: term.session is not None)
        sid = term.session["sid"]
        await term.type("exit\r")
        assert await term.closed() == wt.CLOSE_NORMAL
    starts = wait_audit(cluster, lambda e: e.get("sid") == sid, "--type", "session.start")
    assert starts and starts[0]["user"] == name
    refusals = wait_audit(
        cluster,
        lambda e: e["user"] == name and not e["success"] and e.get("protocol") == "web",
        "--type",
        "auth",
    )
    assert any("second factor" in e.get("error", "") for e in refusals)


async def test_join_a_live_session_as_observer(cluster: WebCluster) -> None:
    owner_name, owner_secret = await new_user(cluster, tag="kim")
    watcher_name, watcher_secret = await new_user(cluster, roles="access,watcher", tag="leo")
    async with (
        await signed_in(cluster, owner_name, owner_secret) as owner_web,
        await signed_in(cluster, watcher_name, watcher_secret) as watcher_web,
    ):
        owner = await open_term(owner_web, cluster, node="main-node", login="root")
        await owner.until(lambda: owner.session is not None)
        sid = owner.session["sid"]
        assert sid
        watcher = await open_term(watcher_web, cluster, sid=sid, mode="observer")
        await watcher.until(lambda: watcher.session is not None)
        assert watcher.session["mode"] == "observer" and watcher.session["sid"] == sid
        await asyncio.sleep(0.5)  # let the join reach the node before the owner types
        await owner.type("echo shared-$((40+2))-view\r")
        await owner.expect("shared-42-view")
        await watcher.expect("shared-42-view")
        await watcher.type("echo typed-by-observer\r")  # dropped: observers cannot type
        await owner.type("echo owner-$((1+2))-last\r")
        await owner.expect("owner-3-last")
        await watcher.expect("owner-3-last")
        assert b"typed-by-observer" not in owner.output
        await owner.type("exit\r")
        assert await owner.closed() == wt.CLOSE_NORMAL
        await watcher.closed()
    joins = wait_audit(
        cluster, lambda e: e.get("sid") == sid and e["user"] == watcher_name, "--type", "session.join"
    )
    assert joins and joins[0]["mode"] == "observer"


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


async def test_output_waits_for_a_slow_browser(cluster: WebCluster) -> None:
    """30 MB of output to a browser that stops reading for a while: nothing piles up in the
    proxy (the channel is paused), and every byte arrives once the browser reads again."""
    name, secret = await new_user(cluster, tag="mia")
    total = 30_000_000
    async with await signed_in(cluster, name, secret) as web:
        term = await open_term(web, cluster, node="main-node", login="root")
        await term.type("stty -echo; echo READY-$((3*3))\r")
        await term.expect("READY-9")
        assert cluster.proc is not None
        before = rss_kib(cluster.proc.pid)
        await term.type(f"head -c {total} /dev/zero | tr '\\0' x; echo; echo DONE-$((4*4))\r")
        await asyncio.sleep(3)  # not reading: the node soon has to stop writing
        during = rss_kib(cluster.proc.pid)
        start = len(term.output)
        await term.expect("DONE-16", timeout=120)
        got = bytes(term.output[start:]).count(b"x")
        await term.type("exit\r")
        assert await term.closed() == wt.CLOSE_NORMAL
    assert got == total
    assert during - before < 16 * 1024, (
        f"the proxy grew by {during - before} KiB while the browser was not reading"
    )


async def test_a_lock_ends_a_live_web_session(cluster: WebCluster) -> None:
    name, secret = await new_user(cluster, tag="ned")
    async with await signed_in(cluster, name, secret) as web:
        term = await open_term(web, cluster, node="main-node", login="root")
        await term.type("echo before-$((5+5))-lock\r")
        await term.expect("before-10-lock")
        await asyncio.to_thread(
            wardctl, cluster.data_dir, "lock", f"--user={name}", "--ttl=1h", "--message=incident-web-88"
        )
        code = await term.closed(timeout=30)
        seen = (term.error or "") + term.output.decode(errors="replace")
        assert "incident-web-88" in seen
        assert code in (wt.CLOSE_ACCESS_DENIED, wt.CLOSE_NORMAL)
        again = await open_term(web, cluster, node="main-node", login="root")
        assert await again.closed() == wt.CLOSE_ACCESS_DENIED
        assert again.error and "incident-web-88" in again.error
