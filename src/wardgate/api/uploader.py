"""Ships finished session recordings from a local directory to the auth service.

Used by SSH nodes and by the proxy (agentless sessions). A recording stays on disk until auth
has stored it, so an outage or a restart loses nothing; `poke()` uploads right away when a
session ends instead of waiting for the next round.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path

from wardgate.api.client import AuthClient
from wardgate.audit.recording import mark_uploaded, pending_uploads

log = logging.getLogger(__name__)


class RecordingUploader:
    def __init__(self, client: AuthClient, directory: Path, *, every: float = 5.0) -> None:
        self.client = client
        self.directory = directory
        self.every = every
        self._now = asyncio.Event()

    async def upload_pending(self) -> int:
        done = 0
        for rec in pending_uploads(self.directory):
            data = await asyncio.to_thread(rec.path.read_bytes)
            await self.client.upload_recording(rec.sid, data)
            mark_uploaded(rec.path)
            done += 1
        return done

    def poke(self) -> None:
        self._now.set()

    async def run(self) -> None:
        while True:
            try:
                await self.upload_pending()
            except Exception as exc:
                log.warning("uploading recordings from %s failed (kept on disk, will retry): %s",
                            self.directory, exc)  # fmt: skip
            self._now.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._now.wait(), self.every)
