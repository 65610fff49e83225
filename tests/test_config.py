"""wardgate.yaml: defaults, the printed sample, and errors that point at the line to fix."""

from __future__ import annotations

import re
import socket
import typing
from datetime import timedelta
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from wardgate.api.codec import ParseError
from wardgate.config import (
    SAMPLE_CONFIG,
    Config,
    default_config,
    format_addr,
    load_config,
    load_config_text,
    parse_addr,
    parse_static_token,
)
from wardgate.errors import BadParameterError


def test_default_config_is_auth_proxy_ssh_on_loopback() -> None:
    c = default_config()
    assert c.enabled_services() == ["auth_service", "proxy_service", "ssh_service"]
    assert c.auth_service.listen_addr == "127.0.0.1:3025"
    assert c.proxy_service.listen_addr == "127.0.0.1:3080"
    assert c.ssh_service.listen_addr == "127.0.0.1:3022"
    assert c.wardgate.data_dir == "./wardgate-data"
    assert c.storage_path == Path("wardgate-data/backend.db")
    assert c.audit_path == Path("wardgate-data/audit.db")
    assert c.auth_service.cert_ttl == timedelta(hours=12)
    assert c.auth_service.authentication.second_factor == "otp"
    assert c.auth_service.authentication.lockout.duration == timedelta(minutes=30)
    assert c.proxy_public_addr == "127.0.0.1:3080"


def test_default_config_data_dir_and_derived_paths(tmp_path: Path) -> None:
    c = default_config(str(tmp_path))
    assert c.data_path("keys", "x") == tmp_path / "keys" / "x"
    assert c.storage_path == tmp_path / "backend.db"
    assert c.audit_path == tmp_path / "audit.db"


def test_nodename_defaults_to_a_valid_host_name_and_names_the_cluster() -> None:
    c = load_config_text("")
    expected = re.sub(r"[^A-Za-z0-9._@+-]", "-", socket.gethostname()).lstrip("._@+-") or "localhost"
    assert c.wardgate.nodename == expected
    assert c.cluster_name == expected
    c = load_config_text("wardgate: {nodename: host1}\nauth_service: {cluster_name: example.com}\n")
    assert (c.nodename, c.cluster_name) == ("host1", "example.com")


def test_empty_file_means_defaults_with_proxy_on_all_interfaces() -> None:
    c = load_config_text("# nothing\n")
    assert c.proxy_service.listen_addr == "0.0.0.0:3080"
    assert c.app_service.enabled is False


def test_sample_config_validates() -> None:
    c = load_config_text(SAMPLE_CONFIG, "wardgate.yaml")
    assert c.enabled_services() == ["auth_service", "proxy_service", "ssh_service"]
    assert c.ssh_service.commands[0].command == ["uname", "-r"]
    assert c.ssh_service.commands[0].period == timedelta(hours=1)


def _field_names(model: type[BaseModel]) -> set[str]:
    names = set()
    for name, f in model.model_fields.items():
        names.add(name)
        for t in [f.annotation, *typing.get_args(f.annotation)]:
            if isinstance(t, type) and issubclass(t, BaseModel):
                names |= _field_names(t)
    return names


def test_sample_config_shows_every_option_with_a_comment() -> None:
    keys = set(re.findall(r"^\s*#?\s*-?\s*([a-z_]+):", SAMPLE_CONFIG, re.M))
    missing = _field_names(Config) - keys
    assert not missing, f"SAMPLE_CONFIG lacks {sorted(missing)}"
    assert set(yaml.safe_load(SAMPLE_CONFIG)) == set(Config.model_fields)
    lines = SAMPLE_CONFIG.splitlines()
    in_list_items = {"name", "command", "period"}  # fields of list entries, explained above the list
    options = _field_names(Config) - in_list_items - {"version"}
    for i, line in enumerate(lines):
        m = re.match(r"^\s*([a-z_]+): \S", line)
        if m and m.group(1) in options:
            assert lines[i - 1].strip().startswith("#"), f"no comment above {line.strip()!r}"


def test_bad_listen_addr_reports_file_line_and_field() -> None:
    text = "version: v1\nauth_service:\n  enabled: true\n  listen_addr: 127.0.0.1:99999\n"
    with pytest.raises(ParseError) as e:
        load_config_text(text, "wardgate.yaml")
    err = e.value
    assert (err.line, err.field) == (4, "auth_service.listen_addr")
    assert str(err).startswith("wardgate.yaml:4: auth_service.listen_addr: invalid port '99999'")


