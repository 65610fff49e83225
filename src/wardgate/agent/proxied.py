"""What the database and app agents share: a service the proxy hands client connections to.

Such an agent serves resources of one kind (`db`, `app`): those in its config, registered with
heartbeats that expire unless renewed, plus `wardctl create`d ones whose labels match its
`resources` selectors. It watches the kinds it authorises against, announces itself (an
`<kind>_service` heartbeat listing what it serves, so proxies know where to go), and is reached
by the proxy in this process or through the reverse tunnel it keeps (one channel service).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar, Protocol

from wardgate.agent.heartbeat import repeat
from wardgate.agent.tunnel import TunnelAgent, tunnel_for
from wardgate.api.cache import ResourceCache
from wardgate.api.client import AuthClient
from wardgate.api.emitter import RemoteEmitter
from wardgate.api.events import ResourceEvent
from wardgate.api.identityfile import IdentityFile
from wardgate.api.resources import Metadata, Resource
from wardgate.auth.rbac import match_labels

log = logging.getLogger(__name__)
HEARTBEAT_EVERY = timedelta(seconds=30)
HEARTBEAT_TTL = timedelta(minutes=2)


class ProxiedSettings(Protocol):
    nodename: str
    host_id: str
    auth_addr: str
    auth_alpn: str
    tunnel_proxy: str
    """host:port of the proxy to keep a reverse tunnel to; empty when the proxy is in this process."""
    selectors: Sequence[dict[str, str]]


class ChannelService(Protocol):
    async def serve_tunnel_channel(self, reader: Any, writer: Any) -> None: ...


class ProxiedAgent(ABC):
    """Subclasses set the class constants, build `self.service`, and say how to beat."""

    KIND: ClassVar[str]
    CACHED_KINDS: ClassVar[tuple[str, ...]]
    TUNNEL_SERVICE: ClassVar[str]
    service: ChannelService

    def __init__(
        self, settings: ProxiedSettings, identity: IdentityFile, static: Mapping[str, Resource]
    ) -> None:
        self.settings = settings
        self.identity = identity
        self.auth = AuthClient.from_identity(identity, settings.auth_addr, alpn=settings.auth_alpn)
        self.cache = ResourceCache(self.CACHED_KINDS)
        self.emitter = RemoteEmitter(self.auth)
        self.static = dict(static)
        self.tunnel: TunnelAgent | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        self._announced: list[str] = []

    def served(self) -> dict[str, Any]:
        """What this service serves now: its config, plus matching `wardctl create`d resources."""
        out: dict[str, Any] = dict(self.static)
        if self.settings.selectors:
            now = datetime.now(UTC)
            for res in self.cache.list(self.KIND):
                if res.spec.host_id or res.name in out or res.is_expired(now):  # type: ignore[attr-defined]
                    continue
                if any(match_labels(sel, res.metadata.labels)[0] for sel in self.settings.selectors):
                    out[res.name] = res
        return out

    async def start(self) -> None:
        s = self.settings
        self._tasks.append(asyncio.create_task(self.cache.run(lambda: self.auth.watch(self.CACHED_KINDS))))
        await asyncio.wait_for(self.cache.ready.wait(), 30)
        if s.tunnel_proxy:
            self.tunnel = tunnel_for(s.tunnel_proxy, self.identity, self._on_channel, self.TUNNEL_SERVICE)
        await self.heartbeat()
        self._tasks.append(asyncio.create_task(self._announce_changes()))
        beats = repeat(HEARTBEAT_EVERY.total_seconds(), self.heartbeat, f"{self.KIND} heartbeat")
        self._tasks.append(asyncio.create_task(beats))

    async def _announce_changes(self) -> None:
        """A `wardctl create`d resource matching the selectors (or its removal) is announced at
        once, not at the next periodic heartbeat: proxies route by what the service says it serves."""
        changed = asyncio.Event()

        def on_event(ev: ResourceEvent) -> None:
            if ev.kind == self.KIND and self.settings.selectors:
                changed.set()

        unsubscribe = self.cache.subscribe(on_event)
        try:
            while True:
                await changed.wait()
                changed.clear()
                if sorted(self.served()) != self._announced:
                    try:
                        await self.heartbeat()
                    except Exception as exc:  # the periodic heartbeat tries again
                        log.warning("announcing a change of served %s resources failed: %s", self.KIND, exc)
        finally:
            unsubscribe()

    async def _on_channel(self, service: str, client_addr: str, reader: Any, writer: Any) -> None:
        await self.service.serve_tunnel_channel(reader, writer)

    @abstractmethod
    def send_heartbeat(self) -> Callable[[Resource], Awaitable[Resource]]:
        """The auth client call that registers a heartbeat of this kind."""

    @abstractmethod
    def service_heartbeat(self, metadata: Metadata) -> Resource:
        """The `<kind>_service` resource announcing this service and what it serves."""

    async def heartbeat(self) -> None:
        expires = datetime.now(UTC) + HEARTBEAT_TTL
        send = self.send_heartbeat()
        for res in self.static.values():
            beat = res.model_copy(deep=True)
            beat.metadata.expires = expires
            await send(beat)
        served = sorted(self.served())
        await send(self.service_heartbeat(Metadata(name=self.settings.host_id, expires=expires)))
        self._announced = served

    @abstractmethod
    async def close_service(self) -> None:
        """End the sessions the service is serving."""

    async def close(self) -> None:
        if self.tunnel is not None:
            await self.tunnel.close()
        for t in self._tasks:
            t.cancel()
        await self.close_service()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        await self.emitter.close()
        await self.auth.close()
