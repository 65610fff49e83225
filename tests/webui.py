"""Playwright helpers for the browser tests: headless Chromium, pages that keep their console,
Chromium's virtual WebAuthn authenticator, the web terminal's buffer, screenshots.

Use from a test module:

    from tests.webui import browser, make_page, shot, add_authenticator  # noqa: F401 (fixtures)

    def test_x(make_page):
        page = make_page()
        page.goto(base + "/web/login")
        ...
        shot(page, "login")
        assert not csp_violations(page)

Everything is the sync API: the end-to-end tests are plain functions driving real processes.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = os.environ.get("WARDGATE_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking"]
SCREENSHOTS = Path(__file__).resolve().parent / "artifacts" / "screenshots"
VIEWPORT = {"width": 1280, "height": 800}

# What a passkey-capable laptop looks like to the page: a platform authenticator with resident
# keys and user verification (so passwordless sign-in works).
PLATFORM_AUTHENTICATOR = {
    "protocol": "ctap2",
    "transport": "internal",
    "hasResidentKey": True,
    "hasUserVerification": True,
    "isUserVerified": True,
}


# ---------------------------------------------------------------- browser and pages


@dataclass
class PageLog:
    """Console messages and uncaught errors of one page, kept from its first moment."""

    console: list[tuple[str, str]] = field(default_factory=list)  # (type, text)
    errors: list[str] = field(default_factory=list)  # uncaught exceptions
    dialogs: list[str] = field(default_factory=list)  # alert/confirm/prompt: an XSS would land here

    def text(self) -> str:
        return "\n".join(
            [f"console.{t}: {m}" for t, m in self.console] + [f"pageerror: {e}" for e in self.errors]
        )


# id(page) -> (page, its log). The page itself is kept too, so that its id cannot be reused by
# another page while the entry exists (a closed tab's log stays readable until the test ends).
_LOGS: dict[int, tuple[Any, PageLog]] = {}


def watch(page: Any) -> PageLog:
    """Start recording a page's console, errors and dialogs (dialogs are dismissed)."""
    if id(page) in _LOGS:
        return _LOGS[id(page)][1]
    log = PageLog()
    _LOGS[id(page)] = (page, log)
    page.on("console", lambda m: log.console.append((m.type, m.text)))
    page.on("pageerror", lambda e: log.errors.append(str(e)))

    def on_dialog(d: Any) -> None:
        log.dialogs.append(f"{d.type}: {d.message}")
        d.dismiss()

    page.on("dialog", on_dialog)
    # Pages the app opens (Connect, Join) are watched too.
    page.on("popup", watch)
    return log


def page_log(page: Any) -> PageLog:
    return _LOGS[id(page)][1] if id(page) in _LOGS else watch(page)


_CSP = re.compile(r"Content Security Policy|Refused to (execute|load|apply|evaluate|connect|frame)", re.I)


def csp_violations(page: Any) -> list[str]:
    """Console lines in which the browser refused something under the Content-Security-Policy."""
    return [m for _, m in page_log(page).console if _CSP.search(m)]


def launch(playwright: Any) -> Any:
    return playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """One headless Chromium per test module."""
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"no Chromium at {CHROMIUM} (set WARDGATE_CHROMIUM)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = launch(p)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def make_page(browser: Any) -> Iterator[Callable[..., Any]]:
    """make_page(**context_options) -> a Page in a fresh context (own cookies and storage),
    accepting the proxy's self-signed certificate, its console recorded. Closed after the test."""
    contexts: list[Any] = []

    def factory(**kw: Any) -> Any:
        opts = {"ignore_https_errors": True, "viewport": VIEWPORT, **kw}
        ctx = browser.new_context(**opts)
        ctx.set_default_timeout(float(os.environ.get("WARDGATE_UI_TIMEOUT_MS", "20000")))
        contexts.append(ctx)
        page = ctx.new_page()
        watch(page)
        return page

    yield factory
    for key, (pg, _) in list(_LOGS.items()):
        if pg.context in contexts:  # closed tabs included
            del _LOGS[key]
    for ctx in contexts:
        ctx.close()


# ---------------------------------------------------------------- WebAuthn


