"""Application access on the auth side: app resources, heartbeats, what users see, certificates
routed to apps, browser app sessions (token → secret, once) and the JWTs apps receive."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest
from pydantic import ValidationError

from tests.conftest import ADMIN, FakeClock
from tests.test_auth_server import PASSWORD, register
from wardgate.api.client import AuthClient
from wardgate.api.identityfile import IdentityFile
from wardgate.api.resources import (
    App,
    AppHeader,
    AppRewrite,
    AppService,
    AppServiceSpec,
    AppSpec,
    LockSpec,
    LockTarget,
    Role,
    RoleConditions,
    RoleOptions,
    RoleSpec,
    app_public_addr,
)
from wardgate.auth import jwt, totp
from wardgate.auth.api import AuthAPI
from wardgate.auth.appsessions import AppSessionRecord, AppSessionStore
from wardgate.auth.certs import verify_tls_identity
from wardgate.auth.identity import Identity
from wardgate.auth.server import SESSION_MFA_TTL, AuthServer
from wardgate.auth.storage import ResourceStore
from wardgate.auth.websessions import WebSessionRecord
from wardgate.backend.memory import MemoryBackend
from wardgate.errors import (
    AccessDeniedError,
    AlreadyExistsError,
    AuthenticationError,
    BadParameterError,
    LockedError,
    NotFoundError,
)
from wardgate.keys import generate_tls_key, private_key_pem, public_key_pem

PROXY = Identity(user="proxy-p1", system_role="proxy", host_id="proxy-p1")
APP_SVC = Identity(user="app-h1", system_role="app", host_id="app-h1")
OTHER_SVC = Identity(user="app-h2", system_role="app", host_id="app-h2")
DB_SVC = Identity(user="db-h1", system_role="db", host_id="db-h1")
NODE = Identity(user="n1", system_role="node", host_id="n1")


def tls_key() -> str:
    return public_key_pem(generate_tls_key().public_key())


def user_app(name: str = "grafana", **labels: str) -> App:
    return App.new(name, AppSpec(uri=f"http://127.0.0.1:9/{name}"), labels=labels)


async def serve(auth: AuthServer, svc: Identity, *apps: App, config: bool = True) -> None:
    """Heartbeat `svc` serving `apps`: as its config apps (host_id = svc), or as `wardctl create`d ones."""
    expires = auth.now() + timedelta(minutes=10)
    for app in apps:
        if config:
            beat = app.model_copy(deep=True)
            beat.spec.host_id = svc.host_id
            beat.metadata.expires = expires
            await auth.upsert_heartbeat(svc, beat)
        elif await auth.store.find("app", app.name) is None:
            await auth.put_resource(ADMIN, app)
    me = AppService.new(
        svc.host_id, AppServiceSpec(hostname=svc.host_id, apps=[a.name for a in apps]), expires=expires
    )
    await auth.upsert_heartbeat(svc, me)


async def fresh_code(clock: FakeClock, secret: str) -> str:
    clock.advance(30)  # each TOTP step is good for one use
    return totp.current_code(secret, clock())


async def web_session(
    auth: AuthServer, clock: FakeClock, secret: str, user: str = "alice"
) -> WebSessionRecord:
    rec, _ = await auth.create_web_session(
        PROXY, user=user, password=PASSWORD, otp=await fresh_code(clock, secret)
    )
    return rec


def as_user(auth: AuthServer, rec: WebSessionRecord) -> Identity:
    """The identity the auth API sees when the proxy calls with the web session's certificate."""
    return verify_tls_identity(rec.tls_cert, auth.ca_certs("user"), now=auth.now())


async def events(auth: AuthServer, kind: str) -> list[dict]:
    found, _ = await auth.audit.search(types=[kind], limit=100)
    return found


