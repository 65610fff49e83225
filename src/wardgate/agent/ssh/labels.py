"""Command labels: run each configured command every `period` and publish its output as a label.

Results land in the node resource's `spec.cmd_labels` (the heartbeat publishes it, and RBAC on
this node reads it through `Node.all_labels()`). A command that fails or times out gives an
empty value, never an error text a role could accidentally match.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Protocol

from wardgate.api.resources import CommandLabel, Node

__all__ = ["CommandLabels"]

log = logging.getLogger(__name__)

MAX_OUTPUT = 4096
"""Label values are short; longer output is cut (at a character boundary)."""


class _CommandSpec(Protocol):
    name: str
    command: list[str]
    period: timedelta


class CommandLabels:
    """Owns one task per command; `start()` runs each once right away, then periodically."""

    def __init__(
        self,
        node: Node,
        commands: Sequence[_CommandSpec],
        *,
        on_change: Callable[[Node], None] | None = None,
    ) -> None:
        self.node = node
        self.commands = list(commands)
        self.on_change = on_change
        self._tasks: list[asyncio.Task[None]] = []
        self._first_round: asyncio.Event = asyncio.Event()
        self._done_first: set[str] = set()
        labels = dict(node.spec.cmd_labels)
        for c in self.commands:
            labels.setdefault(c.name, CommandLabel(name=c.name, command=list(c.command), period=c.period))
        node.spec.cmd_labels = labels

    async def start(self) -> None:
        """Start the loops and wait (up to a few seconds) for the first results, so the node
        does not advertise empty labels to RBAC for a whole period after start."""
        if self._tasks or not self.commands:
            self._first_round.set()
            return
        self._tasks = [asyncio.create_task(self._loop(c), name=f"cmd-label-{c.name}") for c in self.commands]
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._first_round.wait(), timeout=5)

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self._tasks = []

    async def run_once(self, spec: _CommandSpec) -> str:
        """Run one command and store its result; returns the value."""
        timeout = max(1.0, min(spec.period.total_seconds(), 30.0))
        value = await _run(spec.command, timeout)
        self._store(spec, value)
        return value

    def _store(self, spec: _CommandSpec, value: str) -> None:
        labels = dict(self.node.spec.cmd_labels)
        old = labels.get(spec.name)
        if old is not None and old.result == value:
            return
        labels[spec.name] = CommandLabel(
            name=spec.name, command=list(spec.command), period=spec.period, result=value
        )
        self.node.spec.cmd_labels = labels
        if self.on_change is not None:
            self.on_change(self.node)

    async def _loop(self, spec: _CommandSpec) -> None:
        period = max(1.0, spec.period.total_seconds())
        while True:
            try:
                await self.run_once(spec)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("command label %s failed", spec.name)
            self._done_first.add(spec.name)
            if len(self._done_first) >= len(self.commands):
                self._first_round.set()
            await asyncio.sleep(period)


async def _run(argv: Sequence[str], limit: float) -> str:
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
            start_new_session=True,
        )
    except OSError as e:
        log.warning("command label %s cannot run: %s", list(argv), e)
        return ""
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), limit)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        log.warning("command label %s timed out after %.0fs", list(argv), limit)
        return ""
    if proc.returncode != 0:
        log.warning("command label %s exited with status %s", list(argv), proc.returncode)
        return ""
    return out.decode("utf-8", "replace").strip()[:MAX_OUTPUT]
