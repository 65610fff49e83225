"""Recording agentless OpenSSH sessions: the proxy terminates the user's SSH and re-originates it.

An OpenSSH node writes no Wardgate recordings, so when the user's roles want sessions recorded
(`record_session`, the default) the proxy stops relaying bytes and stands in the middle:

1. **Terminate.** After the `ward-ssh` answer line, an asyncssh server runs on the client's TLS
   stream. It presents a host certificate for the node's names (`<node>`, `<node>.<cluster>`,
   host id, hostname), signed by the cluster's host CA for a key this proxy made
   (`POST /v1/certs/agentless-host`, proxy only, cached per node until near expiry), so the
   user's OpenSSH accepts it through its `@cert-authority *.<cluster>` line. Client
   authentication takes Wardgate user certificates only; the SSH certificate's user must be
   the TLS certificate's user, and now that the login is visible `check_ssh_access` decides for
   that login (the relay's "every login in the certificate" rule is not needed). Refusals are
   sent as an authentication banner and audited (`auth`), like the node does.
2. **Re-originate.** Once the client has proved its key, the proxy asks auth for a certificate
   for that one login on that node (`POST /v1/certs/impersonate`, proxy only; auth decides
   again from the stored user, principals = the login, TTL 2 minutes, `impersonated-by@wardgate`)
   and logs in to sshd at `node.spec.addr` with an asyncssh client that trusts only host
   certificates from the host CA valid for `<node>.<cluster>` (what the user's OpenSSH checks in
   relay mode). If any of this fails the client's authentication fails with the reason.
3. **Bridge.** Each session channel is re-opened upstream with the same pty-req (type, size,
   modes), env, shell/exec/subsystem; data, EOF, window changes, signals, breaks, exit status and
   exit signal are passed on, with back-pressure both ways. `direct-tcpip` (`-L`, `-D`) is
   forwarded when the roles allow port forwarding. PTY sessions are recorded (asciicast) in a
   proxy-local directory and uploaded to auth; `session.start`/`session.end` (`agentless: true`),
   `exec`, `sftp` and `port` events are written here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal as signals
import time
import uuid
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

import asyncssh

from wardgate import __version__
from wardgate.api.cache import ResourceCache
from wardgate.api.events import ResourceEvent, ResourceEventType
from wardgate.api.resources import CertAuthority, Lock, Node, RoleOptions
from wardgate.api.uploader import RecordingUploader
from wardgate.audit.events import Emitter
from wardgate.audit.queue import QueuedEmitter
from wardgate.audit.recording import RecordingWriter, recover_orphans
from wardgate.auth.access import check_ssh_access
from wardgate.auth.certs import verify_ssh_user_cert
from wardgate.auth.identity import Identity
from wardgate.auth.locks import lock_applies, lock_decision, lock_in_force
from wardgate.auth.rbac import AccessChecker
from wardgate.auth.sshserver import CertificateAuthServer, key_line
from wardgate.errors import AuthenticationError, WardgateError
from wardgate.protocols.sftp import SftpOp, SftpWatcher
from wardgate.proxy.sshclient import node_client_options

__all__ = ["AgentlessRecorder", "CertSource"]

log = logging.getLogger(__name__)

HOST_CERT_RENEW_BEFORE = timedelta(minutes=10)
"""A cached agentless host certificate is replaced when it has less than this left."""
UPLOAD_EVERY = 5.0
DEFAULT_SSH_PORT = 22


class CertSource(Protocol):
    """What the recorder needs from the auth service (`AuthClient` has all three)."""

    async def agentless_host_cert(self, node: str, ssh_public_key: str) -> dict[str, Any]: ...

    async def impersonate_ssh_cert(
        self, *, user: str, login: str, node: str, ssh_public_key: str, mfa_verified: str = ""
    ) -> dict[str, Any]: ...

    async def upload_recording(self, sid: str, data: bytes) -> None: ...


def _node_names(node: Node) -> list[str]:
    return [n for n in dict.fromkeys((node.name, node.spec.hostname, node.spec.host_id)) if n]


@dataclass(frozen=True, slots=True)
class _Decision:
    allowed: bool
    reason: str = ""
    identity: Identity | None = None
    checker: AccessChecker | None = None


@dataclass
class _HostCert:
    names: tuple[str, ...]
    cert: asyncssh.SSHCertificate
    expires: datetime


class AgentlessRecorder:
    """The proxy's SSH server-and-client for recorded agentless sessions; see the module docstring."""

    def __init__(
        self,
        cache: ResourceCache,
        emitter: Emitter,
        auth: CertSource,
        recordings_dir: str | os.PathLike[str],
        *,
        login_timeout: float = 60.0,
        connect_timeout: float = 15.0,
        keepalive_interval: float = 60.0,
        upload_every: float = UPLOAD_EVERY,
    ) -> None:
        self.cache = cache
        self.emitter = emitter
        self.auth = auth
        self.recordings_dir = Path(recordings_dir)
        self.login_timeout = login_timeout
        self.connect_timeout = connect_timeout
        self.keepalive_interval = keepalive_interval
        self.uploader = RecordingUploader(auth, self.recordings_dir, every=upload_every)
        self.host_key = asyncssh.generate_private_key("ssh-ed25519")
        self._host_certs: dict[str, _HostCert] = {}
        self._cert_locks: dict[str, asyncio.Lock] = {}
        self._connections: set[_Connection] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._audit = QueuedEmitter(emitter, name="agentless-audit")
        self._workers: list[asyncio.Task[None]] = []
        self._unsubscribe: Any = None

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Finish recordings a crash left behind, then keep uploading and watching for locks."""
        self.recordings_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        for p in await asyncio.to_thread(recover_orphans, self.recordings_dir):
            log.warning("recovered agentless recording %s left by an earlier run", p.name)
        self._audit.start()
        self._workers = [asyncio.create_task(self.uploader.run(), name="agentless-uploads")]
        self._unsubscribe = self.cache.subscribe(self._on_resource)

    async def close(self) -> None:
        """End every session (audited), finish and upload recordings, flush audit events."""
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        for c in list(self._connections):
            c.terminate("the proxy is shutting down")
        for c in list(self._connections):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(c.closed.wait(), 5)
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
        with contextlib.suppress(Exception):
            await self.uploader.upload_pending()
        await self._audit.close(grace=10)
        for w in self._workers:
            w.cancel()
        for w in self._workers:
            with contextlib.suppress(asyncio.CancelledError):
                await w

    # ------------------------------------------------------------ trust

    def user_ca_keys(self) -> list[str]:
        return self.cache.ca_ssh_keys("user")

    def host_ca_keys(self) -> list[str]:
        return self.cache.ca_ssh_keys("host")

    @property
    def cluster(self) -> str:
        ca = self.cache.get("cert_authority", "host")
        return ca.spec.cluster_name if isinstance(ca, CertAuthority) else ""

    async def host_cert(self, node: Node) -> asyncssh.SSHCertificate:
        """The host certificate presented as `node`: fetched from auth once, renewed near expiry
        or when the node's names change."""
        names = tuple(_node_names(node))
        lock = self._cert_locks.setdefault(node.name, asyncio.Lock())
        async with lock:
            cached = self._host_certs.get(node.name)
            now = datetime.now(UTC)
            if cached is not None and cached.names == names and cached.expires - now > HOST_CERT_RENEW_BEFORE:
                return cached.cert
            data = await self.auth.agentless_host_cert(node.name, key_line(self.host_key))
            cert = asyncssh.import_certificate(data["ssh_cert"])
            expires = datetime.fromisoformat(data["expires"])
            self._host_certs[node.name] = _HostCert(names, cert, expires)
            return cert

    # ------------------------------------------------------------ serving one client connection

    async def serve(
        self,
        transport: asyncio.Transport,
        pending: bytes,
        eof: bool,
        node: Node,
        tls_identity: Identity,
        client_addr: str,
        host_cert: asyncssh.SSHCertificate,
        *,
        port: int = 0,
    ) -> None:
        """Run the SSH server on a client's stream (already answered `ok`) until it closes;
        sshd is dialled at the node's address (`port`, when the client names one, replaces its
        port, as in relay mode)."""
        srv = _Connection(self, node, tls_identity, client_addr, port)
        options = asyncssh.SSHServerConnectionOptions(
            server_factory=lambda: srv,
            server_host_keys=[(self.host_key, host_cert)],
            server_version=f"Wardgate_{__version__}",
            password_auth=False,
            kbdint_auth=False,
            public_key_auth=True,
            host_based_auth=False,
            gss_host=None,
            allow_pty=True,
            line_editor=False,
            agent_forwarding=False,
            x11_forwarding=False,
            allow_scp=False,
            sftp_factory=None,
            encoding=None,
            rdns_lookup=False,
            login_timeout=self.login_timeout,
            keepalive_interval=self.keepalive_interval,
        )
        conn = _ClientConnection(asyncio.get_running_loop(), options, srv)
        self._connections.add(srv)
        try:
            closing = transport.is_closing()
            transport.set_protocol(conn)
            conn.connection_made(transport)
            if pending:
                conn.data_received(pending)
            if eof:
                conn.eof_received()
            if closing:
                conn.connection_lost(None)
            elif not eof:
                transport.resume_reading()
            await conn.wait_closed()
        finally:
            if not conn.is_closed():  # cancelled: the router is closing
                srv.terminate("the proxy is shutting down")
            srv.drop_upstream()
            srv.closed.set()
            self._connections.discard(srv)

    async def dial(
        self, node: Node, identity: Identity, login: str, *, port: int = 0
    ) -> asyncssh.SSHClientConnection:
        """Log in to the node's sshd as `login` with a certificate auth issues to us for the user."""
        key = asyncssh.generate_private_key("ssh-ed25519")
        data = await self.auth.impersonate_ssh_cert(
            user=identity.user,
            login=login,
            node=node.name,
            ssh_public_key=key_line(key),
            mfa_verified=identity.mfa_verified,
        )
        cert = asyncssh.import_certificate(data["ssh_cert"])
        host, _, default_port = node.spec.addr.rpartition(":")
        if not host:
            host, default_port = node.spec.addr, ""
        cas = [asyncssh.import_public_key(k) for k in self.host_ca_keys()]
        options = node_client_options(
            login=login,
            key=key,
            cert=cert,
            host_ca_keys=cas,
            host_alias=f"{node.name}.{self.cluster}",
            connect_timeout=self.connect_timeout,
            keepalive_interval=self.keepalive_interval,
        )
        return await asyncssh.connect(
            host.strip("[]"), port or int(default_port or DEFAULT_SSH_PORT), options=options, config=None
        )

    # ------------------------------------------------------------ locks arriving mid-session

    def _on_resource(self, ev: ResourceEvent) -> None:
        if ev.type is not ResourceEventType.PUT or ev.kind != "lock" or not isinstance(ev.resource, Lock):
            return
        lock = ev.resource
        if not lock_in_force(lock):
            return
        for c in list(self._connections):
            ident = c.identity
            if ident is None:
                continue
            if lock_applies(
                lock.spec.target,
                user=ident.user,
                roles=frozenset(ident.roles),
                nodes=frozenset(_node_names(c.node)),
                login=c.login,
            ):
                c.terminate(lock_decision(lock).reason)

    # ------------------------------------------------------------ background work

    def background(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def emit(self, event: str, *, user: str = "", success: bool = True, sid: str = "", **fields: Any) -> None:
        """Queue an audit event; one writer keeps them in the order they happened."""
        self._audit.emit_nowait(event, user=user, success=success, sid=sid, **fields)

    async def finish_recording(self, rec: RecordingWriter) -> None:
        try:
            await rec.aclose()
        except OSError:
            log.exception("could not finish the recording of session %s", rec.sid)
        self.uploader.poke()


class _ClientConnection(asyncssh.SSHServerConnection):
    """asyncssh's server connection with our decision, and the upstream login, in front of the
    certificate checks: the client's authentication succeeds only once sshd has accepted us."""

    def __init__(self, loop: asyncio.AbstractEventLoop, options: Any, srv: _Connection) -> None:
        super().__init__(loop, options)
        self.wardgate = srv

    async def validate_public_key(self, username: str, key_data: bytes, msg: bytes, signature: bytes) -> bool:
        srv = self.wardgate
        if not srv.authorize(username, key_data):
            return False
        if not await super().validate_public_key(username, key_data, msg, signature):
            return False
        if not msg:
            return True
        return await srv.open_upstream(username, bytes(key_data))


class _Connection(CertificateAuthServer):
    """One client connection: who it is, the login, and its connection to the node's sshd."""

    def __init__(
        self, svc: AgentlessRecorder, node: Node, tls_identity: Identity, client_addr: str, port: int = 0
    ) -> None:
        super().__init__()
        self.svc = svc
        self.node = node
        self.tls_identity = tls_identity
        self.client_addr = client_addr
        self.port = port
        self.conn: asyncssh.SSHServerConnection | None = None
        self.upstream: asyncssh.SSHClientConnection | None = None
        self.login = ""
        self.sessions: set[_Bridge] = set()
        self.closed = asyncio.Event()

    @property
    def user(self) -> str:
        return self.identity.user if self.identity else self.tls_identity.user

    def event_fields(self, login: str = "") -> dict[str, Any]:
        return {
            "login": login or self.login,
            "server_id": self.node.name,
            "server_hostname": self.node.spec.hostname or self.node.name,
            "server_addr": self.node.spec.addr,
            "remote_addr": self.client_addr,
            "agentless": True,
        }

    # ------------------------------------------------------------ connection

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self.conn = conn

    def connection_lost(self, exc: Exception | None) -> None:
        self.stop_timers()
        for s in list(self.sessions):
            s.client_gone(exc)
        self.drop_upstream()

    def drop_upstream(self) -> None:
        if self.upstream is not None:
            self.upstream.close()
            self.upstream = None

    def _upstream_closed(self, exc: Exception | None) -> None:
        """sshd went away: nothing more can happen on this connection."""
        if self.conn is not None and self.upstream is not None:
            self.upstream = None
            why = f": {exc}" if exc else ""
            text = f"wardgate: {self.node.name} closed the connection{why}"
            self.conn.disconnect(asyncssh.DISC_BY_APPLICATION, text)

    def terminate(self, reason: str) -> None:
        """End every session with a word to the user, then the connection (lock, shutdown, expiry)."""
        if self._closing:
            return
        self._closing = True
        log.info("ending %s's agentless connection to %s: %s", self.user, self.node.name, reason)
        for s in list(self.sessions):
            s.terminate(reason)
        if self.conn is not None:
            self.conn.disconnect(asyncssh.DISC_BY_APPLICATION, f"wardgate: {reason}")
        else:
            self.closed.set()

    # ------------------------------------------------------------ authentication

    def trusted_user_ca_keys(self) -> Sequence[str]:
        return self.svc.user_ca_keys()

    def decide(self, username: str, blob: bytes) -> _Decision:
        return self._decide(username, blob)

    def refused(self, username: str, blob: bytes, decision: _Decision) -> None:
        self._refuse(username, decision.reason)

    def _decide(self, username: str, blob: bytes) -> _Decision:
        try:
            identity = verify_ssh_user_cert(blob, self.svc.user_ca_keys())
        except AuthenticationError as e:
            return _Decision(False, str(e))
        if identity.user != self.tls_identity.user:
            return _Decision(
                False,
                f"the SSH certificate is {identity.user}'s but the TLS certificate is "
                f"{self.tls_identity.user}'s: use one `ward login`",
                identity,
            )
        decision, checker = check_ssh_access(
            identity,
            self.node,
            username,
            roles=self.svc.cache.as_dict("role"),  # type: ignore[arg-type]
            locks=self.svc.cache.list("lock"),  # type: ignore[arg-type]
            node_names=_node_names(self.node),
        )
        if not decision.allowed:
            return _Decision(False, decision.reason, identity)
        return _Decision(True, decision.reason, identity, checker)

    def _refuse(self, login: str, reason: str, *, denied: bool = True) -> None:
        """Tell the client why (OpenSSH prints the banner), audit, and stop a guessing client."""
        log.info("agentless %s refused %s as %r from %s: %s", self.node.name, self.user, login,
                 self.client_addr, reason)  # fmt: skip
        if self.conn is not None:
            with contextlib.suppress(OSError):
                what = "access denied: " if denied else ""
                self.conn.send_auth_banner(f"wardgate: {what}{reason}\r\n")
        self.svc.emit(
            "auth",
            user=self.user,
            success=False,
            error=reason,
            protocol="ssh",
            server=self.node.name,
            component="proxy",
            method="certificate",
            **{k: v for k, v in self.event_fields(login).items() if k not in ("server_id",)},
        )

    async def open_upstream(self, username: str, blob: bytes) -> bool:
        """The client proved its key: log in to sshd as that login, or fail its authentication."""
        d = self.decision_for(username, blob)
        if d is None or not d.allowed or d.identity is None:  # pragma: no cover - authorize() ran first
            return False
        if self.upstream is not None:
            return self.login == username
        try:
            upstream = await self.svc.dial(self.node, d.identity, username, port=self.port)
        except (WardgateError, asyncssh.Error, OSError, TimeoutError, ValueError) as exc:
            reason = _upstream_error(self.node, username, exc)
            self._decisions[username, blob] = _Decision(False, reason, d.identity)
            self._refuse(username, reason, denied=isinstance(exc, WardgateError))
            self.count_refusal()
            return False
        if self.conn is None or self.conn.is_closed():
            upstream.close()
            return False
        self.upstream = upstream
        self.identity, self.login = d.identity, username
        self.options = d.checker.options if d.checker else RoleOptions()
        self.svc.background(self._watch_upstream(upstream))
        return True

    async def _watch_upstream(self, upstream: asyncssh.SSHClientConnection) -> None:
        await upstream.wait_closed()
        if self.upstream is upstream:
            self._upstream_closed(None)

    # ------------------------------------------------------------ channels

    def session_requested(self) -> _Bridge:
        self.touch()
        return _Bridge(self)

    def connection_requested(
        self, dest_host: str, dest_port: int, orig_host: str, orig_port: int
    ) -> asyncssh.SSHClientConnection:
        """`ssh -L`/`-D`: forwarded through sshd when the roles (and so both certificates) allow it."""
        self.touch()
        addr = f"{dest_host}:{dest_port}"
        if not self.options.port_forwarding or self.upstream is None:
            denied = "port forwarding is not allowed by your roles (option port_forwarding)"
            self.svc.emit("port", user=self.user, success=False, **self.event_fields(), addr=addr,
                          kind="local", reason=denied)  # fmt: skip
            raise asyncssh.ChannelOpenError(asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED, denied)
        self.svc.emit("port", user=self.user, **self.event_fields(), addr=addr, kind="local")
        return self.upstream

    def server_requested(self, listen_host: str, listen_port: int) -> bool:
        reason = "remote forwarding (-R) is not available on agentless nodes while sessions are recorded"
        self.svc.emit("port", user=self.user, success=False, **self.event_fields(),
                      addr=f"{listen_host or '*'}:{listen_port}", kind="remote", reason=reason)  # fmt: skip
        return False

    def unix_connection_requested(self, dest_path: str) -> bool:
        return False

    def unix_server_requested(self, listen_path: str) -> bool:
        return False


def _upstream_error(node: Node, login: str, exc: BaseException) -> str:
    if isinstance(exc, asyncssh.PermissionDenied):
        return f'the OpenSSH server of "{node.name}" refused login "{login}": does it trust the user CA?'
    if isinstance(exc, asyncssh.HostKeyNotVerifiable):
        return (
            f'"{node.name}" at {node.spec.addr} did not present a host certificate from the cluster\'s '
            f"host CA for {node.name}: {exc.reason}"
        )
    if isinstance(exc, OSError | TimeoutError):
        return f'node "{node.name}" at {node.spec.addr} is unreachable: {exc or "timed out"}'
    if isinstance(exc, asyncssh.Error):
        return f'SSH to "{node.name}" failed: {exc.reason}'
    return str(exc)


class _Upstream(asyncssh.SSHClientSession[bytes]):
    """The node's end of one bridged session channel."""

    def __init__(self, bridge: _Bridge) -> None:
        self.bridge = bridge

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        self.bridge.node_data(data, datatype)

    def eof_received(self) -> bool:
        self.bridge.node_eof()
        return True

    def exit_status_received(self, status: int) -> None:
        self.bridge.exit_status = status

    def exit_signal_received(self, signal: str, core_dumped: bool, msg: str, lang: str) -> None:
        self.bridge.exit_signal = (signal, core_dumped, msg, lang)

    def pause_writing(self) -> None:
        self.bridge.pause_client()

    def resume_writing(self) -> None:
        self.bridge.resume_client()

    def connection_lost(self, exc: Exception | None) -> None:
        self.bridge.node_closed(exc)


class _Bridge(asyncssh.SSHServerSession[bytes]):
    """The client's end of one session channel, re-opened on the node and recorded on the way."""

    def __init__(self, conn: _Connection) -> None:
        self.conn = conn
        self.svc = conn.svc
        self.sid = str(uuid.uuid4())
        self.chan: asyncssh.SSHServerChannel[bytes] | None = None
        self.up: asyncssh.SSHClientChannel[bytes] | None = None
        self.kind = ""
        self.command = ""
        self.subsystem = ""
        self.want_pty = False
        self.term_type = ""
        self.term_size: tuple[int, int, int, int] = (80, 24, 0, 0)
        self.term_modes: dict[int, int] = {}
        self.pending: list[bytes] = []
        self.pending_eof = False
        self.recorder: RecordingWriter | None = None
        self.sftp: SftpWatcher | None = None
        self.bytes_in = 0
        self.bytes_out = 0
        self.exit_status: int | None = None
        self.exit_signal: tuple[str, bool, str, str] | None = None
        self.started_at = time.time()
        self.client_open = False
        self._opened = False
        self._finished = False

    # ------------------------------------------------------------ requests from the client

    def connection_made(self, chan: asyncssh.SSHServerChannel[bytes]) -> None:  # type: ignore[override]
        self.chan = chan
        self.client_open = True
        self.conn.sessions.add(self)

    def pty_requested(self, term_type: str, term_size: tuple[int, int, int, int], term_modes: dict) -> bool:
        self.want_pty = True
        self.term_type = term_type or "xterm"
        self.term_size = term_size
        self.term_modes = dict(term_modes)
        return True

    def shell_requested(self) -> bool:
        self.kind = "shell"
        return True

    def exec_requested(self, command: str) -> bool:
        self.kind, self.command = "exec", command
        return True

    def subsystem_requested(self, subsystem: str) -> bool:
        self.kind, self.subsystem = "subsystem", subsystem
        return True

    def session_started(self) -> None:
        self.svc.background(self._open())

    async def _open(self) -> None:
        """Open the same session on the node; until then client input waits (reading paused)."""
        upstream, chan = self.conn.upstream, self.chan
        if upstream is None or chan is None or not self.client_open:
            self._fail("the connection to the node is gone")
            return
        recorded = self.want_pty and self.kind != "subsystem" and self.conn.options.record_session
        try:
            if recorded:
                # Fail closed: a role that wants sessions recorded gets no unrecorded session.
                self.recorder = RecordingWriter(
                    self.svc.recordings_dir,
                    self.sid,
                    width=self.term_size[0] or 80,
                    height=self.term_size[1] or 24,
                    env={"TERM": self.term_type},
                    record_input=self.conn.options.record_input,
                    loop=asyncio.get_running_loop(),
                )
            up, _ = await upstream.create_session(
                lambda: _Upstream(self),
                command=self.command if self.kind == "exec" else None,
                subsystem=self.subsystem or None,
                env=dict(chan.get_environment_bytes()),
                request_pty=self.want_pty,
                term_type=self.term_type if self.want_pty else None,
                term_size=self.term_size if self.want_pty else None,
                term_modes=self.term_modes,
                encoding=None,
            )
        except (asyncssh.Error, OSError) as exc:
            reason = exc.reason if isinstance(exc, asyncssh.Error) else str(exc)
            self._fail(f"{self.conn.node.name} refused the session: {reason}")
            return
        self.up = up
        self._opened = True
        if not self.client_open:
            up.close()
            return
        if self.subsystem == "sftp":
            self.sftp = SftpWatcher(self._sftp_op)
        self._report_start()
        for data in self.pending:
            self._to_node(data)
        self.pending.clear()
        if self.pending_eof:
            up.write_eof()
        chan.resume_reading()

    def _report_start(self) -> None:
        c = self.conn
        self.svc.emit(
            "session.start",
            user=c.user,
            sid=self.sid,
            **c.event_fields(),
            interactive=self.want_pty,
            session_type=self.kind,
            command=self.command or None,
            subsystem=self.subsystem or None,
            terminal_size=f"{self.term_size[0]}x{self.term_size[1]}" if self.want_pty else None,
            recorded=self.recorder is not None,
        )

    # ------------------------------------------------------------ client → node

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        if self.up is None:
            self.pending.append(data)
            if self.chan is not None:
                self.chan.pause_reading()
            return
        self._to_node(data)

    def _to_node(self, data: bytes) -> None:
        self.conn.touch()
        self.bytes_in += len(data)
        if self.recorder is not None:
            self.recorder.input(data)
        if self.sftp is not None:
            self.sftp.client_data(data)
        if self.up is not None:
            self.up.write(data)

    def eof_received(self) -> bool:
        if self.up is not None:
            with contextlib.suppress(OSError):
                self.up.write_eof()
        else:
            self.pending_eof = True
        return True  # keep the channel open for the rest of the output

    def terminal_size_changed(self, width: int, height: int, pixwidth: int, pixheight: int) -> None:
        self.term_size = (width, height, pixwidth, pixheight)
        if self.up is not None:
            with contextlib.suppress(OSError):
                self.up.change_terminal_size(width, height, pixwidth, pixheight)
        if self.recorder is not None:
            self.recorder.resize(width, height)

    def signal_received(self, signal: str) -> None:
        if self.up is not None:
            with contextlib.suppress(OSError):
                self.up.send_signal(signal)

    def break_received(self, msec: int) -> bool:
        if self.up is None:
            return False
        with contextlib.suppress(OSError):
            self.up.send_break(msec)
        return True

    def pause_writing(self) -> None:
        """The client's window is full: stop reading from the node until it drains."""
        if self.up is not None:
            self.up.pause_reading()

    def resume_writing(self) -> None:
        if self.up is not None:
            self.up.resume_reading()

    def pause_client(self) -> None:
        if self.client_open and self.chan is not None:
            self.chan.pause_reading()

    def resume_client(self) -> None:
        if self.client_open and self.chan is not None:
            self.chan.resume_reading()

    # ------------------------------------------------------------ node → client

    def node_data(self, data: bytes, datatype: asyncssh.DataType) -> None:
        self.bytes_out += len(data)
        if datatype == asyncssh.EXTENDED_DATA_STDERR:
            if self.client_open and self.chan is not None:
                self.chan.write_stderr(data)
            return
        if self.recorder is not None:
            self.recorder.output(data)
        if self.sftp is not None:
            self.sftp.server_data(data)
        if self.client_open and self.chan is not None:
            self.chan.write(data)

    def node_eof(self) -> None:
        if self.client_open and self.chan is not None:
            with contextlib.suppress(OSError):
                self.chan.write_eof()

    def node_closed(self, exc: Exception | None) -> None:
        """The node ended the session: pass its exit on, then write the closing events."""
        if self.client_open and self.chan is not None:
            with contextlib.suppress(OSError):
                if self.exit_signal is not None:
                    self.chan.exit_with_signal(*self.exit_signal)
                elif self.exit_status is not None:
                    self.chan.exit(self.exit_status)
                else:
                    self.chan.close()
        self._finish("" if exc is None else f"connection to the node lost: {exc}")

    # ------------------------------------------------------------ the end

    def _say(self, text: str) -> None:
        """A line for the person at the other end (stderr, or the terminal with a PTY)."""
        if not self.client_open or self.chan is None:
            return
        with contextlib.suppress(OSError):
            if self.want_pty:
                self.chan.write(f"\r\n{text}\r\n".encode())
            else:
                self.chan.write_stderr(f"{text}\n".encode())

    def _fail(self, reason: str) -> None:
        """The session could not be opened on the node."""
        log.info("agentless session %s on %s not opened: %s", self.sid, self.conn.node.name, reason)
        self._say(f"wardgate: {reason}")
        if self.client_open and self.chan is not None:
            with contextlib.suppress(OSError):
                self.chan.exit(255)
        self.svc.emit(
            "session.start",
            user=self.conn.user,
            sid=self.sid,
            success=False,
            **self.conn.event_fields(),
            session_type=self.kind,
            command=self.command or None,
            subsystem=self.subsystem or None,
            error=reason,
        )
        self._finished = True
        self.conn.sessions.discard(self)
        if self.recorder is not None:
            self.svc.background(self.svc.finish_recording(self.recorder))
            self.recorder = None

    def terminate(self, reason: str) -> None:
        """End the session from our side (lock, certificate expiry, proxy shutdown)."""
        self._say(f"wardgate: {reason}")
        if self.up is not None:
            self.up.close()
        if self.client_open and self.chan is not None:
            self.chan.close()
        self._finish(reason)

    def client_gone(self, exc: Exception | None) -> None:
        self.connection_lost(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.client_open:
            return
        self.client_open = False
        if self.up is not None:
            self.up.close()  # sshd hangs up on the job, as closing a terminal does
        if self._opened and not self._finished:
            self._finish("client disconnected" if exc is None else f"connection lost: {exc}")

    def _finish(self, reason: str) -> None:
        if self._finished or not self._opened:
            return
        self._finished = True
        c = self.conn
        c.sessions.discard(self)
        fields = c.event_fields()
        code = self.exit_status
        signal_name = self.exit_signal[0] if self.exit_signal else None
        if code is None and signal_name:  # as a shell reports it, and as the node audits it
            with contextlib.suppress(KeyError):
                code = 128 + signals.Signals["SIG" + signal_name].value
        if self.kind == "exec":
            self.svc.emit("exec", user=c.user, sid=self.sid, success=code == 0, **fields,
                          command=self.command, exit_code=code, signal=signal_name)  # fmt: skip
        self.svc.emit(
            "session.end",
            user=c.user,
            sid=self.sid,
            **fields,
            interactive=self.want_pty,
            session_type=self.kind,
            recorded=self.recorder is not None,
            duration=round(time.time() - self.started_at, 3),
            bytes_in=self.bytes_in,
            bytes_out=self.bytes_out,
            participants=[c.user],
            exit_code=code,
            signal=signal_name,
            reason=reason or None,
        )
        if self.recorder is not None:
            self.svc.background(self.svc.finish_recording(self.recorder))
            self.recorder = None

    def _sftp_op(self, op: SftpOp) -> None:
        c = self.conn
        self.svc.emit(
            "sftp",
            user=c.user,
            sid=self.sid,
            success=op.success,
            **c.event_fields(),
            action=op.action,
            path=op.path,
            target=op.target or None,
            error=op.error or None,
        )
