"""Live sessions on this node and the fan-out that lets others watch or join them (`ward join`).

Each interactive session registers a `LiveSession`. Its output is broadcast to every joined
participant through a bounded per-participant queue: a participant that falls more than
`MAX_BACKLOG` bytes behind is dropped rather than slowing the session down. Peers may also
type into the session; observers only watch. Who may join (role `join_sessions`) is decided by
the caller before `join()`; this module only keeps the books.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Literal

__all__ = ["MAX_BACKLOG", "LiveSession", "Participant", "SessionEvent", "SessionRegistry"]

MAX_BACKLOG = 4 * 1024 * 1024
"""Bytes of output a participant may lag before it is disconnected."""

Mode = Literal["owner", "observer", "peer"]


@dataclass(frozen=True, slots=True)
class SessionEvent:
    """What a participant receives: `o` output bytes, `r` a resize (cols, rows), `end` the reason."""

    kind: Literal["o", "r", "end"]
    data: bytes = b""
    size: tuple[int, int] = (0, 0)
    reason: str = ""


class Participant:
    """One person attached to a live session; iterate it to receive events until it ends."""

    def __init__(self, session: LiveSession, user: str, mode: Mode) -> None:
        self.id = str(uuid.uuid4())
        self.session = session
        self.user = user
        self.mode: Mode = mode
        self.joined = time.time()
        self._queue: asyncio.Queue[SessionEvent] = asyncio.Queue()
        self._backlog = 0
        self.closed = False
        self.reason = ""

    def _deliver(self, ev: SessionEvent) -> None:
        if self.closed:
            return
        if ev.kind == "o":
            self._backlog += len(ev.data)
            if self._backlog > MAX_BACKLOG:
                self.session.leave(self, reason="too slow: fell too far behind the session's output")
                return
        self._queue.put_nowait(ev)

    def _end(self, reason: str) -> None:
        if not self.closed:
            self.closed = True
            self.reason = reason
            self._queue.put_nowait(SessionEvent("end", reason=reason))

    async def next_event(self) -> SessionEvent:
        """The next event; after the `end` event every call returns it again."""
        if self.closed and self._queue.empty():
            return SessionEvent("end", reason=self.reason)
        ev = await self._queue.get()
        if ev.kind == "o":
            self._backlog -= len(ev.data)
        return ev

    async def __aiter__(self) -> AsyncIterator[SessionEvent]:
        while True:
            ev = await self.next_event()
            if ev.kind == "end":
                return
            yield ev

    def write(self, data: bytes) -> None:
        """Type into the session: only peers (and the owner) may."""
        if self.mode == "observer":
            raise PermissionError("observers cannot type into the session; join as a peer")
        if self.closed:
            raise ConnectionError("no longer part of the session")
        self.session.write_input(data, self)

    def leave(self) -> None:
        self.session.leave(self, reason="left")


@dataclass(eq=False)
class LiveSession:
    """A session others can attach to; the node's SSH session drives it."""

    sid: str
    user: str
    login: str
    server_id: str
    interactive: bool = True
    started: datetime = field(default_factory=lambda: datetime.now(UTC))
    size: tuple[int, int] = (80, 24)
    input_sink: Callable[[bytes], None] | None = None
    """Where peers' keystrokes go (the PTY); None for sessions that take no input from others."""
    on_join: Callable[[Participant], None] | None = None
    on_leave: Callable[[Participant, str], None] | None = None
    participants: dict[str, Participant] = field(default_factory=dict)
    history: list[str] = field(default_factory=list)
    """Every user who took part, in order of first joining (for `session.end`)."""
    ended: bool = False

    def __post_init__(self) -> None:
        if self.user and self.user not in self.history:
            self.history.append(self.user)

    # ------------------------------------------------------------ fan-out (called by the node)

    def broadcast(self, data: bytes) -> None:
        """Hand output to every participant; cheap when nobody has joined."""
        if self.participants and data:
            ev = SessionEvent("o", data=bytes(data))
            for p in list(self.participants.values()):
                p._deliver(ev)

    def resized(self, cols: int, rows: int) -> None:
        self.size = (cols, rows)
        ev = SessionEvent("r", size=(cols, rows))
        for p in list(self.participants.values()):
            p._deliver(ev)

    def end(self, reason: str = "session ended") -> None:
        """The session is over: every participant receives `end`."""
        self.ended = True
        for p in list(self.participants.values()):
            self.leave(p, reason=reason)

    # ------------------------------------------------------------ participants

    def join(self, user: str, mode: Mode = "observer") -> Participant:
        """Attach someone; they receive output from now on (and the current size first)."""
        if self.ended:
            raise ConnectionError(f"session {self.sid} has ended")
        if mode == "peer" and self.input_sink is None:
            raise PermissionError(f"session {self.sid} takes no input from others; join as an observer")
        p = Participant(self, user, mode)
        self.participants[p.id] = p
        if user not in self.history:
            self.history.append(user)
        p._deliver(SessionEvent("r", size=self.size))
        if self.on_join is not None:
            self.on_join(p)
        return p

    def leave(self, p: Participant, *, reason: str = "left") -> None:
        if self.participants.pop(p.id, None) is None:
            return
        p._end(reason)
        if self.on_leave is not None:
            self.on_leave(p, reason)

    def write_input(self, data: bytes, by: Participant | None = None) -> None:
        if by is not None and by.mode == "observer":
            raise PermissionError("observers cannot type into the session")
        if self.input_sink is None:
            raise PermissionError(f"session {self.sid} takes no input from others")
        self.input_sink(data)


class SessionRegistry:
    """sid → LiveSession for this node (one per process, shared by every connection)."""

    def __init__(self) -> None:
        self._sessions: dict[str, LiveSession] = {}

    def add(self, session: LiveSession) -> None:
        if session.sid in self._sessions:
            raise ValueError(f"session {session.sid} is already registered")
        self._sessions[session.sid] = session

    def remove(self, sid: str, reason: str = "session ended") -> None:
        s = self._sessions.pop(sid, None)
        if s is not None:
            s.end(reason)

    def get(self, sid: str) -> LiveSession | None:
        return self._sessions.get(sid)

    def list(self) -> list[LiveSession]:
        return sorted(self._sessions.values(), key=lambda s: s.started)

    def __contains__(self, sid: object) -> bool:
        return sid in self._sessions

    def __len__(self) -> int:
        return len(self._sessions)

    def join(self, sid: str, user: str, mode: Mode = "observer") -> Participant:
        """Attach to a live session by id; KeyError names the session when it does not exist."""
        s = self._sessions.get(sid)
        if s is None:
            raise KeyError(f"no live session {sid} on this node")
        return s.join(user, mode)
