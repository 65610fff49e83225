"""Browser-terminal latency: keystroke to echo through the web terminal vs OpenSSH, in one run.

    .venv/bin/python bench/web_terminal.py                 # 1000 keystrokes per path
    .venv/bin/python bench/web_terminal.py --keys 300 --paths web,ssh
    .venv/bin/python bench/web_terminal.py --format json

Everything is started here, on 127.0.0.1 in a temporary directory, and stopped at the end: a real
all-in-one `wardgate start` (auth + proxy + SSH node; `bench/ssh.py`'s test bed), a user
registered with password + TOTP, logged in with the real `ward login` (for OpenSSH) and signed in
through the web API (`POST /webapi/sessions/web`, cookie + bearer, for the browser terminal).
Each path runs one interactive PTY session whose remote side is `stty raw -echo; exec cat`, and
a keystroke is one byte written by the client; the clock stops when that byte is back. Paths
(`--paths`):

  web          WebSocket `wss://proxy/webapi/sites/CLUSTER/connect/ws` (aiohttp client speaking
               the terminal envelope, `d` messages of one byte) -> proxy (the SSH client) -> node
  ssh          OpenSSH `ssh -tt` with the `ward config` block: ProxyCommand `ward proxy ssh` ->
               proxy (TLS, ALPN ward-ssh) -> node                                  (the baseline)
  direct       OpenSSH `ssh -tt` straight to the node's own port (no proxy)
  web-tunnel   as web, to a second node reachable only over its reverse tunnel
  ssh-tunnel   as ssh, to that node
  sshd         reference: OpenSSH `ssh -tt` to a real OpenSSH sshd (trusting the user CA)

The paths take turns in blocks of back-to-back keystrokes (10 blocks per path), so a slow moment
of the machine hits all of them alike. The browser path's client is Python (aiohttp on this
process's event loop), the others' is OpenSSH's `ssh` (C): a real browser's own cost is not in
any row. The machine is shared by clients, servers and proxy and is noisy: read the ratios to
the `ssh` row of the same run, not the absolutes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import shutil
import signal
import statistics
import string
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import ssh as sshbench  # bench/ssh.py's test bed, reused as it is
import stdlib_http  # noqa: F401 - before anything imports http: bench/http.py would shadow it

from wardgate.protocols import webterm as wt

BIN = sshbench.BIN
CLUSTER = sshbench.CLUSTER
USER = sshbench.USER
LOGIN = sshbench.LOGIN
PASSWORD = sshbench.PASSWORD
progress = sshbench.progress
ALL_PATHS = ("web", "ssh", "direct", "web-tunnel", "ssh-tunnel", "sshd")
DEFAULT_PATHS = ("web", "ssh", "direct", "web-tunnel", "ssh-tunnel")
LABELS = {
    "web": "web terminal",
    "ssh": "ssh (ward config)",
    "direct": "ssh direct to node",
    "web-tunnel": "web terminal, tunnel",
    "ssh-tunnel": "ssh (ward config), tunnel",
    "sshd": "ref: ssh to OpenSSH sshd",
}
SSH_HOSTS = {
    "ssh": sshbench.HOSTS["wardgate"],
    "direct": sshbench.HOSTS["direct"],
    "ssh-tunnel": sshbench.HOSTS["tunnel"],
    "sshd": sshbench.HOSTS["openssh"],
}
WEB_NODES = {"web": "main-node", "web-tunnel": "edge-node"}
REMOTE = "stty raw -echo; echo RE''ADY; exec cat"
"""The remote side: a raw PTY (no line discipline, no echo) and `cat` echoing every byte. The
quotes keep the shell's echo of the typed command from looking like the marker."""
KEYS = (string.ascii_letters + string.digits).encode()


