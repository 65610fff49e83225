"""Audit events: the schema and codes, emitters, and the stores that keep and search them."""

from wardgate.audit.events import EVENT_CODES, Emitter, MemoryEmitter, event_code, make_event
from wardgate.audit.store import SQLiteAuditLog, normalize_event

__all__ = [
    "EVENT_CODES",
    "Emitter",
    "MemoryEmitter",
    "SQLiteAuditLog",
    "event_code",
    "make_event",
    "normalize_event",
]
