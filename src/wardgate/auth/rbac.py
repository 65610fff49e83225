"""Role-based access control: who may reach which resource as whom, and why.

The semantics follow Teleport's RBAC so that operators' roles behave as they expect:

- label selectors: keys AND, values OR; a value is exact, a `*` glob (whole string) or a
  `^…$` regex; `'*': '*'` matches every resource, an empty selector matches none;
- `{{internal.NAME}}`, `{{external.NAME}}` and `{{email.local(external.NAME)}}` expand from the
  user's traits, one value per trait value, keeping text around the template;
- access is allowed iff some role's `allow` matches and no role's `deny` does (deny wins);
- options combine to the strictest value across roles.

An `AccessChecker` is built per connection. Everything that does not depend on the resource
(template expansion, regex compilation, option merging) happens once in `__init__`, so a check is
a few dict and set look-ups, and every decision carries a one-line reason plus a per-role trace
for `wardctl access explain`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache

from wardgate.api.resources import Node, Role, RoleConditions, RoleOptions, RoleSpec, Rule
from wardgate.auth.identity import Identity
from wardgate.errors import AccessDeniedError, LockedError

WILDCARD = "*"

TraitMap = Mapping[str, Sequence[str]]
LabelSelector = Mapping[str, str | Sequence[str]]


# ---------------------------------------------------------------- decisions


@dataclass(frozen=True, slots=True)
class AccessDecision:
    """The outcome of one check, with a sentence a person can act on."""

    allowed: bool
    reason: str
    """One sentence: which role decided and on what, or why nothing allowed it."""
    role: str | None = None
    """The role that decided, if any (None when denied by default or by a lock)."""
    trace: tuple[str, ...] = ()
    """One line per role examined, for `wardctl access explain`."""
    locked: bool = False
    """Denied by a lock rather than by roles: `raise_if_denied` raises `LockedError`."""

    def raise_if_denied(self) -> None:
        """Turn a denial into the error every layer maps to HTTP 403."""
        if self.allowed:
            return
        if self.locked:
            raise LockedError(self.reason)
        raise AccessDeniedError(self.reason)


# ---------------------------------------------------------------- patterns


@dataclass(frozen=True, slots=True)
class Pattern:
    """One compiled selector value: exact text, a `*` glob or a `^…$` regex."""

    text: str
    regex: re.Pattern[str] | None = None
    """None for an exact match."""
    error: str = ""
    """Why the regex is invalid; an invalid pattern never matches."""

    def matches(self, value: str) -> bool:
        if self.error:
            return False
        if self.regex is None:
            return value == self.text
        return self.regex.fullmatch(value) is not None


@lru_cache(maxsize=8192)
def compile_pattern(text: str) -> Pattern:
    """Compile once per distinct string: checkers are built per connection from the same roles."""
    if len(text) >= 2 and text[0] == "^" and text[-1] == "$":
        try:
            return Pattern(text, re.compile(text))
        except re.error as exc:
            return Pattern(text, None, f'invalid regex "{text}": {exc}')
    if WILDCARD in text:
        body = ".*".join(re.escape(part) for part in text.split(WILDCARD))
        return Pattern(text, re.compile(body, re.DOTALL))
    return Pattern(text)


# ---------------------------------------------------------------- trait templates

_TEMPLATE_RE = re.compile(r"\{\{(.*?)\}\}", re.DOTALL)
_CALL_RE = re.compile(r"^([A-Za-z_]\w*\.[A-Za-z_]\w*)\s*\((.*)\)$", re.DOTALL)
_VAR_RE = re.compile(r'^(?:internal|external)(?:\.([A-Za-z0-9_:-]+)|\[\s*"([^"]+)"\s*\])$')
_OPEN, _CLOSE = "{{", "}}"


def _email_local(value: str) -> str:
    local, at, domain = value.partition("@")
    if not at or not local or not domain:
        raise ValueError(f'"{value}" is not an email address')
    return local


_FUNCTIONS: dict[str, Callable[[str], str]] = {"email.local": _email_local}


@dataclass(frozen=True, slots=True)
class _Template:
    prefix: str
    trait: str
    suffix: str
    function: str = ""


def _malformed(value: str, why: str) -> str:
    return f'malformed template "{value}" dropped: {why}'


@lru_cache(maxsize=8192)
def _parse_value(value: str) -> _Template | str | None:
    """None for a literal, a `_Template`, or a string saying why the template is malformed."""
    if _OPEN not in value and _CLOSE not in value:
        return None
    m = _TEMPLATE_RE.search(value)
    if m is None:
        return _malformed(value, "unbalanced braces")
    prefix, suffix = value[: m.start()], value[m.end() :]
    if any(b in prefix or b in suffix for b in (_OPEN, _CLOSE)):
        return _malformed(value, "only one template per value")
    expr = m.group(1).strip()
    function = ""
    call = _CALL_RE.match(expr)
    if call is not None:
        function = call.group(1)
        if function not in _FUNCTIONS:
            return _malformed(value, f"unknown function {function}()")
        expr = call.group(2).strip()
    var = _VAR_RE.match(expr)
    if var is None:
        return _malformed(value, "expected internal.NAME, external.NAME or email.local(external.NAME)")
    return _Template(prefix, var.group(1) or var.group(2), suffix, function)


def _trait_values(traits: TraitMap, name: str) -> Sequence[str]:
    values = traits.get(name, ())
    return (values,) if isinstance(values, str) else values


def _expand(values: Sequence[str], traits: TraitMap, problems: list[str], where: str) -> list[str]:
    """Expand templates, dropping values whose trait is missing; record malformed ones."""
    out: list[str] = []
    for value in values:
        parsed = _parse_value(value)
        if parsed is None:
            if value not in out:
                out.append(value)
            continue
        if isinstance(parsed, str):
            problems.append(f"{where}: {parsed}")
            continue
        fn = _FUNCTIONS[parsed.function] if parsed.function else None
        for trait_value in _trait_values(traits, parsed.trait):
            if fn is not None:
                try:
                    trait_value = fn(trait_value)
                except ValueError as exc:
                    problems.append(f"{where}: {parsed.function}() dropped {exc}")
                    continue
            if not trait_value:
                continue
            expanded = parsed.prefix + trait_value + parsed.suffix
            if expanded not in out:
                out.append(expanded)
    return out


def expand_traits(values: Sequence[str], traits: TraitMap) -> list[str]:
    """Values with templates expanded from `traits` (missing traits and malformed templates drop)."""
    return _expand(values, traits, [], "")


# ---------------------------------------------------------------- label selectors


@dataclass(frozen=True, slots=True)
class _Selector:
    wildcard: bool
    keys: tuple[tuple[str, tuple[Pattern, ...]], ...]

    def match(self, labels: Mapping[str, str]) -> tuple[bool, str]:
        """(matched, detail): the matched labels, or the first key that failed."""
        if self.wildcard:
            return True, "*=*"
        if not self.keys:
            return False, "empty selector matches nothing"
        matched: list[str] = []
        for key, patterns in self.keys:
            if not patterns:
                return False, f'selector key "{key}" has no usable values'
            value = labels.get(key)
            if value is None:
                return False, f'no label "{key}"'
            for p in patterns:
                if p.matches(value):
                    break
            else:
                wanted = "|".join(p.text for p in patterns)
                return False, f"label {key}={value} does not match {wanted}"
            matched.append(f"{key}={value}")
        return True, ", ".join(matched)


_EMPTY_SELECTOR = _Selector(False, ())
_WILDCARD_SELECTOR = _Selector(True, ())


def _compile_selector(
    selector: LabelSelector, traits: TraitMap, problems: list[str], where: str
) -> _Selector:
    if not selector:
        return _EMPTY_SELECTOR
    keys: list[tuple[str, tuple[Pattern, ...]]] = []
    for key, raw in selector.items():
        values = _expand([raw] if isinstance(raw, str) else list(raw), traits, problems, f"{where} {key}")
        if key == WILDCARD:
            if WILDCARD in values:
                return _WILDCARD_SELECTOR  # `'*': '*'` matches every resource, whatever else is set
            problems.append(f'{where}: key "*" only takes the value "*" (never matches)')
            keys.append((key, ()))
            continue
        patterns = tuple(compile_pattern(v) for v in values)
        problems.extend(f"{where} {key}: {p.error} (never matches)" for p in patterns if p.error)
        keys.append((key, patterns))
    return _Selector(False, tuple(keys))


def match_labels(
    selector: LabelSelector, labels: Mapping[str, str], traits: TraitMap | None = None
) -> tuple[bool, str]:
    """Match one selector against a resource's labels: (matched, human detail)."""
    problems: list[str] = []
    ok, detail = _compile_selector(selector, traits or {}, problems, "selector").match(labels)
    if problems and not ok:
        detail = f"{detail} ({'; '.join(problems)})"
    return ok, detail


