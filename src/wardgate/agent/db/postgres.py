"""The PostgreSQL engine of the database service: one client connection, one upstream login.

The client leg is already authenticated by its certificate (the proxy terminated its TLS, and the
local `ward proxy db --tunnel` listener is plain), so the engine reads the client's startup packet
only to learn the db user and database it wants, asks `DBSession.authorize`, and only then logs in
to the database as that user: over TLS with a db-CA client certificate (pg_hba `cert`), or with a
configured password (cleartext, MD5 or SCRAM-SHA-256), or by trust. The client never
authenticated to the database, so it is told `AuthenticationOk` by the engine, followed by what the
database said after its own (ParameterStatus, BackendKeyData, ReadyForQuery) unchanged.

Relay. Client messages are parsed (they are small, and their audit is the point): a simple
`Query` is audited as its text, the extended protocol through `ExtendedQueryTracker` as one
`db.session.query` per `Execute`, with the statement's SQL and its parameters; each chunk read is
forwarded as it came, after its complete messages were audited. Server bytes carry the bulk (rows,
COPY), so they are framed with the least work that keeps the tracker right: only the 5-byte headers
are read, bodies are skipped by length without being copied or buffered, and only the few messages
the tracker and the engine need (ParseComplete, BindComplete, CloseComplete, ParameterDescription,
ReadyForQuery, ErrorResponse) are assembled. Each chunk is forwarded as read, never re-encoded.
When both legs are asyncio transports (a connection handed over in this process) the relay runs
in protocol callbacks, with no task, future or drain per read, and the transports' own flow
control (a full write buffer pauses reading the other side); other streams (an SSH channel of
the reverse tunnel) are relayed by two tasks.

A `CancelRequest` (psql's Ctrl-C, a driver's timeout) arrives on a connection of its own and is
forwarded to the database on a fresh connection, as is: the key it quotes is the database's own
(its BackendKeyData passes through unchanged). A client that goes away in the middle of a query
has that query cancelled the same way, so it does not run on unobserved.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from wardgate.errors import WardgateError
from wardgate.protocols import postgres as pg
from wardgate.protocols.errors import ProtocolError

if TYPE_CHECKING:
    from wardgate.agent.db.service import DBSession

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 10.0
"""Seconds to open the TCP connection to the database."""
STARTUP_TIMEOUT = 30.0
"""Seconds for the client's startup packet."""
LOGIN_TIMEOUT = 30.0
"""Seconds for the whole upstream login (TLS, authentication, up to the first ReadyForQuery)."""
CANCEL_TIMEOUT = 10.0
TERMINATE_GRACE = 10.0
"""Seconds the database has, after the client's Terminate, to finish answering and close."""
READ_CHUNK = 256 * 1024
MAX_RELAY_MESSAGE = 256 << 20
"""Largest message either side may send once the session runs (PostgreSQL allows up to 1 GB). A
client message is held whole to be audited; a server message is never held, only skipped."""

# Message types (as ints) the server framer assembles: what `ExtendedQueryTracker.server` uses,
# and ErrorResponse (the engine notes a FATAL one so as not to add its own after it).
_PARSE_COMPLETE, _BIND_COMPLETE, _CLOSE_COMPLETE, _PARAM_DESC = b"1", b"2", b"3", b"t"
_READY, _ERROR = ord("Z"), ord("E")
_ASSEMBLED = frozenset(b"123tZE")
_ZERO_STATUS = {s: pg.ReadyForQuery(bytes([s]), b"") for s in b"ITE"}
_TRACKED_TYPES = {t[0]: t for t in (_PARSE_COMPLETE, _BIND_COMPLETE, _CLOSE_COMPLETE, _PARAM_DESC)}

_EXTENDED = (pg.Parse, pg.Bind, pg.Describe, pg.Close, pg.Sync)


@dataclass(frozen=True, slots=True)
class _Backend:
    sid: str
    user: str
    database: str


_BACKENDS: dict[tuple[str, int, int], _Backend] = {}
"""(database host, port, backend pid) -> the live Wardgate session on it (to audit cancels)."""


class _Refused(Exception):
    """End the client's startup with this FATAL error; `audit` False when already audited."""

    def __init__(self, message: str, code: str, *, audit: bool = True, raw: bytes = b"") -> None:
        super().__init__(message)
        self.message, self.code, self.audit = message, code, audit
        self.raw = raw
        """Bytes to send instead of our own ErrorResponse (the database's own error)."""


