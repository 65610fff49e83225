"""Resource codec: round trips for every kind, and errors that name the file, line and field."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
import yaml

from wardgate.api.codec import (
    ParseError,
    dump_json,
    dump_yaml,
    load_resources,
    resource_from_dict,
    resource_from_json,
    resource_to_dict,
    resource_to_json,
    validate_yaml,
    yaml_documents_with_lines,
)
from wardgate.api.resources import (
    KINDS,
    App,
    AppHeader,
    AppRewrite,
    AppService,
    AppServiceSpec,
    AppSpec,
    CAKeyPair,
    CertAuthority,
    CertAuthoritySpec,
    CommandLabel,
    Database,
    DatabaseAuth,
    DatabasePassword,
    DatabaseService,
    DatabaseServiceSpec,
    DatabaseSpec,
    DatabaseTLS,
    Lock,
    LockSpec,
    LockTarget,
    Model,
    Node,
    NodeSpec,
    Resource,
    Role,
    RoleConditions,
    RoleOptions,
    RoleSpec,
    Rule,
    Token,
    TokenSpec,
    User,
    UserSpec,
    UserStatus,
)
from wardgate.errors import BadParameterError

WHEN = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
PEM = "-----BEGIN CERTIFICATE-----\nMIIBszCCAVmgAwIBAgIU\nAbCd==\n-----END CERTIFICATE-----\n"


def _conditions(tag: str) -> RoleConditions:
    """Every condition field set, so a field the codec dropped would show up as a difference."""
    return RoleConditions(
        logins=["{{internal.logins}}", f"{tag}-root"],
        node_labels={"env": ["prod", "staging"], "*": "*"},
        app_labels={"team": "^web-.*$"},
        db_labels={"engine": "postgres"},
        db_users=["{{external.db_user}}"],
        db_names=["main", "*"],
        kubernetes_labels={"region": "eu-*"},
        kubernetes_groups=["system:masters"],
        kubernetes_users=["alice@example.com"],
        desktop_labels={"os": "windows"},
        desktop_logins=["Administrator"],
        rules=[
            Rule(resources=["role", "user"], verbs=["list", "read"], where='contains(user.spec.roles, "x")')
        ],
        join_sessions=["observer", "peer"],
    )


SAMPLES: dict[str, Resource] = {
    "role": Role.new(
        "dev-team",
        RoleSpec(
            options=RoleOptions(
                max_session_ttl=timedelta(hours=8, minutes=30),
                require_session_mfa=True,
                port_forwarding=False,
                forward_agent=True,
                client_idle_timeout=timedelta(minutes=15),
                disconnect_expired_cert=True,
                record_session=False,
                record_input=True,
            ),
            allow=_conditions("allow"),
            deny=_conditions("deny"),
        ),
        description="Developers: 'quotes', \"double\", # hash, colon: here",
        labels={"yes": "on", "num": "12", "null": "null", "spaces": " padded ", "star": "*"},
        expires=WHEN,
    ),
    "user": User.new(
        "alice@example.com",
        UserSpec(
            roles=["access", "editor"],
            traits={"logins": ["alice", "root"], "kubernetes_groups": ["devs"]},
            status=UserStatus(locked_until=WHEN, lock_reason="too many failed logins"),
            created=datetime(2026, 11, 23, 10, 0, 0, 123456, tzinfo=UTC),
            created_by="admin",
            has_password=True,
            mfa_devices=["phone", "yubikey"],
        ),
    ),
    "token": Token.new(
        "tok-1", TokenSpec(roles=["node", "app"], token_hash="ab" * 32, static=True), expires=WHEN
    ),
    "cert_authority": CertAuthority.new(
        "host",
        CertAuthoritySpec(
            type="host",
            cluster_name="example",
            active_keys=[
                CAKeyPair(
                    ssh_public_key="ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIB wardgate",
                    ssh_private_key_pem=PEM,
                    tls_cert_pem=PEM,
                    tls_private_key_pem=PEM,
                )
            ],
            additional_trusted_keys=[CAKeyPair(tls_cert_pem=PEM)],
        ),
    ),
    "node": Node.new(
        "db-1",
        NodeSpec(
            hostname="db-1.internal",
            addr="10.0.0.5:3022",
            host_id="6f1c",
            tunnel=True,
            cmd_labels={"kernel": CommandLabel(name="kernel", command=["uname", "-r"], result="6.1.0")},
            version="0.1.0",
        ),
        labels={"env": "prod"},
    ),
    "lock": Lock.new(
        "lock-1",
        LockSpec(
            target=LockTarget(user="mallory", login="root"),
            message="incident 42",
            created_by="bob",
            created=WHEN,
        ),
    ),
    "db": Database.new(
        "pg-main",
        DatabaseSpec(
            protocol="postgres",
            uri="db.internal:5432",
            tls=DatabaseTLS(mode="verify-ca", ca_cert_file="/etc/wardgate/db-ca.pem"),
            auth=DatabaseAuth(passwords={"reporting": DatabasePassword(env="PG_REPORTING_PASSWORD")}),
            host_id="db-6f1c",
            hostname="db-agent-1",
        ),
        labels={"env": "prod"},
    ),
    "db_service": DatabaseService.new(
        "db-6f1c",
        DatabaseServiceSpec(
            hostname="db-agent-1", tunnel=True, resources=[{"env": "dev"}], databases=["pg-main"]
        ),
    ),
    "app": App.new(
        "grafana",
        AppSpec(
            uri="https://grafana.internal:3000/",
            public_addr="grafana.proxy.example:443",
            insecure_skip_verify=True,
            rewrite=AppRewrite(
                redirect=["localhost"],
                headers=[AppHeader(name="X-Grafana-User", value="{{internal.logins}}")],
            ),
            host_id="app-6f1c",
            hostname="app-agent-1",
        ),
        labels={"env": "prod"},
        description="Dashboards",
    ),
    "app_service": AppService.new(
        "app-6f1c",
        AppServiceSpec(hostname="app-agent-1", tunnel=True, resources=[{"team": "web"}], apps=["grafana"]),
    ),
}


def test_every_registered_kind_has_a_sample() -> None:
    assert set(KINDS) <= set(SAMPLES), f"add a sample for {set(KINDS) - set(SAMPLES)}"


@pytest.mark.parametrize("kind", sorted(SAMPLES))
def test_yaml_round_trip(kind: str) -> None:
    r = SAMPLES[kind]
    text = dump_yaml(r)
    [back] = load_resources(text, f"{kind}.yaml")
    assert type(back) is type(r)
    assert back == r


@pytest.mark.parametrize("kind", sorted(SAMPLES))
def test_json_round_trips(kind: str) -> None:
    r = SAMPLES[kind]
    assert load_resources(dump_json(r)) == [r]
    assert resource_from_json(resource_to_json(r)) == r
    assert resource_from_dict(resource_to_dict(r)) == r


def test_all_kinds_in_one_multi_document_file() -> None:
    items = list(SAMPLES.values())
    text = dump_yaml(items)
    assert text.count("\n---\n") == len(items) - 1
    assert load_resources(text) == items
    assert load_resources(dump_json(items)) == items


def test_yaml_keeps_model_order_and_shows_every_option() -> None:
    text = dump_yaml(SAMPLES["role"])
    top = [line.split(":")[0] for line in text.splitlines() if line and not line.startswith(" ")]
    assert top == ["kind", "version", "metadata", "spec"]
    spec_keys = [
        line.strip().split(":")[0]
        for line in text.splitlines()
        if line.startswith("  ") and not line.startswith("   ") and text.index("spec:") < text.index(line)
    ]
    assert spec_keys[:3] == ["options", "allow", "deny"]
    for field in RoleOptions.model_fields:
        assert f"    {field}:" in text
    assert "max_session_ttl: 8h30m" in text
    assert "client_idle_timeout: 15m" in text
    assert "revision" not in text


def test_tricky_strings_survive_yaml() -> None:
    r = SAMPLES["role"]
    [back] = load_resources(dump_yaml(r))
    assert back.metadata.labels == r.metadata.labels
    assert back.metadata.labels["yes"] == "on"
    assert back.metadata.description == r.metadata.description
    # and a YAML 1.1 reader sees strings, not booleans or numbers
    raw = yaml.safe_load(dump_yaml(r))
    assert all(isinstance(v, str) for v in raw["metadata"]["labels"].values())


def test_datetimes_are_rfc3339_strings_and_pem_is_a_literal_block() -> None:
    d = resource_to_dict(SAMPLES["user"])
    assert d["spec"]["created"] == "2026-11-23T10:00:00.123456Z"
    assert d["spec"]["status"]["locked_until"] == "2030-01-02T03:04:05Z"
    assert "revision" not in d["metadata"]
    text = dump_yaml(SAMPLES["cert_authority"])
    assert "tls_cert_pem: |\n" in text
    assert "      -----BEGIN CERTIFICATE-----\n" in text


def test_revision_kept_when_set() -> None:
    r = SAMPLES["node"].model_copy(deep=True)
    r.metadata.revision = 7
    assert resource_to_dict(r)["metadata"]["revision"] == 7
    assert json.loads(resource_to_json(r))["metadata"]["revision"] == 7
    assert resource_from_json(resource_to_json(r)).metadata.revision == 7
    assert b"revision" not in resource_to_json(SAMPLES["node"])


def test_storage_json_is_compact() -> None:
    data = resource_to_json(SAMPLES["lock"])
    assert b"\n" not in data
    assert b": " not in data
    assert data.startswith(b'{"kind":"lock"')


def test_resource_from_json_without_kind_first() -> None:
    d = resource_to_dict(SAMPLES["lock"])
    reordered = {"metadata": d["metadata"], "spec": d["spec"], "version": "v1", "kind": "lock"}
    assert resource_from_json(json.dumps(reordered)) == SAMPLES["lock"]


def test_resource_from_json_errors() -> None:
    with pytest.raises(ParseError, match="invalid JSON"):
        resource_from_json(b'{"kind": "role", ')
    with pytest.raises(ParseError) as e:
        resource_from_json(b'{"kind":"role","metadata":{"name":"x"},"spec":{"allow":{"logins":"root"}}}')
    assert e.value.field == "spec.allow.logins"


HAND_WRITTEN = """\
# comment before the first document
---
kind: role
version: v1
metadata:
  name: access
