"""The web UI end to end: Debian's Chromium, driven by Playwright, against real `wardgate start`
processes reached as https://localhost:PORT (WebAuthn needs a domain name).

Each test asserts what a person sees on the page (and that nothing the page shows can run as
script); every page visited is saved under tests/artifacts/screenshots/. The API underneath is
covered by `test_e2e_web_api.py` and `test_e2e_webterm.py`.

OTP codes work once per 30 s step (and never an earlier step than the last one used), so every
test signs in a user of its own, each code from a later step than the one before.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from tests import webui
from tests.cluster import PASSWORD, WebCluster, audit, current_code, wardctl
from tests.webui import (
    add_authenticator,
    csp_violations,
    page_log,
    shot,
    sign_in,
    terminal_text,
    terminal_type,
    tid,
    wait_terminal_state,
    wait_terminal_text,
    watch,
)

pytestmark = pytest.mark.slow

# The fixtures: one Chromium for the module, a fresh browser context per page.
browser = webui.browser
make_page = webui.make_page

XSS_IMG = "<img src=x onerror=alert(1)>"
XSS_SCRIPT = "<script>alert(1)</script>"

ROLES = f"""kind: role
version: v1
metadata: {{name: dev-only}}
spec:
  allow:
    logins: [root]
    node_labels: {{env: dev}}
---
kind: role
version: v1
metadata: {{name: dev-mfa}}
spec:
  options:
    require_session_mfa: true
  allow:
    logins: [root]
    node_labels: {{env: dev}}
---
kind: role
version: v1
metadata:
  name: xss-role
  description: "{XSS_SCRIPT}"
  labels: {{note: "{XSS_IMG}"}}
spec:
  allow:
    logins: [nobody]
    node_labels: {{env: xss}}
"""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebCluster]:
    """OTP cluster: main-node (env=dev, an agent), prod-db (env=prod, agentless, never dialled),
    xss-node (a label holding markup), and the roles above."""
    c = WebCluster(tmp_path_factory.mktemp("web-ui"))
    try:
        wardctl(c.data_dir, "create", "-f", "-", stdin=ROLES)
        wardctl(
            c.data_dir, "nodes", "add", "--agentless", "--name=prod-db", "--addr=127.0.0.1:1",
            "--labels=env=prod",
        )  # fmt: skip
        wardctl(
            c.data_dir, "nodes", "add", "--agentless", "--name=xss-node", "--addr=127.0.0.1:1",
            f"--labels=env=xss,note={XSS_IMG}",
        )  # fmt: skip
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def passkey_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebCluster]:
    c = WebCluster(
        tmp_path_factory.mktemp("web-ui-passkey"),
        authentication="    second_factor: on\n    passwordless: true\n",
    )
    yield c
    c.stop()


# ---------------------------------------------------------------- helpers


def register(cluster: WebCluster, name: str, roles: str, logins: str = "root") -> str:
    """Invite and register `name` with a code of the *previous* 30 s step (still inside the
    ±1 window): the current step is left for signing in and the next one for a per-session
    MFA prompt, so nothing waits for the clock. Returns the TOTP secret."""
    from wardgate import runtime
    from wardgate.api.client import AuthClient
    from wardgate.api.identityfile import server_trusting_context

    token = cluster.invite(name, roles, logins)
    addr = f"127.0.0.1:{cluster.auth_port}"

    async def go() -> str:
        pems = await AuthClient.discover_trust(addr, ca_pin=cluster.pin)
        async with AuthClient(addr, server_trusting_context(pems)) as c:
            info = await c.begin_registration(token)
            secret = info["totp_secret"]
            await c.complete_registration(token, PASSWORD, current_code(secret, time.time() - 30))
        return secret

    # Playwright's sync API keeps an event loop running in this thread: register from another.
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(runtime.run, go()).result()


def assert_clean(*pages: Any, expected_errors: tuple[str, ...] = ()) -> None:
    """No CSP refusals, uncaught errors, alert/confirm/prompt dialogs or console errors (other
    than the `expected_errors`, e.g. the browser noting a 400 the page then explains) on any of
    the pages."""
    for p in pages:
        log = page_log(p)
        assert not csp_violations(p), log.text()
        assert log.errors == [], log.text()
        assert log.dialogs == [], log.dialogs
        unexpected = [m for t, m in log.console if t == "error" and not any(x in m for x in expected_errors)]
        assert unexpected == [], log.text()


def no_injected_markup(page: Any) -> None:
    assert page.locator("img[src=x]").count() == 0
    assert page.locator("script:not([src])").count() == 0
    assert page_log(page).dialogs == []


def wait_rows(page: Any, row: str, pred: Any, refresh: str, timeout: float = 30) -> Any:
    """Press `refresh` until a `row` element matching `pred(locator)` shows; returns it."""
    deadline = time.monotonic() + timeout
    while True:
        page.wait_for_selector(f"{tid(row)}, [data-testid$=-empty]")
        rows = page.locator(tid(row))
        for i in range(rows.count()):
            if pred(rows.nth(i)):
                return rows.nth(i)
        if time.monotonic() > deadline:
            raise AssertionError(f"no matching {row}: {page.text_content(tid('content'))}")
        page.wait_for_timeout(500)
        page.click(tid(refresh))


def nav(page: Any, key: str, ready: str) -> None:
    page.click(tid(f"nav-{key}"))
    page.wait_for_selector(ready)


def open_terminal(page: Any, node: str, login: str) -> Any:
    """Servers page: Connect -> login; the terminal opens in a new tab, which is returned."""
    row = page.locator(f"{tid('node-row')}[data-name={node}]")
    row.locator(tid("connect")).click()
    with page.context.expect_page() as new:
        row.locator(f"{tid('connect-login')}[data-login={login}]").click()
    term = new.value
    watch(term)
    term.wait_for_selector(tid("terminal"))
    return term


PROMPT = re.compile(r"[#$]\s*$")  # the shell is waiting for a command


def run(term: Any, command: str, expect: str) -> str:
    """Type `command` at the shell's prompt, press Enter, wait for `expect` in the output."""
    wait_terminal_text(term, PROMPT)
    terminal_type(term, command)
    term.keyboard.press("Enter")
    return wait_terminal_text(term, expect)


