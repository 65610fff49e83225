"""The SSH node service: an asyncssh server that admits only Wardgate user certificates.

Every connection is decided during public-key authentication, before any channel opens:

1. the offered key must be a user certificate signed by a currently trusted user CA key and
   inside its validity window (`verify_ssh_user_cert`, which also decodes our extensions);
2. no lock may apply to the user, one of their roles, this node (by name, hostname or host id)
   or the login;
3. the login must be one of the certificate's principals, and the roles must allow it on this
   node's labels (static and command labels); roles with `require_session_mfa` also need a
   certificate minted after a second-factor check (`mfa-verified@wardgate`);
4. the login must exist here, and this process must be able to become it.

A refusal is sent to the client as an authentication banner (OpenSSH prints it) and written to
the audit log as an `auth` event with the reason. Passwords, keyboard-interactive and plain
public keys are never accepted.

Connections arrive from our own listener (`start`), or are handed over by the reverse tunnel
or the proxy: `protocol_factory()` gives an object that is both an asyncio `Protocol` (for a
socket or any transport) and an asyncssh `SSHTCPSession` (for a channel of another SSH
connection, which is how the agent's reverse tunnel delivers them); `serve_socket()` and
`serve_stream()` wrap the two other common cases.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
import signal
import socket
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncssh
from cryptography.hazmat.primitives.serialization import ssh as crypto_ssh

from wardgate import __version__
from wardgate.agent.ssh.labels import CommandLabels
from wardgate.agent.ssh.proc import Child, LoginError, LoginUser, lookup_login
from wardgate.agent.ssh.registry import SessionRegistry
from wardgate.agent.ssh.session import NodeSession
from wardgate.api.cache import ResourceCache
from wardgate.api.events import ResourceEvent, ResourceEventType
from wardgate.api.resources import Lock, Node, NodeSpec, RoleOptions
from wardgate.audit.events import Emitter
from wardgate.audit.queue import QueuedEmitter
from wardgate.audit.recording import recover_orphans
from wardgate.auth.access import check_ssh_access
from wardgate.auth.certs import verify_ssh_user_cert
from wardgate.auth.identity import Identity
from wardgate.auth.locks import lock_applies, lock_decision, lock_in_force
from wardgate.auth.rbac import AccessChecker
from wardgate.auth.sshserver import CertificateAuthServer
from wardgate.errors import AuthenticationError

__all__ = ["DEFAULT_ENV_ALLOW", "SSHNodeOptions", "SSHNodeService", "node_resource"]

log = logging.getLogger(__name__)

DEFAULT_ENV_ALLOW: tuple[str, ...] = ("LANG", "LANGUAGE", "LC_*", "TERM", "COLORTERM", "TZ", "WARD_*")
"""Client variables (`SendEnv`/`SetEnv`) a session receives; everything else is dropped."""

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
"""Refused certificates one connection may present before it is dropped (like sshd's MaxAuthTries)."""
SHUTDOWN_GRACE = 2.0
"""Seconds session processes get after SIGHUP when the node stops, before SIGKILL."""


@dataclass
class SSHNodeOptions:
    """Node-level settings (role options, per user, come from the cache)."""

    record_input: bool = False
    """Record keystrokes (`"i"` events) in every recording, not only for roles that ask."""
    env_allow: Sequence[str] = DEFAULT_ENV_ALLOW
    allow_sftp: bool = True
    default_path: str = DEFAULT_PATH
    commands: Sequence[Any] = ()
    """Command labels: objects with `name`, `command` (argv list) and `period` (timedelta)."""
    login_grace_time: float = 60.0
    """Seconds a connection may take to authenticate."""
    keepalive_interval: float = 300.0
    cluster_name: str = ""
    extra_names: Sequence[str] = ()
    """More names operators may use for this node in locks (besides name, hostname, host id)."""
    server_version: str = field(default_factory=lambda: f"Wardgate_{__version__}")


def node_resource(
    config: Any,
    *,
    name: str,
    host_id: str,
    hostname: str = "",
    addr: str = "",
    tunnel: bool = False,
) -> Node:
    """The node's own resource from its `ssh_service` config: static labels now, command labels
    once `SSHNodeService` runs them (pass `config.commands` as `SSHNodeOptions.commands`)."""
    return Node.new(
        name,
        NodeSpec(hostname=hostname or name, addr=addr, host_id=host_id, tunnel=tunnel, version=__version__),
        labels=dict(config.labels),
    )


def _authentic_user(blob: bytes, ca_keys: Sequence[str]) -> str:
    """Whose certificate this is, if one of our CAs signed it (even if it expired): for the audit log."""
    try:
        n = int.from_bytes(blob[:4], "big")
        line = blob[4 : 4 + n] + b" " + base64.b64encode(blob)
        cert = crypto_ssh.load_ssh_public_identity(line)
        if not isinstance(cert, crypto_ssh.SSHCertificate):
            return ""
        at = datetime.fromtimestamp(max(cert.valid_after, 0), UTC) + timedelta(seconds=1)
        return verify_ssh_user_cert(cert, ca_keys, now=min(at, datetime.now(UTC))).user
    except Exception:
        return ""


@dataclass(frozen=True, slots=True)
class _Decision:
    allowed: bool
    reason: str = ""
    identity: Identity | None = None
    login: LoginUser | None = None
    checker: AccessChecker | None = None


class _NodeConnection(asyncssh.SSHServerConnection):
    """asyncssh's server connection, with our decision in front of its certificate checks."""

    _owner: _NodeServer

    def __init__(self, *args: Any, client_addr: tuple[str, int] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.wardgate_client_addr = client_addr

    async def validate_public_key(self, username: str, key_data: bytes, msg: bytes, signature: bytes) -> bool:
        if not self._owner.authorize(username, key_data):
            return False
        ok = await super().validate_public_key(username, key_data, msg, signature)
        if ok and msg:
            self._owner.authenticated(username, key_data)
        return ok

    async def create_agent_listener(self) -> bool:
        """Agent forwarding needs the cert's permission (asyncssh checks) and the roles' `forward_agent`."""
        owner = self._owner
        if not owner.options.forward_agent:
            self.logger.info("Agent forwarding denied by role option forward_agent")
            return False
        ok = await super().create_agent_listener()
        path = self.get_agent_path()
        login = owner.login
        if ok and path and login is not None and os.geteuid() == 0:
            # The socket lives in a root-owned temp dir: hand both to the login, or it cannot connect.
            os.chown(os.path.dirname(path), login.uid, login.gid)
            os.chown(path, login.uid, login.gid)
        return ok


class _ActivitySession(asyncssh.SSHTCPSession[bytes]):
    """Wraps a port-forwarding session so traffic through it counts as activity (idle timeout)."""

    def __init__(self, inner: asyncssh.SSHTCPSession[bytes], touch: Callable[[], None]) -> None:
        self._inner, self._touch = inner, touch

    def connection_made(self, chan: Any) -> None:
        self._inner.connection_made(chan)

    def connection_lost(self, exc: Exception | None) -> None:
        self._inner.connection_lost(exc)

    def session_started(self) -> None:
        self._inner.session_started()

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        self._touch()
        self._inner.data_received(data, datatype)

    def eof_received(self) -> bool:
        return bool(self._inner.eof_received())

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()


class _NodeServer(CertificateAuthServer):
    """Per-connection state: who authenticated, as whom, their merged role options, timers."""

    def __init__(self, service: SSHNodeService) -> None:
        super().__init__()
        self.service = service
        self.conn: _NodeConnection | None = None
        self.remote_addr: tuple[str, int] = ("", 0)
        self.local_addr: tuple[str, int] = ("", 0)
        self.login: LoginUser | None = None
        self.checker: AccessChecker | None = None
        self.sessions: set[NodeSession] = set()

    @property
    def user(self) -> str:
        return self.identity.user if self.identity else ""

    def event_fields(self) -> dict[str, Any]:
        return {
            "login": self.login.name if self.login else None,
            "server_id": self.service.server_id,
            "server_hostname": self.service.node.spec.hostname or self.service.node.name,
            "remote_addr": f"{self.remote_addr[0]}:{self.remote_addr[1]}",
            "local_addr": f"{self.local_addr[0]}:{self.local_addr[1]}",
        }

    # ------------------------------------------------------------ connection

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        assert isinstance(conn, _NodeConnection)
        self.conn = conn
        peer = conn.wardgate_client_addr or conn.get_extra_info("peername") or ("", 0)
        sock = conn.get_extra_info("sockname") or ("", 0)
        self.remote_addr = (str(peer[0]), int(peer[1]))
        self.local_addr = (str(sock[0]), int(sock[1]))
        self.service._servers.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.stop_timers()
        self.service._servers.discard(self)

    # ------------------------------------------------------------ authentication

    def trusted_user_ca_keys(self) -> Sequence[str]:
        return self.service.user_ca_keys()

    def decide(self, username: str, blob: bytes) -> _Decision:
        return self._decide(username, blob)

    def refused(self, username: str, blob: bytes, decision: _Decision) -> None:
        self._refuse(username, blob, decision)

    def _decide(self, username: str, blob: bytes) -> _Decision:
        svc = self.service
        ca_keys = list(svc.user_ca_keys())
        try:
            identity = verify_ssh_user_cert(blob, ca_keys)
        except AuthenticationError as e:
            return _Decision(False, str(e))
        decision, checker = check_ssh_access(
            identity,
            svc.node,
            username,
            roles=svc.cache.as_dict("role"),
            locks=svc._locks(),
            node_names=svc.node_names(),
        )
        if not decision.allowed:
            return _Decision(False, decision.reason, identity)
        try:
            login = lookup_login(username)
        except LoginError as e:
            return _Decision(False, str(e), identity)
        return _Decision(True, decision.reason, identity, login, checker)

    def _refuse(self, username: str, blob: bytes, d: _Decision) -> None:
        user = d.identity.user if d.identity else _authentic_user(blob, list(self.service.user_ca_keys()))
        log.info(
            "refused %s as %r from %s: %s", user or "unknown user", username, self.remote_addr[0], d.reason
        )
        if self.conn is not None:
            with contextlib.suppress(OSError):
                self.conn.send_auth_banner(f"wardgate: access denied: {d.reason}\r\n")
        fields = self.event_fields()
        fields["login"] = username
        self.service._emit("auth", user=user, success=False, **fields, reason=d.reason, method="certificate")

    def authenticated(self, username: str, key_data: bytes) -> None:
        d = self.decision_for(username, bytes(key_data))
        if d is None or not d.allowed:  # pragma: no cover - authorize() ran first
            return
        self.identity, self.login, self.checker = d.identity, d.login, d.checker
        self.options = d.checker.options if d.checker else RoleOptions()

    def terminate(self, reason: str) -> None:
        """Close every session with `reason` shown to the user, then drop the connection."""
        if self._closing:
            return
        self._closing = True
        log.info("closing connection of %s from %s: %s", self.user, self.remote_addr[0], reason)
        for s in list(self.sessions):
            s.terminate(reason)
        if self.conn is not None:
            self.conn.disconnect(asyncssh.DISC_BY_APPLICATION, f"wardgate: {reason}")

    # ------------------------------------------------------------ channels

    def session_requested(self) -> NodeSession:
        self.touch()
        return NodeSession(self)

    def _port_denied(self) -> str | None:
        if not self.options.port_forwarding:
            return "port forwarding is not allowed by your roles (option port_forwarding)"
        return None

    def connection_requested(
        self, dest_host: str, dest_port: int, orig_host: str, orig_port: int
    ) -> Coroutine[Any, Any, asyncssh.SSHTCPSession[bytes]]:
        """`ssh -L`: allowed when the cert permits port forwarding (asyncssh checks) and roles do."""
        self.touch()
        addr = f"{dest_host}:{dest_port}"
        denied = self._port_denied()
        fields = self.event_fields()
        if denied:
            self.service._emit("port", user=self.user, success=False, **fields, addr=addr, kind="local",
                               reason=denied)  # fmt: skip
            raise asyncssh.ChannelOpenError(asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED, denied)
        self.service._emit("port", user=self.user, **fields, addr=addr, kind="local")
        return self._forward(dest_host, dest_port)

    async def _forward(self, host: str, port: int) -> asyncssh.SSHTCPSession[bytes]:
        assert self.conn is not None
        inner = await self.conn.forward_connection(host, port)
        return _ActivitySession(inner, self.touch)

    def server_requested(self, listen_host: str, listen_port: int) -> Any:
        """`ssh -R`: like OpenSSH's `GatewayPorts no`, listeners bind loopback only; low ports need root."""
        self.touch()
        addr = f"{listen_host or '*'}:{listen_port}"
        fields = self.event_fields()
        denied = self._port_denied()
        if not denied and 0 < listen_port < 1024 and self.login is not None and self.login.uid != 0:
            denied = f"only root may listen on port {listen_port}"
        if denied:
            self.service._emit("port", user=self.user, success=False, **fields, addr=addr, kind="remote",
                               reason=denied)  # fmt: skip
            return False
        self.service._emit("port", user=self.user, **fields, addr=addr, kind="remote")
        return self._listen(listen_host, listen_port)

    async def _listen(self, listen_host: str, listen_port: int) -> asyncssh.SSHListener:
        assert self.conn is not None
        bind = listen_host if listen_host in ("127.0.0.1", "::1") else "localhost"

        def accept(orig_host: str, orig_port: int) -> bool:
            self.touch()
            return not self._closing

        return await self.conn.forward_local_port(bind, listen_port, listen_host, listen_port, accept)

    def unix_connection_requested(self, dest_path: str) -> bool:
        return False

    def unix_server_requested(self, listen_path: str) -> bool:
        return False


class _StreamTransport(asyncio.Transport):
    """Makes an asyncio (reader, writer) pair look like a transport to an SSH connection."""

    def __init__(self, writer: asyncio.StreamWriter, extra: dict[str, Any]) -> None:
        super().__init__(extra)
        self._writer = writer
        self._closing = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not self._closing:
            self._writer.write(bytes(data))

    def is_closing(self) -> bool:
        return self._closing or self._writer.is_closing()

    def close(self) -> None:
        if not self._closing:
            self._closing = True
            self._writer.close()

    def abort(self) -> None:
        self._closing = True
        transport = self._writer.transport
        if transport is not None:
            transport.abort()

    def get_write_buffer_size(self) -> int:
        transport = self._writer.transport
        return transport.get_write_buffer_size() if transport is not None else 0


class SSHNodeService:
    """The SSH node: decides, runs and records sessions; see the module docstring."""

    def __init__(
        self,
        *,
        host_key: str,
        host_cert: str,
        user_ca_keys: Callable[[], Sequence[str]],
        cache: ResourceCache,
        node: Node,
        emitter: Emitter,
        recordings_dir: str | os.PathLike[str],
        options: SSHNodeOptions | None = None,
        sessions: SessionRegistry | None = None,
    ) -> None:
        self.options = options or SSHNodeOptions()
        self.host_key = asyncssh.import_private_key(host_key)
        self.host_cert = asyncssh.import_certificate(host_cert)
        self.user_ca_keys = user_ca_keys
        self.cache = cache
        self.node = node
        self.emitter = emitter
        self.recordings_dir = Path(recordings_dir)
        self.sessions = sessions or SessionRegistry()
        self.cluster = self.options.cluster_name
        self.labels = CommandLabels(node, self.options.commands)
        self._servers: set[_NodeServer] = set()
        self._children: set[Child] = set()
        self._children_changed = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._audit = QueuedEmitter(emitter, name="ssh-node-audit")
        self._conn_options: asyncssh.SSHServerConnectionOptions | None = None
        self._listener: asyncio.AbstractServer | None = None
        self._unsubscribe: Callable[[], None] | None = None
        self._opened = False

    @property
    def server_id(self) -> str:
        return self.node.spec.host_id or self.node.name

    def node_names(self) -> list[str]:
        """Every name a lock may use for this node."""
        spec = self.node.spec
        return [n for n in (self.node.name, spec.hostname, spec.host_id, *self.options.extra_names) if n]

    def _locks(self) -> list[Lock]:
        return self.cache.list("lock")  # type: ignore[return-value]

    # ------------------------------------------------------------ lifecycle

    async def open(self) -> None:
        """Prepare to serve (options, recovered recordings, command labels); `start` calls it."""
        if self._opened:
            return
        self._opened = True
        self.recordings_dir.mkdir(parents=True, exist_ok=True)
        recovered = await asyncio.to_thread(recover_orphans, self.recordings_dir, self.sessions)
        for p in recovered:
            log.warning("recovered recording %s left by an earlier run", p.name)
        self._conn_options = await self._build_options()
        self._audit.start()
        self._unsubscribe = self.cache.subscribe(self._on_resource)
        await self.labels.start()

    async def set_host_credentials(self, host_key: str, host_cert: str) -> None:
        """Present a renewed host key and certificate to connections from now on."""
        key, cert = asyncssh.import_private_key(host_key), asyncssh.import_certificate(host_cert)
        self.host_key, self.host_cert = key, cert
        if self._conn_options is not None:
            self._conn_options = await self._build_options()

    async def _build_options(self) -> asyncssh.SSHServerConnectionOptions:
        return await asyncssh.SSHServerConnectionOptions.construct(
            server_factory=lambda: _NodeServer(self),
            server_host_keys=[(self.host_key, self.host_cert)],
            server_version=self.options.server_version,
            password_auth=False,
            kbdint_auth=False,
            public_key_auth=True,
            host_based_auth=False,
            gss_host=None,
            allow_pty=True,
            line_editor=False,
            agent_forwarding=True,
            x11_forwarding=False,
            allow_scp=False,
            sftp_factory=None,
            encoding=None,
            rdns_lookup=False,
            login_timeout=self.options.login_grace_time,
            keepalive_interval=self.options.keepalive_interval,
        )

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Listen on host:port (0 = a free port) and return the bound port."""
        await self.open()
        loop = asyncio.get_running_loop()
        self._listener = await loop.create_server(lambda: self.protocol_factory(), host, port, backlog=512)
        sockets = self._listener.sockets or ()
        bound = sockets[0].getsockname()[1] if sockets else port
        log.info("SSH node %s listening on %s:%d", self.node.name, host, bound)
        return int(bound)

    async def close(self) -> None:
        """Stop listening, end every session (audited), wait for recordings and audit writes."""
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        for srv in list(self._servers):
            srv.terminate("the node is shutting down")
        await self.labels.close()
        # Sessions were hung up (SIGHUP); give their jobs a moment, then make sure nothing is left.
        if not await self._wait_children(SHUTDOWN_GRACE):
            for child in list(self._children):
                child.signal_group(signal.SIGKILL)
            await self._wait_children(SHUTDOWN_GRACE)
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
        await self._audit.close()

    # ------------------------------------------------------------ handing connections over

    def protocol_factory(self, client_addr: tuple[str, int] | None = None) -> asyncssh.SSHServerConnection:
        """A fresh SSH server connection, ready to be attached to a transport or channel.

        Use it as the protocol of an asyncio transport (`loop.connect_accepted_socket(
        node.protocol_factory, sock)`), or return it as the session of an asyncssh channel
        (e.g. from `connection_requested` on the tunnel connection). `client_addr` is the
        real client's address when the transport's peer is a proxy or tunnel.
        """
        if self._conn_options is None:
            raise RuntimeError("SSHNodeService.open() (or start()) must be awaited first")
        return _NodeConnection(asyncio.get_running_loop(), self._conn_options, client_addr=client_addr)

    async def serve_socket(self, sock: socket.socket, client_addr: tuple[str, int] | None = None) -> None:
        """Serve one already-connected socket until the SSH connection closes."""
        await self.open()
        loop = asyncio.get_running_loop()
        _, conn = await loop.connect_accepted_socket(lambda: self.protocol_factory(client_addr), sock)
        await conn.wait_closed()

    async def serve_stream(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        client_addr: tuple[str, int] | None = None,
    ) -> None:
        """Serve one SSH connection over an asyncio stream pair (e.g. a tunnel or TLS stream).

        Returns when either side closes; `writer` is closed on the way out.
        """
        await self.open()
        extra = {
            "peername": client_addr or writer.get_extra_info("peername"),
            "sockname": writer.get_extra_info("sockname"),
        }
        transport = _StreamTransport(writer, extra)
        conn = self.protocol_factory(client_addr)
        conn.connection_made(transport)
        try:
            while True:
                data = await reader.read(256 * 1024)
                if not data:
                    conn.eof_received()
                    break
                conn.data_received(data)
        except (ConnectionError, OSError) as e:
            conn.connection_lost(e)
        finally:
            conn.close()
            await conn.wait_closed()
            transport.close()

    # ------------------------------------------------------------ locks arriving mid-session

    def _on_resource(self, ev: ResourceEvent) -> None:
        if ev.type is not ResourceEventType.PUT or ev.kind != "lock" or not isinstance(ev.resource, Lock):
            return
        lock = ev.resource
        if not lock_in_force(lock):
            return
        names = frozenset(self.node_names())
        for srv in list(self._servers):
            ident = srv.identity
            if ident is None or srv.login is None:
                continue
            if lock_applies(
                lock.spec.target,
                user=ident.user,
                roles=frozenset(ident.roles),
                nodes=names,
                login=srv.login.name,
            ):
                srv.terminate(lock_decision(lock).reason)

    # ------------------------------------------------------------ session processes

    def _child_started(self, child: Child) -> None:
        self._children.add(child)

    def _child_exited(self, child: Child) -> None:
        self._children.discard(child)
        self._children_changed.set()

    async def _wait_children(self, grace: float) -> bool:
        """Wait until every session process has exited; False if some are still running."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while self._children and loop.time() < deadline:
            self._children_changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._children_changed.wait(), deadline - loop.time())
        return not self._children

    # ------------------------------------------------------------ background work

    def _background(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _emit(
        self, event: str, *, user: str = "", success: bool = True, sid: str = "", **fields: Any
    ) -> None:
        """Queue an audit event; one writer keeps them in the order they happened."""
        self._audit.emit_nowait(event, user=user, success=success, sid=sid, **fields)
