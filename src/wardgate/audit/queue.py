"""Audit events from code that must not wait (protocol callbacks, hot paths): queued in order and
written by one task, so events keep the order they happened in and a slow audit store never
stalls a session."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from wardgate.audit.events import Emitter

log = logging.getLogger(__name__)


class QueuedEmitter:
    def __init__(self, emitter: Emitter, *, name: str = "audit-writer") -> None:
        self.emitter = emitter
        self.name = name
        self._queue: asyncio.Queue[tuple[str, str, bool, str, dict[str, Any]]] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._write(), name=self.name)

    def emit_nowait(
        self, event: str, *, user: str = "", success: bool = True, sid: str = "", **fields: Any
    ) -> None:
        self._queue.put_nowait((event, user, success, sid, fields))

    async def _write(self) -> None:
        while True:
            event, user, success, sid, fields = await self._queue.get()
            try:
                await self.emitter.emit(event, user=user, success=success, sid=sid, **fields)
            except Exception:
                log.exception("could not write audit event %s", event)
            finally:
                self._queue.task_done()

    async def flush(self) -> None:
        """Wait until every queued event is written."""
        await self._queue.join()

    async def close(self, grace: float | None = None) -> None:
        """Write what is queued (for at most `grace` seconds), then stop."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._queue.join(), grace)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