spec:
  allow:
    logins: ['{{internal.logins}}']
    node_labels:
      '*': '*'
---
---
kind: user
metadata:
  name: alice
spec:
  roles: [access]
...
"""


def test_multi_document_yaml_skips_empty_documents_and_fills_defaults() -> None:
    role, user = load_resources(HAND_WRITTEN, "x.yaml")
    assert isinstance(role, Role)
    assert isinstance(user, User)
    assert role.spec.allow.logins == ["{{internal.logins}}"]
    assert role.spec.options.max_session_ttl == timedelta(hours=12)
    assert user.spec.roles == ["access"]
    assert user.version == "v1"


def test_yaml_list_and_json_list_and_json_object() -> None:
    yaml_list = (
        "- {kind: role, metadata: {name: a}}\n"
        "- {kind: lock, metadata: {name: b}, spec: {target: {user: x}}}\n"
    )
    a, b = load_resources(yaml_list)
    assert (a.kind, b.kind) == ("role", "lock")
    json_list = json.dumps(
        [{"kind": "role", "metadata": {"name": "a"}}, {"kind": "user", "metadata": {"name": "u"}}]
    )
    assert [r.name for r in load_resources(json_list)] == ["a", "u"]
    assert load_resources(b'{"kind": "node", "metadata": {"name": "n"}}')[0].kind == "node"


def test_kind_aliases_are_accepted() -> None:
    [r] = load_resources("kind: roles\nmetadata: {name: a}\n")
    assert isinstance(r, Role)
    assert r.kind == "role"


@pytest.mark.parametrize("text", ["", "   \n", "# only a comment\n", "---\n---\n", "[]", "\ufeff"])
def test_empty_input_is_no_resources(text: str) -> None:
    assert load_resources(text) == []


def test_malformed_yaml_reports_line() -> None:
    text = "kind: role\nmetadata:\n  name: a\nspec:\n  allow: {logins: [root}\n"
    with pytest.raises(ParseError) as e:
        load_resources(text, "roles.yaml")
    assert e.value.line == 5
    assert str(e.value).startswith("roles.yaml:5: invalid YAML:")
    with pytest.raises(ParseError, match=r"^bad\.yaml:2: invalid YAML: mapping values are not allowed"):
        load_resources("kind: role\nmetadata: name: a\n", "bad.yaml")


def test_malformed_json_falls_back_to_yaml_errors_with_lines() -> None:
    with pytest.raises(ParseError) as e:
        load_resources('{\n  "kind": "role",\n  "metadata": {"name": "a"\n', "r.json")
    assert e.value.line is not None
    assert e.value.line >= 3


def test_unknown_kind_lists_known_kinds() -> None:
    with pytest.raises(ParseError) as e:
        load_resources("version: v1\nkind: rolez\nmetadata: {name: a}\n", "r.yaml")
    assert e.value.line == 2
    assert e.value.field == "kind"
    for k in KINDS:
        assert k in str(e.value)


def test_missing_kind() -> None:
    with pytest.raises(ParseError, match=r"^r\.yaml:4: missing kind: expected one of .*role"):
        load_resources("kind: role\nmetadata: {name: a}\n---\nmetadata: {name: b}\n", "r.yaml")


def test_document_must_be_a_mapping() -> None:
    with pytest.raises(ParseError, match="expected a resource"):
        load_resources("just a string\n")


ROLE_WITH_STRING_LOGINS = """\
kind: role
version: v1
metadata:
  name: dev
