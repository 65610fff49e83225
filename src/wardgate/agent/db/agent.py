"""The database agent: the database service wired to a (possibly remote) auth service.

It watches roles, locks, CAs and `db` resources, registers its configured databases and itself
with heartbeats (they expire unless renewed), serves `wardctl create`d databases whose labels
match its `resources` selectors, and is reached by the proxy in this process or through the
reverse tunnel it keeps (channel service `db`).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from wardgate.agent.db.service import DatabaseService, Engine
from wardgate.agent.proxied import ProxiedAgent
from wardgate.api.identityfile import IdentityFile
from wardgate.api.resources import Database, DatabaseServiceSpec, DatabaseSpec, Metadata, Resource
from wardgate.api.resources import DatabaseService as DatabaseServiceResource

log = logging.getLogger(__name__)
CACHED_KINDS = ("cert_authority", "role", "lock", "db")
TUNNEL_SERVICE = "db"


def default_engines() -> dict[str, Engine]:
    from wardgate.agent.db.mysql import serve_mysql
    from wardgate.agent.db.postgres import serve_postgres

    return {"postgres": serve_postgres, "mysql": serve_mysql}


@dataclass
class DatabaseAgentSettings:
    nodename: str
    host_id: str
    auth_addr: str
    auth_alpn: str = ""
    tunnel_proxy: str = ""
    """host:port of the proxy to keep a reverse tunnel to; empty when the proxy is in this process."""
    databases: Sequence[Any] = ()
    """The `db_service.databases` config entries."""
    selectors: Sequence[dict[str, str]] = ()
    extra: dict[str, Any] = field(default_factory=dict)


def database_from_config(entry: Any, *, host_id: str, hostname: str) -> Database:
    return Database(
        metadata=Metadata(name=entry.name, description=entry.description, labels=dict(entry.labels)),
        spec=DatabaseSpec.model_validate(
            {
                "protocol": entry.protocol,
                "uri": entry.uri,
                "tls": entry.tls,
                "auth": entry.auth,
                "host_id": host_id,
                "hostname": hostname,
            }
        ),
    )


class DatabaseAgent(ProxiedAgent):
    KIND = "db"
    CACHED_KINDS = CACHED_KINDS
    TUNNEL_SERVICE = TUNNEL_SERVICE

    def __init__(
        self,
        settings: DatabaseAgentSettings,
        identity: IdentityFile,
        *,
        engines: dict[str, Engine] | None = None,
    ) -> None:
        static = {
            d.name: database_from_config(d, host_id=settings.host_id, hostname=settings.nodename)
            for d in settings.databases
        }
        super().__init__(settings, identity, static)
        self.service: DatabaseService = DatabaseService(
            auth=self.auth,
            cache=self.cache,
            emitter=self.emitter,
            host_id=settings.host_id,
            databases=self.databases,
            engines=engines if engines is not None else default_engines(),
        )

    def databases(self) -> dict[str, Database]:
        return self.served()

    def send_heartbeat(self) -> Callable[[Resource], Awaitable[Resource]]:
        return self.auth.db_heartbeat

    def service_heartbeat(self, metadata: Metadata) -> Resource:
        return DatabaseServiceResource(
            metadata=metadata,
            spec=DatabaseServiceSpec(
                hostname=self.settings.nodename,
                tunnel=bool(self.settings.tunnel_proxy),
                resources=[dict(sel) for sel in self.settings.selectors],
                databases=sorted(self.databases()),
            ),
        )

    async def close_service(self) -> None:
        for t in self.service.sessions:
            t.cancel()
