"""The SSH node agent: the node service wired to a (possibly remote) auth service.

It watches roles, locks and CAs into a cache, registers itself with heartbeats (the node
resource expires unless renewed), ships finished recordings to the auth service, and is reached
either directly on its listen address or through a reverse tunnel it keeps to a proxy.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from wardgate.agent.heartbeat import repeat
from wardgate.agent.ssh.service import SSHNodeOptions, SSHNodeService, node_resource
from wardgate.agent.tunnel import TunnelAgent, tunnel_for
from wardgate.api.cache import ResourceCache
from wardgate.api.client import AuthClient
from wardgate.api.emitter import RemoteEmitter
from wardgate.api.identityfile import IdentityFile
from wardgate.api.uploader import RecordingUploader
from wardgate.audit.recording import recover_orphans
from wardgate.protocols.tunnel import parse_client_addr

log = logging.getLogger(__name__)
CACHED_KINDS = ("cert_authority", "role", "lock")
HEARTBEAT_EVERY = timedelta(seconds=30)
NODE_TTL = timedelta(minutes=2)
UPLOAD_EVERY = 5.0


@dataclass
class NodeSettings:
    nodename: str
    host_id: str
    cluster_name: str
    auth_addr: str
    data_dir: Path
    auth_alpn: str = ""
    """`ward-auth` when the auth API is reached through a proxy's one port."""
    listen_host: str = ""
    listen_port: int = 0
    public_addr: str = ""
    """host:port the proxy dials; empty means tunnel only."""
    tunnel_proxy: str = ""
    """host:port of the proxy to keep a reverse tunnel to; empty means direct only."""
    ssh_config: Any = None
    """The `ssh_service` config section (labels, commands)."""
    extra: dict[str, Any] = field(default_factory=dict)


class NodeAgent:
    def __init__(self, settings: NodeSettings, identity: IdentityFile, ssh_host_key: str, ssh_host_cert: str):
        self.settings = settings
        self.identity = identity
        self.auth = AuthClient.from_identity(identity, settings.auth_addr, alpn=settings.auth_alpn)
        self.cache = ResourceCache(CACHED_KINDS)
        self.emitter = RemoteEmitter(self.auth)
        s = settings
        self.recordings = s.data_dir / "recordings"
        self.recordings.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.node = node_resource(
            s.ssh_config,
            name=s.nodename,
            host_id=s.host_id,
            hostname=s.nodename,
            addr=s.public_addr,
            tunnel=bool(s.tunnel_proxy) and not s.public_addr,
        )
        self.service = SSHNodeService(
            host_key=ssh_host_key,
            host_cert=ssh_host_cert,
            user_ca_keys=self._user_ca_keys,
            cache=self.cache,
            node=self.node,
            emitter=self.emitter,
            recordings_dir=self.recordings,
            options=SSHNodeOptions(
                commands=list(getattr(s.ssh_config, "commands", []) or []), cluster_name=s.cluster_name
            ),
        )
        self.uploader = RecordingUploader(self.auth, self.recordings, every=UPLOAD_EVERY)
        self.tunnel: TunnelAgent | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        self.port = 0

    def _user_ca_keys(self) -> list[str]:
        return self.cache.ca_ssh_keys("user")

    async def start(self) -> None:
        s = self.settings
        self._tasks.append(asyncio.create_task(self.cache.run(lambda: self.auth.watch(CACHED_KINDS))))
        await asyncio.wait_for(self.cache.ready.wait(), 30)
        recover_orphans(self.recordings)
        if s.public_addr:
            self.port = await self.service.start(s.listen_host, s.listen_port)
            if s.public_addr.endswith(":0"):  # any free port: register the one we got
                self.service.node.spec.addr = f"{s.public_addr.rsplit(':', 1)[0]}:{self.port}"
        else:
            await self.service.open()
        if s.tunnel_proxy:
            self.tunnel = tunnel_for(s.tunnel_proxy, self.identity, self._on_channel, "ssh")
        await self.heartbeat()
        beats = repeat(HEARTBEAT_EVERY.total_seconds(), self.heartbeat, "heartbeat to the auth service")
        self._tasks.append(asyncio.create_task(beats))
        self._tasks.append(asyncio.create_task(self.uploader.run()))

    async def _on_channel(self, service: str, client_addr: str, reader: Any, writer: Any) -> None:
        addr = parse_client_addr(client_addr) if client_addr else None
        await self.service.serve_stream(reader, writer, addr)

    async def heartbeat(self) -> None:
        node = self.service.node.model_copy(deep=True)
        node.metadata.expires = datetime.now(UTC) + NODE_TTL
        node.metadata.revision = None
        await self.auth.heartbeat(node)

    async def close(self) -> None:
        if self.tunnel is not None:
            await self.tunnel.close()
        await self.service.close()
        with contextlib.suppress(Exception):
            await self.uploader.upload_pending()
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        await self.emitter.close()
        await self.auth.close()