def player_text(page: Any) -> str:
    """What asciinema-player's terminal shows right now."""
    return page.evaluate(
        "() => (document.querySelector('[data-testid=player] .ap-term') || {}).textContent || ''"
    )


def wait_player_text(page: Any, needle: str, timeout: float = 20) -> str:
    deadline = time.monotonic() + timeout
    text = ""
    while time.monotonic() < deadline:
        text = player_text(page)
        if needle in text:
            return text
        page.wait_for_timeout(100)
    raise AssertionError(f"the player never showed {needle!r}; it shows:\n{text}")


def sign_out(page: Any) -> None:
    page.click(tid("user-menu-button"))
    page.click(tid("signout"))
    page.wait_for_url(re.compile(r"/web/login"))
    page.wait_for_selector(tid("login-form"))


# ---------------------------------------------------------------- the main journey


def test_invite_totp_sign_in_terminal_recording_audit(cluster: WebCluster, make_page: Any) -> None:
    token = cluster.invite("alice", "dev-only,auditor", "root")
    page = make_page()

    # The invitation: a password, the TOTP secret read off the page, a code: signed in.
    page.goto(f"{cluster.origin}/web/invite/{token}")
    page.wait_for_selector(tid("totp-secret"))
    assert page.text_content(tid("invite-username")) == "alice"
    assert page.locator(tid("totp-qr")).is_visible()
    secret = re.sub(r"\s+", "", page.text_content(tid("totp-secret")) or "")
    assert re.fullmatch(r"[A-Z2-7]{16,}", secret), secret
    page.fill(tid("invite-password"), PASSWORD)
    page.fill(tid("invite-password-confirm"), PASSWORD)
    page.fill(tid("invite-otp"), current_code(secret))
    shot(page, "invite")
    page.click(tid("invite-submit"))
    page.wait_for_url(re.compile(r"/web/nodes"))
    page.wait_for_selector(tid("node-row"))
    assert page.text_content(tid("current-user")) == "alice"

    # Sign out from the user menu: back to the sign-in page, and the pages need signing in again.
    sign_out(page)
    page.goto(f"{cluster.origin}/web/nodes")
    page.wait_for_url(re.compile(r"/web/login"))

    # Sign in again: password + a code from the next step (the invitation spent this one).
    page.goto(f"{cluster.origin}/web/login")
    page.wait_for_selector(tid("login-form"))
    assert "ssh.example" in (page.text_content(tid("login-cluster")) or "")
    page.fill(tid("login-username"), "alice")
    shot(page, "login")
    sign_in(page, cluster.origin, "alice", PASSWORD, current_code(secret, time.time() + 30))
    page.wait_for_url(re.compile(r"/web/nodes"))

    # Servers: only what dev-only allows, with its login.
    page.wait_for_selector(tid("node-row"))
    names = page.locator(tid("node-row")).evaluate_all("rows => rows.map(r => r.dataset.name)")
    assert names == ["main-node"]
    assert "prod-db" not in (page.text_content(tid("content")) or "")
    assert page.text_content(tid("nodes-count")) == "1 server"
    page.click(tid("connect"))
    logins = page.locator(tid("connect-login")).all_text_contents()
    assert logins == ["root"]
    shot(page, "servers")
    page.keyboard.press("Escape")

    # Connect: a terminal in a new tab, a real shell on main-node.
    term = open_terminal(page, "main-node", "root")
    wait_terminal_state(term, "running")
    assert term.text_content(tid("terminal-title")) == "root@main-node"
    sid = term.get_attribute(tid("terminal"), "data-sid") or ""
    assert re.fullmatch(r"[0-9a-f-]{36}", sid), sid
    assert term.text_content(tid("terminal-sid")) == sid
    run(term, "echo hello-$((6*7))", "hello-42")
    shot(term, "terminal")
    terminal_type(term, "exit")
    term.keyboard.press("Enter")
    wait_terminal_state(term, "ended")
    assert term.text_content(tid("terminal-status")) == "Session ended"
    assert "[session ended with code 0]" in terminal_text(term)
    assert term.get_attribute(tid("terminal"), "data-exit-code") == "0"
    assert term.locator(tid("terminal-restart")).is_visible()
    term.close()

    # Recordings: the session is listed; the player plays it back.
    nav(page, "recordings", tid("recordings-table") + "," + tid("recordings-empty"))
    row = wait_rows(page, "recording-row", lambda r: r.get_attribute("data-sid") == sid, "recordings-refresh")
    cells = row.locator("td").all_text_contents()
    assert cells[0] == "alice" and cells[1] == "main-node" and cells[2] == "root"
    shot(page, "recordings")
    row.locator(tid("play-recording")).click()
    page.wait_for_url(re.compile(rf"/web/recordings/{sid}"))
    wait_player_text(page, "hello-42")
    for control in ("player-play", "seek-back", "seek-forward", "speed-0.5", "speed-1", "speed-2", "speed-4"):
        assert page.locator(tid(control)).is_visible(), control
    assert "Length" in (page.text_content(tid("player-meta")) or "")
    page.wait_for_function("() => document.querySelector('[data-testid=player]').dataset.playing === 'false'")
    shot(page, "player")
    # Twice the speed: the screen stays as it was; Play plays it again from the start.
    page.click(tid("speed-2"))
    assert page.get_attribute(tid("speed-2"), "aria-pressed") == "true"
    page.wait_for_function("() => document.querySelector('[data-testid=player]').dataset.speed === '2'")
    wait_player_text(page, "hello-42")
    page.click(tid("player-play"))
    page.wait_for_function("() => !document.querySelector('[data-testid=player] .ap-overlay-start')")
    wait_player_text(page, "hello-42")

    # Audit log: the session's start and end, the JSON of one event.
    nav(page, "audit", tid("audit-filters"))
    page.fill(tid("audit-type"), "session.*")
    page.fill(tid("audit-user"), "alice")

    def both_events() -> bool:
        page.click(tid("audit-search"))
        page.wait_for_selector(f"{tid('audit-table')}, {tid('audit-empty')}")
        got = page.locator(tid("audit-row")).evaluate_all("rows => rows.map(r => r.dataset.event)")
        return {"session.start", "session.end"} <= set(got)

    deadline = time.monotonic() + 20
    while not both_events():
        assert time.monotonic() < deadline, page.text_content(tid("content"))
        page.wait_for_timeout(500)
    users = page.locator(f"{tid('audit-row')} td:nth-child(4)").all_text_contents()
    assert set(users) == {"alice"}
    shot(page, "audit")
    start = page.locator(f"{tid('audit-row')}[data-event='session.start']").first
    assert "root@main-node" in (start.text_content() or "")
    start.click()
    page.wait_for_selector(f"{tid('audit-detail')}:not([hidden])")
    detail = page.text_content(tid("audit-json")) or ""
    assert f'"sid": "{sid}"' in detail and '"event": "session.start"' in detail
    shot(page, "audit-event")
    assert any(
        e.get("sid") == sid for e in audit(cluster.data_dir, "--type", "session.end", "--user", "alice")
    )

    assert_clean(page, term)


