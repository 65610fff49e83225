"""The MySQL/MariaDB engine of the database service: one client connection, one upstream login.

The client leg is already authenticated by its certificate (the proxy terminated its TLS), so the
engine plays a MySQL server only as far as the protocol demands: its own greeting, the client's
login (whose password is ignored), then `DBSession.authorize` for the db user and schema the
client asked for. Only then does it log in to the database as that db user (`ClientAuth`: a db-CA
client certificate over TLS, or a configured password), answer the client's login with the
database's own OK packet, and relay, decoding the client's commands for the audit log.

Capabilities. The greeting goes out before the engine knows who the client is, hence before it
logs in upstream, yet everything that shapes the wire format after the login must agree on both
legs: the client parses what the database sends. So:

- The greeting offers the codec's server capabilities (never TLS, compression, LOCAL INFILE or
  MariaDB's extended capabilities) *intersected with what this database offered last time*: the
  engine remembers each upstream's greeting (version, capabilities, character set). Until it has
  seen one, it opens the upstream connection before greeting the client and reuses it for the
  login, so even the first client sees the database's real version string (drivers such as
  SQLAlchemy pick their dialect from it). Not always: a client refused after that leaves the
  database an abandoned handshake, and enough of those (max_connect_errors) get the database
  service's host blocked, so a refused user must not be able to cause them at will.
- The database is then asked for exactly the flags the client agreed to, and the flags that
  change framing (CLIENT_DEPRECATE_EOF, CLIENT_SESSION_TRACK) are compared after the login. They
  differ only if the database changed since it was last seen (an upgrade or a fail-over to an
  older server); the client is then refused with a clear error and the next connection, greeted
  with the new facts, works. Nothing is translated on the fly, so results are never rewritten.
- The greeting carries a connection id of Wardgate's own (the database's thread id is unknown
  when the greeting goes out); `KILL [QUERY] <that id>` from the same Wardgate user to the same
  database is translated to the database's thread id, so the `mysql` client's Ctrl-C still works.

Relay. Client packets are framed and parsed (they are small and their audit is the point);
server packets pass through in bulk, unparsed, except right after a command whose answer the
engine needs: COM_STMT_PREPARE (statement ids and parameter counts, for decoding executes),
COM_INIT_DB / `USE db` (the current schema), and local answers queued behind such a response.
Clients are assumed to wait for each response before the next command, as the classic protocol
requires; the one pipelining real drivers do (MariaDB's prepare + execute of the last statement)
is handled. A server response that does not look like what was expected drops the tracking
rather than the session.

Audit: `db.session.start` (success, or why not: `authorize` audits its own refusals),
`db.session.query` (`query`, `command`; executes add `statement_id` and `parameters`; refused
schema switches have success false), `db.session.command` (administrative commands such as
COM_PROCESS_KILL or COM_SHUTDOWN, and refused COM_CHANGE_USER), `db.session.error` (a client
packet that ended the session) and `db.session.end` (`duration`, `bytes_in`, `bytes_out`), once.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import re
import secrets
import ssl
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from wardgate.errors import WardgateError
from wardgate.protocols import mysql as my
from wardgate.protocols.errors import ProtocolError

if TYPE_CHECKING:
    from wardgate.agent.db.service import DBSession

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 10.0
"""Seconds to open the TCP connection to the database (and to read its greeting)."""
LOGIN_TIMEOUT = 30.0
"""Seconds for the client's login packet, and separately for the whole upstream login."""
FRESH_GREETING = 5.0
"""A connection opened before the client's login is used for it only if that came this quickly."""
READ_CHUNK = 256 * 1024
MAX_LOGIN_PACKET = 64 * 1024
MAX_CLIENT_PACKET = 64 * 1024 * 1024
"""Largest command a client may send through the engine (it is held whole to be audited)."""
ER_UNKNOWN_ERROR = 1105
"""For the engine's own login failures: MariaDB's client takes client-side codes (2000+) in a
login reply for a malformed packet, so "cannot reach the database" goes out as 1105 (HY000)."""
ER_CLIENT_LOST = 2013
DEFAULT_SERVER_VERSION = "8.0.0-Wardgate"
"""The greeting's version when the database could not be reached to learn its own."""

