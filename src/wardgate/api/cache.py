"""A watched in-memory copy of resources so the connection path never waits on the backend.

Every service keeps one. It is fed by a stream of ResourceEvents (from the local backend in the
auth process, or from the auth API's watch stream elsewhere): a snapshot of puts, an INIT marker,
then live changes. If the stream breaks, `run()` re-subscribes with back-off and replaces the
state with the new snapshot, so a missed delete cannot linger.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import AbstractAsyncContextManager
from typing import TypeVar

from cryptography import x509

from wardgate.api.events import ResourceEvent, ResourceEventType
from wardgate.api.resources import CertAuthority, Resource
from wardgate.errors import AuthenticationError
from wardgate.keys import load_x509_pem_list

log = logging.getLogger(__name__)
R = TypeVar("R", bound=Resource)

EventSource = Callable[[], AbstractAsyncContextManager[AsyncIterator[ResourceEvent]]]


class ResourceCache:
    def __init__(self, kinds: Iterable[str]) -> None:
        self.kinds = frozenset(kinds)
        self._items: dict[str, dict[str, Resource]] = {k: {} for k in self.kinds}
        self._pending: dict[str, dict[str, Resource]] | None = None
        self.ready = asyncio.Event()
        self._listeners: list[Callable[[ResourceEvent], None]] = []
        self._parsed_cas: dict[str, tuple[Resource, list[x509.Certificate]]] = {}

    # ---- reads (synchronous: no awaiting on the hot path)

    def ca_certs(self, ca_type: str, *, required: bool = False) -> list[x509.Certificate]:
        """The X.509 certificates a CA's keys (active and additionally trusted) verify with;
        `required` raises instead of answering none (so nothing is trusted by accident)."""
        ca = self.get("cert_authority", ca_type)
        if not isinstance(ca, CertAuthority):
            if required:
                raise AuthenticationError(f"the {ca_type} CA is not loaded yet: retry in a moment")
            return []
        # Every new connection asks: parse each version of the CA once (a change replaces the object).
        parsed = self._parsed_cas.get(ca_type)
        if parsed is None or parsed[0] is not ca:
            keys = (*ca.spec.active_keys, *ca.spec.additional_trusted_keys)
            parsed = (ca, load_x509_pem_list("".join(k.tls_cert_pem for k in keys)))
            self._parsed_cas[ca_type] = parsed
        return list(parsed[1])

    def ca_ssh_keys(self, ca_type: str) -> list[str]:
        """The SSH public keys (authorized_keys lines) of a CA, active and additionally trusted."""
        ca = self.get("cert_authority", ca_type)
        if not isinstance(ca, CertAuthority):
            return []
        keys = (*ca.spec.active_keys, *ca.spec.additional_trusted_keys)
        return [k.ssh_public_key for k in keys if k.ssh_public_key]

    def get(self, kind: str, name: str) -> Resource | None:
        return self._items.get(kind, {}).get(name)

    def list(self, kind: str) -> list[Resource]:
        return list(self._items.get(kind, {}).values())

    def as_dict(self, kind: str) -> dict[str, Resource]:
        """The live mapping for a kind; callers must not mutate it."""
        return self._items.get(kind, {})

    def subscribe(self, fn: Callable[[ResourceEvent], None]) -> Callable[[], None]:
        """Call fn on every applied change (e.g. to cut sessions when a lock appears)."""
        self._listeners.append(fn)
        return lambda: self._listeners.remove(fn)

    # ---- feeding

    def apply(self, ev: ResourceEvent) -> None:
        if ev.type is ResourceEventType.INIT:
            if self._pending is not None:
                self._items = {k: self._pending.get(k, {}) for k in self.kinds}
                self._pending = None
            self.ready.set()
            self._notify(ev)
            return
        if ev.kind not in self.kinds:
            return
        target = self._pending if self._pending is not None else self._items
        bucket = target.setdefault(ev.kind, {})
        if ev.type is ResourceEventType.PUT and ev.resource is not None:
            old = bucket.get(ev.name)
            if old is not None and (old.metadata.revision or 0) > ev.revision:
                return
            bucket[ev.name] = ev.resource
        elif ev.type is ResourceEventType.DELETE:
            old = bucket.get(ev.name)
            if old is not None and (old.metadata.revision or 0) > ev.revision:
                return
            bucket.pop(ev.name, None)
        if self._pending is None:
            self._notify(ev)

    def _notify(self, ev: ResourceEvent) -> None:
        for fn in list(self._listeners):
            try:
                fn(ev)
            except Exception:
                log.exception("cache listener failed")

    async def run(self, source: EventSource, *, max_backoff: float = 10.0) -> None:
        """Consume `source` forever, re-subscribing with jittered back-off when it fails."""
        backoff = 0.2
        while True:
            try:
                self._pending = {k: {} for k in self.kinds}
                async with source() as events:
                    async for ev in events:
                        self.apply(ev)
                        if ev.type is ResourceEventType.INIT:
                            backoff = 0.2
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("resource watch broke (%s); retrying in %.1fs", exc, backoff)
            await asyncio.sleep(backoff * (0.5 + random.random()))  # noqa: S311 - jitter, not crypto
            backoff = min(backoff * 2, max_backoff)