# ---------------------------------------------------------------- resources


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"uri": "localhost:3000"}, "must start with http://, https:// or tcp://"),
        ({"uri": "ftp://files.internal"}, "must start with http://, https:// or tcp://"),
        ({"uri": "http://:3000"}, "names no host"),
        ({"uri": "http://a b:3000"}, "neither a host name nor an IP address"),
        ({"uri": "http://grafana:0"}, "port must be a number from 1 to 65535"),
        ({"uri": "http://grafana:99999"}, "port must be a number from 1 to 65535"),
        ({"uri": "http://admin:pw@grafana:3000"}, "no user name or password"),
        ({"uri": "tcp://10.0.0.5"}, "a tcp app needs a port"),
        ({"uri": "tcp://10.0.0.5:5432/db"}, "host:port only"),
        ({"uri": "http://a", "public_addr": "https://grafana.example"}, "without scheme or path"),
        ({"uri": "http://a", "public_addr": "10.0.0.7"}, "must be a DNS name"),
        ({"uri": "http://a", "public_addr": "grafana.example:70000"}, "port '70000' must be a number"),
        ({"uri": "http://a", "rewrite": {"headers": [{"name": "Bad Name", "value": "x"}]}}, "may hold only"),
        (
            {"uri": "http://a", "rewrite": {"headers": [{"name": "wardgate-jwt-assertion", "value": "x"}]}},
            "set by Wardgate itself",
        ),
        ({"uri": "http://a", "rewrite": {"headers": [{"name": "Connection", "value": "x"}]}}, "hop-by-hop"),
        ({"uri": "http://a", "rewrite": {"headers": [{"name": "X-A", "value": "a\r\nb"}]}}, "line breaks"),
        ({"uri": "http://a", "rewrite": {"redirect": ["http://x/"]}}, "bare host name"),
    ],
)
def test_app_spec_errors_say_what_is_wrong(spec: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        AppSpec.model_validate(spec)


def test_app_spec_accepts_what_the_docs_show() -> None:
    spec = AppSpec(
        uri="http://127.0.0.1:3000",
        public_addr="Grafana.Proxy.Example",
        rewrite=AppRewrite(
            redirect=["localhost"], headers=[AppHeader(name="X-Grafana-User", value="{{internal.logins}}")]
        ),
    )
    assert spec.public_addr == "grafana.proxy.example"
    assert AppHeader(name="Host", value="grafana.internal").name == "Host"  # operators may set Host
    assert App.new("grafana", spec).uri_kind == "http"
    assert App.new("pg", AppSpec(uri="tcp://10.0.0.5:5432")).uri_kind == "tcp"
    assert App.new("up", AppSpec(uri="https://my_service:8443/x")).uri_kind == "http"
    with pytest.raises(ValidationError, match="must be a DNS label"):
        App.new("my_app", AppSpec(uri="http://a"))
    assert App.new("my_app", AppSpec(uri="http://a", public_addr="my-app.example")).name == "my_app"


@pytest.mark.parametrize(
    ("public_addr", "proxy", "expected"),
    [
        ("", "proxy.example:3080", "grafana.proxy.example:3080"),
        ("", "Proxy.Example.:443", "grafana.proxy.example:443"),
        ("", "proxy.example", "grafana.proxy.example:3080"),
        ("", "127.0.0.1:3080", "grafana.localhost:3080"),
        ("", "[::1]:8443", "grafana.localhost:8443"),
        ("", "", "grafana.localhost:3080"),
        ("dash.example", "proxy.example:443", "dash.example:443"),
        ("dash.example:8443", "proxy.example:443", "dash.example:8443"),
    ],
)
def test_app_public_addr_defaults(public_addr: str, proxy: str, expected: str) -> None:
    app = App.new("Grafana", AppSpec(uri="http://a", public_addr=public_addr))
    assert app_public_addr(app, proxy) == expected


def test_lock_target_takes_an_app() -> None:
    assert not LockTarget(app="grafana").is_empty()
    with pytest.raises(ValidationError, match="user, role, node, login or app"):
        LockSpec(target=LockTarget())


# ---------------------------------------------------------------- heartbeats and visibility


async def test_heartbeats_only_for_the_callers_own_host(auth: AuthServer) -> None:
    app = user_app()
    await serve(auth, APP_SVC, app)
    stored = await auth.get_resource(ADMIN, "app", "grafana")
    assert isinstance(stored, App) and stored.spec.host_id == "app-h1"
    theirs = app.model_copy(deep=True)
    theirs.spec.host_id = "app-h2"
    with pytest.raises(AccessDeniedError, match="an app service may only register itself and its own apps"):
        await auth.upsert_heartbeat(APP_SVC, theirs)
    with pytest.raises(AccessDeniedError, match="an app service may only register itself"):
        await auth.upsert_heartbeat(APP_SVC, AppService.new("app-h2"))
    with pytest.raises(AlreadyExistsError, match='app "grafana" is already registered'):
        await auth.upsert_heartbeat(OTHER_SVC, theirs)
    with pytest.raises(AccessDeniedError, match="db service may not update app"):
        await auth.upsert_heartbeat(DB_SVC, app)
    with pytest.raises(AccessDeniedError, match="node service may not update app_service"):
        await auth.upsert_heartbeat(NODE, AppService.new("n1"))
    with pytest.raises(BadParameterError, match="only db, db_service, app and app_service"):
        await auth.upsert_heartbeat(APP_SVC, Role.new("x"))
    assert [s.name for s in auth.live_app_services()] == ["app-h1"]


async def test_visible_apps_follow_service_liveness_roles_and_locks(
    auth: AuthServer, clock: FakeClock
) -> None:
    dev = Role.new(
        "dev",
        RoleSpec(
            allow=RoleConditions(app_labels={"env": ["dev", "prod"]}),
            deny=RoleConditions(app_labels={"secret": "yes"}),
        ),
    )
    await auth.put_resource(ADMIN, dev)
    await register(auth, clock, name="erin", roles=("dev",))
    erin = Identity(user="erin", roles=("dev",))
    grafana, wiki = user_app("grafana", env="dev"), user_app("wiki", env="prod")
    vault, other = user_app("vault", env="dev", secret="yes"), user_app("ops", env="ops")
    unserved = user_app("unserved", env="dev")
    await auth.put_resource(ADMIN, unserved)  # created with wardctl, but no service serves it
    await serve(auth, APP_SVC, grafana, vault, other)
    await serve(auth, OTHER_SVC, wiki, config=False)
    assert [a.name for a in auth.visible_apps(erin)] == ["grafana", "wiki"]
    assert {a.name for a in auth.visible_apps(PROXY)} == {"grafana", "wiki", "vault", "ops"}
    with pytest.raises(AccessDeniedError, match="node service may not list app"):
        auth.visible_apps(NODE)

    lock = await auth.create_lock(ADMIN, LockTarget(app="wiki"), ttl=timedelta(hours=1), message="maint")
    assert [a.name for a in auth.visible_apps(erin)] == ["grafana"]
    await auth.delete_resource(ADMIN, "lock", lock.name)
    await auth.create_lock(ADMIN, LockTarget(user="erin"), ttl=timedelta(minutes=5), message="incident 7")
    with pytest.raises(LockedError, match="incident 7"):
        auth.visible_apps(erin)
    clock.advance(11 * 60)  # the lock is over, and so are the services' heartbeats
    assert auth.visible_apps(erin) == []


# ---------------------------------------------------------------- certificates for `ward app login`


async def test_app_cert_is_routed_and_checked(auth: AuthServer, clock: FakeClock) -> None:
    await register(auth, clock)
    alice = Identity(user="alice", roles=("access",), expires=auth.now() + timedelta(hours=1))
    await serve(auth, APP_SVC, user_app("grafana"))
    certs = await auth.issue_app_cert(alice, app="grafana", tls_public_key=tls_key())
    ident = verify_tls_identity(certs.tls_cert, auth.ca_certs("user"), now=auth.now())
    route = ident.route_to_app
    assert route is not None and route.name == "grafana"
    assert route.public_addr == "grafana.localhost:3080"  # the test cluster has no public address
    assert str(uuid.UUID(route.session_id)) == route.session_id
    again = await auth.issue_app_cert(alice, app="grafana", tls_public_key=tls_key())
    assert again.identity.route_to_app.session_id != route.session_id  # type: ignore[union-attr]
    assert certs.ttl <= timedelta(hours=1)  # no longer than the caller's own certificate

    with pytest.raises(NotFoundError, match='app "nope" not found'):
        await auth.issue_app_cert(alice, app="nope", tls_public_key=tls_key())
    with pytest.raises(AccessDeniedError, match="only a user can open an app"):
        await auth.issue_app_cert(APP_SVC, app="grafana", tls_public_key=tls_key())
    await auth.put_resource(ADMIN, Role.new("none"))
    await register(auth, clock, name="bob", roles=("none",))
    with pytest.raises(AccessDeniedError, match='no role allows app "grafana"'):
        await auth.issue_app_cert(
            Identity(user="bob", roles=("none",)), app="grafana", tls_public_key=tls_key()
        )
    await auth.create_lock(ADMIN, LockTarget(app="grafana"), ttl=None, message="grafana is being upgraded")
    with pytest.raises(LockedError, match="grafana is being upgraded"):
        await auth.issue_app_cert(alice, app="grafana", tls_public_key=tls_key())


async def test_app_cert_needs_a_fresh_second_factor_when_roles_say_so(
    auth: AuthServer, clock: FakeClock
) -> None:
    strict = Role.new(
        "strict",
        RoleSpec(options=RoleOptions(require_session_mfa=True), allow=RoleConditions(app_labels={"*": "*"})),
    )
    await auth.put_resource(ADMIN, strict)
    secret = await register(auth, clock, name="mfa-user", roles=("strict",))
    caller = Identity(user="mfa-user", roles=("strict",))
    await serve(auth, APP_SVC, user_app("grafana"))
    with pytest.raises(AccessDeniedError, match="require a second factor"):
        await auth.issue_app_cert(caller, app="grafana", tls_public_key=tls_key())
    with pytest.raises(AuthenticationError):
        await auth.issue_app_cert(caller, app="grafana", tls_public_key=tls_key(), otp="000000")
    certs = await auth.issue_app_cert(
        caller, app="grafana", tls_public_key=tls_key(), otp=await fresh_code(clock, secret)
    )
    assert certs.ttl == SESSION_MFA_TTL and certs.identity.mfa_verified
    assert verify_tls_identity(certs.tls_cert, auth.ca_certs("user"), now=auth.now()).mfa_verified


# ---------------------------------------------------------------- browser app sessions


async def test_app_session_token_works_once_and_ends_with_the_web_session(
    auth: AuthServer, clock: FakeClock
) -> None:
    secret = await register(auth, clock)
    app = App.new("grafana", AppSpec(uri="http://127.0.0.1:3000"), labels={"env": "dev"})
    await serve(auth, APP_SVC, app)
    web = await web_session(auth, clock, secret)
    alice = as_user(auth, web)

    token, created = await auth.create_app_session(alice, app="grafana", web_session_id=web.id)
    assert created.user == "alice" and created.app == "grafana"
    assert created.public_addr == "grafana.localhost:3080"
    assert created.expires <= web.expires and created.expires > auth.now() + timedelta(hours=11)

    with pytest.raises(AccessDeniedError, match="only an app service may exchange"):
        await auth.exchange_app_session(alice, token)
    with pytest.raises(AccessDeniedError, match="does not serve app"):
        await auth.exchange_app_session(OTHER_SVC, token)  # and the token survives a refusal
    cookie, rec = await auth.exchange_app_session(APP_SVC, token)
    assert rec == created and len(cookie) >= 43
    with pytest.raises(AuthenticationError, match="already been used or has expired"):
        await auth.exchange_app_session(APP_SVC, token)

    got = await auth.get_app_session(APP_SVC, cookie)
    assert got.session_id == created.session_id
    ident = verify_tls_identity(got.cert, auth.ca_certs("user"), now=auth.now())
    assert ident.user == "alice" and ident.route_to_app is not None
    assert ident.route_to_app.name == "grafana" and ident.route_to_app.session_id == created.session_id
    with pytest.raises(AccessDeniedError, match="only an app service may read"):
        await auth.get_app_session(PROXY, cookie)

    stored = {key for key, _ in await auth.store.list_records("/app_sessions/")}
    assert stored and not any(cookie in key or token in key for key in stored)  # only hashes

    ev = (await events(auth, "app.session.create"))[0]
    assert ev["code"] == "W4003I" and ev["user"] == "alice" and ev["sid"] == created.session_id
    assert ev["app"] == "grafana" and ev["app_uri"] == "http://127.0.0.1:3000"
    assert ev["app_public_addr"] == "grafana.localhost:3080"

    await auth.delete_web_session(PROXY, web.id)
    assert await auth.store.list_records("/app_sessions/") == []  # deleted, not just refused
    with pytest.raises(NotFoundError, match="app session not found"):
        await auth.get_app_session(APP_SVC, cookie)


async def test_app_session_refusals_are_audited(auth: AuthServer, clock: FakeClock) -> None:
    secret = await register(auth, clock)
    bob_secret = await register(auth, clock, name="bob")
    await serve(auth, APP_SVC, user_app("grafana"))
    web = await web_session(auth, clock, secret)
    bobs = await web_session(auth, clock, bob_secret, user="bob")
    alice = as_user(auth, web)
    with pytest.raises(AccessDeniedError, match="belongs to another user"):
        await auth.create_app_session(alice, app="grafana", web_session_id=bobs.id)
    with pytest.raises(AuthenticationError, match="web session has ended"):
        await auth.create_app_session(alice, app="grafana", web_session_id="not-a-session")
    with pytest.raises(NotFoundError):
        await auth.create_app_session(alice, app="nope", web_session_id=web.id)
    await auth.create_lock(ADMIN, LockTarget(app="grafana"), ttl=None, message="frozen")
    with pytest.raises(LockedError, match="frozen"):
        await auth.create_app_session(alice, app="grafana", web_session_id=web.id)
    failed = await events(auth, "app.session.create")
    assert len(failed) == 4 and all(e["code"] == "W4003W" and not e["success"] for e in failed)
    assert (
        failed[0]["error"].startswith("locked: frozen")
        and failed[0]["app_uri"] == "http://127.0.0.1:9/grafana"
    )
    assert "belongs to another user" in failed[-1]["error"]


async def test_app_session_asks_for_mfa_when_roles_require_it(auth: AuthServer, clock: FakeClock) -> None:
    strict = Role.new(
        "strict",
        RoleSpec(options=RoleOptions(require_session_mfa=True), allow=RoleConditions(app_labels={"*": "*"})),
    )
    await auth.put_resource(ADMIN, strict)
    secret = await register(auth, clock, name="carol", roles=("strict",))
    await serve(auth, APP_SVC, user_app("grafana"))
    web = await web_session(auth, clock, secret, user="carol")
    carol = as_user(auth, web)
    with pytest.raises(AccessDeniedError, match="require a second factor"):
        await auth.create_app_session(carol, app="grafana", web_session_id=web.id)
    token, rec = await auth.create_app_session(
        carol, app="grafana", web_session_id=web.id, otp=await fresh_code(clock, secret)
    )
    assert verify_tls_identity(rec.cert, auth.ca_certs("user"), now=auth.now()).mfa_verified
    assert rec.expires == min(web.expires, rec.expires) and rec.expires > auth.now() + timedelta(hours=1)
    assert (await auth.exchange_app_session(APP_SVC, token))[1].session_id == rec.session_id


async def test_app_session_token_expires_after_a_minute(auth: AuthServer, clock: FakeClock) -> None:
    secret = await register(auth, clock)
    await serve(auth, APP_SVC, user_app("grafana"))
    web = await web_session(auth, clock, secret)
    token, _ = await auth.create_app_session(as_user(auth, web), app="grafana", web_session_id=web.id)
    clock.advance(61)
    with pytest.raises(AuthenticationError, match="already been used or has expired"):
        await auth.exchange_app_session(APP_SVC, token)


async def test_store_refuses_expired_records_the_backend_still_holds() -> None:
    """The backend's clock (real time) has not passed the TTLs; the store's `now` has."""
    store = AppSessionStore(ResourceStore(MemoryBackend()))
    now = datetime.now(UTC)
    rec = AppSessionRecord(
        session_id="s1",
        user="alice",
        app="grafana",
        public_addr="grafana.localhost:3080",
        cert="PEM",
        expires=now + timedelta(hours=1),
        web_session="w" * 64,
    )
    token = await store.create_token(rec, now=now)
    with pytest.raises(AuthenticationError, match="expired"):
        await store.exchange(token, now=now + timedelta(seconds=61))
    with pytest.raises(AuthenticationError, match="already been used"):
        await store.exchange(token, now=now)  # refused once, spent for good
    secret, _ = await store.exchange(await store.create_token(rec, now=now), now=now)
    assert (await store.get(secret, now=now)).user == "alice"
    with pytest.raises(NotFoundError):
        await store.get(secret, now=now + timedelta(hours=2))
    with pytest.raises(NotFoundError):
        await store.get(secret, now=now)  # and it was deleted on the way
    with pytest.raises(BadParameterError, match="malformed"):
        await store.get("x" * 500, now=now)


async def test_app_sessions_survive_renewal_and_end_with_the_user(auth: AuthServer, clock: FakeClock) -> None:
    secret = await register(auth, clock)
    await serve(auth, APP_SVC, user_app("grafana"))
    web = await web_session(auth, clock, secret)
    token, _ = await auth.create_app_session(as_user(auth, web), app="grafana", web_session_id=web.id)
    cookie, _ = await auth.exchange_app_session(APP_SVC, token)
    renewed, _ = await auth.renew_web_session(PROXY, web.id)
    assert (await auth.get_app_session(APP_SVC, cookie)).user == "alice"
    await auth.delete_web_session(PROXY, renewed.id)
    with pytest.raises(NotFoundError):
        await auth.get_app_session(APP_SVC, cookie)

    web = await web_session(auth, clock, secret)
    token, _ = await auth.create_app_session(as_user(auth, web), app="grafana", web_session_id=web.id)
    cookie, _ = await auth.exchange_app_session(APP_SVC, token)
    await auth.reset_user(ADMIN, "alice")
    with pytest.raises(NotFoundError):
        await auth.get_app_session(APP_SVC, cookie)

    # A web session that vanished some other way (a sign-out racing the launch) ends it too.
    web = await web_session(auth, clock, await register(auth, clock, name="alice2"), user="alice2")
    token, _ = await auth.create_app_session(as_user(auth, web), app="grafana", web_session_id=web.id)
    cookie, _ = await auth.exchange_app_session(APP_SVC, token)
    await auth.web_sessions.delete(web.id)
    with pytest.raises(NotFoundError, match="its web session has ended"):
        await auth.get_app_session(APP_SVC, cookie)
    assert await auth.store.list_records("/app_sessions/") == []


async def test_app_session_ends_when_its_web_session_expires(auth: AuthServer, clock: FakeClock) -> None:
    short = Role.new(
        "short",
        RoleSpec(
            options=RoleOptions(max_session_ttl=timedelta(minutes=30)),
            allow=RoleConditions(app_labels={"*": "*"}),
        ),
    )
    await auth.put_resource(ADMIN, short)
    secret = await register(auth, clock, name="dave", roles=("short",))
    await serve(auth, APP_SVC, user_app("grafana"))
    web = await web_session(auth, clock, secret, user="dave")
    token, rec = await auth.create_app_session(as_user(auth, web), app="grafana", web_session_id=web.id)
    assert rec.expires <= web.expires <= auth.now() + timedelta(minutes=30)
    cookie, _ = await auth.exchange_app_session(APP_SVC, token)
    clock.advance(29 * 60)
    await serve(auth, APP_SVC, user_app("grafana"))  # keep the service alive
    assert (await auth.get_app_session(APP_SVC, cookie)).user == "dave"
    clock.advance(2 * 60)
    with pytest.raises(NotFoundError):
        await auth.get_app_session(APP_SVC, cookie)


# ---------------------------------------------------------------- JWTs


async def test_app_jwt_verifies_against_the_jwks_with_the_users_claims(
    auth: AuthServer, clock: FakeClock
) -> None:
    secret = await register(auth, clock)
    app = App.new("grafana", AppSpec(uri="http://127.0.0.1:3000"))
    await serve(auth, APP_SVC, app, user_app("wiki"))
    web = await web_session(auth, clock, secret)
    _, rec = await auth.create_app_session(as_user(auth, web), app="grafana", web_session_id=web.id)

    token, expires = auth.sign_app_jwt(APP_SVC, cert_pem=rec.cert, app="grafana")
    keys = [k.jwt_public_key_pem for k in auth.ca("jwt").spec.active_keys]
    public = jwt.jwks(keys)["keys"]
    assert public and all("d" not in k for k in public)
    claims = jwt.verify(token, keys, audience="http://127.0.0.1:3000", issuer="test.example", now=clock())
    assert claims["sub"] == claims["username"] == "alice"
    assert claims["roles"] == ["access"] and claims["traits"] == {"logins": ["root", "ubuntu"]}
    assert claims["iat"] == int(clock()) and claims["nbf"] <= claims["iat"]
    assert claims["exp"] == int(expires.timestamp()) and 0 < claims["exp"] - clock() <= 300

    with pytest.raises(AccessDeniedError, match='not for app "wiki"'):
        auth.sign_app_jwt(APP_SVC, cert_pem=rec.cert, app="wiki")
    with pytest.raises(AccessDeniedError, match="only an app service"):
        auth.sign_app_jwt(PROXY, cert_pem=rec.cert, app="grafana")
    with pytest.raises(AccessDeniedError, match="does not serve"):
        auth.sign_app_jwt(OTHER_SVC, cert_pem=rec.cert, app="grafana")
    with pytest.raises(AuthenticationError):
        auth.sign_app_jwt(APP_SVC, cert_pem=web.tls_cert.replace("A", "B", 1), app="grafana")
    plain = await auth.issue_app_cert(as_user(auth, web), app="wiki", tls_public_key=tls_key())
    with pytest.raises(AccessDeniedError, match='not for app "grafana"'):
        auth.sign_app_jwt(APP_SVC, cert_pem=plain.tls_cert, app="grafana")
    await auth.create_lock(ADMIN, LockTarget(user="alice"), ttl=None, message="offboarded")
    with pytest.raises(LockedError, match="offboarded"):
        auth.sign_app_jwt(APP_SVC, cert_pem=rec.cert, app="grafana")


async def test_app_jwt_never_outlives_the_certificate(auth: AuthServer, clock: FakeClock) -> None:
    await register(auth, clock)
    await serve(auth, APP_SVC, user_app("grafana"))
    certs = await auth.issue_app_cert(
        Identity(user="alice", roles=("access",), expires=auth.now() + timedelta(minutes=2)),
        app="grafana",
        tls_public_key=tls_key(),
    )
    _, expires = auth.sign_app_jwt(APP_SVC, cert_pem=certs.tls_cert, app="grafana")
    assert certs.identity.expires is not None and expires <= certs.identity.expires
    assert expires - auth.now() <= timedelta(minutes=2)
    clock.advance(3 * 60)
    await serve(auth, APP_SVC, user_app("grafana"))
    with pytest.raises(AuthenticationError, match="expired"):
        auth.sign_app_jwt(APP_SVC, cert_pem=certs.tls_cert, app="grafana")


# ---------------------------------------------------------------- over HTTPS with the typed client


@pytest.fixture
async def api(auth: AuthServer) -> AsyncIterator[str]:
    key = generate_tls_key()
    certs = await auth.issue_host_certs(
        host_id="auth-1",
        node_name="auth",
        system_role="auth",
        tls_public_key=public_key_pem(key.public_key()),
        addresses=["127.0.0.1"],
    )
    server = AuthAPI(auth)
    port = await server.start("127.0.0.1", 0, server.server_ssl_context(certs.tls_cert, private_key_pem(key)))
    yield f"127.0.0.1:{port}"
    await server.close()


def client(auth: AuthServer, addr: str, key_pem: str, cert_pem: str) -> AuthClient:
    ca_pems = [k.tls_cert_pem for k in auth.ca("host").spec.active_keys]
    return AuthClient.from_identity(IdentityFile(key_pem=key_pem, cert_pem=cert_pem, ca_pems=ca_pems), addr)


async def service_client(auth: AuthServer, addr: str, host_id: str) -> AuthClient:
    key = generate_tls_key()
    certs = await auth.issue_host_certs(
        host_id=host_id, node_name=host_id, system_role="app", tls_public_key=public_key_pem(key.public_key())
    )
    return client(auth, addr, private_key_pem(key), certs.tls_cert)


async def test_app_calls_over_https(auth: AuthServer, clock: FakeClock, api: str) -> None:
    await register(auth, clock)
    # Straight from the store, not through a second OTP step: the fake clock must stay near the real
    # one, which TLS checks certificates against.
    web, _ = await auth._new_web_session(await auth.users.get("alice"), method="local")
    async with (
        await service_client(auth, api, "app-h1") as svc,
        client(auth, api, web.tls_key, web.tls_cert) as user,
    ):
        beat = App.new(
            "grafana", AppSpec(uri="http://127.0.0.1:3000", host_id="app-h1"), labels={"env": "dev"}
        )
        assert (await svc.app_heartbeat(beat)).name == "grafana"
        me = AppService.new(
            "app-h1", AppServiceSpec(apps=["grafana"]), expires=auth.now() + timedelta(minutes=5)
        )
        assert isinstance(await svc.app_heartbeat(me), AppService)

        apps = await user.visible_apps()
        assert apps == [
            {
                "name": "grafana",
                "description": "",
                "labels": {"env": "dev"},
                "uri_kind": "http",
                "public_addr": "grafana.localhost:3080",
                "require_session_mfa": False,
            }
        ]
        cert = await user.app_user_cert(app="grafana", tls_public_key=tls_key())
        assert cert["route_to_app"]["name"] == "grafana" and cert["tls_cert"].startswith("-----BEGIN")

        created = await user.create_app_session(app="grafana", web_session_id=web.id)
        assert set(created) == {"token", "session_id", "public_addr", "expires"}
        exchanged = await svc.exchange_app_session(created["token"])
        assert exchanged["session_id"] == created["session_id"] and exchanged["user"] == "alice"
        assert {"secret", "app", "cert", "expires"} <= set(exchanged)
        with pytest.raises(AuthenticationError, match="already been used"):
            await svc.exchange_app_session(created["token"])
        got = await svc.get_app_session(exchanged["secret"])
        assert got["session_id"] == created["session_id"] and "web_session" not in got

        signed = await svc.app_jwt(got["cert"], "grafana")
        keys = [k.jwt_public_key_pem for k in auth.ca("jwt").spec.active_keys]
        assert jwt.verify(signed["jwt"], keys, audience="http://127.0.0.1:3000")["sub"] == "alice"
        with pytest.raises(AccessDeniedError, match="only an app service"):
            await user.app_jwt(got["cert"], "grafana")

        await auth.delete_web_session(PROXY, web.id)
        with pytest.raises(NotFoundError, match="app session not found"):
            await svc.get_app_session(exchanged["secret"])
