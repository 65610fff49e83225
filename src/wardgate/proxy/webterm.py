"""The browser terminal: a WebSocket at `/webapi/sites/{cluster}/connect/ws`, relayed to a node over SSH.

The proxy is the SSH client here (the browser has no key of its own): it logs in to the node
with the user's web-session key and certificate, which the auth service signed for the user at
sign-in, so the node decides and records exactly as for `ward ssh`. One connection goes:

1. **Before the upgrade** (plain JSON errors, like the rest of the API): the `Origin` must be one
   of the proxy's own addresses (403) and the session cookie must name a live web session (401).
   The bearer token is not in the URL (it would end up in logs); it is the first message.
2. **Authenticate.** The first message must be `a` + bearer token within 5 s (else close 4008;
   a wrong token or another first message: 4001).
3. **Decide** with `check_ssh_access` from the proxy's cache, as the `ward-ssh` route does: a
   refusal is an `e` message, an `auth` audit event (`protocol: web`) and close 4003. When
   the only obstacle is the roles' `require_session_mfa`, the proxy sends the user's MFA
   challenge (`m`), waits up to 60 s for the answer, has the auth service sign a one-minute
   MFA-verified certificate for a fresh ed25519 key, and uses that key for this one connection.
4. **Connect** with asyncssh, trusting only host certificates from the cluster's host CA that
   name the node (`<host id>.<cluster>`, or `<name>.<cluster>`; the principals the auth service
   puts in every node's host certificate). Nodes are reached at `node.spec.addr` or, when they
   only dial out, through their reverse tunnel: `_TunnelConnector` is asyncssh's `tunnel=`
   object; it opens the tunnel channel (`TunnelServer.dial`, a public stream pair) and runs
   the SSH client's protocol over it. Agentless OpenSSH nodes are logged in to with the
   agentless recorder's impersonation certificate (`AgentlessRecorder.dial`), and the session is
   recorded here (the proxy is the only Wardgate component that sees it) when the roles say so.
5. **Relay.** A PTY (`xterm-256color`, the browser's size) and a shell, `WARD_WEB=1` in the
   environment (the node passes it on if its `env_allow` does; the default allows `WARD_*`).
   `d` ↔ the channel, `r` → window change, exit status/signal → `x`, then close 1000. Output
   waits for the socket (`await send_bytes`) and the channel stops being read past
   `OUTPUT_HIGH` buffered bytes; browser input stops being read while the node's window is full.
   A browser that goes away closes the channel: the node writes `session.end` and uploads the
   recording. `?sid=&mode=observer|peer` joins a live session through the node's
   `join@wardgate` subsystem instead; an observer's keystrokes are dropped here.

**The session id** (`s`) comes from the node, which makes it: it is sent once the proxy has
found the node's `session.start` event in the audit log. The match is exact, not a guess by
time: user, node, login, and the connection's address as the node saw it (the proxy's local
address of this SSH connection when dialled directly, or the browser's address that the proxy
passes as the channel's originator through a tunnel), newest first. Until the event arrives
(the node ships events in batches, usually within a second) the terminal already works; if it
never arrives within `sid_timeout`, `s` is sent with `sid: null` (and a session that ends
before its id is found gets no `s`). Agentless and joined sessions know their id at once. The
proxy writes one `auth` event (`protocol: web`, `success: true`, with that sid) per terminal, so
the audit log shows that a session came from the web and from which address.

Close codes besides the contract's (1000, 4001, 4003, 4008): 1002 for a message that is not this
protocol, 1008 for a request the proxy will not serve as asked (bad `cols`/`rows`/`mode`/`sid`),
1011 for an internal error, and 1014 when the node cannot be reached or the SSH connection to it
fails, each after an `e` message; and 1009 for a message over 64 KiB (aiohttp closes at once).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

import asyncssh
from aiohttp import WSMsgType, web

from wardgate.api.cache import ResourceCache
from wardgate.api.events import ResourceEvent, ResourceEventType
from wardgate.api.resources import Lock, Node
from wardgate.audit.recording import RecordingWriter
from wardgate.auth.access import SESSION_MFA_REQUIRED, check_ssh_access
from wardgate.auth.certs import verify_ssh_user_cert
from wardgate.auth.identity import Identity
from wardgate.auth.locks import lock_applies, lock_decision, lock_in_force
from wardgate.auth.rbac import AccessChecker
from wardgate.auth.sshserver import key_line
from wardgate.errors import AuthenticationError, BadParameterError, WardgateError
from wardgate.protocols import webterm as wt
from wardgate.protocols.errors import ProtocolError
from wardgate.protocols.tunnel import format_client_addr, parse_client_addr
from wardgate.proxy.agentless import AgentlessRecorder
from wardgate.proxy.sshclient import node_client_options
from wardgate.proxy.websession import COOKIE, WebSession, WebSessions

__all__ = ["WebTerminal"]

log = logging.getLogger(__name__)

AUTH_TIMEOUT = 5.0
MFA_TIMEOUT = 60.0
CONNECT_TIMEOUT = 15.0
HEARTBEAT = 30.0
SID_TIMEOUT = 10.0
TERM_TYPE = "xterm-256color"
DEFAULT_SIZE = (80, 24)
DEFAULT_NODE_PORT = 3022
DEFAULT_SSH_PORT = 22
JOIN_SUBSYSTEM = "join@wardgate"
JOIN_MODES = ("observer", "peer")
OUTPUT_CHUNK = 64 * 1024
"""Most terminal bytes in one `d` message."""
OUTPUT_HIGH = 256 * 1024
"""Stop reading the channel when this much output waits for the browser; resume below LOW."""
OUTPUT_LOW = 64 * 1024
SID_SKEW = timedelta(minutes=2)
"""How far the node's clock may be behind ours when searching for its session.start event."""