# ---------------------------------------------------------------- compiled roles


@dataclass(frozen=True, slots=True)
class _Rule:
    resources: frozenset[str]
    verbs: frozenset[str]
    where: str | None

    def match(self, kind: str, verb: str) -> str | None:
        """`rule <verb> on <kind>` as the rule spelled it (so wildcards show), or None."""
        if kind in self.resources:
            k = kind
        elif WILDCARD in self.resources:
            k = WILDCARD
        else:
            return None
        if verb in self.verbs:
            v = verb
        elif WILDCARD in self.verbs:
            v = WILDCARD
        else:
            return None
        return f"rule {v} on {k}" + (f" where {self.where}" if self.where else "")


@dataclass(frozen=True, slots=True)
class _Conditions:
    logins: frozenset[str]
    node: _Selector
    app: _Selector
    db: _Selector
    db_users: tuple[Pattern, ...]
    db_names: tuple[Pattern, ...]
    kube: _Selector
    kube_groups: frozenset[str]
    kube_users: frozenset[str]
    desktop: _Selector
    desktop_logins: frozenset[str]
    rules: tuple[_Rule, ...]


_NOTHING: frozenset[str] = frozenset()
_CONDITION_FIELDS = (
    "logins", "node_labels", "app_labels", "db_labels", "db_users", "db_names", "kubernetes_labels",
    "kubernetes_groups", "kubernetes_users", "desktop_labels", "desktop_logins",
)  # fmt: skip
"""Everything in `RoleConditions` but `rules` (and `join_sessions`, used by `ward join` only)."""


