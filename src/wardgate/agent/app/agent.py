"""The app agent: the app service wired to a (possibly remote) auth service.

It watches roles, locks, users, CAs and `app` resources, registers its configured apps and itself
with heartbeats (they expire unless renewed), serves `wardctl create`d apps whose labels match
its `resources` selectors, and is reached by the proxy in this process or through the reverse
tunnel it keeps (channel service `app`).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from wardgate.agent.app.service import AppService, AppServiceOptions
from wardgate.agent.proxied import ProxiedAgent
from wardgate.api.identityfile import IdentityFile
from wardgate.api.resources import App, AppServiceSpec, AppSpec, Metadata, Resource
from wardgate.api.resources import AppService as AppServiceResource

log = logging.getLogger(__name__)
CACHED_KINDS = ("cert_authority", "role", "lock", "app", "user")
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


class AppAgent(ProxiedAgent):
    KIND = "app"
    CACHED_KINDS = CACHED_KINDS
    TUNNEL_SERVICE = TUNNEL_SERVICE

    def __init__(self, settings: AppAgentSettings, identity: IdentityFile) -> None:
        static = {
            a.name: app_from_config(a, host_id=settings.host_id, hostname=settings.nodename)
            for a in settings.apps
        }
        super().__init__(settings, identity, static)
        self.service: AppService = AppService(
            auth=self.auth,
            cache=self.cache,
            emitter=self.emitter,
            host_id=settings.host_id,
            apps=self.apps,
            options=settings.options,
        )

    def apps(self) -> dict[str, App]:
        return self.served()

    def send_heartbeat(self) -> Callable[[Resource], Awaitable[Resource]]:
        return self.auth.app_heartbeat

    def service_heartbeat(self, metadata: Metadata) -> Resource:
        return AppServiceResource(
            metadata=metadata,
            spec=AppServiceSpec(
                hostname=self.settings.nodename,
                tunnel=bool(self.settings.tunnel_proxy),
                resources=[dict(sel) for sel in self.settings.selectors],
                apps=sorted(self.apps()),
            ),
        )

    async def close_service(self) -> None:
        await self.service.close()