def totp_after(secret: str, used_step: int) -> tuple[str, int]:
    """A code from a later 30 s step than `used_step` (each code works once, in order)."""
    from wardgate.auth.totp import current_code

    while int((time.time() + 30) // 30) <= used_step:
        time.sleep(0.5)
    at = time.time() + 30
    return current_code(secret, at), int(at // 30)


def register_and_login(bed: sshbench.Bed) -> tuple[str, int]:
    """bench/ssh.py's `add_user_and_login`, keeping the TOTP secret for the web sign-in."""
    progress(f"registering user {USER} (password + TOTP) and running `ward login`")
    secret = sshbench.register_user(bed.wardctl, bed.auth_port, bed.pin, roles="access", logins=LOGIN)
    bed.home = bed.tmp / "ward-home"
    code, step = totp_after(secret, int(time.time() // 30))  # registration spent the current step
    sshbench.ward_login(bed.home, bed.proxy_port, bed.pin, code)
    return secret, step


# -- sessions --------------------------------------------------------------------------------------


class SSHEcho:
    """OpenSSH `ssh -tt HOST REMOTE` over pipes: one byte out, the same byte back."""

    def __init__(self, bed: sshbench.Bed, path: str) -> None:
        self.path = path
        argv = ["ssh", "-F", str(bed.ssh_config), "-tt", SSH_HOSTS[path], REMOTE]
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0
        )
        bed.clients.append(self.proc)
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.wfd, self.rfd = self.proc.stdin.fileno(), self.proc.stdout.fileno()

    async def start(self) -> None:
        seen = b""
        while b"READY" not in seen:
            chunk = os.read(self.rfd, 4096)
            if not chunk:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                raise RuntimeError(f"the {self.path} session closed before it was ready: {err.strip()}")
            seen += chunk
        if not seen.endswith(b"\n"):  # what follows the marker is its newline; nothing else
            os.read(self.rfd, 1)

    async def once(self, key: bytes) -> float:
        t = time.perf_counter()
        os.write(self.wfd, key)
        got = os.read(self.rfd, 16)
        elapsed = time.perf_counter() - t
        if got != key:
            raise RuntimeError(f"{self.path}: sent {key!r}, got {got!r}")
        return elapsed

    async def close(self) -> None:
        self.proc.terminate()  # a raw PTY does not turn our EOF into cat's: hang up instead
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)


class WebEcho:
    """The browser terminal's WebSocket: `d` + one byte out, the `d` carrying it back."""

    def __init__(self, web: WebClient, path: str) -> None:
        self.web = web
        self.path = path
        self.ws: Any = None

    async def start(self) -> None:
        self.ws = await self.web.http.ws_connect(
            self.web.base.replace("https://", "wss://") + f"/webapi/sites/{CLUSTER}/connect/ws",
            params={"node": WEB_NODES[self.path], "login": LOGIN, "cols": "80", "rows": "24"},
            headers={"Origin": self.web.base},
        )
        await self.ws.send_bytes(wt.encode_text(wt.AUTH, self.web.token))
        await self.ws.send_bytes(wt.encode_data(REMOTE.encode() + b"\r"))
        seen = b""
        while b"READY" not in seen:
            seen += await self.read()
        if not seen.endswith(b"\n"):
            await self.read()

    async def read(self) -> bytes:
        while True:
            msg = await self.ws.receive(timeout=30)
            if msg.type != 2:  # aiohttp.WSMsgType.BINARY
                raise RuntimeError(f"the {self.path} socket ended: {msg.type!r} {msg.data!r}")
            f = wt.decode(msg.data, from_browser=False)
            if f.kind == wt.DATA:
                return bytes(f.value)
            if f.kind == wt.ERROR:
                raise RuntimeError(f"{self.path}: {f.value}")

    async def once(self, key: bytes) -> float:
        t = time.perf_counter()
        await self.ws.send_bytes(b"d" + key)
        got = await self.read()
        elapsed = time.perf_counter() - t
        if got != key:
            raise RuntimeError(f"{self.path}: sent {key!r}, got {got!r}")
        return elapsed

    async def close(self) -> None:
        if self.ws is not None:
            await self.ws.close()


class WebClient:
    """Signed in as the browser is: cookie jar + bearer token, over TLS to 127.0.0.1."""

    def __init__(self, proxy_port: int) -> None:
        import aiohttp

        self.base = f"https://127.0.0.1:{proxy_port}"
        self.http = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=False), cookie_jar=aiohttp.CookieJar(unsafe=True)
        )
        self.token = ""

    async def sign_in(self, code: str) -> None:
        async with self.http.post(
            self.base + "/webapi/sessions/web", json={"user": USER, "password": PASSWORD, "otp": code}
        ) as resp:
            data = await resp.json(content_type=None)
            if resp.status != 201:
                raise RuntimeError(f"web sign-in failed ({resp.status}): {data}")
        self.token = data["token"]

    async def close(self) -> None:
        await self.http.close()


