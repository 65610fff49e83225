"""`ward join`: attach an SSH channel to someone's live session on this node, as observer or peer.

The client asks for the `join@wardgate` subsystem after sending `WARD_JOIN_SID` and
`WARD_JOIN_MODE` (observer | peer) as environment variables. Who may join is the joiner's roles'
`join_sessions` (the session's owner may always rejoin their own session); the session's output
is streamed to the channel, and a peer's keystrokes go into the session.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING, Any

import asyncssh

from wardgate.agent.ssh.registry import Participant

if TYPE_CHECKING:
    from wardgate.agent.ssh.session import NodeSession

log = logging.getLogger(__name__)
SUBSYSTEM = "join@wardgate"
MODES = ("observer", "peer")


class JoinHandler:
    def __init__(self, session: NodeSession) -> None:
        self.session = session
        self.participant: Participant | None = None
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        s = self.session
        srv = s.server
        chan = s.chan
        assert chan is not None
        env: dict[str, Any] = dict(chan.get_environment())
        sid, mode = str(env.get("WARD_JOIN_SID", "")), str(env.get("WARD_JOIN_MODE", "observer"))
        ident = srv.identity
        user = ident.user if ident else ""
        live = s.service.sessions.get(sid) if sid else None
        error = ""
        if mode not in MODES:
            error = f"unknown join mode {mode!r}: use observer or peer"
        elif live is None:
            error = f"no live session {sid or '(none given)'} on this node"
        elif live.user != user and (srv.checker is None or mode not in srv.checker.join_modes()):
            error = f"your roles do not allow joining sessions as {mode} (role condition join_sessions)"
        if error or live is None:
            s.service._emit(
                "session.join",
                user=user,
                success=False,
                sid=sid,
                error=error or "no session",
                mode=mode,
                **srv.event_fields(),
            )
            s._say(f"wardgate: {error}")
            s._exit_channel(1, "")
            return
        try:
            self.participant = live.join(user, mode)  # type: ignore[arg-type]
        except (ConnectionError, PermissionError) as exc:
            s._say(f"wardgate: {exc}")
            s._exit_channel(1, "")
            return
        self.task = asyncio.get_running_loop().create_task(self._pump(self.participant))

    async def _pump(self, p: Participant) -> None:
        chan = self.session.chan
        reason = "session ended"
        try:
            async for ev in p:
                if chan is None:
                    break
                if ev.kind == "o":
                    chan.write(ev.data)
                elif ev.kind == "end":
                    reason = ev.reason
                    break
        except (OSError, asyncssh.Error):
            return
        with contextlib.suppress(OSError, asyncssh.Error):
            if chan is not None:
                chan.write(f"\r\nwardgate: {reason}\r\n".encode())
                chan.exit(0)

    def input(self, data: bytes) -> None:
        p = self.participant
        if p is None or p.mode != "peer":
            return
        with contextlib.suppress(PermissionError, ConnectionError):
            p.write(data)

    def stop(self) -> None:
        if self.participant is not None:
            self.participant.leave()
            self.participant = None
        if self.task is not None:
            self.task.cancel()