def _compile_conditions(
    c: RoleConditions, side: str, traits: TraitMap, problems: list[tuple[str, str]]
) -> _Conditions:
    """Expand and compile one side of a role; empty fields (most of them) cost one test each."""
    rules = tuple(_Rule(frozenset(r.resources), frozenset(r.verbs), r.where) for r in c.rules)
    if not any(getattr(c, f) for f in _CONDITION_FIELDS):
        return _Conditions(
            _NOTHING, _EMPTY_SELECTOR, _EMPTY_SELECTOR, _EMPTY_SELECTOR, (), (), _EMPTY_SELECTOR,
            _NOTHING, _NOTHING, _EMPTY_SELECTOR, _NOTHING, rules,
        )  # fmt: skip

    def values(field: str) -> list[str]:
        raw: list[str] = getattr(c, field)
        if not raw:
            return []
        found: list[str] = []
        out = _expand(raw, traits, found, f"{side}.{field}")
        problems.extend((field, m) for m in found)
        return out

    def names(field: str) -> frozenset[str]:
        return frozenset(values(field)) if getattr(c, field) else _NOTHING

    def selector(field: str) -> _Selector:
        raw: LabelSelector = getattr(c, field)
        if not raw:
            return _EMPTY_SELECTOR
        found: list[str] = []
        out = _compile_selector(raw, traits, found, f"{side}.{field}")
        problems.extend((field, m) for m in found)
        return out

    def patterns(field: str) -> tuple[Pattern, ...]:
        out = tuple(compile_pattern(v) for v in values(field))
        problems.extend((field, f"{side}.{field}: {x.error} (never matches)") for x in out if x.error)
        return out

    return _Conditions(
        logins=names("logins"),
        node=selector("node_labels"),
        app=selector("app_labels"),
        db=selector("db_labels"),
        db_users=patterns("db_users"),
        db_names=patterns("db_names"),
        kube=selector("kubernetes_labels"),
        kube_groups=names("kubernetes_groups"),
        kube_users=names("kubernetes_users"),
        desktop=selector("desktop_labels"),
        desktop_logins=names("desktop_logins"),
        rules=rules,
    )


@dataclass(frozen=True, slots=True)
class _CompiledRole:
    name: str
    allow: _Conditions
    deny: _Conditions
    problems: dict[str, tuple[str, ...]]
    """Malformed templates and invalid regexes, by condition field (e.g. `node_labels`)."""