def test_unknown_section_and_unknown_option_are_rejected() -> None:
    with pytest.raises(ParseError) as e:
        load_config_text("version: v1\nauth_servce:\n  enabled: true\n")
    assert e.value.line == 2
    assert "unknown field" in str(e.value)
    assert "'auth_service'" in str(e.value)
    with pytest.raises(ParseError, match=r"^wardgate\.yaml:3: ssh_service\.listen_adr: unknown field"):
        load_config_text("ssh_service:\n  enabled: true\n  listen_adr: :3022\n")


def test_storage_postgres_is_rejected_clearly() -> None:
    with pytest.raises(ParseError) as e:
        load_config_text("wardgate:\n  storage:\n    type: postgres\n")
    assert (e.value.line, e.value.field) == (3, "wardgate.storage.type")
    assert "postgres storage is not available" in e.value.message
    assert "sqlite" in e.value.message


def test_storage_path_override(tmp_path: Path) -> None:
    text = f"wardgate:\n  storage: {{path: {tmp_path}/b.db}}\nauth_service:\n  audit: {{path: a.db}}\n"
    c = load_config_text(text)
    assert c.storage_path == tmp_path / "b.db"
    assert c.audit_path == Path("a.db")


def test_auth_token_literal_and_from_file(tmp_path: Path) -> None:
    assert load_config_text("wardgate: {auth_token: abc123}\n").wardgate.join_token == "abc123"
    f = tmp_path / "token"
    f.write_text("  s3cret-from-file\n")
    c = load_config_text(f"wardgate:\n  auth_token: {f}\n")
    assert c.wardgate.join_token == "s3cret-from-file"
    assert c.wardgate.auth_token == str(f)
    with pytest.raises(ParseError) as e:
        load_config_text(f"wardgate:\n  auth_token: {tmp_path}/absent\n")
    assert (e.value.line, e.value.field) == (2, "wardgate.auth_token")
    assert "cannot read the token file" in e.value.message
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ParseError, match="is empty"):
        load_config_text(f"wardgate:\n  auth_token: {tmp_path}/empty\n")


def test_load_config_file(tmp_path: Path) -> None:
    p = tmp_path / "wardgate.yaml"
    p.write_text("version: v1\nwardgate:\n  data_dir: /var/lib/wardgate\n")
    assert load_config(p).wardgate.data_dir == "/var/lib/wardgate"
    p.write_text("version: v1\nproxy_service:\n  listen_addr: 'http://x'\n")
    with pytest.raises(ParseError) as e:
        load_config(p)
    assert str(e.value).startswith(f"{p}:3: proxy_service.listen_addr:")
    assert "no scheme" in str(e.value)


def test_missing_config_file_says_how_to_make_one(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(BadParameterError) as e:
        load_config(path)
    assert str(path) in str(e.value)
    assert "wardgate configure > wardgate.yaml" in str(e.value)
    with pytest.raises(BadParameterError, match="is a directory"):
        load_config(tmp_path)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("example.com", ("example.com", 3025)),
        ("example.com:443", ("example.com", 443)),
        ("10.0.0.1:0", ("10.0.0.1", 0)),
        ("[::1]:3025", ("::1", 3025)),
        ("[fe80::1%eth0]:22", ("fe80::1%eth0", 22)),
        ("[::1]", ("::1", 3025)),
        ("::1", ("::1", 3025)),
        (":3025", ("", 3025)),
        (" localhost ", ("localhost", 3025)),
    ],
)
def test_parse_addr_accepts(text: str, expected: tuple[str, int]) -> None:
    assert parse_addr(text, 3025) == expected


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("", "empty address"),
        ("host:port", "invalid port 'port'"),
        ("host:65536", "0 to 65535"),
        ("https://proxy:443", "no scheme"),
        ("two words", "invalid address"),
        ("[::1", "brackets"),
        ("[nothex]:1", "invalid IPv6"),
        ("fe80::zz:1", "brackets"),
        ("-host:1", "invalid host"),
        ("host:", "invalid port"),
    ],
)
def test_parse_addr_rejects(text: str, needle: str) -> None:
    with pytest.raises(ValueError, match=re.escape(needle)):
        parse_addr(text, 3025)