# Flags of the connection phase, which each leg negotiates on its own.
_LOGIN_FLAGS = (
    my.CLIENT_LONG_PASSWORD
    | my.CLIENT_PROTOCOL_41
    | my.CLIENT_SECURE_CONNECTION
    | my.CLIENT_PLUGIN_AUTH
    | my.CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA
    | my.CLIENT_CONNECT_ATTRS
    | my.CLIENT_CONNECT_WITH_DB
)
# Flags that matter after the login: offered only when the database offers them too.
_RELAY_FLAGS = my.DEFAULT_SERVER_CAPABILITIES & ~(my.CLIENT_SSL | _LOGIN_FLAGS)
# Of those, the ones that change how packets are framed or laid out.
_WIRE_FLAGS = my.CLIENT_DEPRECATE_EOF | my.CLIENT_SESSION_TRACK
_FLAG_NAMES = {
    my.CLIENT_DEPRECATE_EOF: "CLIENT_DEPRECATE_EOF",
    my.CLIENT_SESSION_TRACK: "CLIENT_SESSION_TRACK",
}

# Commands the database answers with nothing at all.
_NO_REPLY = frozenset({my.COM_QUIT, my.COM_STMT_CLOSE, my.COM_STMT_SEND_LONG_DATA})
# Other commands worth an audit event of their own (the rest are routine: ping, statement
# book-keeping, option setting, result fetching).
_AUDITED_COMMANDS = frozenset(
    {
        my.COM_CREATE_DB,
        my.COM_DROP_DB,
        my.COM_REFRESH,
        my.COM_SHUTDOWN,
        my.COM_PROCESS_INFO,
        my.COM_PROCESS_KILL,
        my.COM_DEBUG,
        my.COM_BINLOG_DUMP,
        my.COM_BINLOG_DUMP_GTID,
        my.COM_TABLE_DUMP,
        my.COM_REGISTER_SLAVE,
        my.COM_CLONE,
        my.COM_DAEMON,
        my.COM_STMT_BULK_EXECUTE,
    }
)

_USE_RE = re.compile(r"\A\s*USE\s+(`(?:[^`]|``)+`|[^\s;`]+)\s*;?\s*\Z", re.IGNORECASE | re.DOTALL)
_KILL_RE = re.compile(
    r"\A(\s*KILL\s+(?:(?:HARD|SOFT)\s+)?(?:(?:QUERY|CONNECTION)\s+)?)(\d+)(\s*;?\s*)\Z",
    re.IGNORECASE | re.DOTALL,
)


@dataclass(frozen=True, slots=True)
class _Upstream:
    """What a database said in its last greeting."""

    version: str
    capabilities: int
    charset: int


_SEEN: dict[tuple[str, int], _Upstream] = {}
"""host:port -> its last greeting's facts (a handful of databases per service: unbounded is fine)."""


@dataclass(frozen=True, slots=True)
class _Conn:
    user: str
    database: str
    thread_id: int


_CONNECTIONS: dict[int, _Conn] = {}
"""Greeting connection id -> who holds it and the database's thread id, for KILL."""
_conn_ids = itertools.count(0x40000000 + secrets.randbelow(0x10000000))


def _next_conn_id() -> int:
    while True:
        cid = next(_conn_ids) & 0x7FFFFFFF or 1
        if cid not in _CONNECTIONS:
            return cid


def greeting_capabilities(upstream_caps: int | None) -> int:
    """What our greeting offers, given the database's last known capabilities (None: unknown)."""
    relay = _RELAY_FLAGS if upstream_caps is None else _RELAY_FLAGS & upstream_caps
    return _LOGIN_FLAGS | relay