# -- measuring -------------------------------------------------------------------------------------


@dataclass
class Result:
    path: str
    label: str
    keys: int = 0
    p50_us: float = 0.0
    p90_us: float = 0.0
    p99_us: float = 0.0
    mean_us: float = 0.0
    max_us: float = 0.0
    samples_us: list[float] = field(default_factory=list, repr=False)


async def measure(bed: sshbench.Bed, web: WebClient, paths: list[str], keys: int) -> list[Result]:
    sessions: dict[str, SSHEcho | WebEcho] = {}
    try:
        for p in paths:
            progress(f"opening the {LABELS[p]} session")
            s: SSHEcho | WebEcho = WebEcho(web, p) if p.startswith("web") else SSHEcho(bed, p)
            sessions[p] = s
            await s.start()
            for _ in range(20):  # warm up
                await s.once(random.choice(KEYS).to_bytes(1, "big"))
        times: dict[str, list[float]] = {p: [] for p in paths}
        blocks = 10
        progress(f"{keys} keystrokes per path, paths taking turns in {blocks} blocks")
        for block in range(blocks):
            for p, s in sessions.items():
                n = keys * (block + 1) // blocks - keys * block // blocks
                for _ in range(n):
                    times[p].append(await s.once(random.choice(KEYS).to_bytes(1, "big")))
    finally:
        for s in sessions.values():
            with contextlib.suppress(Exception):
                await s.close()
    results = []
    for p in paths:
        ts = sorted(times[p])
        us = [t * 1e6 for t in ts]
        results.append(
            Result(
                p,
                LABELS[p],
                keys=len(ts),
                p50_us=statistics.median(us),
                p90_us=sshbench.percentile(us, 0.90),
                p99_us=sshbench.percentile(us, 0.99),
                mean_us=statistics.fmean(us),
                max_us=us[-1],
                samples_us=us,
            )
        )
    return results


def ratios(results: list[Result]) -> dict[str, dict[str, float]]:
    base = next((r for r in results if r.path == "ssh"), None)
    if base is None:
        return {}
    return {
        r.path: {
            "p50": r.p50_us / base.p50_us,
            "p99": r.p99_us / base.p99_us,
            "mean": r.mean_us / base.mean_us,
        }
        for r in results
    }


def report(results: list[Result], meta: dict[str, Any]) -> str:
    rs = ratios(results)
    rows = [["path", "keys", "p50 us", "p90 us", "p99 us", "mean us", "max us", "p50 x ssh", "p99 x ssh"]]
    for r in results:
        x = rs.get(r.path)
        rows.append(
            [
                r.label,
                str(r.keys),
                f"{r.p50_us:.0f}",
                f"{r.p90_us:.0f}",
                f"{r.p99_us:.0f}",
                f"{r.mean_us:.0f}",
                f"{r.max_us:.0f}",
                f"{x['p50']:.2f}" if x else "-",
                f"{x['p99']:.2f}" if x else "-",
            ]
        )
    out = [
        f"keystroke -> echo: {meta['keys']} single bytes per path over one raw PTY session each"
        " (`stty raw -echo; exec cat`), paths taking turns in 10 blocks",
        f"{meta['openssh']}, python {meta['python']}, aiohttp {meta['aiohttp']},"
        f" {meta['cpus']} CPUs shared by clients, servers and proxy, {meta['when']}",
        "",
        *sshbench.render(rows),
        "",
        "x ssh: divided by the `ssh (ward config)` row (OpenSSH through the same proxy to the same node).",
        "web rows: a Python WebSocket client (aiohttp) on the bench's event loop;"
        " ssh rows: OpenSSH `ssh -tt`.",
    ]
    return "\n".join(out)


