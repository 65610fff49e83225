"""Web sessions: what a browser sign-in leaves on the auth service.

A web session is a key pair the auth service makes and signs for the user (an SSH and an X.509
certificate), held for the browser by the proxy so it can call the auth API and nodes as that
user. The browser holds two secrets: the session id (an HttpOnly cookie) and a bearer token the
page sends on every call (CSRF defence). Records are keyed by a hash of the id and keep only a
hash of the token, so a copy of the backend opens no session.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from wardgate.auth.storage import ResourceStore
from wardgate.errors import AuthenticationError, BadParameterError

PREFIX = "/web/sessions/"
MAX_ID_LENGTH = 128


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def token_matches(token: str, token_hash: str) -> bool:
    """Constant-time check of a bearer token against the stored hash."""
    return hmac.compare_digest(digest(token).encode(), token_hash.encode())


def _key(session_id: str) -> str:
    if not session_id or len(session_id) > MAX_ID_LENGTH:
        raise BadParameterError("malformed web session id")
    return PREFIX + digest(session_id)


@dataclass
class WebSessionRecord:
    """What the proxy needs to act for the user; secrets included, so only proxies read it."""

    id: str
    user: str
    token_hash: str
    created: datetime
    expires: datetime
    ssh_key: str
    ssh_cert: str
    tls_key: str
    tls_cert: str
    login_method: str = "local"

    def to_json(self) -> dict[str, Any]:
        return {
            "session_id": self.id,
            "user": self.user,
            "token_hash": self.token_hash,
            "created": self.created.isoformat(),
            "expires": self.expires.isoformat(),
            "ssh_key": self.ssh_key,
            "ssh_cert": self.ssh_cert,
            "tls_key": self.tls_key,
            "tls_cert": self.tls_cert,
            "login_method": self.login_method,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> WebSessionRecord:
        return cls(
            id=d["session_id"],
            user=d["user"],
            token_hash=d["token_hash"],
            created=datetime.fromisoformat(d["created"]),
            expires=datetime.fromisoformat(d["expires"]),
            ssh_key=d["ssh_key"],
            ssh_cert=d["ssh_cert"],
            tls_key=d["tls_key"],
            tls_cert=d["tls_cert"],
            login_method=d.get("login_method", "local"),
        )


class WebSessionStore:
    def __init__(self, store: ResourceStore) -> None:
        self.store = store

    @staticmethod
    def new_secrets() -> tuple[str, str]:
        """A fresh (session id, bearer token) pair."""
        return secrets.token_urlsafe(32), secrets.token_urlsafe(32)

    async def put(self, rec: WebSessionRecord) -> None:
        data = rec.to_json()
        del data["session_id"]  # only its hash is kept (in the key)
        await self.store.put_record(_key(rec.id), data, expires=rec.expires.timestamp())

    async def get(self, session_id: str, *, now: datetime) -> WebSessionRecord:
        rec = await self.store.get_record(_key(session_id))
        if rec is None:
            raise AuthenticationError("your web session has ended: sign in again")
        data = dict(rec[0], session_id=session_id)
        out = WebSessionRecord.from_json(data)
        if out.expires <= now:
            await self.delete(session_id)
            raise AuthenticationError("your web session has expired: sign in again")
        return out

    async def delete(self, session_id: str) -> bool:
        return await self.store.delete_record(_key(session_id))

    async def delete_user(self, user: str) -> int:
        """End every web session of a user (deleted, reset or locked out by an admin)."""
        n = 0
        for key, data in await self.store.list_records(PREFIX):
            if data.get("user") == user:
                n += await self.store.delete_record(key)
        return n