def _flag_names(flags: int) -> str:
    return ", ".join(name for bit, name in _FLAG_NAMES.items() if flags & bit)


class _LoginFailed(Exception):
    """Refuse the client's login with this ERR; `audit` False when authorize already did."""

    def __init__(self, code: int, sqlstate: str, message: str, *, audit: bool = True) -> None:
        super().__init__(message)
        self.code, self.sqlstate, self.message, self.audit = code, sqlstate, message, audit


class _Packets:
    """Whole packets off a stream, with a timeout per wait."""

    def __init__(self, reader: Any, max_packet: int) -> None:
        self.reader = reader
        self.framer = my.PacketReader(max_packet)
        self.queue: deque[my.Packet] = deque()

    async def next(self, seconds: float) -> my.Packet | None:
        """The next packet, or None at EOF. Raises TimeoutError, ProtocolError, OSError."""
        async with asyncio.timeout(seconds):
            while not self.queue:
                data = await self.reader.read(READ_CHUNK)
                if not data:
                    return None
                self.queue.extend(self.framer.feed(data))
        return self.queue.popleft()


@dataclass(slots=True)
class _Expect:
    """One server response the relay must read packet by packet (or a local answer queued)."""

    kind: str  # "prepare" | "single" | "local"
    on_reply: Callable[[bytes], None] | None = None
    data: bytes = b""
    left: int | None = None  # prepare: definition packets still to come (None: OK not seen yet)