# ---------------------------------------------------------------- passkeys


def test_passkey_enrolment_and_passwordless_sign_in(passkey_cluster: WebCluster, make_page: Any) -> None:
    c = passkey_cluster
    name = "pat"
    token = c.invite(name, "access", "root")
    page = make_page()
    authenticator = add_authenticator(page)

    page.goto(f"{c.origin}/web/invite/{token}")
    page.wait_for_selector(tid("invite-methods"))
    page.click(tid("invite-method-webauthn"))
    assert page.locator(tid("invite-webauthn")).is_visible()
    assert not page.locator(tid("invite-totp")).is_visible()
    page.fill(tid("invite-password"), PASSWORD)
    page.fill(tid("invite-password-confirm"), PASSWORD)
    page.fill(tid("invite-device-name"), "laptop")
    shot(page, "invite-passkey")
    page.click(tid("invite-submit"))
    page.wait_for_url(re.compile(r"/web/nodes"))
    assert page.text_content(tid("current-user")) == name
    (cred,) = authenticator.credentials()
    assert cred["isResidentCredential"] and cred["rpId"] == "localhost"

    sign_out(page)
    assert page.locator(tid("login-passkey")).is_visible()
    shot(page, "passkey-sign-in")
    # No username, no password: the passkey alone.
    page.click(tid("login-passkey"))
    page.wait_for_url(re.compile(r"/web/nodes"))
    page.wait_for_selector(tid("current-user"))
    assert page.text_content(tid("current-user")) == name

    page.click(tid("user-menu-button"))
    page.click(tid("menu-account"))
    page.wait_for_selector(tid("mfa-row"))
    row = page.locator(f"{tid('mfa-row')}[data-name=laptop]")
    assert "Passkey / security key" in (row.text_content() or "")
    assert "never" not in (row.text_content() or "")  # the sign-in used it
    shot(page, "account-passkey")
    assert_clean(page)


