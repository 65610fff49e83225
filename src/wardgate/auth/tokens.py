"""Join tokens: how a service proves it may join the cluster as node/app/db/… .

A dynamic token is random, shown once, and stored only as its sha256; the resource's name is
the first 16 hex digits of that hash, so `wardctl tokens ls/rm` can refer to it without the
secret. Static tokens come from config (`auth_service.tokens: ["node,app:SECRET"]`).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from wardgate.api.resources import SYSTEM_ROLES, Token, TokenSpec
from wardgate.audit.events import Emitter
from wardgate.auth.storage import ResourceStore
from wardgate.errors import AccessDeniedError, BadParameterError, NotFoundError

JOINABLE_ROLES = ("node", "proxy", "app", "db", "kube", "desktop")


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def token_id(token: str) -> str:
    return token_hash(token)[:16]


def parse_roles(text: str | Sequence[str]) -> list[str]:
    """`node,app` -> ["node", "app"], refusing roles a token cannot carry."""
    items = text.split(",") if isinstance(text, str) else list(text)
    roles = [r.strip() for r in items if r.strip()]
    bad = [r for r in roles if r not in JOINABLE_ROLES]
    if bad or not roles:
        raise BadParameterError(
            f"invalid token type {','.join(bad) or '(empty)'}: use one or more of {','.join(JOINABLE_ROLES)}"
        )
    return roles


def parse_static_token(spec: str) -> tuple[list[str], str]:
    """`node,app:SECRET` from config."""
    roles, sep, secret = spec.partition(":")
    if not sep or len(secret) < 16:
        raise BadParameterError(
            "static token must look like 'node,app:SECRET' with a secret of at least 16 characters"
        )
    return parse_roles(roles), secret


@dataclass
class StaticToken:
    roles: list[str]
    secret_hash: str


class TokenManager:
    def __init__(
        self,
        store: ResourceStore,
        audit: Emitter,
        *,
        static: Sequence[str] = (),
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.audit = audit
        self.clock = clock
        self.static = [StaticToken(r, token_hash(s)) for r, s in map(parse_static_token, static)]

    async def create(self, roles: Sequence[str], ttl: timedelta, *, by: str) -> tuple[str, Token]:
        roles = parse_roles(roles)
        if ttl <= timedelta(0) or ttl > timedelta(days=30):
            raise BadParameterError("token TTL must be between 1s and 30 days")
        secret = secrets.token_hex(16)
        expires = datetime.fromtimestamp(self.clock(), UTC) + ttl
        tok = Token.new(
            token_id(secret), TokenSpec(roles=roles, token_hash=token_hash(secret)), expires=expires
        )
        tok = await self.store.create(tok)
        await self.audit.emit(
            "token.create", user=by, name=tok.name, roles=roles, expires=expires.isoformat()
        )
        return secret, tok

    async def list(self) -> list[Token]:
        return [t.without_secrets() for t in await self.store.list("token")]  # type: ignore[misc]

    async def delete(self, name: str, *, by: str) -> None:
        await self.store.delete("token", name)
        await self.audit.emit("token.delete", user=by, name=name)

    async def validate(self, secret: str, role: str, *, host: str = "", remote_addr: str = "") -> list[str]:
        """Return the token's roles if it is valid for `role`; audit and refuse otherwise."""
        if role not in SYSTEM_ROLES:
            raise BadParameterError(f"unknown system role {role!r}")
        digest = token_hash(secret)
        roles: list[str] | None = None
        for st in self.static:
            if hmac.compare_digest(st.secret_hash, digest):
                roles = st.roles
        if roles is None:
            try:
                tok = await self.store.get("token", digest[:16])
            except NotFoundError:
                tok = None
            if isinstance(tok, Token) and hmac.compare_digest(tok.spec.token_hash, digest):
                roles = list(tok.spec.roles)
        if roles is None:
            await self._refuse(host, role, remote_addr, "invalid or expired token")
            raise AccessDeniedError(
                "the join token is not valid or has expired: create one with `wardctl tokens add`"
            )
        if role not in roles:
            await self._refuse(host, role, remote_addr, f"token does not allow role {role}")
            raise AccessDeniedError(f"the join token allows {','.join(roles)}, not {role}")
        return roles

    async def _refuse(self, host: str, role: str, remote_addr: str, why: str) -> None:
        await self.audit.emit("join", success=False, host=host, role=role, remote_addr=remote_addr, error=why)