class EventSearch(Protocol):
    async def search_events(self, **query: Any) -> tuple[list[dict[str, Any]], str | None]: ...


class _Refused(Exception):
    """End the socket with an `e` message and a close code (and, when `audit`, an auth event)."""

    def __init__(self, message: str, code: int = wt.CLOSE_ACCESS_DENIED, *, audit: bool = True) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.audit = audit


class _Gone(Exception):
    """The browser went away; nothing more to say to it."""


def _json_error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message}}, status=status)


def _close_reason(text: str) -> bytes:
    """A WebSocket close reason is at most 123 bytes of UTF-8."""
    raw = text.encode("utf-8")
    if len(raw) <= 123:
        return raw
    return raw[:120].decode("utf-8", "ignore").encode("utf-8") + b"..."


def _node_names(node: Node) -> list[str]:
    return [n for n in dict.fromkeys((node.name, node.spec.hostname, node.spec.host_id)) if n]


def _split_addr(addr: str, default_port: int) -> tuple[str, int]:
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit() or (host.count(":") and not host.startswith("[")):
        return addr.strip("[]"), default_port
    return host.strip("[]"), int(port)


# ---------------------------------------------------------------- the tunnel as asyncssh's transport


class _ChannelTransport(asyncio.Transport):
    """A reverse-tunnel channel (asyncssh's stream pair) as the transport of an SSH connection."""

    def __init__(self, reader: Any, writer: Any, extra: dict[str, Any]) -> None:
        super().__init__(extra)
        self._reader = reader
        self._writer = writer
        self._closing = False
        self._pump: asyncio.Task[None] | None = None

    def start(self, protocol: asyncio.Protocol) -> None:
        self._pump = asyncio.get_running_loop().create_task(self._read(protocol))

    async def _read(self, protocol: asyncio.Protocol) -> None:
        exc: Exception | None = None
        try:
            while data := await self._reader.read(256 * 1024):
                protocol.data_received(data)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # the tunnel broke: the SSH connection on it is lost
            exc = e
        if exc is None:
            protocol.eof_received()
        protocol.connection_lost(exc)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not self._closing:
            self._writer.write(bytes(data))

    def is_closing(self) -> bool:
        return self._closing

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        with contextlib.suppress(OSError, asyncssh.Error):
            self._writer.write_eof()

    def get_write_buffer_size(self) -> int:
        return int(self._writer.channel.get_write_buffer_size())

    def close(self) -> None:
        if not self._closing:
            self._closing = True
            with contextlib.suppress(OSError, asyncssh.Error):
                self._writer.close()

    def abort(self) -> None:
        self._closing = True
        with contextlib.suppress(OSError, asyncssh.Error):
            self._writer.channel.abort()
        if self._pump is not None:
            self._pump.cancel()


class _TunnelConnector:
    """asyncssh's `tunnel=` object: `create_connection` opens the node's tunnel channel (the
    `ssh` service, with the browser's address as the originator) and attaches the SSH client's
    protocol to it."""

    def __init__(self, tunnels: Any, host_id: str, client_addr: str) -> None:
        self.tunnels = tunnels
        self.host_id = host_id
        self.client_addr = client_addr

    async def create_connection(
        self, session_factory: Callable[[], asyncio.Protocol], host: str, port: int
    ) -> tuple[asyncio.Transport, asyncio.Protocol]:
        reader, writer = await self.tunnels.dial(self.host_id, "ssh", client_addr=self.client_addr)
        protocol = session_factory()
        transport = _ChannelTransport(
            reader,
            writer,
            {"peername": (self.host_id, 0), "sockname": parse_client_addr(self.client_addr)},
        )
        protocol.connection_made(transport)
        transport.start(protocol)
        return transport, protocol


class _Client(asyncssh.SSHClient):
    """Keeps the node's authentication banner: a refusing Wardgate node explains itself there."""

    def __init__(self) -> None:
        self.banner = ""

    def auth_banner_received(self, msg: str, lang: str) -> None:
        self.banner += msg


# ---------------------------------------------------------------- the session channel


