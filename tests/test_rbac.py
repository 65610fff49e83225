"""RBAC and locks: the access matrix operators rely on, decision reasons, and lock targeting."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from wardgate.api.resources import (
    CommandLabel,
    Lock,
    LockSpec,
    LockTarget,
    Node,
    NodeSpec,
    Role,
    RoleConditions,
    RoleOptions,
    RoleSpec,
    Rule,
)
from wardgate.auth.identity import Identity
from wardgate.auth.locks import check_locks, find_lock, lock_decision, lock_in_force
from wardgate.auth.rbac import (
    BUILTIN_ROLES,
    AccessChecker,
    AccessDecision,
    expand_traits,
    match_labels,
    merge_options,
    role_problems,
)
from wardgate.errors import AccessDeniedError, LockedError

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)


def role(
    name: str, *, allow: dict[str, Any] | None = None, deny: dict[str, Any] | None = None, **options: Any
) -> Role:
    spec = RoleSpec(
        allow=RoleConditions(**(allow or {})),
        deny=RoleConditions(**(deny or {})),
        options=RoleOptions(**options),
    )
    return Role.new(name, spec)


# ---------------------------------------------------------------- label selectors


@pytest.mark.parametrize(
    ("selector", "labels", "expected"),
    [
        # exact, keys AND, values OR
        ({"env": "dev"}, {"env": "dev"}, True),
        ({"env": "dev"}, {"env": "prod"}, False),
        ({"env": "dev"}, {}, False),
        ({"env": ["dev", "staging"]}, {"env": "staging"}, True),
        ({"env": ["dev", "staging"]}, {"env": "prod"}, False),
        ({"env": "dev", "team": "a"}, {"env": "dev", "team": "a", "extra": "x"}, True),
        ({"env": "dev", "team": "a"}, {"env": "dev", "team": "b"}, False),
        ({"env": "dev", "team": "a"}, {"env": "dev"}, False),
        # globs match the whole string, `*` matches anything including nothing
        ({"host": "web-*"}, {"host": "web-1"}, True),
        ({"host": "web-*"}, {"host": "web-"}, True),
        ({"host": "web-*"}, {"host": "db-web-1"}, False),
        ({"host": "*-1"}, {"host": "web-1"}, True),
        ({"host": "*-1"}, {"host": "web-10"}, False),
        ({"host": "w*b*1"}, {"host": "web-1"}, True),
        ({"v": "1.*"}, {"v": "1x2"}, False),  # `.` is literal in a glob
        ({"v": "1.*"}, {"v": "1.2"}, True),
        ({"env": "*"}, {"env": "anything"}, True),
        ({"env": "*"}, {"other": "x"}, False),  # a glob value still needs the key
        # regexes: `^…$`, whole-string
        ({"env": "^(dev|stage)$"}, {"env": "stage"}, True),
        ({"env": "^d.v$"}, {"env": "dav"}, True),
        ({"env": "^dev$"}, {"env": "devx"}, False),
        ({"env": "^dev|prod$"}, {"env": "devops"}, False),
        ({"env": "^dev"}, {"env": "^dev"}, True),  # no `$`: a literal, not a regex
        ({"env": "^dev"}, {"env": "dev"}, False),
        # invalid regexes never match, other values still do
        ({"env": "^(dev$"}, {"env": "dev"}, False),
        ({"env": ["^(dev$", "dev"]}, {"env": "dev"}, True),
        # wildcard selector and empty selector
        ({"*": "*"}, {}, True),
        ({"*": "*"}, {"env": "prod"}, True),
        ({"*": ["*"]}, {"env": "prod"}, True),
        ({"*": "*", "env": "dev"}, {"env": "prod"}, True),
        ({"*": "dev"}, {"env": "dev"}, False),
        ({}, {}, False),
        ({}, {"env": "dev"}, False),
    ],
)
def test_match_labels(selector: dict[str, Any], labels: dict[str, str], expected: bool) -> None:
    ok, detail = match_labels(selector, labels)
    assert ok is expected, detail


def test_match_labels_details() -> None:
    assert match_labels({"env": "dev", "team": "*"}, {"env": "dev", "team": "a"}) == (True, "env=dev, team=a")
    assert match_labels({"env": "dev"}, {"env": "prod"}) == (False, "label env=prod does not match dev")
    assert match_labels({"env": "dev"}, {}) == (False, 'no label "env"')
    ok, detail = match_labels({"env": "^(dev$"}, {"env": "dev"})
    assert not ok
    assert 'invalid regex "^(dev$"' in detail
    assert match_labels({}, {})[1] == "empty selector matches nothing"


@pytest.mark.parametrize(
    ("selector", "traits", "labels", "expected"),
    [
        ({"team": "{{internal.teams}}"}, {"teams": ["a", "b"]}, {"team": "b"}, True),
        ({"team": "{{internal.teams}}"}, {"teams": ["a", "b"]}, {"team": "c"}, False),
        ({"team": "{{internal.teams}}"}, {}, {"team": "a"}, False),  # missing trait: nothing matches
        ({"owner": "{{email.local(external.email)}}"}, {"email": ["al@x.io"]}, {"owner": "al"}, True),
        ({"host": "{{internal.teams}}-*"}, {"teams": ["a"]}, {"host": "a-web"}, True),
    ],
)
def test_label_values_expand_traits(
    selector: dict[str, Any], traits: dict[str, list[str]], labels: dict[str, str], expected: bool
) -> None:
    assert match_labels(selector, labels, traits)[0] is expected


# ---------------------------------------------------------------- trait templates

TRAITS = {"logins": ["alice", "deploy"], "email": ["alice@example.com", "al@corp.io"], "empty": []}


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        (["root"], ["root"]),
        (["{{internal.logins}}"], ["alice", "deploy"]),
        (["{{ internal.logins }}"], ["alice", "deploy"]),
        (['{{internal["logins"]}}'], ["alice", "deploy"]),
        (["{{external.logins}}"], ["alice", "deploy"]),
        (["ops-{{internal.logins}}"], ["ops-alice", "ops-deploy"]),
        (["x-{{internal.logins}}-y"], ["x-alice-y", "x-deploy-y"]),
        (["{{external.email}}"], ["alice@example.com", "al@corp.io"]),
        (["{{email.local(external.email)}}"], ["alice", "al"]),
        (["{{email.local(internal.logins)}}"], []),  # not email addresses: dropped
        (["{{internal.missing}}"], []),
        (["root", "{{internal.missing}}"], ["root"]),
        (["{{internal.empty}}"], []),
        (["alice", "{{internal.logins}}"], ["alice", "deploy"]),  # de-duplicated, order kept
        (["{{internal.}}"], []),
        (["{{internal}}"], []),
        (["{{logins}}"], []),
        (["{{strings.upper(internal.logins)}}", "root"], ["root"]),  # unknown function
        (["{{internal.logins"], []),
        (["{{internal.logins}}-{{internal.logins}}"], []),
    ],
)
def test_expand_traits(values: list[str], expected: list[str]) -> None:
    assert expand_traits(values, TRAITS) == expected


def test_trait_given_as_plain_string_is_one_value() -> None:
    assert expand_traits(["{{internal.logins}}"], {"logins": "alice"}) == ["alice"]  # type: ignore[dict-item]


# ---------------------------------------------------------------- SSH nodes

DEV = role(
    "dev", allow={"logins": ["{{internal.logins}}", "ubuntu"], "node_labels": {"env": ["dev", "staging"]}}
)
PROD_RO = role("prod-ro", allow={"logins": ["viewer"], "node_labels": {"env": "prod"}})
NO_PROD = role("no-prod", deny={"node_labels": {"env": "prod"}})
NO_ROOT = role("no-root", deny={"logins": ["root"]})
ROOT_EVERYWHERE = role("root-all", allow={"logins": ["root"], "node_labels": {"*": "*"}})
USER_TRAITS = {"logins": ["alice", "root"]}


@pytest.mark.parametrize(
    ("roles", "labels", "login", "allowed", "decided_by"),
    [
        ([DEV, PROD_RO, NO_ROOT], {"env": "dev"}, "alice", True, "dev"),
        ([DEV, PROD_RO, NO_ROOT], {"env": "staging"}, "ubuntu", True, "dev"),
        ([DEV, PROD_RO, NO_ROOT], {"env": "dev"}, "root", False, "no-root"),  # deny by login
        ([DEV, PROD_RO, NO_ROOT], {"env": "prod"}, "viewer", True, "prod-ro"),
        ([DEV, PROD_RO, NO_ROOT], {"env": "prod"}, "alice", False, None),  # no role allows
        ([DEV, PROD_RO, NO_ROOT], {"env": "qa"}, "alice", False, None),
        ([DEV, PROD_RO, NO_ROOT], {}, "alice", False, None),
        ([DEV, PROD_RO], {"env": "dev"}, "root", True, "dev"),  # root comes from the traits
        ([DEV, PROD_RO], {"env": "dev"}, "bob", False, None),
        ([PROD_RO, NO_PROD], {"env": "prod"}, "viewer", False, "no-prod"),  # deny by labels
        ([NO_PROD, PROD_RO], {"env": "prod"}, "viewer", False, "no-prod"),  # order does not matter
        ([DEV, NO_PROD], {"env": "dev"}, "alice", True, "dev"),  # deny selects other nodes only
        ([ROOT_EVERYWHERE], {}, "root", True, "root-all"),
        ([ROOT_EVERYWHERE, NO_ROOT], {"env": "dev"}, "root", False, "no-root"),  # deny wins
        ([ROOT_EVERYWHERE, NO_PROD], {"env": "prod"}, "root", False, "no-prod"),
        ([role("labels-only", allow={"node_labels": {"*": "*"}})], {}, "alice", False, None),
        ([role("logins-only", allow={"logins": ["alice"]})], {"env": "dev"}, "alice", False, None),
        ([], {"env": "dev"}, "alice", False, None),
    ],
)
def test_node_access_matrix(
    roles: list[Role], labels: dict[str, str], login: str, allowed: bool, decided_by: str | None
) -> None:
    d = AccessChecker(roles, USER_TRAITS, user="alice").check_node(labels, login, node_name="web1")
    assert d.allowed is allowed, d.reason
    assert d.role == decided_by, d.reason
    if decided_by:
        assert f'role "{decided_by}"' in d.reason
    assert len(d.trace) == len(roles)


def test_node_reasons_are_sentences() -> None:
    checker = AccessChecker([DEV, NO_PROD, NO_ROOT], USER_TRAITS)
    assert checker.check_node({"env": "dev"}, "alice").reason == (
        'allowed by role "dev": login "alice", labels env=dev'
    )
    assert checker.check_node({"env": "prod"}, "alice").reason == (
        'denied by role "no-prod": deny.node_labels env=prod'
    )
    assert checker.check_node({"env": "dev"}, "root").reason == 'denied by role "no-root": deny.logins "root"'
    assert checker.check_node({"env": "qa"}, "alice", node_name="web1").reason == (
        'no role allows login "alice" on node "web1"'
    )
    trace = checker.check_node({"env": "qa"}, "alice").trace
    assert (
        trace[0] == 'role "dev": does not allow (allow.node_labels: label env=qa does not match dev|staging)'
    )
    assert trace[1:] == (
        'role "no-prod": does not allow (allow.node_labels: empty selector matches nothing)',
        'role "no-root": does not allow (allow.node_labels: empty selector matches nothing)',
    )
    with pytest.raises(AccessDeniedError, match='no role allows login "alice"'):
        checker.check_node({"env": "qa"}, "alice").raise_if_denied()
    checker.check_node({"env": "dev"}, "alice").raise_if_denied()


def test_node_resource_uses_command_labels_and_hostname() -> None:
    node = Node.new(
        "4f1c",
        NodeSpec(
            hostname="web1",
            cmd_labels={"arch": CommandLabel(name="arch", command=["uname", "-m"], result="x86_64")},
        ),
        labels={"env": "dev"},
    )
    r = role("x86", allow={"logins": ["alice"], "node_labels": {"env": "dev", "arch": "x86_*"}})
    checker = AccessChecker([r])
    assert checker.check_node(node, "alice").allowed
    assert checker.check_node(node, "bob").reason == 'no role allows login "bob" on node "web1"'
    assert checker.can_see_node(node)


@pytest.mark.parametrize(
    ("roles", "labels", "visible"),
    [
        ([DEV], {"env": "dev"}, True),
        ([DEV], {"env": "prod"}, False),
        ([DEV, PROD_RO], {"env": "prod"}, True),
        ([PROD_RO, NO_PROD], {"env": "prod"}, False),
        ([DEV, NO_ROOT], {"env": "dev"}, True),  # a login deny does not hide nodes
        ([], {"env": "dev"}, False),
    ],
)
def test_can_see_node(roles: list[Role], labels: dict[str, str], visible: bool) -> None:
    assert AccessChecker(roles, USER_TRAITS).can_see_node(labels) is visible


def test_logins_are_expanded_minus_denied_and_sorted() -> None:
    checker = AccessChecker([DEV, PROD_RO, NO_ROOT], {"logins": ["zed", "root", "alice"]})
    assert checker.logins() == ["alice", "ubuntu", "viewer", "zed"]
    assert AccessChecker([DEV], {}).logins() == ["ubuntu"]


def test_invalid_regex_never_matches_and_is_reported() -> None:
    bad_allow = role("bad", allow={"logins": ["alice"], "node_labels": {"env": "^(dev$"}})
    d = AccessChecker([bad_allow]).check_node({"env": "dev"}, "alice")
    assert not d.allowed
    assert 'invalid regex "^(dev$"' in d.reason
    assert 'role "bad"' in d.reason

    bad_deny = role("bad-deny", deny={"node_labels": {"env": "^(prod$"}})
    ok = role("ok", allow={"logins": ["alice"], "node_labels": {"*": "*"}})
    d = AccessChecker([ok, bad_deny]).check_node({"env": "prod"}, "alice")
    assert d.allowed  # the broken deny never matches...
    assert 'invalid regex "^(prod$"' in d.reason  # ...and says so
    assert role_problems(bad_deny) == [
        'deny.node_labels env: invalid regex "^(prod$": missing ), unterminated subpattern at position 1 '
        "(never matches)"
    ]
    assert role_problems(DEV) == []


def test_malformed_template_is_dropped_and_reported() -> None:
    r = role("typo", allow={"logins": ["{{internal.}}", "ubuntu"], "node_labels": {"*": "*"}})
    checker = AccessChecker([r], {"logins": ["alice"]})
    assert checker.logins() == ["ubuntu"]
    d = checker.check_node({}, "ubuntu")
    assert d.allowed
    assert 'malformed template "{{internal.}}"' in d.reason
    assert any("malformed template" in line for line in d.trace)
    assert role_problems(r)
    assert "allow.logins" in role_problems(r)[0]


# ---------------------------------------------------------------- apps, databases, kubernetes, desktops


@pytest.mark.parametrize(
    ("labels", "allowed", "decided_by"),
    [
        ({"env": "dev"}, True, "apps"),
        ({"env": "dev", "pii": "yes"}, False, "no-pii"),
        ({"env": "prod"}, False, None),
    ],
)
def test_app_access(labels: dict[str, str], allowed: bool, decided_by: str | None) -> None:
    roles = [
        role("apps", allow={"app_labels": {"env": "dev"}}),
        role("no-pii", deny={"app_labels": {"pii": "yes"}}),
    ]
    d = AccessChecker(roles).check_app(labels, name="grafana")
    assert (d.allowed, d.role) == (allowed, decided_by), d.reason
    if decided_by is None:
        assert d.reason == 'no role allows app "grafana"'


DB_ROLES = [
    role(
        "db-dev",
        allow={
            "db_labels": {"env": "dev"},
            "db_users": ["{{internal.db_users}}", "ro-*"],
            "db_names": ["app", "^test_[0-9]+$"],
        },
    ),
    role("no-admin", deny={"db_users": ["admin"], "db_names": ["secret*"]}),
]


@pytest.mark.parametrize(
    ("labels", "db_user", "db_name", "allowed", "decided_by"),
    [
        ({"env": "dev"}, "alice", "app", True, "db-dev"),
        ({"env": "dev"}, "ro-bob", "test_12", True, "db-dev"),
        ({"env": "dev"}, "alice", "", True, "db-dev"),  # protocol without a database name
        ({"env": "dev"}, "mallory", "app", False, None),
        ({"env": "dev"}, "alice", "other", False, None),
        ({"env": "dev"}, "alice", "test_x", False, None),
        ({"env": "dev"}, "admin", "app", False, "no-admin"),  # admin is in the traits, but denied
        ({"env": "dev"}, "alice", "secrets", False, "no-admin"),
        ({"env": "prod"}, "alice", "app", False, None),
    ],
)
def test_db_access(
    labels: dict[str, str], db_user: str, db_name: str, allowed: bool, decided_by: str | None
) -> None:
    checker = AccessChecker(DB_ROLES, {"db_users": ["alice", "admin"]})
    d = checker.check_db(labels, db_user, db_name, name="pg1")
    assert (d.allowed, d.role) == (allowed, decided_by), d.reason


def test_db_reasons() -> None:
    checker = AccessChecker(DB_ROLES, {"db_users": ["alice"]})
    assert checker.check_db({"env": "dev"}, "alice", "app", name="pg1").reason == (
        'allowed by role "db-dev": db user "alice", db name "app", labels env=dev'
    )
    assert checker.check_db({"env": "dev"}, "admin", "app").reason == (
        'denied by role "no-admin": deny.db_users "admin" matches db user "admin"'
    )
    d = checker.check_db({"env": "dev"}, "bob", "app", name="pg1")
    assert d.reason == 'no role allows database "pg1" as db user "bob", db name "app"'
    assert "does not match allow.db_users alice|ro-*" in d.trace[0]


KUBE_ROLES = [
    role(
        "kube-dev",
        allow={
            "kubernetes_labels": {"env": "dev"},
            "kubernetes_groups": ["{{internal.kubernetes_groups}}", "viewers"],
            "kubernetes_users": ["alice"],
        },
    ),
    role("kube-any", allow={"kubernetes_labels": {"*": "*"}, "kubernetes_groups": ["readers"]}),
    role("no-masters", deny={"kubernetes_groups": ["system:masters"]}),
]


def test_kube_groups_and_users() -> None:
    checker = AccessChecker(KUBE_ROLES, {"kubernetes_groups": ["system:masters", "devs"]})
    assert checker.kube_groups({"env": "dev"}) == ["devs", "readers", "viewers"]
    assert checker.kube_users({"env": "dev"}) == ["alice"]
    assert checker.kube_groups({"env": "prod"}) == ["readers"]
    assert checker.kube_users({"env": "prod"}) == []
    assert checker.check_kube({"env": "prod"}, name="k1").allowed

    deny_prod = role("no-prod-kube", deny={"kubernetes_labels": {"env": "prod"}})
    checker = AccessChecker([*KUBE_ROLES, deny_prod], {"kubernetes_groups": ["devs"]})
    d = checker.check_kube({"env": "prod"}, name="k1")
    assert (d.allowed, d.role) == (False, "no-prod-kube")
    assert checker.kube_groups({"env": "prod"}) == []


def test_kube_needs_a_group_or_user() -> None:
    no_groups = role(
        "kube-empty",
        allow={"kubernetes_labels": {"*": "*"}, "kubernetes_groups": ["{{internal.kubernetes_groups}}"]},
    )
    d = AccessChecker([no_groups], {}).check_kube({"env": "dev"}, name="k1")
    assert not d.allowed
    assert d.reason == 'no kubernetes_groups or kubernetes_users are allowed on kubernetes cluster "k1"'
    assert AccessChecker([no_groups], {"kubernetes_groups": ["devs"]}).check_kube({}).allowed


@pytest.mark.parametrize(
    ("labels", "login", "allowed", "decided_by"),
    [
        ({"os": "windows"}, "alice", True, "desk"),
        ({"os": "windows"}, "Administrator", False, "no-admin-desk"),
        ({"os": "linux"}, "alice", False, None),
        ({"os": "windows"}, "bob", False, None),
    ],
)
def test_desktop_access(labels: dict[str, str], login: str, allowed: bool, decided_by: str | None) -> None:
    roles = [
        role(
            "desk",
            allow={
                "desktop_labels": {"os": "win*"},
                "desktop_logins": ["{{internal.desktop_logins}}", "Administrator"],
            },
        ),
        role("no-admin-desk", deny={"desktop_logins": ["Administrator"]}),
    ]
    d = AccessChecker(roles, {"desktop_logins": ["alice"]}).check_desktop(labels, login, name="dc1")
    assert (d.allowed, d.role) == (allowed, decided_by), d.reason


# ---------------------------------------------------------------- API rules

NO_ROLE_DELETE = role("no-role-delete", deny={"rules": [Rule(resources=["role"], verbs=["delete"])]})
READER = role("reader", allow={"rules": [Rule(resources=["*"], verbs=["read", "list"])]})
LOCKED_OUT = role("locked-out", deny={"rules": [Rule(resources=["*"], verbs=["*"])]})
EDITOR = BUILTIN_ROLES["editor"]


@pytest.mark.parametrize(
    ("roles", "kind", "verb", "allowed", "decided_by"),
    [
        ([EDITOR], "user", "create", True, "editor"),
        ([EDITOR], "role", "delete", True, "editor"),
        ([EDITOR], "cert_authority", "read", True, "editor"),
        ([EDITOR], "cert_authority", "update", False, None),
        ([EDITOR], "event", "list", False, None),
        ([EDITOR, NO_ROLE_DELETE], "role", "delete", False, "no-role-delete"),
        ([NO_ROLE_DELETE, EDITOR], "role", "update", True, "editor"),
        ([READER], "anything", "read", True, "reader"),
        ([READER], "anything", "delete", False, None),
        ([READER, EDITOR, LOCKED_OUT], "user", "read", False, "locked-out"),
        ([], "user", "read", False, None),
    ],
)
def test_rules(roles: list[Role], kind: str, verb: str, allowed: bool, decided_by: str | None) -> None:
    d = AccessChecker(roles).check_rule(kind, verb)
    assert (d.allowed, d.role) == (allowed, decided_by), d.reason


def test_rule_reasons_show_wildcards() -> None:
    assert AccessChecker([EDITOR]).check_rule("role", "update").reason == (
        'allowed by role "editor": rule * on role'
    )
    assert AccessChecker([READER, LOCKED_OUT]).check_rule("user", "read").reason == (
        'denied by role "locked-out": deny rule * on *'
    )
    assert AccessChecker([READER]).check_rule("user", "delete").reason == "no role allows delete on user"


def test_rules_with_where_fail_closed() -> None:
    own = role("own", allow={"rules": [Rule(resources=["session"], verbs=["read"], where="is_owner")]})
    assert not AccessChecker([own]).check_rule("session", "read").allowed
    assert AccessChecker([own]).check_rule("session", "read", where=lambda e: e == "is_owner").allowed
    assert not AccessChecker([own]).check_rule("session", "read", where=lambda e: False).allowed
    deny = role("deny-own", deny={"rules": [Rule(resources=["session"], verbs=["*"], where="x")]})
    assert not AccessChecker([READER, deny]).check_rule("session", "read").allowed
    assert AccessChecker([READER, deny]).check_rule("session", "read", where=lambda e: False).allowed


# ---------------------------------------------------------------- options


@pytest.mark.parametrize(
    ("a", "b", "field", "expected"),
    [
        ({"max_session_ttl": "8h"}, {"max_session_ttl": "2h"}, "max_session_ttl", timedelta(hours=2)),
        ({}, {"max_session_ttl": "30h"}, "max_session_ttl", timedelta(hours=12)),
        ({"require_session_mfa": False}, {"require_session_mfa": True}, "require_session_mfa", True),
        ({}, {}, "require_session_mfa", False),
        ({"port_forwarding": True}, {"port_forwarding": False}, "port_forwarding", False),
        ({}, {}, "port_forwarding", True),
        ({"forward_agent": True}, {"forward_agent": True}, "forward_agent", True),
        ({"forward_agent": True}, {}, "forward_agent", False),
        ({"client_idle_timeout": "30m"}, {}, "client_idle_timeout", timedelta(minutes=30)),
        (
            {"client_idle_timeout": "30m"},
            {"client_idle_timeout": "5m"},
            "client_idle_timeout",
            timedelta(minutes=5),
        ),
        ({}, {}, "client_idle_timeout", None),
        ({"disconnect_expired_cert": True}, {}, "disconnect_expired_cert", True),
        ({"record_session": False}, {"record_session": False}, "record_session", False),
        ({"record_session": False}, {}, "record_session", True),
        ({}, {"record_input": True}, "record_input", True),
    ],
)
def test_options_merge_strictly(a: dict[str, Any], b: dict[str, Any], field: str, expected: Any) -> None:
    checker = AccessChecker([role("a", **a), role("b", **b)])
    assert getattr(checker.options, field) == expected
    assert getattr(merge_options([RoleOptions(**b), RoleOptions(**a)]), field) == expected


def test_options_without_roles_are_defaults() -> None:
    assert AccessChecker([]).options == RoleOptions()


# ---------------------------------------------------------------- built-in roles and identities

ALICE_TRAITS = {
    "logins": ["alice", "deploy"],
    "db_users": ["alice"],
    "db_names": ["app"],
    "kubernetes_groups": ["devs"],
    "kubernetes_users": [],
    "desktop_logins": ["alice"],
}


def identity(*roles: str, traits: dict[str, list[str]] | None = None) -> Identity:
    return Identity(user="alice", roles=roles, traits=ALICE_TRAITS if traits is None else traits)


def test_builtin_access_role_follows_traits() -> None:
    c = AccessChecker.for_identity(identity("access"), {})
    assert c.role_names == ("access",)
    assert c.logins() == ["alice", "deploy"]
    assert c.check_node({"env": "prod"}, "deploy").reason == (
        'allowed by role "access": login "deploy", labels *=*'
    )
    assert not c.check_node({}, "root").allowed
    assert c.check_db({}, "alice", "app").allowed
    assert not c.check_db({}, "postgres", "app").allowed
    assert c.kube_groups({}) == ["devs"]
    assert c.check_kube({}).allowed
    assert c.check_desktop({}, "alice").allowed
    assert c.check_app({"any": "thing"}).allowed
    assert c.check_rule("session", "read").allowed
    assert not c.check_rule("role", "update").allowed

    bare = AccessChecker.for_identity(identity("access", traits={}), {})
    assert bare.logins() == []
    assert not bare.check_node({}, "alice").allowed
    assert not bare.check_kube({}).allowed


def test_builtin_auditor_and_editor() -> None:
    c = AccessChecker.for_identity(identity("auditor", "editor"), {})
    assert c.check_rule("event", "list").allowed
    assert c.check_rule("session", "read").allowed
    assert not c.check_rule("event", "delete").allowed
    assert c.check_rule("lock", "create").allowed
    assert c.logins() == []


def test_stored_role_overrides_builtin() -> None:
    narrow = role("editor", allow={"rules": [Rule(resources=["lock"], verbs=["read"])]})
    c = AccessChecker.for_identity(identity("editor"), {"editor": narrow})
    assert c.check_rule("lock", "read").allowed
    assert not c.check_rule("user", "create").allowed
    assert BUILTIN_ROLES["editor"].spec.allow.rules[0].verbs == ["*"]  # the built-in is untouched


def test_missing_role_denies_by_default_and_is_noted() -> None:
    c = AccessChecker.for_identity(identity("gone"), {})
    assert c.role_names == ()
    d = c.check_node({"env": "dev"}, "alice", node_name="web1")
    assert not d.allowed
    assert d.role is None
    assert (
        d.reason
        == 'no roles: login "alice" on node "web1" is denied by default (role(s) "gone" no longer exist)'
    )
    assert not c.check_rule("user", "read").allowed

    c = AccessChecker.for_identity(identity("gone", "access", "access"), {})
    assert c.role_names == ("access",)
    d = c.check_node({}, "alice")
    assert d.allowed
    assert d.trace[0] == 'role "gone": does not exist, skipped'
    d = c.check_node({}, "root")
    assert d.reason == 'no role allows login "root" (role(s) "gone" no longer exist)'


# ---------------------------------------------------------------- locks


def lock(name: str, expires: datetime | None = None, message: str = "", **target: str) -> Lock:
    return Lock.new(name, LockSpec(target=LockTarget(**target), message=message), expires=expires)


@pytest.mark.parametrize(
    ("target", "context", "applies"),
    [
        ({"user": "alice"}, {"user": "alice"}, True),
        ({"user": "alice"}, {"user": "alice", "node": "web1", "login": "root"}, True),
        ({"user": "alice"}, {"user": "bob"}, False),
        ({"role": "contractor"}, {"user": "bob", "roles": ["access", "contractor"]}, True),
        ({"role": "contractor"}, {"user": "bob", "roles": ["access"]}, False),
        ({"node": "web1"}, {"user": "bob", "node": "web1"}, True),
        ({"node": "web1"}, {"user": "bob", "node": ["4f1c", "web1"]}, True),  # any of the node's names
        ({"node": "web1"}, {"user": "bob", "node": "web2"}, False),
        ({"node": "web1"}, {"user": "bob"}, False),  # not a node connection
        ({"login": "root"}, {"user": "bob", "node": "web9", "login": "root"}, True),
        ({"login": "root"}, {"user": "bob", "node": "web9", "login": "bob"}, False),
        ({"user": "alice", "node": "web1"}, {"user": "alice", "node": "web1"}, True),
        ({"user": "alice", "node": "web1"}, {"user": "alice", "node": "web2"}, False),
        ({"user": "alice", "node": "web1"}, {"user": "bob", "node": "web1"}, False),
        ({"app": "grafana"}, {"user": "bob", "app": "grafana"}, True),
        ({"app": "grafana"}, {"user": "bob", "app": "wiki"}, False),
        ({"app": "grafana"}, {"user": "bob", "node": "grafana"}, False),  # not an app connection
        ({"app": "grafana"}, {"user": "bob"}, False),
        ({"user": "alice", "app": "grafana"}, {"user": "alice", "app": "grafana"}, True),
        ({"user": "alice", "app": "grafana"}, {"user": "bob", "app": "grafana"}, False),
        ({"user": "alice"}, {"user": "alice", "app": "grafana"}, True),
    ],
)
def test_lock_targets(target: dict[str, str], context: dict[str, Any], applies: bool) -> None:
    found = find_lock([lock("l1", **target)], now=NOW, **context)
    assert (found is not None) is applies


def test_expired_locks_do_not_apply() -> None:
    expired = lock("old", expires=NOW - timedelta(seconds=1), user="alice")
    active = lock("new", expires=NOW + timedelta(hours=1), user="alice")
    assert not lock_in_force(expired, NOW)
    assert lock_in_force(active, NOW)
    assert lock_in_force(lock("forever", user="alice"), NOW)
    assert find_lock([expired], user="alice", now=NOW) is None
    assert find_lock([expired, active], user="alice", now=NOW) is active
    assert find_lock([active], user="alice", now=NOW + timedelta(hours=2)) is None


def test_longest_lasting_lock_is_reported() -> None:
    short = lock("short", expires=NOW + timedelta(minutes=5), user="alice")
    long = lock("long", expires=NOW + timedelta(days=1), role="access")
    forever = lock("forever", node="web1")
    assert find_lock([short, long], user="alice", roles=["access"], now=NOW) is long
    assert find_lock([short, long, forever], user="alice", roles=["access"], node="web1", now=NOW) is forever


def test_lock_decision_denies_whatever_the_roles() -> None:
    timed = lock(
        "incident-42",
        expires=datetime(2026, 11, 24, 9, 30, tzinfo=UTC),
        message="security review",
        user="alice",
    )
    d = lock_decision(timed)
    assert isinstance(d, AccessDecision)
    assert not d.allowed
    assert d.locked
    assert d.reason == 'locked: security review (lock "incident-42", until 2026-11-24 09:30:00 UTC)'
    with pytest.raises(LockedError, match="security review"):
        d.raise_if_denied()
    assert lock_decision(lock("l2", node="web1")).reason == (
        'locked: node "web1" is locked (lock "l2", until further notice)'
    )

    ident = identity("access")
    assert AccessChecker.for_identity(ident, {}).check_node({}, "alice").allowed  # roles would allow...
    d2 = check_locks([timed], ident, node="web1", login="alice", now=NOW)
    assert d2 is not None
    assert d2.reason == d.reason  # ...the lock still denies
    assert check_locks([timed], ident, now=datetime(2026, 11, 25, tzinfo=UTC)) is None


@pytest.mark.parametrize(
    ("allow", "deny", "expected"),
    [
        ([], [], set()),
        (["observer"], [], {"observer"}),
        (["*"], [], {"observer", "peer"}),
        (["*"], ["peer"], {"observer"}),
        (["observer", "peer"], ["*"], set()),
    ],
)
def test_join_modes_deny_wins(allow: list[str], deny: list[str], expected: set[str]) -> None:
    from wardgate.api.resources import Role, RoleConditions, RoleSpec
    from wardgate.auth.rbac import AccessChecker

    role = Role.new(
        "r", RoleSpec(allow=RoleConditions(join_sessions=allow), deny=RoleConditions(join_sessions=deny))
    )
    assert set(AccessChecker([role]).join_modes()) == expected
