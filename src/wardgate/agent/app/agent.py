"""The app agent: the app service wired to a (possibly remote) auth service.

It watches roles, locks, users, CAs and `app` resources, registers its configured apps and itself
with heartbeats (they expire unless renewed), serves `wardctl create`d apps whose labels match
its `resources` selectors, and is reached by the proxy in this process or through the reverse
tunnel it keeps (channel service `app`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from wardgate.agent.app.service import AppService, AppServiceOptions
from wardgate.agent.heartbeat import repeat
from wardgate.agent.tunnel import TunnelAgent, tunnel_for
from wardgate.api.cache import ResourceCache
from wardgate.api.client import AuthClient
from wardgate.api.emitter import RemoteEmitter
from wardgate.api.identityfile import IdentityFile
from wardgate.api.resources import App, AppServiceSpec, AppSpec, Metadata
from wardgate.api.resources import AppService as AppServiceResource
from wardgate.auth.rbac import match_labels

log = logging.getLogger(__name__)
CACHED_KINDS = ("cert_authority", "role", "lock", "app", "user")
HEARTBEAT_EVERY = timedelta(seconds=30)
HEARTBEAT_TTL = timedelta(minutes=2)
TUNNEL_SERVICE = "app"


@dataclass
class AppAgentSettings:
    nodename: str
    host_id: str
    auth_addr: str
    auth_alpn: str = ""
    tunnel_proxy: str = ""
    """host:port of the proxy to keep a reverse tunnel to; empty when the proxy is in this process."""
    apps: Sequence[Any] = ()
    """The `app_service.apps` config entries."""
    selectors: Sequence[dict[str, str]] = ()
    options: AppServiceOptions = field(default_factory=AppServiceOptions)


def app_from_config(entry: Any, *, host_id: str, hostname: str) -> App:
    """A config entry as the `app` resource its heartbeat registers."""
    return App(
        metadata=Metadata(name=entry.name, description=entry.description, labels=dict(entry.labels)),
        spec=AppSpec.model_validate(
            {
                "uri": entry.uri,
                "public_addr": entry.public_addr,
                "insecure_skip_verify": entry.insecure_skip_verify,
                "rewrite": entry.rewrite.model_dump(),
                "host_id": host_id,
                "hostname": hostname,
            }
        ),
    )


class AppAgent:
    def __init__(self, settings: AppAgentSettings, identity: IdentityFile) -> None:
        self.settings = settings
        self.identity = identity
        self.auth = AuthClient.from_identity(identity, settings.auth_addr, alpn=settings.auth_alpn)
        self.cache = ResourceCache(CACHED_KINDS)
        self.emitter = RemoteEmitter(self.auth)
        self.static = {
            a.name: app_from_config(a, host_id=settings.host_id, hostname=settings.nodename)
            for a in settings.apps
        }
        self.service = AppService(
            auth=self.auth,
            cache=self.cache,
            emitter=self.emitter,
            host_id=settings.host_id,
            apps=self.apps,
            options=settings.options,
        )
        self.tunnel: TunnelAgent | None = None
        self._tasks: list[asyncio.Task[Any]] = []

    def apps(self) -> dict[str, App]:
        """What this service serves now: its config, plus matching `wardctl create`d resources."""
        out = dict(self.static)
        if self.settings.selectors:
            now = datetime.now(UTC)
            for app in self.cache.list("app"):
                if not isinstance(app, App) or app.spec.host_id or app.name in out or app.is_expired(now):
                    continue
                if any(match_labels(sel, app.metadata.labels)[0] for sel in self.settings.selectors):
                    out[app.name] = app
        return out

    async def start(self) -> None:
        s = self.settings
        self._tasks.append(asyncio.create_task(self.cache.run(lambda: self.auth.watch(CACHED_KINDS))))
        await asyncio.wait_for(self.cache.ready.wait(), 30)
        if s.tunnel_proxy:
            self.tunnel = tunnel_for(s.tunnel_proxy, self.identity, self._on_channel, TUNNEL_SERVICE)
        await self.heartbeat()
        beats = repeat(HEARTBEAT_EVERY.total_seconds(), self.heartbeat, "app heartbeat")
        self._tasks.append(asyncio.create_task(beats))

    async def _on_channel(self, service: str, client_addr: str, reader: Any, writer: Any) -> None:
        await self.service.serve_tunnel_channel(reader, writer)

    async def heartbeat(self) -> None:
        expires = datetime.now(UTC) + HEARTBEAT_TTL
        for app in self.static.values():
            beat = app.model_copy(deep=True)
            beat.metadata.expires = expires
            await self.auth.app_heartbeat(beat)
        me = AppServiceResource(
            metadata=Metadata(name=self.settings.host_id, expires=expires),
            spec=AppServiceSpec(
                hostname=self.settings.nodename,
                tunnel=bool(self.settings.tunnel_proxy),
                resources=[dict(sel) for sel in self.settings.selectors],
                apps=sorted(self.apps()),
            ),
        )
        await self.auth.app_heartbeat(me)

    async def close(self) -> None:
        if self.tunnel is not None:
            await self.tunnel.close()
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        await self.service.close()
        await self.emitter.close()
        await self.auth.close()
