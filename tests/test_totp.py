"""TOTP codes (RFC 6238), single use, the provisioning URI, and the terminal QR code."""

from __future__ import annotations

import base64
from urllib.parse import parse_qs, urlsplit

import pytest
import qrcode

from wardgate.auth import totp
from wardgate.errors import BadParameterError

# RFC 6238 appendix B: the ASCII secret "12345678901234567890", SHA-1
RFC_SECRET = base64.b32encode(b"12345678901234567890").decode()
SECRET = "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP"
NOW = 1_760_000_015.0  # 15 s into a step
STEP = int(NOW // 30)


def test_rfc6238_vectors():
    # the RFC's 8-digit values, of which a 6-digit code is the last six
    assert totp.current_code(RFC_SECRET, 59) == "287082"
    assert totp.current_code(RFC_SECRET, 1111111109) == "081804"
    assert totp.current_code(RFC_SECRET, 2000000000) == "279037"
    assert totp.verify_totp(RFC_SECRET, "081804", last_used_step=None, now=1111111109) == 1111111109 // 30


def test_new_secret_is_160_random_bits():
    a, b = totp.new_totp_secret(), totp.new_totp_secret()
    assert a != b
    assert len(base64.b32decode(a)) == 20
    assert totp.verify_totp(a, totp.current_code(a), last_used_step=None) is not None


def test_current_code_verifies_and_returns_its_step():
    code = totp.current_code(SECRET, NOW)
    assert len(code) == 6
    assert code.isdigit()
    assert totp.verify_totp(SECRET, code, last_used_step=None, now=NOW) == STEP


def test_neighbouring_steps_are_accepted_two_away_are_not():
    prev = totp.current_code(SECRET, NOW - 30)
    nxt = totp.current_code(SECRET, NOW + 30)
    assert totp.verify_totp(SECRET, prev, last_used_step=None, now=NOW) == STEP - 1
    assert totp.verify_totp(SECRET, nxt, last_used_step=None, now=NOW) == STEP + 1
    for offset in (-60, 60, -90, 90):
        code = totp.current_code(SECRET, NOW + offset)
        assert code != totp.current_code(SECRET, NOW)  # holds for these fixed values
        assert totp.verify_totp(SECRET, code, last_used_step=None, now=NOW) is None
    assert totp.verify_totp(SECRET, prev, last_used_step=None, now=NOW, window=0) is None
    far = totp.current_code(SECRET, NOW - 60)
    assert totp.verify_totp(SECRET, far, last_used_step=None, now=NOW, window=2) == STEP - 2


def test_a_code_works_only_once():
    code = totp.current_code(SECRET, NOW)
    step = totp.verify_totp(SECRET, code, last_used_step=None, now=NOW)
    assert step == STEP
    assert totp.verify_totp(SECRET, code, last_used_step=step, now=NOW) is None
    # still refused a little later, while the code would otherwise still be in the window
    assert totp.verify_totp(SECRET, code, last_used_step=step, now=NOW + 20) is None
    # the next code is fine
    nxt = totp.current_code(SECRET, NOW + 30)
    assert totp.verify_totp(SECRET, nxt, last_used_step=step, now=NOW + 30) == STEP + 1


def test_an_older_code_is_refused_after_a_newer_one():
    newer = totp.current_code(SECRET, NOW + 30)
    used = totp.verify_totp(SECRET, newer, last_used_step=None, now=NOW)
    assert used == STEP + 1
    current = totp.current_code(SECRET, NOW)
    assert totp.verify_totp(SECRET, current, last_used_step=used, now=NOW) is None
    assert totp.verify_totp(SECRET, current, last_used_step=STEP - 1, now=NOW) == STEP


def test_spaces_are_ignored():
    code = totp.current_code(SECRET, NOW)
    spaced = f" {code[:3]} {code[3:]}\n"
    assert totp.verify_totp(SECRET, spaced, last_used_step=None, now=NOW) == STEP


@pytest.mark.parametrize(
    "code",
    [
        "",
        "12345",
        "1234567",
        "abcdef",
        "12345a",
        "+12345",
        "-12345",
        "١٢٣٤٥٦",
        "\uff11\uff12\uff13\uff14\uff15\uff16",
        "12.456",
    ],
)
def test_malformed_codes_fail(code):
    assert totp.verify_totp(SECRET, code, last_used_step=None, now=NOW) is None


def test_non_string_code_fails():
    assert totp.verify_totp(SECRET, 123456, last_used_step=None, now=NOW) is None  # type: ignore[arg-type]


def test_bad_secret_is_reported_without_echoing_it():
    secret = "NOT!BASE32!!"
    with pytest.raises(BadParameterError) as info:
        totp.verify_totp(secret, "123456", last_used_step=None, now=NOW)
    assert secret not in str(info.value)


def test_uri_names_issuer_and_account():
    uri = totp.totp_uri(SECRET, account="alice@example.com", issuer="Ward Gate")
    parts = urlsplit(uri)
    assert parts.scheme == "otpauth"
    assert parts.netloc == "totp"
    assert "alice%40example.com" in parts.path or "alice@example.com" in parts.path
    assert parts.path.startswith("/Ward%20Gate:")
    q = parse_qs(parts.query)
    assert q["secret"] == [SECRET]
    assert q["issuer"] == ["Ward Gate"]


def _decode_blocks(text: str) -> list[list[bool]]:
    """Turn half-block text back into rows of 'light' flags (two rows per line)."""
    top = {" ": False, "\u2580": True, "\u2584": False, "\u2588": True}
    bottom = {" ": False, "\u2580": False, "\u2584": True, "\u2588": True}
    rows: list[list[bool]] = []
    for line in text.splitlines():
        rows.append([top[c] for c in line])
        rows.append([bottom[c] for c in line])
    return rows


def test_qr_text_draws_the_qr_code_inverted():
    uri = totp.totp_uri(SECRET, account="alice", issuer="wardgate")
    text = totp.qr_text(uri)
    lines = text.splitlines()
    assert len(lines) > 10
    assert len({len(line) for line in lines}) == 1
    assert set(text) <= {" ", "\u2580", "\u2584", "\u2588", "\n"}
    assert "\x1b" not in text

    qr = qrcode.QRCode(border=2, error_correction=qrcode.constants.ERROR_CORRECT_M)
    qr.add_data(uri)
    qr.make(fit=True)
    matrix = qr.get_matrix()  # True = dark, quiet zone included
    drawn = _decode_blocks(text)[: len(matrix)]
    assert drawn == [[not dark for dark in row] for row in matrix]


def test_qr_text_ansi_forces_colours():
    text = totp.qr_text("otpauth://totp/x?secret=" + SECRET, ansi=True)
    lines = text.splitlines()
    assert all(line.endswith("\x1b[0m") for line in lines)
    assert "\x1b[48;5;232m" in lines[0]
