"""An audit emitter for services outside the auth process: events go to the auth API in batches.

Events are queued and shipped in order; when the auth service is unreachable they wait (up to a
bound) and are retried, so a short outage loses nothing and never blocks a session.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from wardgate.api.client import AuthClient
from wardgate.audit.events import make_event

log = logging.getLogger(__name__)
MAX_QUEUED = 50_000
BATCH = 500


class RemoteEmitter:
    def __init__(self, client: AuthClient) -> None:
        self.client = client
        self._queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(MAX_QUEUED)
        self._task: asyncio.Task[None] | None = None
        self.dropped = 0

    async def emit(
        self, event: str, *, user: str = "", success: bool = True, sid: str = "", **fields: Any
    ) -> dict:
        return self.emit_nowait(event, user=user, success=success, sid=sid, **fields)

    def emit_nowait(
        self, event: str, *, user: str = "", success: bool = True, sid: str = "", **fields: Any
    ) -> dict:
        """For callbacks that cannot await; needs a running loop."""
        ev = make_event(event, user=user, success=success, sid=sid, **fields)
        try:
            self._queue.put_nowait(ev)
        except asyncio.QueueFull:
            self.dropped += 1
            log.error("audit queue full: dropped %s event (%d dropped so far)", event, self.dropped)
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._ship(), name="audit-shipper")
        return ev

    async def _ship(self) -> None:
        backoff = 0.5
        while True:
            batch = [await self._queue.get()]
            while len(batch) < BATCH and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            while True:
                try:
                    await self.client.emit_events(batch)
                    for _ in batch:
                        self._queue.task_done()
                    backoff = 0.5
                    break
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    log.warning(
                        "shipping %d audit events failed (%s); retrying in %.1fs", len(batch), exc, backoff
                    )
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 10.0)

    async def flush(self) -> None:
        """Wait until every queued event is shipped."""
        await self._queue.join()

    async def close(self) -> None:
        if self._task is not None and not self._task.done():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.flush(), 10.0)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