class ServerFramer:
    """Walks the server's byte stream by its 5-byte headers without copying bodies.

    `feed(chunk)` is called with each chunk as read (the caller forwards it unchanged). Bodies of
    most messages are skipped by length, however big and however split across reads; those of the
    types in `_ASSEMBLED` (all small) are assembled and handed to `on_message(type, body)`.
    `at_boundary` is True when the bytes fed so far end exactly between two messages: only then
    may the engine add a message of its own to the client's stream.
    """

    __slots__ = ("_head", "_keep", "_keep_len", "_keep_type", "_skip", "max_message", "on_message")

    def __init__(self, on_message: Callable[[int, bytes], None], *, max_message: int = MAX_RELAY_MESSAGE):
        self.on_message = on_message
        self.max_message = max_message
        self._skip = 0
        self._head = b""
        self._keep: bytearray | None = None
        self._keep_len = 0
        self._keep_type = 0

    @property
    def at_boundary(self) -> bool:
        return not self._skip and not self._head and self._keep is None

    def feed(self, data: bytes) -> None:
        n = len(data)
        pos = 0
        if self._skip:
            if self._skip >= n:
                self._skip -= n
                return
            pos = self._skip
            self._skip = 0
        elif self._keep is not None:
            need = self._keep_len - len(self._keep)
            self._keep += data[:need]
            if len(self._keep) < self._keep_len:
                return
            body, t = bytes(self._keep), self._keep_type
            self._keep = None
            pos = need
            self.on_message(t, body)
        elif self._head:
            data = self._head + data  # a header cut in two: rare, and at most one chunk's copy
            n = len(data)
            self._head = b""
        from_bytes = int.from_bytes
        assembled = _ASSEMBLED
        while n - pos >= 5:
            length = from_bytes(data[pos + 1 : pos + 5], "big")
            if length < 4 or length > self.max_message:
                self._bad(data[pos], length)
            end = pos + 1 + length
            t = data[pos]
            if t in assembled:
                if end > n:
                    self._keep = bytearray(data[pos + 5 :])
                    self._keep_len = length - 4
                    self._keep_type = t
                    return
                self.on_message(t, data[pos + 5 : end])
            elif end > n:
                self._skip = end - n
                return
            pos = end
        if pos < n:
            self._head = data[pos:]

    def _bad(self, t: int, length: int) -> None:
        if length < 4:
            raise ProtocolError(f"server message {chr(t)!r} has length {length}; the minimum is 4")
        raise ProtocolError(
            f"server message {chr(t)!r} of {length} bytes exceeds the {self.max_message}-byte limit",
            kind="oversized",
        )


class _Leg(asyncio.Protocol):
    """One side's transport under the relay: its bytes and its end go to the engine; when its
    write buffer fills, the other side (`peer`, whose bytes fill it) stops being read."""

    def __init__(
        self, on_data: Callable[[bytes], None], on_end: Callable[[Exception | None], None], peer: Any
    ) -> None:
        self.data_received = on_data  # type: ignore[method-assign]
        self.on_end = on_end
        self.peer = peer

    def eof_received(self) -> bool:
        self.on_end(None)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.on_end(exc)

    def pause_writing(self) -> None:
        with contextlib.suppress(Exception):
            self.peer.pause_reading()

    def resume_writing(self) -> None:
        with contextlib.suppress(Exception):
            self.peer.resume_reading()


def _take_buffer(reader: asyncio.StreamReader) -> tuple[bytes, bool]:
    """What a stream reader has buffered but not yet handed out, and whether it saw EOF."""
    buf = getattr(reader, "_buffer", None)
    data = b""
    if buf:
        data = bytes(buf)
        buf.clear()
    return data, bool(getattr(reader, "_eof", False))


