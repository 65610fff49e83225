"""Who a certificate says its holder is: one dataclass used by every service.

`Identity` travels inside X.509 client certificates (as canonical JSON in one extension) and,
in part, inside SSH certificates (principals + `*@wardgate` extensions). The codec functions
live in `auth/certs.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime


@dataclass(frozen=True, slots=True)
class RouteToDatabase:
    service_name: str = ""
    protocol: str = ""
    username: str = ""
    database: str = ""


@dataclass(frozen=True, slots=True)
class RouteToApp:
    name: str = ""
    public_addr: str = ""
    session_id: str = ""


@dataclass(frozen=True, slots=True)
class Identity:
    """A person's (or bot's) identity, or a service's when `system_role` is set."""

    user: str
    roles: tuple[str, ...] = ()
    traits: dict[str, list[str]] = field(default_factory=dict)
    logins: tuple[str, ...] = ()
    cluster: str = ""
    route_to_cluster: str = ""
    route_to_db: RouteToDatabase | None = None
    route_to_app: RouteToApp | None = None
    kube_cluster: str = ""
    kube_users: tuple[str, ...] = ()
    kube_groups: tuple[str, ...] = ()
    mfa_verified: str = ""
    """Id of the MFA device that verified this cert (per-session MFA), empty otherwise."""
    expires: datetime | None = None
    system_role: str = ""
    """For host certs: node, proxy, app, db, kube, desktop, auth, admin."""
    host_id: str = ""
    principals: tuple[str, ...] = ()
    """For host certs: the names the service answers to."""

    @property
    def is_service(self) -> bool:
        return bool(self.system_role)
