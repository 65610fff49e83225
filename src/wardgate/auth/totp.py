"""TOTP second factor (RFC 6238: HMAC-SHA1, 30 s steps, 6 digits) and a terminal QR code.

Each code is usable once: `verify_totp` returns the matched time step, callers store it, and any
later code from that step or an earlier one is refused, so a code seen over a shoulder or in a
log cannot be replayed within its validity window. Secrets and codes are never logged or put in
exception messages.
"""

from __future__ import annotations

import binascii
import hmac
import time

import pyotp
import qrcode
import qrcode.image.svg

from wardgate.errors import BadParameterError

STEP_SECONDS = 30
DIGITS = 6
SECRET_CHARS = 32  # 32 base32 characters = 160 bits, the HMAC-SHA1 block the RFC recommends


def _totp(secret: str) -> pyotp.TOTP:
    """pyotp decodes the secret up front; a bad one is reported without echoing it."""
    try:
        return pyotp.TOTP(secret, digits=DIGITS, interval=STEP_SECONDS)
    except (binascii.Error, ValueError, TypeError):
        raise BadParameterError("the TOTP secret is not valid base32") from None


def new_totp_secret() -> str:
    """A fresh random 160-bit secret, base32 without padding, as authenticator apps expect."""
    return pyotp.random_base32(length=SECRET_CHARS)


def totp_uri(secret: str, *, account: str, issuer: str) -> str:
    """The otpauth:// URI an authenticator app imports (usually from a QR code)."""
    return _totp(secret).provisioning_uri(name=account, issuer_name=issuer)


def current_code(secret: str, now: float | None = None) -> str:
    """The code for `now` (default: the current time); for tests and tools."""
    return _totp(secret).at(time.time() if now is None else now)


def verify_totp(
    secret: str,
    code: str,
    *,
    last_used_step: int | None,
    now: float | None = None,
    window: int = 1,
) -> int | None:
    """Return the time step `code` belongs to (within ±`window` steps of now), or None.

    Steps at or before `last_used_step` never match, so each code works once and an older code
    cannot be used after a newer one. Malformed codes (after removing spaces) simply fail.
    """
    if window < 0:
        raise BadParameterError("TOTP window must not be negative")
    if not isinstance(code, str):
        return None
    code = "".join(code.split())
    if len(code) != DIGITS or not code.isascii() or not code.isdigit():
        return None
    otp = _totp(secret)
    current = int((time.time() if now is None else now) // STEP_SECONDS)
    matched: int | None = None
    # Check every candidate (no early exit) so the time taken does not depend on which matched.
    for step in range(current - window, current + window + 1):
        if step < 0 or (last_used_step is not None and step <= last_used_step):
            continue
        if hmac.compare_digest(otp.generate_otp(step), code) and matched is None:
            matched = step
    return matched


def qr_svg(data: str) -> str:
    """`data` (e.g. an otpauth:// URI) as a QR code in a standalone SVG document, for web pages."""
    qr = qrcode.QRCode(
        border=2,
        error_correction=qrcode.constants.ERROR_CORRECT_M,
        image_factory=qrcode.image.svg.SvgPathImage,
    )
    qr.add_data(data)
    qr.make(fit=True)
    return qr.make_image().to_string(encoding="unicode")


def qr_text(data: str, *, ansi: bool = False) -> str:
    """`data` as a QR code drawn with Unicode half blocks, two module rows per text line.

    Light modules are drawn as blocks and dark ones as blanks (inverted), which scans on the
    usual dark terminal; with `ansi=True` the colours are forced (white on black) so it scans on
    a light terminal too. Use `ansi` only when writing to a terminal: escape codes garble files.
    """
    qr = qrcode.QRCode(border=2, error_correction=qrcode.constants.ERROR_CORRECT_M)
    qr.add_data(data)
    qr.make(fit=True)
    size = qr.modules_count
    border = qr.border
    end = size + border

    def light(row: int, col: int) -> bool:
        if row >= end or col >= end:  # past the bottom edge of an odd row count: draw nothing
            return False
        if min(row, col) < 0 or max(row, col) >= size:  # quiet zone
            return True
        return not qr.modules[row][col]

    # index: top light (1) + bottom light (2)
    glyphs = (" ", "\u2580", "\u2584", "\u2588")
    lines = []
    for row in range(-border, end, 2):
        cells = "".join(
            glyphs[int(light(row, col)) + (int(light(row + 1, col)) << 1)] for col in range(-border, end)
        )
        if ansi:
            # Black background except on a last line that is only half used, so the blank half
            # below the quiet zone takes the terminal's own background.
            bg = "\x1b[48;5;232m" if row + 1 < end else ""
            cells = f"{bg}\x1b[38;5;255m{cells}\x1b[0m"
        lines.append(cells)
    return "\n".join(lines) + "\n"