async def serve_postgres(
    session: DBSession, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    """Serve one PostgreSQL client connection for `session` (see the module's docstring)."""
    await _Engine(session, reader, writer).run()


class _Engine:
    def __init__(self, session: DBSession, reader: Any, writer: Any) -> None:
        self.session = session
        self.reader = reader
        self.writer = writer
        self.frontend = pg.FrontendReader()
        self.tracker = pg.ExtendedQueryTracker()
        self.framer = ServerFramer(self.on_server_message)
        self.up_reader: Any = None
        self.up_writer: Any = None
        self.backend_key: tuple[int, bytes] | None = None
        self.pending = b""
        """Client bytes read after its startup packet (sent without waiting for our answer)."""
        self.early = b""
        """Server bytes read after its first ReadyForQuery, during the login."""
        self.started = 0.0
        self.ended = False
        self.terminated = False
        self.waiting = 0
        """ReadyForQuery messages the client is owed (one per Query, Sync, FunctionCall)."""
        self.server_fatal = False
        self.executed: set[str] = set()
        """Portals executed since their Bind: a later Execute only fetches more rows."""
        self.bytes_in = 0
        self.bytes_out = 0
        # The relay on transports:
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.ct: Any = None
        self.ut: Any = None
        self.helpers: set[asyncio.Task[Any]] = set()
        self.grace: asyncio.TimerHandle | None = None

    # ------------------------------------------------------------------ lifecycle

    async def run(self) -> None:
        try:
            startup = await self.read_startup()
            if startup is not None and await self.login(startup):
                await self.relay()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("postgres session %s failed", self.session.id)
        finally:
            if self.backend_key is not None:
                _BACKENDS.pop((*self.session.upstream_host_port(), self.backend_key[0]), None)
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

    async def refuse(self, exc: _Refused) -> None:
        if exc.audit:
            self.session.emit("db.session.start", success=False, error=exc.message)
        log.info("postgres login to %s refused: %s", self.session.database.name, exc.message)
        await self.send_client(exc.raw or pg.error_response(exc.message, code=exc.code))

    # ------------------------------------------------------------------ startup

    async def read_startup(self) -> pg.StartupMessage | None:
        """The client's StartupMessage (answering encryption requests on the way), or None when
        the connection ends here (a cancel request, garbage, a client that went away)."""
        s = self.session
        try:
            async with asyncio.timeout(STARTUP_TIMEOUT):
                while True:
                    data = await self.reader.read(READ_CHUNK)
                    if not data:
                        return None
                    msgs = self.frontend.feed(data)
                    for i, msg in enumerate(msgs):
                        if isinstance(msg, pg.SSLRequest | pg.GSSENCRequest):
                            # The client's leg is encrypted already (ward <-> proxy) and is plain
                            # only on the user's own machine.
                            await self.send_client(b"N")
                            self.frontend.expect_startup()
                        elif isinstance(msg, pg.CancelRequest):
                            await self.cancel(msg)
                            return None
                        elif isinstance(msg, pg.StartupMessage):
                            # Bytes sent without waiting for the login are relayed (and audited)
                            # once it is done, as if they came then.
                            rest = b"".join(m.raw for m in msgs[i + 1 :])
                            self.pending = rest + bytes(self.frontend._buf)
                            self.frontend._buf.clear()
                            return msg
        except TimeoutError:
            log.info("postgres client %s sent no startup packet in time", s.client_addr)
        except ProtocolError as exc:
            msg = f"invalid startup packet: {exc}"
            log.info("postgres client %s: %s", s.client_addr, msg)
            s.emit("db.session.error", success=False, error=msg)
            await self.send_client(pg.error_response(msg, code="08P01"))
        except OSError:
            pass
        return None

    async def cancel(self, req: pg.CancelRequest) -> None:
        """Forward a cancel request to the database on a fresh connection (no login: the request
        is the whole conversation, right after the TLS negotiation)."""
        s = self.session
        target = _BACKENDS.get((*s.upstream_host_port(), req.pid))
        extra: dict[str, Any] = {"backend_pid": req.pid}
        if target is not None:
            extra["target_sid"] = target.sid
        if s.refusal:
            s.emit("db.session.cancel", success=False, error=s.refusal, **extra)
            return
        host, port = s.upstream_host_port()
        try:
            async with asyncio.timeout(CANCEL_TIMEOUT):
                ctx = await s.service.upstream_tls(s.database, "", with_cert=False)
                r, w = await asyncio.open_connection(host, port)
                try:
                    if ctx is not None:
                        await self.negotiate_tls(r, w, ctx)
                    w.write(req.raw)
                    await w.drain()
                    await r.read(1)  # the server closes once it has the request
                finally:
                    w.close()
        except (OSError, TimeoutError, ssl.SSLError, ssl.CertificateError, WardgateError, _Refused) as exc:
            error = exc.message if isinstance(exc, _Refused) else str(exc) or type(exc).__name__
            s.emit("db.session.cancel", success=False, error=error, **extra)
            return
        s.emit("db.session.cancel", **extra)

    async def negotiate_tls(self, r: Any, w: Any, ctx: ssl.SSLContext) -> None:
        name = self.session.database.name
        w.write(pg.ssl_request())
        await w.drain()
        answer = await r.read(1)
        if not answer:
            raise _Refused(f"the database {name} closed the connection when asked for TLS", "08006")
        try:
            ok = pg.read_ssl_answer(answer + bytes(getattr(r, "_buffer", b"")))
        except ProtocolError as exc:
            raise _Refused(f"the database {name} broke the TLS negotiation: {exc}", "08P01") from None
        if not ok:
            raise _Refused(
                f"the database {name} does not accept TLS: turn its ssl setting on (with a certificate from "
                "`wardctl auth sign --format=db`), or set the database's tls.mode to off",
                "08001",
            )
        try:
            await w.start_tls(ctx, server_hostname=self.session.server_name())
        except (ssl.SSLError, ssl.CertificateError) as exc:
            raise _Refused(f"TLS to the database {name} failed: {exc}", "08001") from None

    # ------------------------------------------------------------------ login

    async def login(self, startup: pg.StartupMessage) -> bool:
        s = self.session
        db_user = startup.params.get("user", "")
        db_name = startup.params.get("database") or db_user
        try:
            if not db_user:
                raise _Refused("no PostgreSQL user name specified in the startup packet", "28000")
            try:
                s.authorize(db_user, db_name)
            except WardgateError as exc:
                raise _Refused(str(exc), "28000", audit=False) from None
            async with asyncio.timeout(LOGIN_TIMEOUT):
                greeting = await self.login_upstream(startup, db_user, db_name)
        except _Refused as exc:
            await self.refuse(exc)
            return False
        except TimeoutError:
            msg = f"the database {s.database.name} did not finish the login in {LOGIN_TIMEOUT:.0f} s"
            await self.refuse(_Refused(msg, "08006"))
            return False
        self.frontend.max_message = MAX_RELAY_MESSAGE
        self.started = time.monotonic()
        extra = {}
        if startup.params.get("application_name"):
            extra["application_name"] = startup.params["application_name"]
        s.emit("db.session.start", success=True, **extra)
        await self.send_client(greeting)
        return True

    async def login_upstream(self, startup: pg.StartupMessage, db_user: str, db_name: str) -> bytes:
        """Log in to the database; returns what the client is to be told (AuthenticationOk and
        everything up to the first ReadyForQuery), or raises _Refused."""
        s = self.session
        host, port = s.upstream_host_port()
        where = f"{s.database.name} at {host}:{port}"
        try:
            ctx = await s.upstream_tls(db_user)  # may ask the auth service for a client certificate
        except Exception as exc:
            reason = str(exc) or type(exc).__name__
            raise _Refused(f"cannot set up TLS to the database {where}: {reason}", "08001") from None
        try:
            self.up_reader, self.up_writer = await asyncio.wait_for(
                asyncio.open_connection(host, port, limit=READ_CHUNK), CONNECT_TIMEOUT
            )
        except (OSError, TimeoutError) as exc:
            reason = "timed out" if isinstance(exc, TimeoutError) else str(exc) or type(exc).__name__
            raise _Refused(f"cannot reach database {where}: {reason}", "08001") from None
        r, w = self.up_reader, self.up_writer
        with contextlib.suppress(AttributeError, OSError):
            w.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if ctx is not None:
            await self.negotiate_tls(r, w, ctx)
        params = dict(startup.params)
        params["user"], params["database"] = db_user, db_name
        w.write(pg.startup_message(params, startup.version))
        backend = pg.BackendReader()
        out: list[bytes] = []
        scram: pg.ScramSha256Client | None = None
        authenticated = False
        try:
            while True:
                await w.drain()
                data = await r.read(READ_CHUNK)
                if not data:
                    raise _Refused(f"the database {where} closed the connection during the login", "08006")
                msgs = backend.feed(data)
                for i, msg in enumerate(msgs):
                    if isinstance(msg, pg.ErrorResponse):
                        # The database's own words (psql prints them as they are).
                        raise _Refused(msg.message, msg.code, raw=b"".join(out) + msg.raw)
                    if isinstance(msg, pg.Authentication):
                        if authenticated:
                            raise _Refused(f"the database {where} asked to authenticate twice", "08P01")
                        if msg.code == pg.AUTH_OK:
                            authenticated = True
                            out.append(pg.authentication_ok())
                        else:
                            scram = self.answer_auth(msg, db_user, scram)
                        continue
                    if isinstance(msg, pg.BackendKeyData):
                        self.backend_key = (msg.pid, msg.secret)
                        _BACKENDS[(host, port, msg.pid)] = _Backend(s.id, s.identity.user, s.database.name)
                    out.append(msg.raw)
                    if isinstance(msg, pg.ReadyForQuery):
                        if not authenticated:
                            raise _Refused(f"the database {where} is ready before authenticating", "08P01")
                        # Anything after it is the relay's (its framer must see every byte).
                        self.early = b"".join(m.raw for m in msgs[i + 1 :]) + bytes(backend._buf)
                        return b"".join(out)
        except ProtocolError as exc:
            raise _Refused(f"the login to the database {where} failed: {exc}", "08006") from None
        except OSError as exc:
            raise _Refused(
                f"the login to the database {where} failed: {exc or type(exc).__name__}", "08006"
            ) from None

    def answer_auth(
        self, msg: pg.Authentication, db_user: str, scram: pg.ScramSha256Client | None
    ) -> pg.ScramSha256Client | None:
        """Answer one authentication request of the database (written, not yet drained)."""
        w = self.up_writer
        name = self.session.database.name
        if msg.code in (pg.AUTH_SASL_CONTINUE, pg.AUTH_SASL_FINAL):
            if scram is None:
                raise _Refused(f"the database {name} continued a SASL exchange it never began", "08P01")
            if msg.code == pg.AUTH_SASL_CONTINUE:
                w.write(pg.sasl_response(scram.client_final(msg.data)))
            else:
                scram.verify_server_final(msg.data)
            return scram
        if msg.code not in (pg.AUTH_CLEARTEXT, pg.AUTH_MD5, pg.AUTH_SASL):
            method = {pg.AUTH_KERBEROS_V5: "Kerberos V5", pg.AUTH_GSS: "GSSAPI", pg.AUTH_SSPI: "SSPI"}
            raise _Refused(
                f"the database {name} asks for {method.get(msg.code, f'authentication method {msg.code}')}, "
                "which Wardgate does not support: use cert (the db CA), scram-sha-256, md5 or password "
                "in pg_hba.conf",
                "28000",
            )
        try:
            password = self.session.password(db_user)
        except WardgateError as exc:
            raise _Refused(str(exc), "28000") from None
        if password is None:
            raise _Refused(
                f'database {name} asks for a password for db user "{db_user}": configure one for that user '
                "in the database's auth.passwords (db_service databases, or the db resource), or have "
                "the database trust the db CA (cert auth, `wardctl auth sign --format=db`)",
                "28000",
            )
        if msg.code == pg.AUTH_CLEARTEXT:
            w.write(pg.password_message(password.encode()))
        elif msg.code == pg.AUTH_MD5:
            w.write(pg.password_message(pg.md5_password(db_user, password, msg.salt)))
        else:
            if pg.SCRAM_SHA_256 not in msg.mechanisms:
                raise _Refused(
                    f"the database {name} offers SASL mechanisms {', '.join(msg.mechanisms)}; "
                    f"Wardgate speaks {pg.SCRAM_SHA_256} only",
                    "28000",
                )
            scram = pg.ScramSha256Client(db_user, password)
            w.write(pg.sasl_initial_response(pg.SCRAM_SHA_256, scram.client_first()))
        return scram

    # ------------------------------------------------------------------ relay

    async def relay(self) -> None:
        if isinstance(self.writer, asyncio.StreamWriter) and isinstance(self.up_writer, asyncio.StreamWriter):
            await self.relay_transports()
        else:  # e.g. an SSH channel of the agent's reverse tunnel
            await self.relay_streams()

    # -- the relay on transports: callbacks, no tasks or futures per read

    async def relay_transports(self) -> None:
        """Take both transports from their streams and relay in protocol callbacks.

        Per round trip this saves each direction a future, a task wake-up and a drain; flow
        control is the transports' own (a full write buffer pauses reading the other side).
        """
        loop = asyncio.get_running_loop()
        self.done = loop.create_future()
        self.ct = ct = self.writer.transport
        self.ut = ut = self.up_writer.transport
        c_data, c_eof = _take_buffer(self.reader)
        u_data, u_eof = _take_buffer(self.up_reader)
        ct.set_protocol(_Leg(self.on_client_bytes, self.on_client_end, ut))
        ut.set_protocol(_Leg(self.on_server_bytes, self.on_server_end, ct))
        try:
            if self.early or u_data:
                self.on_server_bytes(self.early + u_data)
            if self.pending or c_data:
                self.on_client_bytes(self.pending + c_data)
            if u_eof:
                self.on_server_end(None)
            if c_eof:
                self.on_client_end(None)
            for t in (ct, ut):
                with contextlib.suppress(Exception):
                    t.resume_reading()
            await self.done
        finally:
            for task in list(self.helpers):
                task.cancel()
            if self.grace is not None:
                self.grace.cancel()

    def end(self) -> None:
        if not self.done.done():
            self.done.set_result(None)

    def spawn(self, coro: Any) -> None:
        """Run `coro` (which ends the relay when it is done) from a protocol callback."""
        task = asyncio.ensure_future(coro)
        self.helpers.add(task)

        def finished(t: asyncio.Task[Any]) -> None:
            self.helpers.discard(t)
            if not t.cancelled() and t.exception() is not None:
                log.error("postgres session %s relay failed", self.session.id, exc_info=t.exception())
            self.end()

        task.add_done_callback(finished)

    def on_client_bytes(self, data: bytes) -> None:
        if self.terminated or self.done.done():
            return
        try:
            msgs = self.frontend.feed(data)
        except ProtocolError as exc:
            self.ct.pause_reading()
            self.spawn(self.client_protocol_error(exc))
            return
        try:
            if msgs:
                self.audit(msgs)
            self.bytes_in += len(data)
            self.ut.write(data)
            if self.terminated:  # the database answers what came before, then closes
                self.ct.pause_reading()
                self.grace = asyncio.get_running_loop().call_later(TERMINATE_GRACE, self.end)
        except Exception:
            log.exception("postgres session %s relay failed", self.session.id)
            self.end()

    def on_client_end(self, exc: Exception | None) -> None:
        if not self.terminated and not self.done.done() and not self.helpers:
            self.spawn(self.client_gone())

    def on_server_bytes(self, data: bytes) -> None:
        if self.done.done():
            return
        try:
            self.framer.feed(data)
        except ProtocolError as exc:
            log.warning("postgres session %s: %s", self.session.id, exc)
            self.session.emit("db.session.error", success=False, error=f"from the database: {exc}")
            self.ct.write(data)
            self.end()
            return
        except Exception:
            log.exception("postgres session %s relay failed", self.session.id)
            self.end()
            return
        self.bytes_out += len(data)
        self.ct.write(data)

    def on_server_end(self, exc: Exception | None) -> None:
        if self.done.done() or self.helpers:
            return
        if self.terminated:
            self.end()
        else:
            self.spawn(self.database_gone())

    # -- the relay on streams

    async def relay_streams(self) -> None:
        tasks = [
            asyncio.ensure_future(self.client_to_server()),
            asyncio.ensure_future(self.server_to_client()),
        ]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            if self.terminated and tasks[1] not in done:
                # The client said goodbye: the database answers what came before, then closes.
                more, _ = await asyncio.wait(tasks[1:], timeout=TERMINATE_GRACE)
                done |= more
            for t in done:
                exc = t.exception()
                if exc is not None and not isinstance(exc, OSError | asyncio.IncompleteReadError):
                    log.error("postgres session %s relay failed", self.session.id, exc_info=exc)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def fatal(self, message: str, code: str) -> None:
        """A FATAL error of our own for the client, if its stream is between two messages."""
        if self.framer.at_boundary:
            await self.send_client(pg.error_response(message, code=code))

    async def client_to_server(self) -> None:
        up = self.up_writer
        frontend = self.frontend
        read = self.reader.read
        audit = self.audit
        data, self.pending = self.pending, b""
        while not self.terminated:
            if not data:
                data = await read(READ_CHUNK)
            if not data:
                await self.client_gone()
                return
            try:
                msgs = frontend.feed(data)
            except ProtocolError as exc:
                await self.client_protocol_error(exc)
                return
            if msgs:
                audit(msgs)
            self.bytes_in += len(data)
            up.write(data)
            data = b""
            await up.drain()
        with contextlib.suppress(Exception):  # Terminate: the database closes its end
            await up.drain()
            up.write_eof()

    async def client_protocol_error(self, exc: ProtocolError) -> None:
        msg = f"invalid message from the client: {exc}"
        log.info("postgres session %s: %s", self.session.id, msg)
        self.session.emit("db.session.error", success=False, error=msg)
        await self.fatal(msg, "54000" if exc.kind == "oversized" else "08P01")

    def audit(self, msgs: list[pg.FrontendMessage]) -> None:
        s = self.session
        tracker = self.tracker
        for m in msgs:
            t = type(m)
            if t is pg.Query:
                tracker.client(m)
                self.waiting += 1
                s.emit("db.session.query", query=m.sql)  # type: ignore[union-attr]
            elif t is pg.Execute:
                aq = tracker.client(m)
                assert aq is not None
                portal = aq.portal
                if portal in self.executed:
                    continue  # fetching more rows of a suspended portal
                self.executed.add(portal)
                extra: dict[str, Any] = {}
                if aq.statement:
                    extra["statement"] = aq.statement
                if not aq.certain:
                    extra["uncertain"] = True
                s.emit("db.session.query", query=aq.query or "", parameters=list(aq.params), **extra)
            elif t is pg.Bind:
                tracker.client(m)
                self.executed.discard(m.portal)  # type: ignore[union-attr]
            elif t in _EXTENDED:
                tracker.client(m)
                if t is pg.Sync:
                    self.waiting += 1
            elif t is pg.FunctionCall:
                tracker.client(m)
                self.waiting += 1
                f: pg.FunctionCall = m  # type: ignore[assignment]
                params = pg.describe_params(f.args, f.arg_formats)
                s.emit("db.session.function", function_oid=f.oid, parameters=params)
            elif t is pg.Terminate:
                self.terminated = True

    async def client_gone(self) -> None:
        """The client closed without Terminate: stop what it left running, and say goodbye."""
        if self.waiting and self.backend_key is not None:
            pid, secret = self.backend_key
            log.info("postgres session %s: client left mid-query; cancelling it", self.session.id)
            await self.cancel(pg.CancelRequest(pid, secret, pg.cancel_request(pid, secret)))
        if not self.frontend.in_message:
            with contextlib.suppress(Exception):
                self.up_writer.write(pg.terminate())
                await self.up_writer.drain()

    def on_server_message(self, t: int, body: bytes) -> None:
        if t == _READY:
            status = _ZERO_STATUS.get(body[0]) if len(body) == 1 else None
            if status is None:
                raise ProtocolError(f"malformed ReadyForQuery message: status {body!r} is not I, T or E")
            if self.waiting:
                self.waiting -= 1
            if body == b"I":
                self.executed.clear()
            self.tracker.server(status)
        elif t == _ERROR:
            self.server_fatal = b"SFATAL\0" in body or b"SPANIC\0" in body
        else:
            self.tracker.server(pg.BackendMessage(_TRACKED_TYPES[t], body, b""))

    async def server_to_client(self) -> None:
        read = self.up_reader.read
        write = self.writer.write
        drain = self.writer.drain
        feed = self.framer.feed
        early, self.early = self.early, b""
        while True:
            try:
                data = early or await read(READ_CHUNK)
                early = b""
            except (OSError, ssl.SSLError) as exc:
                log.info("postgres session %s: database connection failed: %s", self.session.id, exc)
                data = b""
            if not data:
                if not self.terminated:
                    await self.database_gone()
                return
            try:
                feed(data)
            except ProtocolError as exc:
                # Not PostgreSQL any more: pass on what came, then end.
                log.warning("postgres session %s: %s", self.session.id, exc)
                self.session.emit("db.session.error", success=False, error=f"from the database: {exc}")
                write(data)
                return
            self.bytes_out += len(data)
            write(data)
            await drain()

    async def database_gone(self) -> None:
        name = self.session.database.name
        log.info("postgres session %s: the database %s closed the connection", self.session.id, name)
        if not self.server_fatal:
            await self.fatal(f"the database {name} closed the connection", "08006")