# -- main ------------------------------------------------------------------------------------------


async def run_async(
    bed: sshbench.Bed, secret: str, used_step: int, paths: list[str], keys: int
) -> list[Result]:
    web = WebClient(bed.proxy_port)
    try:
        if any(p.startswith("web") for p in paths):
            progress("signing in through the web API (waiting for a fresh TOTP step if needed)")
            code, _ = await asyncio.to_thread(totp_after, secret, used_step)
            await web.sign_in(code)
        return await measure(bed, web, paths, keys)
    finally:
        await web.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keys", type=int, default=1000, help="keystrokes per path (default 1000)")
    ap.add_argument(
        "--paths",
        default=",".join(DEFAULT_PATHS),
        help=f"comma-separated, from {','.join(ALL_PATHS)} (default {','.join(DEFAULT_PATHS)})",
    )
    ap.add_argument("--format", choices=["text", "json"], default="text", help="result format on stdout")
    ap.add_argument(
        "--keep", action="store_true", help="keep the temp dir (configs, logs) and print its path"
    )
    args = ap.parse_args()
    paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    if bad := [p for p in paths if p not in ALL_PATHS]:
        ap.error(f"unknown path(s) {', '.join(bad)}; choose from {', '.join(ALL_PATHS)}")
    if not paths or args.keys < 1:
        ap.error("--paths must name a path and --keys must be positive")
    if shutil.which("ssh") is None:
        ap.error("ssh (OpenSSH) is not installed")
    if "sshd" in paths and not (shutil.which("sshd") or Path("/usr/sbin/sshd").exists()):
        ap.error("sshd (OpenSSH server) is not installed: drop sshd from --paths")

    def on_term(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    tmp = Path(tempfile.mkdtemp(prefix="wardgate-bench-webterm-"))
    results: list[Result] = []
    try:
        with contextlib.ExitStack() as stack:
            bed = sshbench.Bed(tmp, stack)
            bed.start_main()
            secret, used_step = register_and_login(bed)
            if "sshd" in paths:
                bed.start_jump()
            if {"web-tunnel", "ssh-tunnel"} & set(paths):
                bed.start_edge()
            bed.write_ssh_config()
            if not bed.jump_port:  # bench/ssh.py's config names the sshd's port in any case
                text = bed.ssh_config.read_text().replace("    Port 0\n", "")
                bed.ssh_config.write_text(text)
            stack.callback(bed.kill_clients)  # runs first: clients before the servers
            from wardgate import runtime

            results = runtime.run(run_async(bed, secret, used_step, paths, args.keys))
            progress("stopping")
    except KeyboardInterrupt:
        progress("interrupted: everything started has been stopped")
        sys.exit(130)
    finally:
        if args.keep:
            progress(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    import aiohttp

    openssh = subprocess.run(["ssh", "-V"], capture_output=True, text=True).stderr.strip().split(",")[0]
    meta = {
        "keys": args.keys,
        "openssh": openssh,
        "python": platform.python_version(),
        "aiohttp": aiohttp.__version__,
        "cpus": os.cpu_count(),
        "when": time.strftime("%Y-%m-%d %H:%M"),
    }
    if args.format == "json":
        body = {
            "meta": meta,
            "results": [{k: v for k, v in asdict(r).items() if k != "samples_us"} for r in results],
            "ratios_to_ssh": ratios(results),
        }
        print(json.dumps(body, indent=2))
    else:
        print(report(results, meta))


if __name__ == "__main__":
    main()
