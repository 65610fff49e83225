"""A small web app to publish through Wardgate in end-to-end tests and benchmarks.

Run as `python tests/upstream_app.py PORT`. It shows what an app behind the proxy sees: the
identity header, the Host and X-Forwarded-* headers, cookies; it redirects to its own address,
echoes uploads and WebSocket messages, streams big bodies, and can hang or reset on demand.
"""

from __future__ import annotations

import asyncio
import hashlib
import sys

from aiohttp import WSMsgType, web

BIG = bytes(range(256)) * 4096  # 1 MiB


async def index(request: web.Request) -> web.Response:
    return web.Response(
        text="<!doctype html><title>Upstream</title><h1 id=hello>Hello from the upstream app</h1>",
        content_type="text/html",
    )


async def whoami(request: web.Request) -> web.Response:
    return web.json_response(
        {"headers": dict(request.headers), "path": request.path_qs, "method": request.method}
    )


async def redirect(request: web.Request) -> web.Response:
    raise web.HTTPFound(f"http://{request.host}/landing")


async def upload(request: web.Request) -> web.Response:
    digest, size = hashlib.sha256(), 0
    async for chunk in request.content.iter_chunked(65536):
        digest.update(chunk)
        size += len(chunk)
    return web.json_response({"size": size, "sha256": digest.hexdigest()})


async def big(request: web.Request) -> web.Response:
    return web.Response(body=BIG, content_type="application/octet-stream")


async def small(request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


async def stream(request: web.Request) -> web.StreamResponse:
    resp = web.StreamResponse()
    resp.enable_chunked_encoding()
    await resp.prepare(request)
    for i in range(int(request.query.get("n", "10"))):
        await resp.write(f"chunk {i}\n".encode())
        await asyncio.sleep(0.01)
    await resp.write_eof()
    return resp


async def hang(request: web.Request) -> web.Response:
    await asyncio.sleep(3600)
    return web.Response(text="too late")


async def reset(request: web.Request) -> web.Response:
    assert request.transport is not None
    request.transport.abort()
    await asyncio.sleep(1)
    return web.Response(text="never")


async def ws(request: web.Request) -> web.WebSocketResponse:
    sock = web.WebSocketResponse(heartbeat=None)
    await sock.prepare(request)
    async for msg in sock:
        if msg.type == WSMsgType.TEXT:
            await sock.send_str(f"echo: {msg.data}")
        elif msg.type == WSMsgType.BINARY:
            await sock.send_bytes(msg.data)
    return sock


SEEN: list[str] = []
"""Every request's method and path, so a test can tell what reached the app (and what not)."""


@web.middleware
async def record(request: web.Request, handler):  # type: ignore[no-untyped-def]
    if request.path != "/seen":
        SEEN.append(f"{request.method} {request.path_qs}")
    return await handler(request)


async def seen(request: web.Request) -> web.Response:
    return web.json_response(SEEN)


def make_app() -> web.Application:
    app = web.Application(client_max_size=64 * 1024 * 1024, middlewares=[record])
    app.router.add_get("/seen", seen)
    app.router.add_get("/", index)
    app.router.add_route("*", "/whoami", whoami)
    app.router.add_get("/redirect", redirect)
    app.router.add_post("/upload", upload)
    app.router.add_get("/big", big)
    app.router.add_get("/small", small)
    app.router.add_get("/stream", stream)
    app.router.add_get("/hang", hang)
    app.router.add_get("/reset", reset)
    app.router.add_get("/ws", ws)
    return app


if __name__ == "__main__":
    web.run_app(make_app(), host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None)
