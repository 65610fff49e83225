"""Audit event schema: names, codes and the emitter interface every service calls.

An event is a flat JSON object: `event` (dotted name), `code` (`W1000I`: W, a number, then
I for info / W for warning (a failure) / E for error), `time` (RFC 3339, UTC, microseconds),
`uid` (unique id), `user`, `sid` where a session exists, `success`, and the event's own fields.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any, Protocol

# event name -> (code on success, code on failure)
EVENT_CODES: dict[str, tuple[str, str]] = {
    "user.login": ("W1000I", "W1000W"),
    "user.create": ("W1001I", "W1001W"),
    "user.update": ("W1002I", "W1002W"),
    "user.delete": ("W1003I", "W1003W"),
    "user.password_change": ("W1004I", "W1004W"),
    "user.invite": ("W1005I", "W1005W"),
    "user.register": ("W1006I", "W1006W"),
    "user.locked": ("W1007W", "W1007W"),
    "user.logout": ("W1008I", "W1008W"),
    "web.session.create": ("W1009I", "W1009W"),
    "mfa.add": ("W1010I", "W1010W"),
    "mfa.delete": ("W1011I", "W1011W"),
    "mfa.verify": ("W1012I", "W1012W"),
    "role.create": ("W1100I", "W1100W"),
    "role.update": ("W1101I", "W1101W"),
    "role.delete": ("W1102I", "W1102W"),
    "token.create": ("W1200I", "W1200W"),
    "token.delete": ("W1201I", "W1201W"),
    "join": ("W1202I", "W1202W"),
    "cert.create": ("W1300I", "W1300W"),
    "lock.create": ("W1400I", "W1400W"),
    "lock.delete": ("W1401I", "W1401W"),
    "resource.create": ("W1500I", "W1500W"),
    "resource.update": ("W1501I", "W1501W"),
    "resource.delete": ("W1502I", "W1502W"),
    "auth": ("W1600I", "W1600W"),
    "access.denied": ("W1601W", "W1601W"),
    "session.start": ("W2000I", "W2000W"),
    "session.end": ("W2001I", "W2001W"),
    "session.join": ("W2002I", "W2002W"),
    "session.leave": ("W2003I", "W2003W"),
    "exec": ("W2004I", "W2004E"),
    "scp": ("W2005I", "W2005E"),
    "sftp": ("W2006I", "W2006E"),
    "port": ("W2007I", "W2007W"),
    "session.upload": ("W2008I", "W2008E"),
    "db.session.start": ("W3000I", "W3000W"),
    "db.session.query": ("W3001I", "W3001E"),
    "db.session.end": ("W3002I", "W3002W"),
    "db.session.command": ("W3003I", "W3003W"),
    "db.session.error": ("W3004E", "W3004E"),
    "app.session.start": ("W4000I", "W4000W"),
    "app.session.request": ("W4001I", "W4001W"),
    "app.session.end": ("W4002I", "W4002W"),
    "app.session.create": ("W4003I", "W4003W"),
}


def event_code(event: str, success: bool = True) -> str:
    """Unknown names get W9999I/W so a new event is never dropped for lack of a code."""
    ok, fail = EVENT_CODES.get(event, ("W9999I", "W9999W"))
    return ok if success else fail


def make_event(event: str, *, user: str = "", success: bool = True, sid: str = "", **fields: Any) -> dict:
    """Build the canonical dict; None fields are left out."""
    out: dict[str, Any] = {
        "event": event,
        "code": event_code(event, success),
        "time": datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z"),
        "uid": str(uuid.uuid4()),
        "user": user,
        "success": success,
    }
    if sid:
        out["sid"] = sid
    out.update({k: v for k, v in fields.items() if v is not None})
    return out


class Emitter(Protocol):
    """What services hold to write the audit log (a local store, or the auth API client)."""

    async def emit(
        self, event: str, *, user: str = "", success: bool = True, sid: str = "", **fields: Any
    ) -> dict: ...


class MemoryEmitter:
    """Keeps events in a list; for unit tests of code that emits."""

    def __init__(self) -> None:
        self.events: list[dict] = []

    async def emit(
        self, event: str, *, user: str = "", success: bool = True, sid: str = "", **fields: Any
    ) -> dict:
        ev = make_event(event, user=user, success=success, sid=sid, **fields)
        self.events.append(ev)
        return ev

    def named(self, event: str) -> list[dict]:
        return [e for e in self.events if e["event"] == event]
