"""Browser sessions for apps: what lets a click in the web UI land the user in an app, signed in.

The auth service hands the web UI a one-time token (valid 60 s); the app service, on the app's own
host name, exchanges it for a long random secret that becomes the app's session cookie. Both are
stored under a hash of themselves, like web sessions, so a copy of the backend opens no session:

  /app_session_tokens/<sha256(token)>   pending, until exchanged (once) or 60 s pass
  /app_sessions/<sha256(secret)>        live, until the web session it came from ends

Each record names the web session (by the digest of its id) so signing out ends its app sessions.
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

from wardgate.auth.storage import ResourceStore
from wardgate.auth.websessions import digest
from wardgate.errors import AuthenticationError, BadParameterError, CompareFailedError, NotFoundError

PENDING_PREFIX = "/app_session_tokens/"
SESSION_PREFIX = "/app_sessions/"
TOKEN_TTL = timedelta(seconds=60)
MAX_SECRET_LENGTH = 128

SPENT_MESSAGE = "this app sign-in link has already been used or has expired: open the app again"
SESSION_GONE = "app session not found: it has ended or expired"


def _key(prefix: str, secret: str, what: str) -> str:
    if not secret or len(secret) > MAX_SECRET_LENGTH:
        raise BadParameterError(f"malformed {what}")
    return prefix + digest(secret)


@dataclass(frozen=True)
class AppSessionRecord:
    """One user's session with one app; `cert` is their certificate routed to it (no key: the app
    service only presents it as proof of identity, e.g. to have a JWT signed)."""

    session_id: str
    """Public id (audit `sid`); never the cookie."""
    user: str
    app: str
    public_addr: str
    cert: str
    expires: datetime
    web_session: str
    """sha256 hex of the id of the web session it came from."""

    def to_json(self) -> dict[str, Any]:
        return {
            "session_id": self.session_id,
            "user": self.user,
            "app": self.app,
            "public_addr": self.public_addr,
            "cert": self.cert,
            "expires": self.expires.isoformat(),
            "web_session": self.web_session,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> AppSessionRecord:
        return cls(
            session_id=d["session_id"],
            user=d["user"],
            app=d["app"],
            public_addr=d.get("public_addr", ""),
            cert=d["cert"],
            expires=datetime.fromisoformat(d["expires"]),
            web_session=d.get("web_session", ""),
        )

    def public_json(self) -> dict[str, Any]:
        """What the app service gets: everything but the web session link."""
        out = self.to_json()
        del out["web_session"]
        return out


class AppSessionStore:
    def __init__(self, store: ResourceStore) -> None:
        self.store = store

    async def create_token(self, rec: AppSessionRecord, *, now: datetime) -> str:
        """A one-time token for `rec`, valid `TOKEN_TTL` (or less, if the session ends sooner)."""
        token = secrets.token_urlsafe(32)
        ends = min(now + TOKEN_TTL, rec.expires)
        data = dict(rec.to_json(), token_expires=ends.isoformat())
        await self.store.put_record(_key(PENDING_PREFIX, token, "token"), data, expires=ends.timestamp())
        return token

    async def exchange(
        self,
        token: str,
        *,
        now: datetime,
        authorize: Callable[[AppSessionRecord], None] | None = None,
    ) -> tuple[str, AppSessionRecord]:
        """Spend the token (once: whoever deletes the pending record wins) for a new session secret.

        `authorize` may refuse the caller before the token is spent."""
        key = _key(PENDING_PREFIX, token, "token")
        found = await self.store.get_record(key)
        if found is None:
            raise AuthenticationError(SPENT_MESSAGE)
        data = found[0]
        rec = AppSessionRecord.from_json(data)
        if authorize is not None:
            authorize(rec)
        if not await self.store.delete_record(key):
            raise AuthenticationError(SPENT_MESSAGE)  # spent by a concurrent exchange
        token_expires = datetime.fromisoformat(data.get("token_expires") or data["expires"])
        if token_expires <= now or rec.expires <= now:  # the backend may not have reaped it yet
            raise AuthenticationError(SPENT_MESSAGE)
        secret = secrets.token_urlsafe(32)
        await self.store.put_record(
            _key(SESSION_PREFIX, secret, "app session"), rec.to_json(), expires=rec.expires.timestamp()
        )
        return secret, rec

    async def get(self, secret: str, *, now: datetime) -> AppSessionRecord:
        key = _key(SESSION_PREFIX, secret, "app session")
        found = await self.store.get_record(key)
        if found is None:
            raise NotFoundError(SESSION_GONE)
        rec = AppSessionRecord.from_json(found[0])
        if rec.expires <= now:
            await self.store.delete_record(key)
            raise NotFoundError(SESSION_GONE)
        return rec

    async def delete(self, secret: str) -> bool:
        return await self.store.delete_record(_key(SESSION_PREFIX, secret, "app session"))

    async def _delete_where(self, match: Callable[[dict[str, Any]], bool]) -> int:
        n = 0
        for prefix in (PENDING_PREFIX, SESSION_PREFIX):
            for key, data in await self.store.list_records(prefix):
                if match(data):
                    n += await self.store.delete_record(key)
        return n

    async def delete_for_web_session(self, web_session_digest: str) -> int:
        """End every app session (and pending token) made from one web session (sign-out)."""
        if not web_session_digest:
            return 0
        return await self._delete_where(lambda d: d.get("web_session") == web_session_digest)

    async def delete_user(self, user: str) -> int:
        """End every app session of a user (deleted or reset by an admin)."""
        return await self._delete_where(lambda d: d.get("user") == user)

    async def move_web_session(self, old_digest: str, new_digest: str) -> int:
        """Re-link app sessions to the web session that replaced theirs (renewal keeps the absolute
        expiry), so signing out of the renewed one still ends them."""
        n = 0
        for prefix in (PENDING_PREFIX, SESSION_PREFIX):
            for key, data in await self.store.list_records(prefix):
                if data.get("web_session") != old_digest:
                    continue
                found = await self.store.get_record(key)
                if found is None:
                    continue
                rec = AppSessionRecord.from_json(found[0])
                moved = dict(found[0], **replace(rec, web_session=new_digest).to_json())
                ends = datetime.fromisoformat(moved.get("token_expires") or moved["expires"])
                with contextlib.suppress(CompareFailedError, NotFoundError):  # ended meanwhile
                    await self.store.put_record(key, moved, expires=ends.timestamp(), revision=found[1])
                    n += 1
        return n