def _compile_role(role: Role, traits: TraitMap) -> _CompiledRole:
    found: list[tuple[str, str]] = []
    allow = _compile_conditions(role.spec.allow, "allow", traits, found)
    deny = _compile_conditions(role.spec.deny, "deny", traits, found)
    problems: dict[str, tuple[str, ...]] = {}
    for field, message in found:
        problems[field] = (*problems.get(field, ()), message)
    return _CompiledRole(role.name, allow, deny, problems)


def role_problems(role: Role) -> list[str]:
    """What in a role can never match (invalid regex, malformed template): reject it on write."""
    compiled = _compile_role(role, {})
    return [p for field in sorted(compiled.problems) for p in compiled.problems[field]]


def merge_options(options: Sequence[RoleOptions]) -> RoleOptions:
    """The strictest combination: shortest TTL, MFA/recording if any role wants it, etc."""
    if not options:
        return RoleOptions()
    idle = [o.client_idle_timeout for o in options if o.client_idle_timeout is not None]
    return RoleOptions.model_construct(
        max_session_ttl=min(o.max_session_ttl for o in options),
        require_session_mfa=any(o.require_session_mfa for o in options),
        port_forwarding=all(o.port_forwarding for o in options),
        forward_agent=all(o.forward_agent for o in options),
        client_idle_timeout=min(idle) if idle else None,
        disconnect_expired_cert=any(o.disconnect_expired_cert for o in options),
        record_session=any(o.record_session for o in options),
        record_input=any(o.record_input for o in options),
    )


# ---------------------------------------------------------------- built-in roles


def _builtin(name: str, description: str, allow: RoleConditions) -> Role:
    role: Role = Role.new(name, RoleSpec(allow=allow), description=description)
    return role


_ANY: dict[str, str | list[str]] = {WILDCARD: WILDCARD}
_EDITOR_KINDS = [
    "user", "role", "token", "lock", "node", "app", "db", "kube_cluster", "desktop",
    "trusted_cluster", "oidc", "saml", "github",
]  # fmt: skip

BUILTIN_ROLES: dict[str, Role] = {
    r.name: r
    for r in (
        _builtin(
            "access",
            "Access to every resource as the logins, users and groups in the user's traits",
            RoleConditions(
                logins=["{{internal.logins}}"],
                node_labels=dict(_ANY),
                app_labels=dict(_ANY),
                db_labels=dict(_ANY),
                db_users=["{{internal.db_users}}"],
                db_names=["{{internal.db_names}}"],
                kubernetes_labels=dict(_ANY),
                kubernetes_groups=["{{internal.kubernetes_groups}}"],
                kubernetes_users=["{{internal.kubernetes_users}}"],
                desktop_labels=dict(_ANY),
                desktop_logins=["{{internal.desktop_logins}}"],
                rules=[Rule(resources=["session"], verbs=["list", "read"])],
            ),
        ),
        _builtin(
            "editor",
            "Edit cluster configuration: users, roles, tokens, locks and resources",
            RoleConditions(
                rules=[
                    Rule(resources=list(_EDITOR_KINDS), verbs=[WILDCARD]),
                    Rule(resources=["cert_authority"], verbs=["list", "read"]),
                ]
            ),
        ),
        _builtin(
            "auditor",
            "Read the audit log and session recordings",
            RoleConditions(rules=[Rule(resources=["event", "session"], verbs=["list", "read"])]),
        ),
    )
}
"""Roles every cluster has; a stored role of the same name takes precedence."""


# ---------------------------------------------------------------- the checker

_Eval = tuple[str | None, str | None, str]
"""(deny detail if a deny matched, allow detail if allow matched, why allow did not match)."""


def _bracket(items: frozenset[str]) -> str:
    return "[" + ", ".join(sorted(items)) + "]"