spec:
  allow:
    node_labels:
      env: prod
    logins: root
"""


def test_wrong_type_names_field_and_line() -> None:
    with pytest.raises(ParseError) as e:
        load_resources(ROLE_WITH_STRING_LOGINS, "roles.yaml")
    err = e.value
    assert isinstance(err, BadParameterError)
    assert (err.source, err.line, err.field) == ("roles.yaml", 9, "spec.allow.logins")
    assert str(err).startswith("roles.yaml:9: spec.allow.logins: Input should be a valid list")
    assert '"root"' in str(err)


def test_wrong_type_in_json_names_line() -> None:
    doc = {"kind": "role", "metadata": {"name": "x"}, "spec": {"allow": {"logins": "root"}}}
    text = json.dumps(doc, indent=2)
    with pytest.raises(ParseError) as e:
        load_resources(text, "r.json")
    assert e.value.field == "spec.allow.logins"
    assert e.value.line == text.splitlines().index('      "logins": "root"') + 1


def test_list_item_error_points_at_item() -> None:
    text = """\
kind: role
metadata: {name: a}
spec:
  allow:
    rules:
      - resources: [role]
        verbs: [list]
      - resources: [user]
        verbs: [smash]
"""
    with pytest.raises(ParseError) as e:
        load_resources(text, "r.yaml")
    assert e.value.field == "spec.allow.rules[1].verbs"
    assert e.value.line == 9
    assert "unknown verb" in str(e.value)


def test_union_errors_are_merged() -> None:
    with pytest.raises(ParseError) as e:
        load_resources("kind: role\nmetadata: {name: a}\nspec:\n  allow:\n    node_labels: {env: 5}\n")
    assert e.value.field == "spec.allow.node_labels.env"
    assert "valid string or a valid list" in e.value.message
    assert e.value.line == 5


def test_unknown_field_suggests_spelling() -> None:
    text = "kind: role\nmetadata: {name: a}\nspec:\n  allow:\n    lgins: [root]\n"
    with pytest.raises(ParseError) as e:
        load_resources(text, "r.yaml")
    assert e.value.line == 5
    assert e.value.field == "spec.allow.lgins"
    assert "unknown field (check the spelling" in str(e.value)
    assert "'logins'" in str(e.value)
    with pytest.raises(ParseError, match=r"r\.yaml:3: zzz: unknown field \(check the spelling\)$"):
        load_resources("kind: user\nmetadata: {name: a}\nzzz: 1\n", "r.yaml")


def test_missing_metadata_name() -> None:
    with pytest.raises(ParseError) as e:
        load_resources("kind: user\nmetadata:\n  labels: {a: b}\n", "u.yaml")
    assert (e.value.line, e.value.field, e.value.message) == (2, "metadata.name", "field required")


def test_missing_metadata_entirely() -> None:
    with pytest.raises(ParseError) as e:
        load_resources("kind: user\nspec: {}\n", "u.yaml")
    assert e.value.field == "metadata"
    assert e.value.line == 1


def test_bad_name_characters() -> None:
    with pytest.raises(ParseError) as e:
        load_resources("kind: role\nmetadata:\n  name: 'bad name!'\n", "r.yaml")
    assert e.value.line == 3
    assert e.value.field == "metadata.name"
    assert "letters, digits" in e.value.message
    assert not e.value.message.startswith("Value error")


def test_bad_duration_says_how_to_write_one() -> None:
    text = "kind: role\nmetadata: {name: a}\nspec:\n  options:\n    max_session_ttl: 12x\n"
    with pytest.raises(ParseError) as e:
        load_resources(text, "r.yaml")
    assert e.value.line == 5
    assert e.value.field == "spec.options.max_session_ttl"
    assert "12h" in e.value.message
    assert "1h30m" in e.value.message


def test_version_must_be_v1() -> None:
    with pytest.raises(ParseError) as e:
        load_resources("kind: role\nversion: v7\nmetadata: {name: a}\n", "r.yaml")
    assert e.value.line == 2
    assert e.value.field == "version"
    assert "v1" in e.value.message


def test_all_problems_in_a_document_are_reported_in_line_order() -> None:
    text = """\
