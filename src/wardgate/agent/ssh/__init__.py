"""The SSH node service (asyncssh server admitting Wardgate certificates) and its session machinery.

Names are imported lazily so that `python -m wardgate.agent.ssh.sftp_child`, started once per
SFTP session, does not pay for importing the whole service.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from wardgate.agent.ssh.registry import LiveSession, Participant, SessionEvent, SessionRegistry
    from wardgate.agent.ssh.service import DEFAULT_ENV_ALLOW, SSHNodeOptions, SSHNodeService, node_resource

__all__ = [
    "DEFAULT_ENV_ALLOW",
    "LiveSession",
    "Participant",
    "SSHNodeOptions",
    "SSHNodeService",
    "SessionEvent",
    "SessionRegistry",
    "node_resource",
]

_WHERE = {
    "DEFAULT_ENV_ALLOW": "service",
    "SSHNodeOptions": "service",
    "SSHNodeService": "service",
    "node_resource": "service",
    "LiveSession": "registry",
    "Participant": "registry",
    "SessionEvent": "registry",
    "SessionRegistry": "registry",
}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
