"""Database connections on the one port (ALPN `ward-postgres`, `ward-mysql`).

The client's certificate names the database (its route); the proxy finds a live database service
serving it and hands the connection over, in this process or through that service's reverse
tunnel, with a header carrying the certificate so the service verifies the identity itself. The
service reads the client's startup and refuses in the protocol's own words (an ErrorResponse that
psql prints, an ERR packet for mysql), so the proxy refuses here only what it cannot attribute.
"""

from __future__ import annotations

import contextlib
import logging
import random
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from wardgate.api.cache import ResourceCache
from wardgate.api.resources import Database, DatabaseService
from wardgate.auth.certs import verify_tls_identity
from wardgate.errors import AuthenticationError, NotFoundError, WardgateError
from wardgate.protocols.dbconn import encode_header
from wardgate.proxy.router import TLSConnection
from wardgate.proxy.tunnel import pipe, stream_pair

if TYPE_CHECKING:
    from wardgate.agent.db.service import DatabaseService as LocalService
    from wardgate.proxy.tunnel import TunnelServer

log = logging.getLogger(__name__)
ALPN_PROTOCOLS = {"ward-postgres": "postgres", "ward-mysql": "mysql"}


class DBProxy:
    def __init__(
        self,
        cache: ResourceCache,
        emitter: Any,
        *,
        tunnels: TunnelServer | None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.cache = cache
        self.emitter = emitter
        self.tunnels = tunnels
        self.clock = clock
        self.local: dict[str, LocalService] = {}
        """Database services running in this process, by host id (no tunnel needed)."""

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self.clock(), UTC)

    def services_for(self, db: Database) -> list[str]:
        """Host ids of live database services serving `db`, local ones first."""
        now = self._now()
        live = [
            s.name
            for s in self.cache.list("db_service")
            if isinstance(s, DatabaseService) and not s.is_expired(now) and db.name in s.spec.databases
        ]
        random.shuffle(live)
        return sorted(live, key=lambda h: h not in self.local)

    async def handle(self, conn: TLSConnection) -> None:
        client_addr = f"{conn.remote[0]}:{conn.remote[1]}"
        protocol = ALPN_PROTOCOLS.get(conn.alpn or "", "")
        try:
            if not conn.peer_cert:
                raise AuthenticationError("no client certificate: run `ward db login NAME` first")
            cert = x509.load_der_x509_certificate(conn.peer_cert)
            ident = verify_tls_identity(cert, self.cache.ca_certs("user", required=True), now=self._now())
            route = ident.route_to_db
            if ident.system_role or route is None or not route.service_name:
                raise AuthenticationError("this certificate is not for a database: run `ward db login NAME`")
            db = self.cache.get("db", route.service_name)
            if not isinstance(db, Database) or db.is_expired(self._now()):
                raise NotFoundError(f'database "{route.service_name}" is not registered (anymore)')
            if db.spec.protocol != protocol:
                raise AuthenticationError(f'database "{db.name}" speaks {db.spec.protocol}, not {protocol}')
            hosts = self.services_for(db)
            if not hosts:
                raise NotFoundError(f'no database service is serving "{db.name}" right now')
        except (WardgateError, ValueError) as exc:
            self.emitter.emit_nowait(
                "db.session.start", success=False, error=str(exc), remote_addr=client_addr, protocol=protocol
            )
            log.info("refused a %s connection from %s: %s", protocol, client_addr, exc)
            conn.close()
            return
        cert_pem = cert.public_bytes(Encoding.PEM).decode()
        d = conn.detach()
        reader, writer = stream_pair(d.transport, pending=d.pending, eof=d.eof)
        for host_id in hosts:
            local = self.local.get(host_id)
            if local is not None:
                header = {"cert": cert_pem, "db": db.name, "client_addr": client_addr}
                await local.serve(reader, writer, header)
                return
            if self.tunnels is None:
                continue
            try:
                upstream = await self.tunnels.dial(host_id, "db", client_addr=client_addr)
            except WardgateError as exc:
                log.info("database service %s unreachable: %s", host_id, exc)
                continue
            up_reader, up_writer = upstream
            up_writer.write(encode_header(cert_pem, db.name, client_addr))
            await pipe(reader, writer, up_reader, up_writer)
            return
        with contextlib.suppress(Exception):
            writer.close()

