"""Browser sessions at the proxy: cookie + bearer checks, idle timeout, and an auth client per user.

The auth service keeps the session (so every proxy of a cluster knows it); this cache holds what
the proxy needs on each request without a round trip: the hash of the bearer token, the expiry,
when the browser was last active, and an auth API client that presents the user's own web-session
certificate, so every call the UI makes is authorised as that user.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncssh
from cryptography import x509

from wardgate.api.client import AuthClient
from wardgate.api.identityfile import IdentityFile
from wardgate.auth.certs import verify_tls_identity
from wardgate.auth.identity import Identity
from wardgate.auth.websessions import MAX_ID_LENGTH, token_matches
from wardgate.errors import AuthenticationError, WardgateError

log = logging.getLogger(__name__)

COOKIE = "__Host-wardgate_session"
DEFAULT_IDLE_TIMEOUT = timedelta(minutes=30)


@dataclass(eq=False)
class WebSession:
    id: str
    user: str
    token_hash: str
    identity: Identity
    expires: datetime
    ssh_key: asyncssh.SSHKey
    ssh_cert: asyncssh.SSHCertificate
    auth: AuthClient
    """The auth API as this user (their web-session certificate)."""
    last_active: float = field(default_factory=time.monotonic)

    def touch(self) -> None:
        self.last_active = time.monotonic()


class WebSessions:
    def __init__(
        self,
        auth: AuthClient,
        *,
        auth_addr: str,
        ca_pems: Callable[[], list[str]],
        user_cas: Callable[[], list[x509.Certificate]],
        idle_timeout: timedelta = DEFAULT_IDLE_TIMEOUT,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.auth = auth
        self.auth_addr = auth_addr
        self.ca_pems = ca_pems
        self.user_cas = user_cas
        self.idle_timeout = idle_timeout
        self.clock = clock
        self._sessions: dict[str, WebSession] = {}
        self._loading: dict[str, asyncio.Future[WebSession]] = {}

    def now(self) -> datetime:
        return datetime.fromtimestamp(self.clock(), UTC)

    def _build(self, data: dict[str, Any]) -> WebSession:
        cert = x509.load_pem_x509_certificate(data["tls_cert"].encode())
        ident = verify_tls_identity(cert, self.user_cas())
        identity_file = IdentityFile(
            key_pem=data["tls_key"], cert_pem=data["tls_cert"], ca_pems=self.ca_pems()
        )
        sess = WebSession(
            id=data["session_id"],
            user=data["user"],
            token_hash=data["token_hash"],
            identity=ident,
            expires=datetime.fromisoformat(data["expires"]),
            ssh_key=asyncssh.import_private_key(data["ssh_key"]),
            ssh_cert=asyncssh.import_certificate(data["ssh_cert"]),
            auth=AuthClient.from_identity(identity_file, self.auth_addr),
        )
        old = self._sessions.pop(sess.id, None)
        if old is not None:
            self._close_later(old)
        self._sessions[sess.id] = sess
        return sess

    # ---- created by signing in

    async def sign_in(self, **body: Any) -> tuple[WebSession, str]:
        data = await self.auth.create_web_session(**body)
        return self._build(data), data["token"]

    async def register(self, **body: Any) -> tuple[WebSession, str]:
        data = await self.auth.register_web_session(**body)
        return self._build(data), data["token"]

    async def renew(self, sess: WebSession) -> tuple[WebSession, str]:
        data = await self.auth.renew_web_session(sess.id)
        self._forget(sess)
        return self._build(data), data["token"]

    async def sign_out(self, sess: WebSession) -> None:
        self._forget(sess)
        await self.auth.delete_web_session(sess.id)

    # ---- checked on every request

    async def lookup(self, session_id: str) -> WebSession:
        """The session a cookie names (from memory, else from the auth service), if still live."""
        if not session_id or len(session_id) > MAX_ID_LENGTH:
            raise AuthenticationError("you are not signed in: sign in first")
        sess = self._sessions.get(session_id)
        if sess is None:
            pending = self._loading.get(session_id)
            if pending is None:
                pending = asyncio.get_running_loop().create_future()
                self._loading[session_id] = pending
                try:
                    sess = self._build(await self.auth.get_web_session(session_id))
                    pending.set_result(sess)
                except WardgateError as exc:
                    pending.set_exception(exc)
                    pending.exception()  # retrieved: others awaiting it get it raised
                    raise AuthenticationError("your web session has ended: sign in again") from None
                finally:
                    self._loading.pop(session_id, None)
            else:
                sess = await asyncio.shield(pending)
        if sess.expires <= self.now():
            self._forget(sess)
            raise AuthenticationError("your web session has expired: sign in again")
        if time.monotonic() - sess.last_active > self.idle_timeout.total_seconds():
            self._forget(sess)
            with contextlib.suppress(WardgateError):
                await self.auth.delete_web_session(sess.id)
            raise AuthenticationError("your web session was idle too long and has ended: sign in again")
        return sess

    async def authenticate(self, session_id: str, token: str) -> WebSession:
        """Cookie and bearer token together, or nothing (a cross-site request has only the cookie)."""
        sess = await self.lookup(session_id)
        if not token or not token_matches(token, sess.token_hash):
            raise AuthenticationError("missing or wrong bearer token: reload the page and sign in again")
        sess.touch()
        return sess

    def check_token(self, sess: WebSession, token: str) -> None:
        if not token or not token_matches(token, sess.token_hash):
            raise AuthenticationError("missing or wrong bearer token")
        sess.touch()

    # ---- housekeeping

    def _forget(self, sess: WebSession) -> None:
        if self._sessions.get(sess.id) is sess:
            del self._sessions[sess.id]
        self._close_later(sess)

    def _close_later(self, sess: WebSession) -> None:
        task = asyncio.get_running_loop().create_task(sess.auth.close())
        task.add_done_callback(lambda t: t.exception() if not t.cancelled() else None)

    def reap(self) -> None:
        """Drop expired and idle sessions from memory (the auth service's TTL drops the record)."""
        now, mono = self.now(), time.monotonic()
        for sess in list(self._sessions.values()):
            if sess.expires <= now or mono - sess.last_active > self.idle_timeout.total_seconds():
                self._forget(sess)

    async def close(self) -> None:
        for sess in list(self._sessions.values()):
            await sess.auth.close()
        self._sessions.clear()