class AccessChecker:
    """Answers access questions for one user's roles and traits; build one per connection."""

    __slots__ = (
        "_deny_kube_groups",
        "_deny_kube_users",
        "_join_modes",
        "_logins",
        "_missing",
        "_roles",
        "options",
        "role_names",
        "traits",
        "user",
    )

    def __init__(
        self,
        roles: Sequence[Role],
        traits: TraitMap | None = None,
        *,
        user: str = "",
        missing_roles: Sequence[str] = (),
    ) -> None:
        self.user = user
        self.traits: TraitMap = traits or {}
        self._roles = tuple(_compile_role(r, self.traits) for r in roles)
        self._missing = tuple(missing_roles)
        allow_join = {m for r in roles for m in r.spec.allow.join_sessions}
        deny_join = {m for r in roles for m in r.spec.deny.join_sessions}
        if "*" in allow_join:
            allow_join |= {"observer", "peer"}
        self._join_modes = frozenset() if "*" in deny_join else frozenset(allow_join - deny_join - {"*"})
        self.role_names: tuple[str, ...] = tuple(r.name for r in self._roles)
        self.options: RoleOptions = merge_options([r.spec.options for r in roles])
        denied_logins = frozenset().union(*(r.deny.logins for r in self._roles))
        allowed_logins = frozenset().union(*(r.allow.logins for r in self._roles))
        self._logins = sorted(allowed_logins - denied_logins)
        self._deny_kube_groups = frozenset().union(*(r.deny.kube_groups for r in self._roles))
        self._deny_kube_users = frozenset().union(*(r.deny.kube_users for r in self._roles))

    @classmethod
    def for_identity(cls, identity: Identity, roles: Mapping[str, Role]) -> AccessChecker:
        """Resolve the identity's role names (stored roles first, then built-ins).

        A role deleted since the certificate was issued is skipped and noted in every denial,
        so access shrinks immediately and never widens.
        """
        found: list[Role] = []
        missing: list[str] = []
        seen: set[str] = set()
        for name in identity.roles:
            if name in seen:
                continue
            seen.add(name)
            role = roles.get(name)
            if role is None:
                role = BUILTIN_ROLES.get(name)
            if role is None:
                missing.append(name)
            else:
                found.append(role)
        return cls(found, identity.traits, user=identity.user, missing_roles=missing)

    def __repr__(self) -> str:
        return f"AccessChecker(user={self.user!r}, roles={list(self.role_names)!r})"

    # ------------------------------------------------------------ core

    def _decide(
        self, what: str, fields: tuple[str, ...], evaluate: Callable[[_CompiledRole], _Eval]
    ) -> AccessDecision:
        """Run `evaluate` on every role: the first deny wins, else the first allow, else deny."""
        trace: list[str] = [f'role "{m}": does not exist, skipped' for m in self._missing]
        notes: list[str] = []
        denied: tuple[str, str] | None = None
        allowed: tuple[str, str] | None = None
        for role in self._roles:
            deny, allow, miss = evaluate(role)
            if deny is not None:
                trace.append(f'role "{role.name}": denies ({deny})')
                if denied is None:
                    denied = (role.name, deny)
            elif allow is not None:
                trace.append(f'role "{role.name}": allows ({allow})')
                if allowed is None:
                    allowed = (role.name, allow)
            else:
                trace.append(f'role "{role.name}": does not allow ({miss})')
            for field in fields:
                notes.extend(f'role "{role.name}" {p}' for p in role.problems.get(field, ()))
        trace.extend(f"note: {n}" for n in notes)
        suffix = f" (note: {'; '.join(notes)})" if notes else ""
        if denied is not None:
            return AccessDecision(
                False, f'denied by role "{denied[0]}": {denied[1]}{suffix}', denied[0], tuple(trace)
            )
        if allowed is not None:
            return AccessDecision(
                True, f'allowed by role "{allowed[0]}": {allowed[1]}{suffix}', allowed[0], tuple(trace)
            )
        if self._missing:
            gone = ", ".join(f'"{m}"' for m in self._missing)
            notes.append(f"role(s) {gone} no longer exist")
            suffix = f" ({'; '.join(notes)})"
        if not self._roles:
            return AccessDecision(False, f"no roles: {what} is denied by default{suffix}", None, tuple(trace))
        return AccessDecision(False, f"no role allows {what}{suffix}", None, tuple(trace))

    @staticmethod
    def _login_eval(
        allow_sel: _Selector,
        deny_sel: _Selector,
        allow_logins: frozenset[str],
        deny_logins: frozenset[str],
        labels: Mapping[str, str],
        login: str,
        prefix: str,
        logins_field: str,
    ) -> _Eval:
        ok, detail = deny_sel.match(labels)
        if ok:
            deny: str | None = f"deny.{prefix}_labels {detail}"
        elif login in deny_logins:
            deny = f'deny.{logins_field} "{login}"'
        else:
            deny = None
        ok, detail = allow_sel.match(labels)
        if not ok:
            return deny, None, f"allow.{prefix}_labels: {detail}"
        if login not in allow_logins:
            return deny, None, f'login "{login}" not in allow.{logins_field} {_bracket(allow_logins)}'
        return deny, f'login "{login}", labels {detail}', ""

    # ------------------------------------------------------------ SSH nodes

    def join_modes(self) -> frozenset[str]:
        """How these roles may join others' live sessions: `observer`, `peer` (deny wins)."""
        return self._join_modes

    def logins(self) -> list[str]:
        """Logins some role allows (after trait expansion) and none denies, sorted."""
        return list(self._logins)

    @staticmethod
    def _node_labels(node: Node | Mapping[str, str], node_name: str) -> tuple[Mapping[str, str], str]:
        if isinstance(node, Node):
            return node.all_labels(), node_name or node.spec.hostname or node.name
        return node, node_name

    def check_node(
        self, node: Node | Mapping[str, str], login: str, *, node_name: str = ""
    ) -> AccessDecision:
        """May this user log in as `login` on this node (by its labels)?"""
        labels, name = self._node_labels(node, node_name)
        what = f'login "{login}" on node "{name}"' if name else f'login "{login}"'
        return self._decide(
            what,
            ("logins", "node_labels"),
            lambda r: self._login_eval(
                r.allow.node, r.deny.node, r.allow.logins, r.deny.logins, labels, login, "node", "logins"
            ),
        )

    def can_see_node(self, node: Node | Mapping[str, str]) -> bool:
        """Whether `ward ls` shows the node: some allow selects it and no deny selects it."""
        labels, _ = self._node_labels(node, "")
        seen = False
        for r in self._roles:
            if r.deny.node.match(labels)[0]:
                return False
            seen = seen or r.allow.node.match(labels)[0]
        return seen

    # ------------------------------------------------------------ apps

    def check_app(self, labels: Mapping[str, str], *, name: str = "") -> AccessDecision:
        """May this user reach the app with these labels?"""

        def evaluate(r: _CompiledRole) -> _Eval:
            ok, detail = r.deny.app.match(labels)
            deny = f"deny.app_labels {detail}" if ok else None
            ok, detail = r.allow.app.match(labels)
            if not ok:
                return deny, None, f"allow.app_labels: {detail}"
            return deny, f"labels {detail}", ""

        return self._decide(f'app "{name}"' if name else "app", ("app_labels",), evaluate)

    # ------------------------------------------------------------ databases

    def can_see_db(self, labels: Mapping[str, str]) -> bool:
        """Whether `ward db ls` shows the database: some allow selects it and no deny does."""
        seen = False
        for r in self._roles:
            if r.deny.db.match(labels)[0]:
                return False
            seen = seen or r.allow.db.match(labels)[0]
        return seen

    def db_users(self) -> list[str]:
        """The literal db users the roles allow (for hints; globs and regexes are left out)."""
        out: list[str] = []
        for r in self._roles:
            for p in r.allow.db_users:
                if p.text not in out and not any(c in p.text for c in "*^$"):
                    out.append(p.text)
        return out

    def check_db(
        self, labels: Mapping[str, str], db_user: str, db_name: str = "", *, name: str = ""
    ) -> AccessDecision:
        """May this user connect to the database as `db_user` (and to `db_name`, when given)?

        `db_name` empty means the protocol has no database name (Redis, MySQL without one):
        `db_names` is then not consulted.
        """

        def first(patterns: tuple[Pattern, ...], value: str) -> Pattern | None:
            for p in patterns:
                if p.matches(value):
                    return p
            return None

        def evaluate(r: _CompiledRole) -> _Eval:
            d, a = r.deny, r.allow
            deny: str | None = None
            ok, detail = d.db.match(labels)
            if ok:
                deny = f"deny.db_labels {detail}"
            elif (p := first(d.db_users, db_user)) is not None:
                deny = f'deny.db_users "{p.text}" matches db user "{db_user}"'
            elif db_name and (p := first(d.db_names, db_name)) is not None:
                deny = f'deny.db_names "{p.text}" matches db name "{db_name}"'
            ok, detail = a.db.match(labels)
            if not ok:
                return deny, None, f"allow.db_labels: {detail}"
            if first(a.db_users, db_user) is None:
                allowed = "|".join(x.text for x in a.db_users) or "nothing"
                return deny, None, f'db user "{db_user}" does not match allow.db_users {allowed}'
            if db_name and first(a.db_names, db_name) is None:
                allowed = "|".join(x.text for x in a.db_names) or "nothing"
                return deny, None, f'db name "{db_name}" does not match allow.db_names {allowed}'
            named = f', db name "{db_name}"' if db_name else ""
            return deny, f'db user "{db_user}"{named}, labels {detail}', ""

        what = f'database "{name}" as db user "{db_user}"' if name else f'db user "{db_user}"'
        if db_name:
            what += f', db name "{db_name}"'
        return self._decide(what, ("db_labels", "db_users", "db_names"), evaluate)

    # ------------------------------------------------------------ kubernetes

    def _kube_principals(self, labels: Mapping[str, str]) -> tuple[set[str], set[str]]:
        groups: set[str] = set()
        users: set[str] = set()
        for r in self._roles:
            if r.deny.kube.match(labels)[0]:
                return set(), set()
            if r.allow.kube.match(labels)[0]:
                groups |= r.allow.kube_groups
                users |= r.allow.kube_users
        return groups - self._deny_kube_groups, users - self._deny_kube_users

    def kube_groups(self, labels: Mapping[str, str]) -> list[str]:
        """Kubernetes groups to impersonate on this cluster: allowed by matching roles, minus denied."""
        return sorted(self._kube_principals(labels)[0])

    def kube_users(self, labels: Mapping[str, str]) -> list[str]:
        """Kubernetes users to impersonate on this cluster: allowed by matching roles, minus denied."""
        return sorted(self._kube_principals(labels)[1])

    def check_kube(self, labels: Mapping[str, str], *, name: str = "") -> AccessDecision:
        """May this user reach the cluster? Also denied when no group or user is left to act as."""

        def evaluate(r: _CompiledRole) -> _Eval:
            ok, detail = r.deny.kube.match(labels)
            deny = f"deny.kubernetes_labels {detail}" if ok else None
            ok, detail = r.allow.kube.match(labels)
            if not ok:
                return deny, None, f"allow.kubernetes_labels: {detail}"
            return deny, f"labels {detail}", ""

        what = f'kubernetes cluster "{name}"' if name else "kubernetes cluster"
        decision = self._decide(
            what, ("kubernetes_labels", "kubernetes_groups", "kubernetes_users"), evaluate
        )
        if not decision.allowed:
            return decision
        groups, users = self._kube_principals(labels)
        if not groups and not users:
            reason = f"no kubernetes_groups or kubernetes_users are allowed on {what}"
            return AccessDecision(False, reason, None, (*decision.trace, reason))
        return decision

    # ------------------------------------------------------------ desktops

    def check_desktop(self, labels: Mapping[str, str], login: str, *, name: str = "") -> AccessDecision:
        """May this user log in to the desktop as `login`?"""
        what = f'login "{login}" on desktop "{name}"' if name else f'desktop login "{login}"'
        return self._decide(
            what,
            ("desktop_labels", "desktop_logins"),
            lambda r: self._login_eval(
                r.allow.desktop,
                r.deny.desktop,
                r.allow.desktop_logins,
                r.deny.desktop_logins,
                labels,
                login,
                "desktop",
                "desktop_logins",
            ),
        )

    # ------------------------------------------------------------ API rules

    def check_rule(
        self, kind: str, verb: str, *, where: Callable[[str], bool] | None = None
    ) -> AccessDecision:
        """May this user `verb` resources of `kind` through the auth API?

        Rules with a `where` clause need `where(expr)` to evaluate it: without it an allow rule
        with a clause grants nothing and a deny rule with a clause applies (fail closed).
        """

        def evaluate(r: _CompiledRole) -> _Eval:
            deny: str | None = None
            for rule in r.deny.rules:
                hit = rule.match(kind, verb)
                if hit is not None and (rule.where is None or where is None or where(rule.where)):
                    deny = f"deny {hit}"
                    break
            for rule in r.allow.rules:
                hit = rule.match(kind, verb)
                if hit is not None and (rule.where is None or (where is not None and where(rule.where))):
                    return deny, hit, ""
            return deny, None, f"no allow rule for {verb} on {kind}"

        return self._decide(f"{verb} on {kind}", (), evaluate)
