"""Locks: an operator's immediate "stop" for a user, a role, a node, a login or an app.

Every service checks new connections against its cached list of locks before (and regardless
of) roles, so a lock takes effect as soon as the watch stream delivers it, even for holders of
still-valid certificates.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime

from wardgate.api.resources import Lock, LockTarget, utcnow
from wardgate.auth.identity import Identity
from wardgate.auth.rbac import AccessDecision


def lock_in_force(lock: Lock, now: datetime | None = None) -> bool:
    """A lock holds until its `metadata.expires` (forever when unset)."""
    return not lock.is_expired(now)


def lock_applies(
    target: LockTarget,
    *,
    user: str,
    roles: frozenset[str],
    nodes: frozenset[str],
    login: str,
    apps: frozenset[str] = frozenset(),
) -> bool:
    """Every non-empty field of the target must match the context; an empty target never applies.

    A node or app lock applies only to access to that node or app (`nodes`/`apps` name it)."""
    if target.is_empty():
        return False
    if target.user and target.user != user:
        return False
    if target.role and target.role not in roles:
        return False
    if target.node and target.node not in nodes:
        return False
    if target.app and target.app not in apps:
        return False
    return not (target.login and target.login != login)


def _names(value: str | Iterable[str]) -> frozenset[str]:
    return frozenset((value,) if isinstance(value, str) else value) - {""}


def find_lock(
    locks: Iterable[Lock],
    *,
    user: str = "",
    roles: Iterable[str] = (),
    node: str | Iterable[str] = "",
    login: str = "",
    app: str | Iterable[str] = "",
    now: datetime | None = None,
) -> Lock | None:
    """The in-force lock that applies to this access, or None.

    `node` may list every name the node answers to (name, hostname, host id), since operators
    lock whichever they know; `app` names the app being reached, if any. When several locks
    apply, the longest-lasting one is returned, so the message tells the truth about when
    access comes back.
    """
    now = now or utcnow()
    role_set = frozenset(roles)
    nodes, apps = _names(node), _names(app)
    best: Lock | None = None
    for lock in locks:
        if not lock_in_force(lock, now):
            continue
        if not lock_applies(lock.spec.target, user=user, roles=role_set, nodes=nodes, login=login, apps=apps):
            continue
        if lock.metadata.expires is None:
            return lock
        if best is None or (
            best.metadata.expires is not None and lock.metadata.expires > best.metadata.expires
        ):
            best = lock
    return best


def _describe(target: LockTarget) -> str:
    parts = [
        f'{k} "{v}"'
        for k, v in (
            ("user", target.user),
            ("role", target.role),
            ("node", target.node),
            ("login", target.login),
            ("app", target.app),
        )
        if v
    ]
    return ", ".join(parts) + " is locked"


def lock_decision(lock: Lock) -> AccessDecision:
    """A denial naming the lock, its message and when it ends."""
    exp = lock.metadata.expires
    until = exp.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC") if exp else "further notice"
    message = lock.spec.message or _describe(lock.spec.target)
    reason = f'locked: {message} (lock "{lock.name}", until {until})'
    return AccessDecision(False, reason, None, (reason,), locked=True)


def check_locks(
    locks: Iterable[Lock],
    identity: Identity,
    *,
    node: str | Iterable[str] = "",
    login: str = "",
    app: str | Iterable[str] = "",
    now: datetime | None = None,
) -> AccessDecision | None:
    """The lock denial for this identity's access, or None when no lock applies."""
    lock = find_lock(
        locks, user=identity.user, roles=identity.roles, node=node, login=login, app=app, now=now
    )
    return None if lock is None else lock_decision(lock)