# ---------------------------------------------------------------- per-session MFA


def test_per_session_mfa_in_the_terminal(cluster: WebCluster, make_page: Any) -> None:
    name = "maria"
    secret = register(cluster, name, "dev-mfa")
    page = make_page()
    signed_in_at = time.time()
    sign_in(page, cluster.origin, name, PASSWORD, current_code(secret, signed_in_at))
    page.wait_for_selector(tid("node-row"))

    term = open_terminal(page, "main-node", "root")
    wait_terminal_state(term, "mfa")
    term.wait_for_selector(tid("mfa-modal"))
    assert "second factor for each session" in (term.text_content(tid("mfa-modal")) or "")
    good = current_code(secret, signed_in_at + 30)
    window = {current_code(secret, signed_in_at + d) for d in (-60, -30, 0, 30, 60, 90)}
    wrong = next(f"{n:06d}" for n in range(123456, 999999) if f"{n:06d}" not in window)
    term.fill(tid("mfa-otp"), wrong)
    shot(term, "mfa-prompt")
    term.click(tid("mfa-submit"))
    wait_terminal_text(term, "second factor not accepted")
    term.wait_for_selector(f"{tid('terminal-banner')}:not([hidden])")
    assert terminal_text(term).count("second factor not accepted") == 1  # said once
    assert "invalid one-time code" in terminal_text(term)
    assert term.locator(tid("terminal-reconnect")).is_visible()
    shot(term, "mfa-refused")

    # Reconnect: asked again; a code from the next step opens the shell.
    term.click(tid("terminal-reconnect"))
    term.wait_for_selector(tid("mfa-modal"))
    term.fill(tid("mfa-otp"), good)
    term.click(tid("mfa-submit"))
    wait_terminal_state(term, "running")
    assert term.locator(tid("mfa-modal")).count() == 0
    run(term, "echo mfa-$((2+3))", "mfa-5")
    shot(term, "mfa-terminal")
    terminal_type(term, "exit")
    term.keyboard.press("Enter")
    wait_terminal_state(term, "ended")
    assert_clean(page, term)


# ---------------------------------------------------------------- XSS