async def serve_mysql(session: DBSession, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Serve one MySQL client connection for `session` (see the module's docstring)."""
    await _Engine(session, reader, writer).run()


class _Engine:
    def __init__(self, session: DBSession, reader: Any, writer: Any) -> None:
        self.session = session
        self.reader = reader
        self.writer = writer
        self.client = _Packets(reader, MAX_LOGIN_PACKET)
        self.key = session.upstream_host_port()
        self.conn_id = _next_conn_id()
        self.up_reader: Any = None
        self.up_writer: Any = None
        self.up_packets: _Packets | None = None
        self.up_greeting: my.HandshakeV10 | None = None
        self.up_error: _LoginFailed | None = None
        self.up_opened = 0.0
        self.caps = 0
        """What the client and we agreed on (commands are parsed with these)."""
        self.tracker = my.StatementTracker()
        self.expect: deque[_Expect] = deque()
        self.deferred: list[my.StmtExecute] = []
        self.sbuf = bytearray()
        self.started = 0.0
        self.ended = False
        self.quit = False
        self.waiting_seq: int | None = None
        """Sequence number the client expects next while it waits for a reply, else None."""
        self.bytes_in = 0
        self.bytes_out = 0

    # ------------------------------------------------------------------ lifecycle

    async def run(self) -> None:
        try:
            if await self.login():
                await self.relay()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("mysql session %s failed", self.session.id)
        finally:
            _CONNECTIONS.pop(self.conn_id, None)
            if self.up_writer is not None:
                with contextlib.suppress(Exception):
                    self.up_writer.close()
            self.finish()

    def finish(self) -> None:
        """Emit `db.session.end` once, for a session that started."""
        if self.started and not self.ended:
            self.ended = True
            self.session.emit(
                "db.session.end",
                duration=round(time.monotonic() - self.started, 3),
                bytes_in=self.bytes_in,
                bytes_out=self.bytes_out,
            )

    async def send_client(self, data: bytes) -> None:
        with contextlib.suppress(Exception):
            self.writer.write(data)
            await self.writer.drain()

    async def fail_login(self, seq: int, exc: _LoginFailed) -> None:
        if exc.audit:
            self.session.emit("db.session.start", success=False, error=exc.message)
        log.info("mysql login to %s refused: %s", self.session.database.name, exc.message)
        await self.send_client(my.err_packet(seq, exc.code, exc.sqlstate, exc.message))

    # ------------------------------------------------------------------ login

    async def login(self) -> bool:
        s = self.session
        known = _SEEN.get(self.key)
        if known is None:
            await self.connect_upstream()
            if self.up_greeting is not None:
                known = _SEEN.get(self.key)
        offered = greeting_capabilities(known.capabilities if known else None)
        greeting = my.HandshakeV10(
            server_version=known.version if known else DEFAULT_SERVER_VERSION,
            connection_id=self.conn_id,
            auth_plugin_data=my.new_nonce(),
            capabilities=offered,
            charset=known.charset if known else my.UTF8MB4_GENERAL_CI,
            auth_plugin_name=my.NATIVE_PASSWORD,
        )
        await self.send_client(my.encode_packet(0, greeting.encode()))
        try:
            pkt = await self.client.next(LOGIN_TIMEOUT)
        except ProtocolError as exc:
            await self.fail_login(1, _LoginFailed(1043, "08S01", f"Bad handshake: {exc}"))
            return False
        except (TimeoutError, OSError) as exc:
            log.info("mysql client %s gave no login: %r", s.client_addr, exc)
            return False
        if pkt is None:
            return False
        seq = pkt.next_seq
        try:
            login = my.parse_client_handshake(pkt.payload)
        except ProtocolError as exc:
            await self.fail_login(seq, _LoginFailed(1043, "08S01", f"Bad handshake: {exc}"))
            return False
        if isinstance(login, my.SSLRequest):
            msg = (
                "the connection to Wardgate is already encrypted (ward <-> proxy): connect to the "
                "local proxy without TLS (mariadb --skip-ssl, mysql --ssl-mode=DISABLED)"
            )
            await self.fail_login(seq, _LoginFailed(ER_UNKNOWN_ERROR, "HY000", msg))
            return False
        self.caps = login.capabilities & offered
        db_user, db_name = login.username, login.database or ""
        try:
            s.authorize(db_user, db_name)
        except WardgateError as exc:
            await self.fail_login(
                seq, _LoginFailed(my.ER_ACCESS_DENIED_ERROR, "28000", str(exc), audit=False)
            )
            return False
        try:
            ok = await asyncio.wait_for(self.login_upstream(login), LOGIN_TIMEOUT)
        except _LoginFailed as exc:
            await self.fail_login(seq, exc)
            return False
        except TimeoutError:
            msg = f"the database {s.database.name} did not finish the login in {LOGIN_TIMEOUT:.0f} s"
            await self.fail_login(seq, _LoginFailed(ER_UNKNOWN_ERROR, "HY000", msg))
            return False
        self.tracker.capabilities = self.caps
        self.client.framer.max_packet = MAX_CLIENT_PACKET
        await self.send_client(my.encode_packet(seq, ok))
        self.started = time.monotonic()
        s.emit("db.session.start", success=True)
        return True

    async def connect_upstream(self) -> None:
        """Open the TCP connection and read the greeting; failures are kept in `up_error`."""
        host, port = self.key
        where = f"{self.session.database.name} ({host}:{port})"
        self.up_opened = time.monotonic()
        try:
            self.up_reader, self.up_writer = await asyncio.wait_for(
                asyncio.open_connection(host, port), CONNECT_TIMEOUT
            )
            self.up_packets = _Packets(self.up_reader, MAX_LOGIN_PACKET)
            pkt = await self.up_packets.next(CONNECT_TIMEOUT)
            if pkt is None:
                raise ConnectionError("the database closed the connection before its greeting")
            if my.is_err(pkt.payload):
                err = my.ErrPacket.parse(pkt.payload)
                self.up_error = _LoginFailed(
                    err.code, err.sqlstate, f"the database {where} refused: {err.message}"
                )
                return
            greeting = my.HandshakeV10.parse(pkt.payload)
        except (OSError, TimeoutError, ProtocolError) as exc:
            reason = "timed out" if isinstance(exc, TimeoutError) else str(exc) or type(exc).__name__
            self.up_error = _LoginFailed(
                ER_UNKNOWN_ERROR, "HY000", f"Wardgate cannot reach the database {where}: {reason}"
            )
            return
        self.up_greeting = greeting
        _SEEN[self.key] = _Upstream(greeting.server_version, greeting.capabilities, greeting.charset)

    async def login_upstream(self, login: my.HandshakeResponse41) -> bytes:
        """Log in to the database as the client's db user; returns the OK payload to pass on."""
        s = self.session
        db_user, db_name = login.username, login.database or ""
        try:
            password = s.password(db_user)
            ctx = await s.upstream_tls(db_user)
        except WardgateError as exc:
            msg = f"Wardgate cannot log in to {s.database.name} as {db_user}: {exc}"
            raise _LoginFailed(my.ER_ACCESS_DENIED_ERROR, "28000", msg) from None
        if self.up_writer is not None and time.monotonic() - self.up_opened > FRESH_GREETING:
            # Opened before the client's login, which took a while: the database may be about
            # to drop a connection that has not logged in (its connect_timeout). Start afresh.
            self.up_writer.close()
            self.up_writer = self.up_greeting = None
        if self.up_writer is None and self.up_error is None:
            await self.connect_upstream()
        if self.up_error is not None:
            raise self.up_error
        assert self.up_packets is not None and self.up_greeting is not None
        attrs = dict(login.connect_attrs)
        if s.identity.user:
            attrs["wardgate_user"] = s.identity.user
        auth = my.ClientAuth(
            db_user,
            password,
            db_name or None,
            ssl=ctx is not None,
            capabilities=(self.caps & _RELAY_FLAGS) | my.CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA,
            connect_attrs=attrs,
            charset=login.charset,
            max_packet=login.max_packet or my.MAX_PACKET,
        )
        where = s.database.name
        last = b""
        try:
            out = auth.on_greeting(self.up_greeting)
            if auth.state == "tls":
                assert ctx is not None
                self.up_writer.write(out)
                await self.up_writer.drain()
                try:
                    await self.up_writer.start_tls(ctx, server_hostname=s.server_name())
                except (ssl.SSLError, ssl.CertificateError) as exc:
                    raise _LoginFailed(
                        ER_UNKNOWN_ERROR, "HY000", f"TLS to the database {where} failed: {exc}"
                    ) from None
                out = auth.tls_established()
            while True:
                if out:
                    self.up_writer.write(out)
                    await self.up_writer.drain()
                if auth.state in ("done", "failed"):
                    break
                pkt = await self.up_packets.next(LOGIN_TIMEOUT)
                if pkt is None:
                    raise ConnectionError("the database closed the connection during the login")
                last = pkt.payload
                out = auth.receive(pkt)
        except ProtocolError as exc:
            if exc.kind == "no_tls":
                msg = (
                    f"the database {where} does not offer TLS: give it a certificate "
                    "(`wardctl auth sign --format=db`), or set its tls.mode to off"
                )
            else:
                msg = f"the login to the database {where} failed: {exc}"
            raise _LoginFailed(ER_UNKNOWN_ERROR, "HY000", msg) from None
        except OSError as exc:
            msg = f"the login to the database {where} failed: {exc or type(exc).__name__}"
            raise _LoginFailed(ER_UNKNOWN_ERROR, "HY000", msg) from None
        if auth.error is not None:
            e = auth.error
            raise _LoginFailed(e.code, e.sqlstate, f"the database {where} refused {db_user}: {e.message}")
        greeting = self.up_greeting
        _SEEN[self.key] = _Upstream(greeting.server_version, greeting.capabilities, greeting.charset)
        missing = (self.caps & _WIRE_FLAGS) & ~auth.capabilities
        if missing:
            msg = (
                f"the database {where} no longer offers {_flag_names(missing)}, which this connection "
                "was set up with: connect again"
            )
            raise _LoginFailed(my.ER_NOT_SUPPORTED_YET, "42000", msg)
        _CONNECTIONS[self.conn_id] = _Conn(s.identity.user, s.database.name, greeting.connection_id)
        return last

    # ------------------------------------------------------------------ relay

    async def relay(self) -> None:
        tasks = [
            asyncio.ensure_future(self.client_to_server()),
            asyncio.ensure_future(self.server_to_client()),
        ]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                exc = t.exception()
                if exc is not None and not isinstance(exc, (OSError, asyncio.IncompleteReadError)):
                    log.error("mysql session %s relay failed", self.session.id, exc_info=exc)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def client_to_server(self) -> None:
        pending = list(self.client.queue)
        self.client.queue.clear()
        while True:
            if pending:
                packets, pending = pending, []
            else:
                data = await self.reader.read(READ_CHUNK)
                if not data:
                    if not self.quit:  # say goodbye, so the database logs no aborted connection
                        with contextlib.suppress(Exception):
                            self.up_writer.write(my.encode_packet(0, bytes((my.COM_QUIT,))))
                            self.quit = True
                    return
                try:
                    packets = self.client.framer.feed(data)
                except ProtocolError as exc:
                    await self.refuse_packet(1, exc)
                    return
            out: list[bytes] = []
            for pkt in packets:
                try:
                    raw = await self.on_command(pkt)
                except ProtocolError as exc:
                    if out:
                        self.up_writer.write(b"".join(out))
                    await self.refuse_packet(pkt.next_seq, exc)
                    return
                if raw:
                    out.append(raw)
            if out:
                data = b"".join(out)
                self.bytes_in += len(data)
                self.up_writer.write(data)
                await self.up_writer.drain()
            if self.quit:
                return

    async def refuse_packet(self, seq: int, exc: ProtocolError) -> None:
        """A client packet the engine cannot take: tell the client, end the session."""
        if exc.kind == "oversized":
            code, msg = 1153, f"Got a packet bigger than Wardgate's limit: {exc}"
        else:
            code, msg = my.ER_UNKNOWN_COM_ERROR, f"Malformed packet: {exc}"
        log.info("mysql session %s: %s", self.session.id, msg)
        self.session.emit("db.session.error", success=False, error=msg)
        await self.send_client(my.err_packet(seq, code, "08S01", msg))

    def emit_query(self, query: str, command: str, **extra: Any) -> None:
        self.session.emit("db.session.query", query=query, command=command, **extra)

    async def answer(self, data: bytes) -> None:
        """A reply of our own: now, or after the server responses still being tracked."""
        if self.expect:
            self.expect.append(_Expect("local", data=data))
        else:
            await self.send_client(data)

    async def on_command(self, pkt: my.Packet) -> bytes | None:
        """Audit one client command; returns the bytes to forward (None: answered here)."""
        cmd = my.parse_command(pkt.payload, self.caps)
        s = self.session
        raw = pkt.raw
        if isinstance(cmd, my.Query):
            use = _USE_RE.match(cmd.sql)
            if use is not None:
                name = use.group(1)
                if name.startswith("`"):
                    name = name[1:-1].replace("``", "`")
                if not await self.change_db(pkt, name, cmd.sql, "COM_QUERY"):
                    return None
            else:
                raw = self.translate_kill(pkt, cmd)
                extra = {"upstream_query": _decode_query(raw)} if raw is not pkt.raw else {}
                self.emit_query(cmd.sql, "COM_QUERY", **extra)
        elif isinstance(cmd, my.InitDB):
            if not await self.change_db(pkt, cmd.schema, f"USE {_quote(cmd.schema)}", "COM_INIT_DB"):
                return None
        elif isinstance(cmd, my.StmtPrepare):
            self.tracker.observe(cmd)
            self.track(_Expect("prepare"))
            self.emit_query(cmd.sql, "COM_STMT_PREPARE")
        elif isinstance(cmd, my.StmtExecute):
            if self.preparing():
                self.deferred.append(cmd)  # pipelined behind its prepare: audited once that is in
            else:
                self.audit_execute(cmd)
        elif isinstance(cmd, my.ChangeUser):
            msg = (
                "changing users inside a session is not allowed: connect again with `ward db login --db-user`"
            )
            s.emit("db.session.command", success=False, command=cmd.name, error=msg, target_db_user=cmd.user)
            await self.answer(my.err_packet(pkt.next_seq, 1227, "42000", msg))
            return None
        elif isinstance(cmd, my.Quit):
            self.quit = True
        else:
            self.tracker.observe(cmd)
            if cmd.code in _AUDITED_COMMANDS:
                extra: dict[str, Any] = {}
                if cmd.code == my.COM_PROCESS_KILL and len(pkt.payload) == 5:
                    target = int.from_bytes(pkt.payload[1:], "little")
                    extra["thread_id"] = target
                    upstream = self.upstream_thread(target)
                    if upstream is not None:
                        extra["upstream_thread_id"] = upstream
                        raw = my.encode_packet(
                            pkt.seq, bytes((my.COM_PROCESS_KILL,)) + upstream.to_bytes(4, "little")
                        )
                elif isinstance(cmd, my.OtherCommand) and cmd.payload:
                    extra["arguments"] = my.describe_params([cmd.payload])[0]
                s.emit("db.session.command", command=cmd.name, **extra)
        if cmd.code not in _NO_REPLY:
            self.waiting_seq = pkt.next_seq
        return raw

    def audit_execute(self, cmd: my.StmtExecute) -> None:
        st = self.tracker.get(cmd.stmt_id)
        extra: dict[str, Any] = {"statement_id": st.stmt_id if st else cmd.stmt_id}
        try:
            params = self.tracker.observe(cmd)
        except ProtocolError as exc:  # the database judges the packet; the audit says what failed
            log.warning("mysql session %s: cannot decode execute parameters: %s", self.session.id, exc)
            params, extra["parameters_error"] = None, str(exc)
        if params is not None:
            extra["parameters"] = my.describe_params(params)
        self.emit_query(st.sql if st else "", "COM_STMT_EXECUTE", **extra)

    async def change_db(self, pkt: my.Packet, name: str, query: str, command: str) -> bool:
        """Check a switch of schema before it reaches the database; False: refused here."""
        s = self.session
        previous = s.db_name
        try:
            s.authorize(s.db_user, name)
        except WardgateError as exc:
            s.db_name = previous
            self.emit_query(query, command, success=False, error=str(exc))
            await self.answer(my.err_packet(pkt.next_seq, my.ER_DBACCESS_DENIED_ERROR, "42000", str(exc)))
            return False
        s.db_name = previous  # until the database says yes
        self.emit_query(query, command)

        def on_reply(payload: bytes) -> None:
            if my.is_ok(payload):
                s.db_name = name

        self.track(_Expect("single", on_reply))
        return True

    def translate_kill(self, pkt: my.Packet, cmd: my.Query) -> bytes:
        """`KILL [QUERY] <our connection id>` -> the database's thread id (same user and database)."""
        m = _KILL_RE.match(cmd.sql)
        if m is None or cmd.attributes:
            return pkt.raw
        upstream = self.upstream_thread(int(m.group(2)))
        if upstream is None:
            return pkt.raw
        sql = f"{m.group(1)}{upstream}{m.group(3)}"
        return my.encode_packet(pkt.seq, bytes((my.COM_QUERY,)) + sql.encode())

    def upstream_thread(self, conn_id: int) -> int | None:
        """The database's thread id behind one of our connection ids, if the same Wardgate user
        holds it on the same database (anyone else's ids are passed on untouched)."""
        conn = _CONNECTIONS.get(conn_id)
        s = self.session
        if conn is None or conn.user != s.identity.user or conn.database != s.database.name:
            return None
        return conn.thread_id

    # ------------------------------------------------------------------ server -> client

    def track(self, exp: _Expect) -> None:
        self.expect.append(exp)

    async def server_to_client(self) -> None:
        while True:
            data = await self.up_reader.read(READ_CHUNK)
            if not data:
                if self.waiting_seq is not None and not self.quit:
                    msg = f"Lost connection to the database {self.session.database.name} during the query"
                    await self.send_client(my.err_packet(self.waiting_seq, ER_CLIENT_LOST, "HY000", msg))
                return
            self.waiting_seq = None
            if self.expect or self.sbuf:
                data = self.frame(data)
            if data:
                self.bytes_out += len(data)
                self.writer.write(data)
                await self.writer.drain()

    def frame(self, data: bytes) -> bytes:
        """Walk server packets while responses are tracked; returns the bytes to pass on now."""
        buf = self.sbuf
        buf += data
        out: list[bytes | bytearray] = []
        start = pos = 0
        while True:
            while self.expect and self.expect[0].kind == "local":
                out.append(buf[start:pos])
                out.append(self.expect.popleft().data)
                start = pos
            if not self.expect or len(buf) - pos < my.HEADER_SIZE:
                break
            length = buf[pos] | (buf[pos + 1] << 8) | (buf[pos + 2] << 16)
            end = pos + my.HEADER_SIZE + length
            if length == my.MAX_PAYLOAD:
                self.lose_track("a 16 MiB packet in a tracked response")
                continue
            if end > len(buf):
                break
            try:
                self.on_server_packet(bytes(buf[pos + my.HEADER_SIZE : end]))
            except ProtocolError as exc:
                self.lose_track(str(exc))
            pos = end
        if self.expect:
            out.append(buf[start:pos])
            del buf[:pos]
        else:
            out.append(buf[start:])
            buf.clear()
        return b"".join(out)

    def lose_track(self, why: str) -> None:
        """The server said something the tracking did not expect: stop tracking, keep relaying."""
        log.warning("mysql session %s: lost track of server responses (%s)", self.session.id, why)
        locals_ = [e for e in self.expect if e.kind == "local"]
        self.expect.clear()
        self.expect.extend(locals_)  # still owed to the client, in order
        self.tracker = _retrack(self.tracker)
        self.flush_deferred()

    def on_server_packet(self, payload: bytes) -> None:
        exp = self.expect[0]
        if exp.kind == "single":
            self.expect.popleft()
            if exp.on_reply is not None:
                exp.on_reply(payload)
            return
        # A prepare response: PREPARE_OK, then parameter and column definitions (each list
        # ended by an EOF unless CLIENT_DEPRECATE_EOF), or an ERR.
        if exp.left is None:
            if my.is_err(payload):
                self.tracker.feed_server(payload)
                self.expect.popleft()
                self.flush_deferred()
                return
            ok = my.StmtPrepareOk.parse(payload)
            self.tracker.feed_server(payload)
            eof = 0 if self.caps & my.CLIENT_DEPRECATE_EOF else 1
            exp.left = 0
            if ok.metadata_follows:
                exp.left = (ok.num_params + eof if ok.num_params else 0) + (
                    ok.num_columns + eof if ok.num_columns else 0
                )
        else:
            self.tracker.feed_server(payload)
            exp.left -= 1
        if exp.left == 0:
            self.expect.popleft()
            self.flush_deferred()

    def preparing(self) -> bool:
        return any(e.kind == "prepare" for e in self.expect)

    def flush_deferred(self) -> None:
        if self.preparing():
            return
        deferred, self.deferred = self.deferred, []
        for cmd in deferred:
            self.audit_execute(cmd)


def _retrack(old: my.StatementTracker) -> my.StatementTracker:
    """A tracker without the prepares in flight (their answers can no longer be found)."""
    new = my.StatementTracker(capabilities=old.capabilities, max_statements=old.max_statements)
    new._stmts = old._stmts  # keep what was learnt
    new._last_id = old._last_id
    return new


def _decode_query(raw: bytes) -> str:
    return raw[my.HEADER_SIZE + 1 :].decode("utf-8", "replace")


def _quote(name: str) -> str:
    return "`" + name.replace("`", "``") + "`"
