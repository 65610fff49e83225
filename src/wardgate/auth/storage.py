"""Typed storage of resources and auth secrets over any Backend.

Key layout (one place, so every caller agrees):
  /resources/<kind>/<name>              a resource as compact JSON
  /secrets/users/<user>/password        argon2id hash
  /secrets/users/<user>/mfa/<device>    MFA device (TOTP seed, WebAuthn credential)
  /state/users/<user>/login             failed-attempt counters for lockout
  /invites/<sha256 of token>            pending invitation
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

from wardgate.api.events import ResourceEvent, ResourceEventType
from wardgate.api.resources import KINDS, Resource
from wardgate.backend.base import Backend, EventType, Item
from wardgate.errors import AlreadyExistsError, CompareFailedError, NotFoundError

R = TypeVar("R", bound=Resource)
RESOURCES = "/resources/"


def resource_key(kind: str, name: str) -> str:
    return f"{RESOURCES}{kind}/{name}"


def _decode(kind: str, item: Item) -> Resource:
    res = KINDS[kind].model_validate_json(item.value)
    res.metadata.revision = item.revision
    return res


def _encode(res: Resource) -> tuple[bytes, float | None]:
    data = res.model_dump_json(exclude={"metadata": {"revision"}}).encode()
    exp = res.metadata.expires.timestamp() if res.metadata.expires else None
    return data, exp


class ResourceStore:
    def __init__(self, backend: Backend) -> None:
        self.backend = backend

    async def get(self, kind: str, name: str) -> Resource:
        try:
            return _decode(kind, await self.backend.get(resource_key(kind, name)))
        except NotFoundError:
            raise NotFoundError(f'{kind} "{name}" not found') from None

    async def find(self, kind: str, name: str) -> Resource | None:
        try:
            return await self.get(kind, name)
        except NotFoundError:
            return None

    async def list(self, kind: str) -> list[Resource]:
        return [_decode(kind, it) for it in await self.backend.range(f"{RESOURCES}{kind}/")]

    async def create(self, res: R) -> R:
        data, exp = _encode(res)
        try:
            item = await self.backend.create(resource_key(res.kind, res.name), data, expires=exp)
        except AlreadyExistsError:
            raise AlreadyExistsError(
                f'{res.kind} "{res.name}" already exists (use --force to overwrite)'
            ) from None
        return _with_revision(res, item)

    async def put(self, res: R) -> R:
        """Create or overwrite; when metadata.revision is set, only if nobody changed it since."""
        data, exp = _encode(res)
        key = resource_key(res.kind, res.name)
        if res.metadata.revision:
            try:
                item = await self.backend.compare_and_swap(key, res.metadata.revision, data, expires=exp)
            except CompareFailedError:
                raise CompareFailedError(
                    f'{res.kind} "{res.name}" was changed by someone else; read it again and retry'
                ) from None
        else:
            item = await self.backend.put(key, data, expires=exp)
        return _with_revision(res, item)

    async def delete(self, kind: str, name: str) -> None:
        try:
            await self.backend.delete(resource_key(kind, name))
        except NotFoundError:
            raise NotFoundError(f'{kind} "{name}" not found') from None

    @asynccontextmanager
    async def watch(self, kinds: Iterable[str]) -> AsyncIterator[AsyncIterator[ResourceEvent]]:
        """Snapshot then live changes of the given kinds, as a cache wants them."""
        kinds = list(kinds)
        async with self.backend.watch([f"{RESOURCES}{k}/" for k in kinds]) as watcher:
            it = aiter(watcher)
            first = await anext(it)
            if first.type is not EventType.INIT:
                raise RuntimeError("backend watch did not start with INIT")

            async def events() -> AsyncIterator[ResourceEvent]:
                for kind in kinds:
                    for res in await self.list(kind):
                        yield ResourceEvent(
                            ResourceEventType.PUT, kind, res.name, res.metadata.revision or 0, res
                        )
                yield ResourceEvent(ResourceEventType.INIT)
                async for ev in it:
                    if ev.item is None:
                        continue
                    kind, _, name = ev.item.key[len(RESOURCES) :].partition("/")
                    if kind not in KINDS:
                        continue
                    if ev.type is EventType.PUT:
                        res = _decode(kind, ev.item)
                        yield ResourceEvent(ResourceEventType.PUT, kind, name, ev.item.revision, res)
                    elif ev.type is EventType.DELETE:
                        yield ResourceEvent(ResourceEventType.DELETE, kind, name, ev.item.revision)

            yield events()

    # ---- small JSON records (secrets and state), never shown to users

    async def get_record(self, key: str) -> tuple[dict[str, Any], int] | None:
        try:
            item = await self.backend.get(key)
        except NotFoundError:
            return None
        return json.loads(item.value), item.revision

    async def put_record(
        self, key: str, value: dict[str, Any], *, expires: float | None = None, revision: int = 0
    ) -> int:
        data = json.dumps(value, separators=(",", ":")).encode()
        if revision:
            item = await self.backend.compare_and_swap(key, revision, data, expires=expires)
        else:
            item = await self.backend.put(key, data, expires=expires)
        return item.revision

    async def list_records(self, prefix: str) -> list[tuple[str, dict[str, Any]]]:
        return [(it.key, json.loads(it.value)) for it in await self.backend.range(prefix)]

    async def delete_record(self, key: str) -> bool:
        try:
            await self.backend.delete(key)
        except NotFoundError:
            return False
        return True


def _with_revision(res: R, item: Item) -> R:
    out = res.model_copy(deep=True)
    out.metadata.revision = item.revision
    return out