class _Channel(asyncssh.SSHClientSession[bytes]):
    """The node's end of the terminal: output is buffered (bounded) for the browser."""

    def __init__(self, term: _Terminal) -> None:
        self.term = term
        self.chan: asyncssh.SSHClientChannel[bytes] | None = None
        self.out = bytearray()
        self.ready = asyncio.Event()
        self.closed = asyncio.Event()
        self.writable = asyncio.Event()
        self.writable.set()
        self.paused = False
        self.exit_status: int | None = None
        self.exit_signal: str | None = None

    def connection_made(self, chan: asyncssh.SSHClientChannel[bytes]) -> None:  # type: ignore[override]
        self.chan = chan

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        self.term.output(data)
        self.out += data
        self.ready.set()
        if not self.paused and len(self.out) >= OUTPUT_HIGH and self.chan is not None:
            self.paused = True
            self.chan.pause_reading()

    def drained(self) -> None:
        if self.paused and len(self.out) < OUTPUT_LOW and self.chan is not None:
            self.paused = False
            self.chan.resume_reading()

    def eof_received(self) -> bool:
        return True  # keep the channel open for the exit status

    def exit_status_received(self, status: int) -> None:
        self.exit_status = status

    def exit_signal_received(self, signal: str, core_dumped: bool, msg: str, lang: str) -> None:
        self.exit_signal = signal

    def pause_writing(self) -> None:
        self.writable.clear()

    def resume_writing(self) -> None:
        self.writable.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed.set()
        self.ready.set()
        self.writable.set()


# ---------------------------------------------------------------- one browser terminal


@dataclass(frozen=True)
class _Ask:
    """What the query string asks for: a new session (node, login) or a live one (sid, mode)."""

    node: str = ""
    login: str = ""
    sid: str = ""
    mode: str = "peer"


@dataclass
class _Target:
    node: Node
    login: str
    mode: str  # "peer" for an own session; observer/peer when joining
    join_sid: str = ""
    checker: AccessChecker | None = None


