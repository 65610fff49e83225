"""Resource change events: what the auth service streams and what caches consume."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from wardgate.api.resources import Resource


class ResourceEventType(enum.StrEnum):
    PUT = "put"
    DELETE = "delete"
    INIT = "init"
    """The snapshot is complete: everything before this was the current state."""


@dataclass(frozen=True, slots=True)
class ResourceEvent:
    type: ResourceEventType
    kind: str = ""
    name: str = ""
    revision: int = 0
    resource: Resource | None = None