def test_xss_payloads_render_inert(cluster: WebCluster, make_page: Any) -> None:
    name = "xena"
    secret = register(cluster, name, "editor,auditor,access")
    wardctl(cluster.data_dir, "lock", "--user=nobody-here", "--ttl=1h", f"--message={XSS_IMG} {XSS_SCRIPT}")
    page = make_page()
    sign_in(page, cluster.origin, name, PASSWORD, current_code(secret))

    # A node label.
    page.wait_for_selector(f"{tid('node-row')}[data-name=xss-node]")
    chips = page.locator(f"{tid('node-row')}[data-name=xss-node] {tid('label-chip')}").all_text_contents()
    assert f"note={XSS_IMG}" in chips
    shot(page, "xss-servers")
    no_injected_markup(page)

    # A role's description and label, in the editor.
    page.goto(f"{cluster.origin}/web/roles?role=xss-role")
    page.wait_for_selector(tid("role-yaml"))
    assert page.text_content(tid("role-title")) == "xss-role"
    yaml_text = page.input_value(tid("role-yaml"))
    assert XSS_SCRIPT in yaml_text and XSS_IMG in yaml_text
    shot(page, "xss-roles")
    no_injected_markup(page)

    # An audit event: the lock's message, in the list and in the JSON.
    nav(page, "audit", tid("audit-filters"))
    page.fill(tid("audit-type"), "lock.create")
    page.click(tid("audit-search"))
    row = page.locator(tid("audit-row")).first
    row.wait_for()
    assert XSS_IMG in (row.text_content() or "")
    row.click()
    detail = page.text_content(tid("audit-json")) or ""
    assert XSS_IMG in detail and XSS_SCRIPT in detail
    shot(page, "xss-audit")
    no_injected_markup(page)
    assert_clean(page)


# ---------------------------------------------------------------- editor pages


def test_editor_pages(cluster: WebCluster, make_page: Any) -> None:
    name = "erin"
    secret = register(cluster, name, "editor,auditor,access")
    page = make_page()
    sign_in(page, cluster.origin, name, PASSWORD, current_code(secret))
    page.wait_for_selector(tid("nav-users"))

    # Users: invite someone from the form; the link is shown.
    nav(page, "users", tid("users-table"))
    me = page.locator(f"{tid('user-row')}[data-name={name}]")
    assert "(you)" in (me.text_content() or "")
    assert me.locator(tid("user-delete")).is_disabled()
    invitee = "frank"
    page.click(tid("invite-user"))
    page.wait_for_selector(tid("invite-modal"))
    page.fill(tid("invite-name"), invitee)
    page.check(f"{tid('invite-role')}[data-role=access]")
    page.fill(tid("invite-logins"), "root, ubuntu")
    page.click(tid("invite-create"))
    page.wait_for_selector(tid("invite-result"))
    url = page.input_value(tid("invite-url"))
    assert url.startswith(f"{cluster.origin}/web/invite/"), url
    assert invitee in (page.text_content(tid("invite-result")) or "")
    shot(page, "users-invite")
    page.click(tid("invite-done"))
    row = page.locator(f"{tid('user-row')}[data-name={invitee}]")
    row.wait_for()
    assert row.locator(tid("user-status")).text_content() == "invited"
    shot(page, "users")

    # Roles: invalid YAML is refused, the message and the line shown where it is.
    nav(page, "roles", tid("role-yaml"))
    page.click(tid("role-new"))
    bad = "kind: role\nversion: v1\nmetadata:\n  name: broken\nspec:\n  allow:\n    loginz: [root]\n"
    page.fill(tid("role-yaml"), bad)
    page.click(tid("role-save"))
    err = page.locator(f"{tid('role-error')}:not([hidden])")
    err.wait_for()
    message = err.text_content() or ""
    assert message.startswith("Line 7: spec.allow.loginz: unknown field"), message
    assert "did you mean 'logins'" in message
    assert page.get_attribute(tid("role-error-line"), "data-line") == "7"
    assert page.locator(tid("role-error-line")).is_visible()
    assert "broken" not in page.locator(tid("role-item")).all_text_contents()
    shot(page, "roles")

    # Account: the profile and the authenticator app the registration enrolled.
    page.click(tid("user-menu-button"))
    page.click(tid("menu-account"))
    page.wait_for_selector(tid("mfa-row"))
    assert name in (page.text_content(tid("account-info")) or "")
    assert "Authenticator app" in (page.text_content(tid("mfa-table")) or "")
    shot(page, "account")
    assert_clean(page, expected_errors=("status of 400",))