@dataclass
class Authenticator:
    """A CDP virtual authenticator attached to one page (WebAuthn is per page target)."""

    cdp: Any
    id: str

    def credentials(self) -> list[dict]:
        return self.cdp.send("WebAuthn.getCredentials", {"authenticatorId": self.id})["credentials"]

    def set_user_verified(self, verified: bool) -> None:
        self.cdp.send("WebAuthn.setUserVerified", {"authenticatorId": self.id, "isUserVerified": verified})

    def set_presence(self, enabled: bool) -> None:
        """False: requests wait for a touch that never comes (to test cancel/timeout paths)."""
        self.cdp.send(
            "WebAuthn.setAutomaticPresenceSimulation", {"authenticatorId": self.id, "enabled": enabled}
        )

    def add_credential(self, credential: dict) -> None:
        self.cdp.send("WebAuthn.addCredential", {"authenticatorId": self.id, "credential": credential})

    def remove(self) -> None:
        self.cdp.send("WebAuthn.removeVirtualAuthenticator", {"authenticatorId": self.id})


def add_authenticator(page: Any, **options: Any) -> Authenticator:
    """Give the page a virtual authenticator (default: a platform passkey authenticator with
    user verification). Options override PLATFORM_AUTHENTICATOR, e.g. transport='usb',
    hasResidentKey=False for a plain security key."""
    cdp = page.context.new_cdp_session(page)
    cdp.send("WebAuthn.enable", {"enableUI": False})
    res = cdp.send("WebAuthn.addVirtualAuthenticator", {"options": {**PLATFORM_AUTHENTICATOR, **options}})
    return Authenticator(cdp, res["authenticatorId"])


# ---------------------------------------------------------------- screenshots


def shot(page: Any, name: str, *, full_page: bool = False) -> Path:
    """Save a PNG under tests/artifacts/screenshots/<name>.png and return its path."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    safe = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "shot"
    path = SCREENSHOTS / f"{safe}.png"
    page.screenshot(path=str(path), full_page=full_page)
    return path


# ---------------------------------------------------------------- the app


def tid(testid: str) -> str:
    """CSS selector for a data-testid."""
    return f"[data-testid={testid!r}]".replace("'", '"')


def sign_in(
    page: Any, base: str, user: str, password: str, otp: str | None = None, *, next_path: str = ""
) -> None:
    """Fill the sign-in form (password + optional OTP) and wait until the app has left it."""
    url = base.rstrip("/") + "/web/login" + (f"?next={next_path}" if next_path else "")
    page.goto(url)
    page.fill(tid("login-username"), user)
    page.fill(tid("login-password"), password)
    if otp is not None:
        page.fill(tid("login-otp"), otp)
    page.click(tid("login-submit"))
    page.wait_for_function(
        "() => !location.pathname.startsWith('/web/login') || "
        "!document.querySelector('[data-testid=login-error]')?.hidden",
    )
    err = page.locator(f"{tid('login-error')}:not([hidden])")
    if err.count():
        raise AssertionError(f"sign-in failed: {err.text_content()}")


def login_error(page: Any) -> str:
    """The message shown next to the sign-in form (waits for it)."""
    sel = f"{tid('login-error')}:not([hidden])"
    page.wait_for_selector(sel)
    return page.text_content(sel) or ""


def bearer_token(page: Any) -> str:
    return page.evaluate("() => localStorage.getItem('wardgate.token') || ''")


_TERM_TEXT_JS = """() => {
  const t = window.wardTerm;
  if (!t) return null;
  const b = t.buffer.active;
  const out = [];
  for (let i = 0; i < b.length; i++) out.push(b.getLine(i).translateToString(true));
  return out.join('\\n');
}"""


def terminal_text(page: Any) -> str:
    """Everything in the web terminal's active buffer (scrollback included)."""
    return page.evaluate(_TERM_TEXT_JS) or ""


def wait_terminal_text(page: Any, needle: str | re.Pattern[str], timeout: float = 20) -> str:
    """Wait until the terminal shows `needle` (text or regex); returns the buffer."""
    deadline = time.monotonic() + timeout
    text = ""
    while time.monotonic() < deadline:
        text = terminal_text(page)
        if needle.search(text) if isinstance(needle, re.Pattern) else needle in text:
            return text
        page.wait_for_timeout(100)
    raise AssertionError(f"terminal never showed {needle!r}; it shows:\n{text}")


def wait_terminal_state(page: Any, state: str, timeout: float = 20) -> None:
    """Terminal states: connecting, mfa, running, ended, error, lost."""
    page.wait_for_selector(f"{tid('terminal')}[data-state={state}]", timeout=timeout * 1000)


def terminal_type(page: Any, text: str) -> None:
    """Type into the web terminal (it has to have focus; click it first)."""
    page.click(tid("terminal"))
    page.keyboard.type(text)
