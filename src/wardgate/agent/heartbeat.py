"""Heartbeats: agents renew what they registered before it expires, forever, surviving failures."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)


async def repeat(period: float, beat: Callable[[], Awaitable[object]], what: str) -> None:
    """Call `beat` every `period` seconds; a failure is logged and retried at the next beat."""
    while True:
        await asyncio.sleep(period)
        try:
            await beat()
        except Exception as exc:
            log.warning("%s failed: %s", what, exc)