class _Terminal:
    def __init__(self, svc: WebTerminal, request: web.Request, ws: web.WebSocketResponse, sess: WebSession):
        self.svc = svc
        self.request = request
        self.ws = ws
        self.sess = sess
        peer = request.transport.get_extra_info("peername") if request.transport else None
        if isinstance(peer, tuple) and len(peer) >= 2:
            self.client_addr = format_client_addr(str(peer[0]), int(peer[1]))
        else:
            self.client_addr = format_client_addr(request.remote or "", 0)
        self.size = DEFAULT_SIZE
        self.ask = _Ask()
        self.target: _Target | None = None
        self.seen_as: tuple[str, int] = ("", 0)
        """This SSH connection's address as the node sees it (for finding its session id)."""
        self.key: asyncssh.SSHKey = sess.ssh_key
        self.cert: asyncssh.SSHCertificate = sess.ssh_cert
        self.identity: Identity = sess.identity
        self.conn: asyncssh.SSHClientConnection | None = None
        self.channel: _Channel | None = None
        self.sid = ""
        self.recorder: RecordingWriter | None = None
        self.started = time.time()
        self.bytes_in = 0
        self.bytes_out = 0
        self._send_lock = asyncio.Lock()
        self._closer: asyncio.Future[None] | None = None
        self._reader: asyncio.Task[None] | None = None
        self._stop: tuple[str, int] | None = None
        self._audited = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self._ended = False
        self._agentless_events = False

    # ------------------------------------------------------------ sending

    async def send(self, msg: bytes) -> None:
        async with self._send_lock:
            if self.ws.closed:
                raise _Gone
            try:
                await self.ws.send_bytes(msg)
            except (ConnectionError, RuntimeError) as exc:
                raise _Gone from exc

    async def close(self, code: int, reason: str = "") -> None:
        """Close the socket with `code`; the handshake finishes even if the caller is cancelled
        (an aborted close would drop the last messages still in the TLS buffer)."""
        if self._closer is None:
            self._closer = asyncio.ensure_future(self._close(code, reason))
        await asyncio.shield(self._closer)

    async def _close(self, code: int, reason: str) -> None:
        with contextlib.suppress(Exception):
            await self.ws.close(code=code, message=_close_reason(reason))

    async def refuse(self, message: str, code: int) -> None:
        with contextlib.suppress(_Gone):
            await self.send(wt.encode_text(wt.ERROR, message))
        await self.close(code, message)

    def audit_refusal(self, message: str) -> None:
        t, ask = self.target, self.ask
        self.svc.emitter.emit_nowait(
            "auth",
            user=self.sess.user,
            success=False,
            error=message,
            protocol="web",
            server=t.node.name if t else ask.node,
            login=t.login if t else ask.login,
            sid=ask.sid,
            remote_addr=self.client_addr,
            component="proxy",
        )

    # ------------------------------------------------------------ receiving

    async def receive(self, within: float | None = None) -> wt.Frame:
        """The next browser message, decoded; `p` is answered here."""
        while True:
            msg = await self.ws.receive(timeout=within)
            if msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR):
                raise _Gone
            if msg.type != WSMsgType.BINARY:
                raise ProtocolError("terminal messages are binary: one type byte, then the payload")
            frame = wt.decode(msg.data, from_browser=True)
            if frame.kind == wt.PING:
                await self.send(wt.encode_ping())
                continue
            return frame

    # ------------------------------------------------------------ the whole life of the socket

    async def run(self) -> None:
        try:
            await self._authenticate()
            self.ask = self._parse_query()
            await self._authorize()
            await self._connect()
            await self._relay()
        except _Refused as r:
            log.debug("web terminal of %s from %s refused: %s", self.sess.user, self.client_addr, r.message)
            if r.audit:
                self.audit_refusal(r.message)
            await self.refuse(r.message, r.code)
        except ProtocolError as exc:
            log.debug("web terminal of %s: protocol error: %s", self.sess.user, exc)
            await self.refuse(f"protocol error: {exc}", wt.CLOSE_PROTOCOL_ERROR)
        except _Gone:
            log.debug("web terminal of %s from %s: the browser went away", self.sess.user, self.client_addr)
        finally:
            await self._cleanup()

    def terminate(self, reason: str, code: int = wt.CLOSE_ACCESS_DENIED) -> None:
        """End a running session from our side (a lock, the proxy shutting down): the channel
        closes, and once its last output is sent the browser gets `e` and `code`."""
        self._stop = (f"wardgate: {reason}", code)
        if self.channel is not None and self.channel.chan is not None:
            self.channel.chan.close()

    async def _stop_reading(self) -> None:
        """Take the reader out of `receive()` before closing: aiohttp closes the socket without
        waiting for the browser's close frame when another task is in `receive()`."""
        r = self._reader
        if r is not None and not r.done():
            r.cancel()
            await asyncio.wait({r})

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _cleanup(self) -> None:
        if self.conn is not None:
            self.conn.close()
        for task in list(self._tasks):
            if task is not asyncio.current_task():
                task.cancel()
        self._audit_start()  # when the session ended before its id was found
        self._finish_agentless("browser disconnected" if not self._ended else "")
        if self._closer is None and not self.ws.closed:
            self._closer = asyncio.ensure_future(self._close(wt.CLOSE_NORMAL, ""))
        if self._closer is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._closer), 15)
            except TimeoutError:
                self._closer.cancel()
        if self.conn is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.conn.wait_closed(), 5)

    # ------------------------------------------------------------ steps

    async def _authenticate(self) -> None:
        try:
            frame = await self.receive(self.svc.auth_timeout)
        except TimeoutError:
            raise _Refused(
                f"no bearer token within {self.svc.auth_timeout:g}s: send it as the first message",
                wt.CLOSE_NO_TOKEN,
                audit=False,
            ) from None
        if frame.kind != wt.AUTH:
            raise _Refused(
                "the first message must be the bearer token", wt.CLOSE_NOT_AUTHENTICATED, audit=False
            )
        try:
            self.svc.sessions.check_token(self.sess, frame.value)
        except AuthenticationError as exc:
            self.svc.emitter.emit_nowait(
                "auth",
                user=self.sess.user,
                success=False,
                error=str(exc),
                protocol="web",
                remote_addr=self.client_addr,
                component="proxy",
            )
            raise _Refused(
                f"{exc}: reload the page and sign in again", wt.CLOSE_NOT_AUTHENTICATED, audit=False
            ) from None

    def _parse_query(self) -> _Ask:
        """Syntax only; nodes and sessions are looked up in `_authorize`."""
        q = self.request.query
        try:
            size = wt.Resize(int(q.get("cols") or DEFAULT_SIZE[0]), int(q.get("rows") or DEFAULT_SIZE[1]))
        except (ValueError, ProtocolError):
            raise _Refused(
                "cols and rows must be whole numbers from 1 to 1000", wt.CLOSE_POLICY, audit=False
            ) from None
        self.size = (size.cols, size.rows)
        sid, node, login = q.get("sid", ""), q.get("node", ""), q.get("login", "")
        if sid:
            mode = q.get("mode") or "observer"
            if mode not in JOIN_MODES:
                raise _Refused(f"unknown mode {mode!r}: use observer or peer", wt.CLOSE_POLICY, audit=False)
            try:
                sid = str(uuid.UUID(sid))
            except ValueError:
                raise _Refused(f"{sid!r} is not a session id", wt.CLOSE_POLICY, audit=False) from None
            return _Ask(login=login, sid=sid, mode=mode)
        if not node or not login:
            raise _Refused(
                "say where to connect: ?node=NAME&login=LOGIN (or ?sid=SESSION_ID to join)",
                wt.CLOSE_POLICY,
                audit=False,
            )
        return _Ask(node=node, login=login)

    def _check(self, identity: Identity, node: Node, login: str) -> tuple[Any, AccessChecker | None]:
        return check_ssh_access(
            identity,
            node,
            login,
            roles=self.svc.cache.as_dict("role"),  # type: ignore[arg-type]
            locks=self.svc.cache.list("lock"),  # type: ignore[arg-type]
            node_names=_node_names(node),
            now=self.svc.now(),
        )

    def _resolve(self, name: str) -> Node:
        try:
            return self.svc.resolve(name)
        except BadParameterError as exc:
            raise _Refused(str(exc), wt.CLOSE_POLICY) from None
        except WardgateError as exc:
            raise _Refused(str(exc)) from None

    async def _find_join_target(self) -> _Target:
        sid, mode, wanted = self.ask.sid, self.ask.mode, self.ask.login
        try:
            info = await self.sess.auth.find_session(sid)
        except WardgateError as exc:
            raise _Refused(f"cannot join session {sid}: {exc}") from None
        if not info.get("active", False):
            raise _Refused(f"session {sid} has ended: replay its recording instead", audit=False)
        server = str(info.get("server_id") or info.get("server_hostname") or "")
        node = self._resolve(server)
        if node.spec.agentless:
            raise _Refused(f'session {sid} runs on the agentless node "{node.name}": it cannot be joined')
        logins = [wanted] if wanted else list(self.identity.logins)
        fallback = ""
        for login in logins:
            decision, _ = self._check(self.identity, node, login)
            if decision.allowed:
                return _Target(node, login, mode, join_sid=sid)
            if decision.reason == SESSION_MFA_REQUIRED and not fallback:
                fallback = login
        if fallback:
            return _Target(node, fallback, mode, join_sid=sid)
        if wanted:
            return _Target(node, wanted, mode, join_sid=sid)  # refused below, with the reason
        raise _Refused(f'none of your logins ({", ".join(logins) or "none"}) is allowed on "{node.name}"')

    async def _authorize(self) -> None:
        if self.ask.sid:
            self.target = await self._find_join_target()
        else:
            self.target = _Target(self._resolve(self.ask.node), self.ask.login, "peer")
        t = self.target
        decision, checker = self._check(self.identity, t.node, t.login)
        if not decision.allowed and decision.reason == SESSION_MFA_REQUIRED:
            await self._session_mfa()
            decision, checker = self._check(self.identity, t.node, t.login)
        if not decision.allowed:
            raise _Refused(f"access denied: {decision.reason}")
        t.checker = checker
        if t.node.spec.agentless and self.svc.agentless is None and self._record():
            raise _Refused(
                f'"{t.node.name}" is an agentless OpenSSH node and your roles require sessions to be '
                "recorded (record_session), but this proxy has no recordings directory"
            )

    def _record(self) -> bool:
        t = self.target
        return bool(t and t.checker and t.checker.options.record_session)

    async def _session_mfa(self) -> None:
        """Per-session MFA: the challenge to the browser, its answer to auth, a one-minute cert."""
        try:
            challenge = await self.sess.auth.mfa_challenge()
        except WardgateError as exc:
            raise _Refused(f"your roles require a second factor for every session, but: {exc}") from None
        await self.send(
            wt.encode_json(wt.MFA, {"otp": bool(challenge.get("otp")), "webauthn": challenge.get("webauthn")})
        )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.svc.mfa_timeout
        while True:
            left = deadline - loop.time()
            try:
                if left <= 0:
                    raise TimeoutError
                frame = await self.receive(left)
            except TimeoutError:
                raise _Refused(
                    f"no answer to the second-factor challenge within {self.svc.mfa_timeout:g}s"
                ) from None
            if frame.kind == wt.MFA:
                break
            if frame.kind == wt.RESIZE:
                self.size = (frame.value.cols, frame.value.rows)
            # keystrokes before the session exists have nowhere to go: dropped
        answer: dict[str, Any] = frame.value
        key = asyncssh.generate_private_key("ssh-ed25519")
        try:
            certs = await self.sess.auth.session_mfa_certs(
                ssh_public_key=key_line(key),
                otp=answer.get("otp") or "",
                webauthn=answer.get("webauthn"),
            )
            cert_line = str(certs["ssh_cert"])
            identity = verify_ssh_user_cert(cert_line, self.svc.user_ca_keys(), now=self.svc.now())
        except WardgateError as exc:
            raise _Refused(f"second factor not accepted: {exc}") from None
        if identity.user != self.sess.user:  # pragma: no cover - auth signs for the caller only
            raise _Refused("the per-session certificate names another user")
        self.key, self.cert, self.identity = key, asyncssh.import_certificate(cert_line), identity

    # ------------------------------------------------------------ connecting to the node

    async def _connect(self) -> None:
        t = self.target
        assert t is not None
        node = t.node
        if node.spec.agentless and self.svc.agentless is not None:
            try:
                self.conn = await self.svc.agentless.dial(node, self.identity, t.login)
            except Exception as exc:
                raise self._connect_error(node, t.login, exc, "") from None
        else:
            self.conn = await self._dial(node, t.login)
        chan = _Channel(self)
        env = {"WARD_WEB": "1"}
        if t.join_sid:
            env.update(WARD_JOIN_SID=t.join_sid, WARD_JOIN_MODE=t.mode)
        try:
            await self.conn.create_session(
                lambda: chan,
                subsystem=JOIN_SUBSYSTEM if t.join_sid else None,
                env=env,
                request_pty=True,
                term_type=TERM_TYPE,
                term_size=self.size,
                encoding=None,
            )
        except (asyncssh.Error, OSError) as exc:
            reason = exc.reason if isinstance(exc, asyncssh.Error) else str(exc)
            raise _Refused(f'"{node.name}" refused the session: {reason}', wt.CLOSE_BAD_GATEWAY) from None
        self.channel = chan
        if node.spec.agentless:
            self._start_agentless()

    async def _dial(self, node: Node, login: str) -> asyncssh.SSHClientConnection:
        """A Wardgate node (directly or through its tunnel), or an agentless one without the recorder."""
        client = _Client()
        # Every node's host certificate names `<host id>.<cluster>` (and `<name>.<cluster>`): the
        # host id pins the very node resolved; agentless sshd certificates name the node.
        alias = node.spec.host_id if node.spec.host_id and not node.spec.agentless else node.name
        options = node_client_options(
            login=login,
            key=self.key,
            cert=self.cert,
            host_ca_keys=self.svc.host_ca_keys(),
            host_alias=f"{alias}.{self.svc.cluster_name}",
            connect_timeout=self.svc.connect_timeout,
            keepalive_interval=HEARTBEAT,
            client_factory=lambda: client,
        )
        try:
            if (node.spec.tunnel or not node.spec.addr) and not node.spec.agentless:
                if self.svc.tunnels is None:
                    raise WardgateError(
                        "it is only reachable through a reverse tunnel, and this proxy has none"
                    )
                connector = _TunnelConnector(
                    self.svc.tunnels, node.spec.host_id or node.name, self.client_addr
                )
                conn = await asyncssh.connect(node.name, DEFAULT_SSH_PORT, tunnel=connector, options=options)
                self.seen_as = parse_client_addr(self.client_addr)
            else:
                default = DEFAULT_SSH_PORT if node.spec.agentless else DEFAULT_NODE_PORT
                host, port = _split_addr(node.spec.addr, default)
                conn = await asyncssh.connect(host, port, options=options)
                sock = conn.get_extra_info("sockname") or ("", 0)
                self.seen_as = (str(sock[0]), int(sock[1]))
        except Exception as exc:
            raise self._connect_error(node, login, exc, client.banner) from None
        return conn

    def _connect_error(self, node: Node, login: str, exc: Exception, banner: str) -> _Refused:
        """What a person can act on, from why the SSH connection to the node failed."""
        where = f'node "{node.name}"'
        if node.spec.addr and not node.spec.tunnel:
            where += f" at {node.spec.addr}"
        code = wt.CLOSE_BAD_GATEWAY
        if isinstance(exc, asyncssh.PermissionDenied):
            said = " ".join(line.strip() for line in banner.splitlines() if line.strip())
            message = said or f'{where} refused login "{login}" with your certificate'
            code = wt.CLOSE_ACCESS_DENIED
        elif isinstance(exc, asyncssh.HostKeyNotVerifiable):
            message = (
                f"{where} did not present a host certificate from the cluster's host CA "
                f"for {node.name}: {exc.reason}"
            )
        elif isinstance(exc, TimeoutError):
            message = f"{where} did not answer within {self.svc.connect_timeout:g}s: is it running?"
        elif isinstance(exc, OSError):
            message = f"{where} is unreachable: {exc.strerror or exc}"
        elif isinstance(exc, asyncssh.Error):
            message = f"SSH to {where} failed: {exc.reason}"
        elif isinstance(exc, WardgateError):
            message = f"cannot reach {where}: {exc}"
        else:
            log.warning("web terminal: connecting to %s failed", node.name, exc_info=exc)
            message = f"cannot reach {where}: {exc}"
        return _Refused(message, code)

    # ------------------------------------------------------------ agentless: recorded here

    def _start_agentless(self) -> None:
        t = self.target
        assert t is not None
        self.sid = str(uuid.uuid4())
        svc = self.svc.agentless
        if svc is not None and self._record():
            assert t.checker is not None
            self.recorder = RecordingWriter(
                svc.recordings_dir,
                self.sid,
                width=self.size[0],
                height=self.size[1],
                env={"TERM": TERM_TYPE},
                record_input=t.checker.options.record_input,
                loop=asyncio.get_running_loop(),
            )
        self._agentless_events = True
        self._emit_session("session.start", terminal_size=f"{self.size[0]}x{self.size[1]}")

    def _session_fields(self) -> dict[str, Any]:
        t = self.target
        assert t is not None
        return {
            "login": t.login,
            "server_id": t.node.name,
            "server_hostname": t.node.spec.hostname or t.node.name,
            "server_addr": t.node.spec.addr,
            "remote_addr": self.client_addr,
            "agentless": True,
            "protocol": "web",
        }

    def _emit_session(self, event: str, **fields: Any) -> None:
        svc = self.svc.agentless
        args = {"user": self.identity.user, "sid": self.sid, **self._session_fields(), **fields}
        if svc is not None:
            svc.emit(event, **args)
        else:
            self.svc.emitter.emit_nowait(event, **args)

    def _finish_agentless(self, reason: str) -> None:
        if not self._agentless_events:
            return
        self._agentless_events = False
        ch = self.channel
        code = ch.exit_status if ch else None
        self._emit_session(
            "session.end",
            interactive=True,
            session_type="shell",
            recorded=self.recorder is not None,
            duration=round(time.time() - self.started, 3),
            bytes_in=self.bytes_in,
            bytes_out=self.bytes_out,
            participants=[self.identity.user],
            exit_code=code,
            signal=ch.exit_signal if ch else None,
            reason=reason or None,
        )
        rec, self.recorder = self.recorder, None
        if rec is not None:
            if self.svc.agentless is not None:
                self.svc.agentless.background(self.svc.agentless.finish_recording(rec))
            else:  # pragma: no cover - recordings need the recorder
                rec.close()

    def output(self, data: bytes) -> None:
        self.bytes_out += len(data)
        if self.recorder is not None:
            self.recorder.output(data)

    # ------------------------------------------------------------ relaying

    async def _relay(self) -> None:
        t, ch = self.target, self.channel
        assert t is not None and ch is not None and ch.chan is not None
        if t.join_sid:
            self.sid = t.join_sid
        if self.sid:
            await self._announce()
        else:
            self._spawn(self._learn_sid())
        reader = self._reader = self._spawn(self._read(ch, observer=t.mode == "observer"))
        pump = self._spawn(self._pump(ch))
        await asyncio.wait({pump, reader}, return_when=asyncio.FIRST_COMPLETED)
        if reader.done() and not reader.cancelled():
            exc = reader.exception()  # the browser left (_Gone) or broke the protocol
            if exc is not None:
                raise exc
            return
        await pump  # the session ended: the pump stopped the reader and is closing the socket

    async def _read(self, ch: _Channel, *, observer: bool) -> None:
        chan = ch.chan
        assert chan is not None
        while True:
            await ch.writable.wait()
            frame = await self.receive()
            if ch.closed.is_set():
                continue
            if frame.kind == wt.DATA:
                if observer or not frame.value:
                    continue
                self.sess.touch()
                self.bytes_in += len(frame.value)
                if self.recorder is not None:
                    self.recorder.input(frame.value)
                with contextlib.suppress(OSError, asyncssh.Error):  # closing under us: the pump ends it
                    chan.write(frame.value)
            elif frame.kind == wt.RESIZE:
                self.sess.touch()
                self.size = (frame.value.cols, frame.value.rows)
                with contextlib.suppress(OSError, asyncssh.Error):
                    chan.change_terminal_size(frame.value.cols, frame.value.rows)
                if self.recorder is not None:
                    self.recorder.resize(frame.value.cols, frame.value.rows)
            # a late `a` or an unasked `m` changes nothing

    async def _pump(self, ch: _Channel) -> None:
        """Node output to the browser, then the exit, then close 1000."""
        while True:
            await ch.ready.wait()
            ch.ready.clear()
            while ch.out:
                piece = bytes(ch.out[:OUTPUT_CHUNK])
                del ch.out[:OUTPUT_CHUNK]
                await self.send(wt.encode_data(piece))
                ch.drained()
            if ch.closed.is_set() and not ch.out:
                break
        self._ended = True
        self._finish_agentless(self._stop[0] if self._stop else "")
        await self._stop_reading()
        if self._stop is not None:
            await self.refuse(*self._stop)
            return
        await self.send(wt.encode_json(wt.EXIT, {"code": ch.exit_status, "signal": ch.exit_signal}))
        await self.close(wt.CLOSE_NORMAL, "session ended")

    # ------------------------------------------------------------ the session id

    async def _announce(self) -> None:
        t = self.target
        assert t is not None
        await self.send(
            wt.encode_json(
                wt.SESSION,
                {
                    "sid": self.sid or None,
                    "node": t.node.name,
                    "login": t.login,
                    "mode": t.mode,
                    "cluster": self.svc.cluster_name,
                },
            )
        )
        self._audit_start()

    def _audit_start(self) -> None:
        """The audit log's word that this session came from the web (once, with the id if known)."""
        t = self.target
        if self._audited or t is None or self.channel is None:
            return
        self._audited = True
        self.svc.emitter.emit_nowait(
            "auth",
            user=self.identity.user,
            success=True,
            protocol="web",
            method="web_session",
            server=t.node.name,
            login=t.login,
            sid=self.sid,
            mode=t.mode,
            join=bool(t.join_sid) or None,
            mfa_verified=self.identity.mfa_verified or None,
            remote_addr=self.client_addr,
            component="proxy",
        )

    async def _learn_sid(self) -> None:
        """Find the node's session.start for this very connection (see the module docstring)."""
        t = self.target
        assert t is not None
        host, port = self.seen_as
        expected = f"{host}:{port}"
        names = {t.node.spec.host_id, t.node.name} - {""}
        since = datetime.fromtimestamp(self.started, UTC) - SID_SKEW
        search: EventSearch = self.svc.events or self.sess.auth  # type: ignore[assignment]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.svc.sid_timeout
        delay = 0.05
        while not self.sid:
            try:
                events, _ = await search.search_events(
                    types=["session.start"], user=self.identity.user, since=since, limit=50
                )
            except WardgateError as exc:
                log.debug("web terminal: searching for the session id failed: %s", exc)
                events = []
            for e in events:  # newest first
                if (
                    e.get("server_id") in names
                    and e.get("remote_addr") == expected
                    and e.get("login") == t.login
                    and e.get("sid")
                ):
                    self.sid = str(e["sid"])
                    break
            if self.sid or loop.time() + delay > deadline:
                break
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)
        if not self.sid:
            log.info(
                "web terminal: the node's session id for %s on %s was not found", self.sess.user, t.node.name
            )
        with contextlib.suppress(_Gone):
            await self._announce()