kind: role
metadata:
  name: ok
spec:
  options:
    max_session_ttl: 1y
  allow:
    logins: root
  dney: {}
"""
    with pytest.raises(ParseError) as e:
        load_resources(text, "r.yaml")
    assert [p.line for p in e.value.problems] == [6, 8, 9]
    lines = str(e.value).splitlines()
    assert len(lines) == 3
    assert lines[2].startswith("r.yaml:9: spec.dney: unknown field")


def test_duplicate_keys_are_rejected() -> None:
    with pytest.raises(ParseError) as e:
        load_resources("kind: role\nmetadata: {name: a}\nspec:\n  allow: {}\n  allow: {}\n", "r.yaml")
    assert e.value.line == 5
    assert "duplicate key 'allow' (first at line 4)" in str(e.value)


def test_merge_keys_work_and_may_be_overridden() -> None:
    text = """\
kind: role
metadata: {name: a}
spec:
  allow: &common
    logins: [root]
    db_users: [x]
  deny:
    <<: *common
    logins: [admin]
"""
    [r] = load_resources(text)
    assert r.spec.deny.logins == ["admin"]
    assert r.spec.deny.db_users == ["x"]


def test_lines_are_recorded_for_keys_and_items() -> None:
    [(data, lines)] = yaml_documents_with_lines("a:\n  b:\n    - x\n    - y\n", "f.yaml")
    assert data == {"a": {"b": ["x", "y"]}}
    assert lines.line_for(("a", "b", 1)) == 4
    assert lines.line_for(("a", "b", 1, "missing", "deeper")) == 4
    assert lines.line_for(("nothing",)) == 1


class Small(Model):
    port: int = 1


def test_validate_yaml_generic_helper() -> None:
    assert validate_yaml(Small, "port: 5\n", "s.yaml").port == 5
    assert validate_yaml(Small, "", "s.yaml").port == 1
    with pytest.raises(ParseError, match=r"^s\.yaml:3: expected one YAML document, found 2$"):
        validate_yaml(Small, "port: 1\n---\nport: 2\n", "s.yaml")
    with pytest.raises(ParseError, match=r"^s\.yaml:2: port: Input should be a valid integer"):
        validate_yaml(Small, "\nport: many\n", "s.yaml")
    with pytest.raises(ParseError, match=r"^s\.yaml:1: expected a mapping of fields"):
        validate_yaml(Small, "- 1\n", "s.yaml")
