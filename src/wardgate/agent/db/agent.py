"""The database agent: the database service wired to a (possibly remote) auth service.

It watches roles, locks, CAs and `db` resources, registers its configured databases and itself
with heartbeats (they expire unless renewed), serves `wardctl create`d databases whose labels
match its `resources` selectors, and is reached by the proxy in this process or through the
reverse tunnel it keeps (channel service `db`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from wardgate.agent.db.service import DatabaseService, Engine
from wardgate.agent.heartbeat import repeat
from wardgate.agent.tunnel import TunnelAgent, tunnel_for
from wardgate.api.cache import ResourceCache
from wardgate.api.client import AuthClient
from wardgate.api.emitter import RemoteEmitter
from wardgate.api.identityfile import IdentityFile
from wardgate.api.resources import Database, DatabaseServiceSpec, DatabaseSpec, Metadata
from wardgate.api.resources import DatabaseService as DatabaseServiceResource
from wardgate.auth.rbac import match_labels

log = logging.getLogger(__name__)
CACHED_KINDS = ("cert_authority", "role", "lock", "db")
HEARTBEAT_EVERY = timedelta(seconds=30)
HEARTBEAT_TTL = timedelta(minutes=2)
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


class DatabaseAgent:
    def __init__(
        self,
        settings: DatabaseAgentSettings,
        identity: IdentityFile,
        *,
        engines: dict[str, Engine] | None = None,
    ) -> None:
        self.settings = settings
        self.identity = identity
        self.auth = AuthClient.from_identity(identity, settings.auth_addr, alpn=settings.auth_alpn)
        self.cache = ResourceCache(CACHED_KINDS)
        self.emitter = RemoteEmitter(self.auth)
        self.static = {
            d.name: database_from_config(d, host_id=settings.host_id, hostname=settings.nodename)
            for d in settings.databases
        }
        self.service = DatabaseService(
            auth=self.auth,
            cache=self.cache,
            emitter=self.emitter,
            host_id=settings.host_id,
            databases=self.databases,
            engines=engines if engines is not None else default_engines(),
        )
        self.tunnel: TunnelAgent | None = None
        self._tasks: list[asyncio.Task[Any]] = []

    def databases(self) -> dict[str, Database]:
        """What this service serves now: its config, plus matching `wardctl create`d resources."""
        out = dict(self.static)
        if self.settings.selectors:
            now = datetime.now(UTC)
            for db in self.cache.list("db"):
                if not isinstance(db, Database) or db.spec.host_id or db.name in out or db.is_expired(now):
                    continue
                if any(match_labels(sel, db.metadata.labels)[0] for sel in self.settings.selectors):
                    out[db.name] = db
        return out

    async def start(self) -> None:
        s = self.settings
        self._tasks.append(asyncio.create_task(self.cache.run(lambda: self.auth.watch(CACHED_KINDS))))
        await asyncio.wait_for(self.cache.ready.wait(), 30)
        if s.tunnel_proxy:
            self.tunnel = tunnel_for(s.tunnel_proxy, self.identity, self._on_channel, TUNNEL_SERVICE)
        await self.heartbeat()
        beats = repeat(HEARTBEAT_EVERY.total_seconds(), self.heartbeat, "database heartbeat")
        self._tasks.append(asyncio.create_task(beats))

    async def _on_channel(self, service: str, client_addr: str, reader: Any, writer: Any) -> None:
        await self.service.serve_tunnel_channel(reader, writer)

    async def heartbeat(self) -> None:
        expires = datetime.now(UTC) + HEARTBEAT_TTL
        for db in self.static.values():
            beat = db.model_copy(deep=True)
            beat.metadata.expires = expires
            await self.auth.db_heartbeat(beat)
        me = DatabaseServiceResource(
            metadata=Metadata(name=self.settings.host_id, expires=expires),
            spec=DatabaseServiceSpec(
                hostname=self.settings.nodename,
                tunnel=bool(self.settings.tunnel_proxy),
                resources=[dict(sel) for sel in self.settings.selectors],
                databases=sorted(self.databases()),
            ),
        )
        await self.auth.db_heartbeat(me)

    async def close(self) -> None:
        if self.tunnel is not None:
            await self.tunnel.close()
        for t in [*self._tasks, *self.service.sessions]:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        await self.emitter.close()
        await self.auth.close()