# ---------------------------------------------------------------- the handler


class WebTerminal:
    """`GET /webapi/sites/{cluster}/connect/ws`; see the module docstring."""

    def __init__(
        self,
        *,
        sessions: WebSessions,
        cache: ResourceCache,
        resolve: Callable[[str], Node],
        tunnels: Any,
        agentless: AgentlessRecorder | None,
        cluster_name: str,
        allowed_origins: Callable[[web.Request], set[str]],
        emitter: Any,
        events: EventSearch | None = None,
        auth_timeout: float = AUTH_TIMEOUT,
        mfa_timeout: float = MFA_TIMEOUT,
        connect_timeout: float = CONNECT_TIMEOUT,
        heartbeat: float = HEARTBEAT,
        sid_timeout: float = SID_TIMEOUT,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.sessions = sessions
        self.cache = cache
        self.resolve = resolve
        self.tunnels = tunnels
        self.agentless = agentless
        self.cluster_name = cluster_name
        self.allowed_origins = allowed_origins
        self.emitter = emitter
        self.events: EventSearch | None = events if events is not None else getattr(emitter, "client", None)
        """Where to find the node's session.start (the proxy's own auth client may search the
        audit log; a user's usually may not)."""
        self.auth_timeout = auth_timeout
        self.mfa_timeout = mfa_timeout
        self.connect_timeout = connect_timeout
        self.heartbeat = heartbeat
        self.sid_timeout = sid_timeout
        self.clock = clock
        self._live: set[_Terminal] = set()
        self._idle = asyncio.Event()
        self._unsubscribe: Callable[[], None] | None = None

    def now(self) -> datetime:
        return datetime.fromtimestamp(self.clock(), UTC)

    def host_ca_keys(self) -> list[asyncssh.SSHKey]:
        return [asyncssh.import_public_key(k) for k in self.cache.ca_ssh_keys("host")]

    def user_ca_keys(self) -> list[str]:
        return self.cache.ca_ssh_keys("user")

    @property
    def live(self) -> int:
        """Browser terminals open right now."""
        return len(self._live)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        cluster = request.match_info.get("cluster", self.cluster_name)
        if cluster != self.cluster_name:
            return _json_error(
                404, "not_found", f'cluster "{cluster}" not found: this proxy serves "{self.cluster_name}"'
            )
        origin = request.headers.get("Origin", "")
        if not origin or origin not in self.allowed_origins(request):
            return _json_error(
                403,
                "access_denied",
                "the terminal accepts connections only from this proxy's own pages "
                f"(Origin {origin or 'missing'} is not one of them)",
            )
        try:
            sess = await self.sessions.lookup(request.cookies.get(COOKIE, ""))
        except WardgateError as exc:
            return _json_error(exc.status, exc.code, str(exc))
        ws = web.WebSocketResponse(
            max_msg_size=wt.MAX_BROWSER_MESSAGE, heartbeat=self.heartbeat, autoping=True, compress=False
        )
        if not ws.can_prepare(request).ok:
            return _json_error(
                400, "bad_parameter", "this address speaks WebSocket only: open it with the terminal"
            )
        await ws.prepare(request)
        self._watch_locks()
        term = _Terminal(self, request, ws, sess)
        self._live.add(term)
        try:
            await term.run()
        except asyncio.CancelledError:
            raise
        except Exception:  # one bad socket must not take others down
            log.exception("web terminal of %s failed", sess.user)
            with contextlib.suppress(Exception):
                await ws.close(code=1011, message=b"internal error: see the proxy log")
        finally:
            self._live.discard(term)
            if not self._live:
                self._idle.set()
        return ws

    # ------------------------------------------------------------ locks arriving mid-session

    def _watch_locks(self) -> None:
        if self._unsubscribe is None:
            self._unsubscribe = self.cache.subscribe(self._on_resource)

    def _on_resource(self, ev: ResourceEvent) -> None:
        if ev.type is not ResourceEventType.PUT or ev.kind != "lock" or not isinstance(ev.resource, Lock):
            return
        lock = ev.resource
        if not lock_in_force(lock):
            return
        for term in list(self._live):
            t = term.target
            if t is None or term.channel is None:
                continue
            if lock_applies(
                lock.spec.target,
                user=term.sess.user,
                roles=frozenset(term.identity.roles),
                nodes=frozenset(_node_names(t.node)),
                login=t.login,
            ):
                term.terminate(lock_decision(lock).reason)

    async def close(self) -> None:
        """End every browser terminal (the proxy is stopping)."""
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        for term in list(self._live):
            term.terminate("the proxy is shutting down", 1001)
        if self._live:
            self._idle.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), 5)
