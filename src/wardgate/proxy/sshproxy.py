"""The `ward-ssh` route: a user's SSH stream, authorised at the proxy, relayed to its node.

Wire protocol (after TLS with the user's X.509 client certificate): the client sends one JSON
line `{"host", "port", "login"}`; the proxy answers one line `{"ok": true, "node", "host_id"}`
then relays raw SSH bytes, or `{"ok": false, "error"}` and closes. The SSH session itself is end
to end between the user's client and the node, which checks the user's SSH certificate again.

Agentless OpenSSH nodes are the exception when the user's roles want sessions recorded
(`record_session`): the proxy then terminates SSH itself, records, and logs in to sshd on the
user's behalf (`proxy/agentless.py`). Without recording it relays bytes like for any node, and
since it cannot see the login inside the stream, every login in the certificate must be allowed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Protocol

from cryptography import x509

from wardgate.api.cache import ResourceCache
from wardgate.api.resources import Node
from wardgate.audit.events import Emitter
from wardgate.auth.access import check_ssh_access
from wardgate.auth.certs import verify_tls_identity
from wardgate.auth.identity import Identity
from wardgate.errors import AccessDeniedError, AuthenticationError, BadParameterError, NotFoundError
from wardgate.proxy.agentless import AgentlessRecorder
from wardgate.proxy.relay import Relay
from wardgate.proxy.router import TLSConnection
from wardgate.proxy.tunnel import pipe, stream_pair

log = logging.getLogger(__name__)
MAX_REQUEST = 4096
REQUEST_DEADLINE = 10.0
DEFAULT_NODE_PORT = 3022


class TunnelDialer(Protocol):
    async def dial(self, host_id: str, service: str, *, client_addr: str = "") -> Any: ...


class _LineReader(asyncio.Protocol):
    """Collects the request line from a detached transport; the rest stays for the relay."""

    def __init__(self, initial: bytes, eof: bool) -> None:
        self.buf = bytearray(initial)
        self.eof = eof
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._check()

    def _check(self) -> None:
        if self.done.done():
            return
        if b"\n" in self.buf:
            self.done.set_result(None)
        elif len(self.buf) > MAX_REQUEST:
            self.done.set_exception(BadParameterError("request line too long"))
        elif self.eof:
            self.done.set_exception(BadParameterError("connection closed before the request line"))

    def data_received(self, data: bytes) -> None:
        self.buf += data
        self._check()

    def eof_received(self) -> bool:
        self.eof = True
        self._check()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_exception(ConnectionResetError("client went away"))


class SSHProxy:
    def __init__(
        self,
        cache: ResourceCache,
        emitter: Emitter,
        *,
        tunnels: TunnelDialer | None = None,
        agentless: AgentlessRecorder | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.cache = cache
        self.emitter = emitter
        self.tunnels = tunnels
        self.agentless = agentless
        """Terminates and records agentless sessions; without it such sessions are refused when
        the roles want them recorded (fail closed)."""
        self.clock = clock

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self.clock(), UTC)

    def identify(self, der: bytes | None) -> Identity:
        if not der:
            raise AuthenticationError("no client certificate: run `ward login` first")
        cert = x509.load_der_x509_certificate(der)
        ident = verify_tls_identity(cert, self.cache.ca_certs("user", required=True), now=self._now())
        if ident.system_role:
            raise AuthenticationError("a service certificate cannot open SSH sessions")
        return ident

    def resolve(self, host: str) -> Node:
        """A node by name, host id, hostname, or its registered address."""
        nodes: list[Node] = self.cache.list("node")  # type: ignore[assignment]
        for match in (
            lambda n: n.name == host,
            lambda n: n.spec.host_id == host,
            lambda n: n.spec.hostname == host,
            lambda n: n.spec.addr == host or n.spec.addr.rsplit(":", 1)[0] == host,
        ):
            found = [n for n in nodes if match(n)]
            if len(found) == 1:
                return found[0]
            if len(found) > 1:
                names = ", ".join(sorted(n.name for n in found))
                raise BadParameterError(f'"{host}" matches several nodes ({names}): use the node name')
        raise NotFoundError(f'node "{host}" not found: `ward ls` lists the nodes you can reach')

    async def handle(self, conn: TLSConnection) -> None:
        client_addr = f"{conn.remote[0]}:{conn.remote[1]}"
        d = conn.detach()
        transport = d.transport
        reader = _LineReader(d.pending, d.eof)
        transport.set_protocol(reader)
        transport.resume_reading()
        ident: Identity | None = None
        req: dict[str, Any] = {}
        try:
            await asyncio.wait_for(asyncio.shield(reader.done), REQUEST_DEADLINE)
            transport.pause_reading()  # what follows the line is SSH, kept for the relay
            line, _, rest = bytes(reader.buf).partition(b"\n")
            req = json.loads(line)
            if not isinstance(req, dict):
                raise BadParameterError("request must be a JSON object")
            ident = self.identify(conn.peer_cert)
            host, login = str(req.get("host", "")), str(req.get("login", ""))
            node = self.resolve(host)
            decision, checker = check_ssh_access(
                ident,
                node,
                login,
                roles=self.cache.as_dict("role"),
                locks=self.cache.list("lock"),  # type: ignore[arg-type]
                node_names=[node.name, node.spec.hostname, node.spec.host_id],
                now=self._now(),
            )
            if not decision.allowed:
                raise AccessDeniedError(decision.reason)
            record = node.spec.agentless and checker is not None and checker.options.record_session
            if node.spec.agentless and not record:
                self._check_agentless(ident, node)
        except (TimeoutError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            await self._refuse(transport, ident, req, client_addr, f"bad request: {exc or 'timed out'}")
            return
        except (AuthenticationError, AccessDeniedError, BadParameterError, NotFoundError) as exc:
            await self._refuse(transport, ident, req, client_addr, str(exc), code=exc.code)
            return
        except ConnectionResetError:
            return
        if record:
            port = int(req.get("port") or 0)
            await self._terminate(transport, rest, reader.eof, node, ident, client_addr, port)
            return
        await self._connect(
            transport, rest, reader.eof, node, ident, login, client_addr, int(req.get("port") or 0)
        )

    async def _terminate(
        self,
        transport: asyncio.Transport,
        rest: bytes,
        eof: bool,
        node: Node,
        ident: Identity,
        client_addr: str,
        port: int,
    ) -> None:
        """Recording mode for an agentless node: the proxy is the SSH server the client sees."""
        refusal = ""
        if self.agentless is None:
            refusal = (
                f'"{node.name}" is an agentless OpenSSH node and your roles require sessions to be '
                "recorded (record_session), but this proxy has no recordings directory"
            )
        elif not node.spec.addr:
            refusal = f'agentless node "{node.name}" has no address to dial'
        if refusal or self.agentless is None:
            await self._refuse(transport, ident, {"host": node.name}, client_addr, refusal)
            return
        try:
            host_cert = await self.agentless.host_cert(node)
        except Exception as exc:
            log.warning("no host certificate for agentless node %s: %s", node.name, exc)
            await self._refuse(
                transport,
                ident,
                {"host": node.name},
                client_addr,
                f'the proxy could not get a host certificate for "{node.name}": {exc}',
            )
            return
        ok = {"ok": True, "node": node.name, "host_id": node.spec.host_id, "recorded": True}
        transport.write(json.dumps(ok).encode() + b"\n")
        await self.agentless.serve(transport, rest, eof, node, ident, client_addr, host_cert, port=port)

    def _check_agentless(self, ident: Identity, node: Node) -> None:
        """An OpenSSH node accepts any login in the certificate, and the proxy cannot see which
        one the client picks inside the encrypted stream: so every login the certificate carries
        must be allowed there, or the connection is refused (deny by default)."""
        names = [node.name, node.spec.hostname, node.spec.host_id]
        refused = [
            login
            for login in ident.logins
            if not check_ssh_access(
                ident,
                node,
                login,
                roles=self.cache.as_dict("role"),
                locks=self.cache.list("lock"),  # type: ignore[arg-type]
                node_names=names,
                now=self._now(),
            )[0].allowed
        ]
        if refused:
            raise AccessDeniedError(
                f'"{node.name}" is an agentless OpenSSH node, which accepts any login in your certificate; '
                f"your certificate also carries login(s) {', '.join(refused)} that your roles do not allow "
                "there, so the proxy refuses it (ask for a role whose logins all apply to this node)"
            )

    async def _connect(
        self,
        transport: asyncio.Transport,
        rest: bytes,
        eof: bool,
        node: Node,
        ident: Identity,
        login: str,
        client_addr: str,
        port: int,
    ) -> None:
        ok = json.dumps({"ok": True, "node": node.name, "host_id": node.spec.host_id}).encode() + b"\n"
        if node.spec.tunnel or not node.spec.addr:
            if self.tunnels is None:
                await self._refuse(
                    transport,
                    ident,
                    {"host": node.name},
                    client_addr,
                    f'node "{node.name}" is only reachable through a tunnel, and none is open',
                )
                return
            try:
                pair = await self.tunnels.dial(node.spec.host_id or node.name, "ssh", client_addr=client_addr)
            except Exception as exc:
                await self._refuse(transport, ident, {"host": node.name}, client_addr, str(exc))
                return
            transport.write(ok)
            reader, writer = stream_pair(transport, pending=rest, eof=eof)
            await pipe(reader, writer, *pair)
            return
        host, _, default_port = node.spec.addr.rpartition(":")
        target_port = port or int(default_port or DEFAULT_NODE_PORT)
        # Dial before attaching the client: the relay holds the node's first bytes (its SSH
        # banner) until both sides are attached, so the client reads our answer line first.
        relay = Relay()
        try:
            await relay.dial_b(host.strip("[]"), target_port, dial_timeout=10.0)
        except (OSError, TimeoutError) as exc:
            relay.abort()
            await self._refuse(
                transport,
                ident,
                {"host": node.name},
                client_addr,
                f'node "{node.name}" at {node.spec.addr} is unreachable: {exc}',
            )
            return
        transport.write(ok)
        relay.attach_a(transport, pending=rest, eof=eof)
        if not node.spec.agentless:
            await relay.run()
            return
        # An OpenSSH node writes no Wardgate events: the proxy records that the session happened.
        sid = str(uuid.uuid4())
        fields = {
            "login": login,
            "server_id": node.name,
            "server_hostname": node.spec.hostname or node.name,
            "server_addr": node.spec.addr,
            "remote_addr": client_addr,
            "agentless": True,
        }
        started = time.monotonic()
        await self.emitter.emit("session.start", user=ident.user, sid=sid, **fields)
        stats = await relay.run()
        await self.emitter.emit(
            "session.end",
            user=ident.user,
            sid=sid,
            **fields,
            duration=round(time.monotonic() - started, 3),
            bytes_in=stats.a_to_b,
            bytes_out=stats.b_to_a,
        )

    async def _refuse(
        self,
        transport: asyncio.Transport,
        ident: Identity | None,
        req: dict[str, Any],
        client_addr: str,
        reason: str,
        *,
        code: str = "access_denied",
    ) -> None:
        log.info("ssh proxy refused %s: %s", client_addr, reason)
        transport.write(json.dumps({"ok": False, "error": reason, "code": code}).encode() + b"\n")
        transport.close()
        await self.emitter.emit(
            "auth",
            user=ident.user if ident else "",
            success=False,
            error=reason,
            protocol="ssh",
            server=str(req.get("host", "")),
            login=str(req.get("login", "")),
            remote_addr=client_addr,
            component="proxy",
        )