def test_parse_addr_without_default_port_requires_one() -> None:
    with pytest.raises(ValueError, match="needs a port"):
        parse_addr("db.internal", None)
    assert format_addr("::1", 5) == "[::1]:5"
    assert format_addr("h", 5) == "h:5"


def test_listen_addrs_are_normalised_with_default_ports() -> None:
    c = load_config_text("auth_service: {listen_addr: 0.0.0.0}\nssh_service: {listen_addr: '[::]'}\n")
    assert c.auth_service.listen_addr == "0.0.0.0:3025"
    assert c.ssh_service.listen_addr == "[::]:3022"


def test_yaml_booleans_on_off_are_read_as_words() -> None:
    text = "auth_service:\n  session_recording: off\n  authentication:\n    second_factor: on\n"
    c = load_config_text(text)
    assert c.auth_service.session_recording == "off"
    assert c.auth_service.authentication.second_factor == "on"
    log = load_config_text("wardgate: {log: {severity: WARN, format: JSON}}").wardgate.log
    assert (log.severity, log.format) == ("warning", "json")


def test_bad_second_factor_names_choices() -> None:
    with pytest.raises(ParseError) as e:
        load_config_text("auth_service:\n  authentication:\n    second_factor: sms\n")
    assert e.value.line == 3
    assert "'otp'" in e.value.message
    assert '"sms"' in e.value.message


def test_ports_must_not_collide() -> None:
    with pytest.raises(ParseError) as e:
        load_config_text("proxy_service:\n  listen_addr: 0.0.0.0:3022\n")
    assert e.value.field == "ssh_service.listen_addr"
    assert "already taken by proxy_service.listen_addr" in e.value.message
    # port 0 (pick a free port) never collides
    load_config_text("proxy_service: {listen_addr: ':0'}\nssh_service: {listen_addr: '127.0.0.1:0'}\n")


def test_nothing_enabled_is_an_error() -> None:
    text = "auth_service: {enabled: false}\nproxy_service: {enabled: false}\nssh_service: {enabled: false}\n"
    with pytest.raises(ParseError, match="nothing to run"):
        load_config_text(text)


def test_static_tokens() -> None:
    c = load_config_text("auth_service:\n  tokens: ['node,app:abc', 'proxy:x:y']\n")
    assert c.auth_service.static_tokens() == [(["node", "app"], "abc"), (["proxy"], "x:y")]
    assert parse_static_token("db:s") == (["db"], "s")
    with pytest.raises(ParseError, match="ROLES:SECRET"):
        load_config_text("auth_service:\n  tokens: [justasecret]\n")
    with pytest.raises(ParseError, match="invalid role"):
        load_config_text("auth_service:\n  tokens: ['admin:x']\n")


def test_ssh_labels_and_commands() -> None:
    text = "ssh_service:\n  labels: {tier: 1, gpu: yes}\n  commands:\n    - {name: up, command: [uptime]}\n"
    c = load_config_text(text)
    assert c.ssh_service.labels == {"tier": "1", "gpu": "true"}
    assert c.ssh_service.commands[0].period == timedelta(minutes=1)
    with pytest.raises(ParseError) as e:
        load_config_text("ssh_service:\n  commands:\n    - name: up\n      command: uptime\n")
    assert e.value.field == "ssh_service.commands[0].command"
    assert e.value.line == 4
    with pytest.raises(ParseError, match="use a form like"):
        load_config_text("ssh_service:\n  commands: [{name: up, command: [uptime], period: soon}]\n")


def test_ca_pin() -> None:
    pin = "sha256:" + "ab" * 32
    assert load_config_text(f"wardgate: {{ca_pin: {pin}}}").wardgate.ca_pin == [pin]
    upper = "sha256:" + "AB" * 32
    assert load_config_text(f"wardgate: {{ca_pin: [{upper}]}}").wardgate.ca_pin == [pin]
    with pytest.raises(ParseError, match="invalid CA pin"):
        load_config_text("wardgate: {ca_pin: [sha256:abc]}")


def test_version_must_be_v1() -> None:
    with pytest.raises(ParseError) as e:
        load_config_text("version: v3\n")
    assert (e.value.line, e.value.field) == (1, "version")


def test_assignment_is_validated() -> None:
    c = default_config()
    c.wardgate.data_dir = "/tmp/elsewhere"
    assert c.storage_path == Path("/tmp/elsewhere/backend.db")
    with pytest.raises(ValueError, match="data_dir must not be empty"):
        c.wardgate.data_dir = " "
