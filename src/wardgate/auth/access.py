"""One decision for "may this identity open an SSH session on this node as this login?".

The proxy asks it before dialling (so a refused user never reaches the node) and the node asks
it again on every connection (so a node reachable some other way is just as strict).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime

from wardgate.api.resources import Lock, Node, Role
from wardgate.auth.identity import Identity
from wardgate.auth.locks import find_lock, lock_decision
from wardgate.auth.rbac import AccessChecker, AccessDecision

SESSION_MFA_REQUIRED = (
    "your roles require multi-factor authentication for every session: "
    "connect with a per-session certificate (ward ssh asks for your second factor)"
)


def check_ssh_access(
    identity: Identity,
    node: Node,
    login: str,
    *,
    roles: Mapping[str, Role],
    locks: Iterable[Lock],
    node_names: Sequence[str] = (),
    now: datetime | None = None,
) -> tuple[AccessDecision, AccessChecker | None]:
    """Locks first, then the login in the certificate, then the roles, then per-session MFA."""
    if identity.system_role:
        return AccessDecision(False, "a service identity cannot open SSH sessions"), None
    names = list(node_names) or [node.name]
    lock = find_lock(locks, user=identity.user, roles=identity.roles, node=names, login=login, now=now)
    if lock is not None:
        return lock_decision(lock), None
    if login not in identity.logins:
        allowed = ", ".join(identity.logins) or "none"
        return AccessDecision(
            False, f'login "{login}" is not in your certificate (its logins: {allowed})'
        ), None
    checker = AccessChecker.for_identity(identity, roles)
    decision = checker.check_node(node, login, node_name=node.name)
    if not decision.allowed:
        return decision, checker
    if checker.options.require_session_mfa and not identity.mfa_verified:
        return AccessDecision(False, SESSION_MFA_REQUIRED, role=decision.role), checker
    return decision, checker
