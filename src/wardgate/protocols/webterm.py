"""The browser terminal's WebSocket envelope: one type byte, then the payload (sans-IO).

Every message on `/webapi/sites/{cluster}/connect/ws` is a binary WebSocket message whose
first byte says what follows (see docs/web-api.md, "The terminal WebSocket"):

| type | direction        | payload                                                         |
|------|------------------|-----------------------------------------------------------------|
| `a`  | browser → proxy  | the bearer token (UTF-8); the first message, within 5 s         |
| `d`  | both             | terminal bytes (keystrokes; output)                             |
| `r`  | browser → proxy  | `{"cols": 1-1000, "rows": 1-1000}`                              |
| `s`  | proxy → browser  | `{"sid", "node", "login", "mode", "cluster"}`                   |
| `m`  | both             | MFA challenge (proxy) / answer `{"otp"}` or `{"webauthn"}`      |
| `x`  | proxy → browser  | `{"code": int or null, "signal": str or null}`                  |
| `e`  | proxy → browser  | an error a person can read (UTF-8)                              |
| `p`  | both             | keep-alive (empty)                                              |

`decode` checks a message against the direction it travelled and returns a `Frame` with the
payload parsed (bytes, text, a JSON object, or a validated `Resize`); anything else raises
`ProtocolError` with a message saying what was wrong. The encoders build messages. No I/O.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from wardgate.protocols.errors import ProtocolError

__all__ = [
    "AUTH",
    "BROWSER_KINDS",
    "CLOSE_ACCESS_DENIED",
    "CLOSE_BAD_GATEWAY",
    "CLOSE_NORMAL",
    "CLOSE_NOT_AUTHENTICATED",
    "CLOSE_NO_TOKEN",
    "CLOSE_POLICY",
    "CLOSE_PROTOCOL_ERROR",
    "DATA",
    "ERROR",
    "EXIT",
    "JSON_KINDS",
    "KINDS",
    "MAX_BROWSER_MESSAGE",
    "MAX_SERVER_MESSAGE",
    "MAX_TERMINAL_SIZE",
    "MFA",
    "PING",
    "RESIZE",
    "SERVER_KINDS",
    "SESSION",
    "Frame",
    "Resize",
    "decode",
    "encode_data",
    "encode_json",
    "encode_ping",
    "encode_resize",
    "encode_text",
]

AUTH = "a"
DATA = "d"
RESIZE = "r"
SESSION = "s"
MFA = "m"
EXIT = "x"
ERROR = "e"
PING = "p"

KINDS = frozenset({AUTH, DATA, RESIZE, SESSION, MFA, EXIT, ERROR, PING})
BROWSER_KINDS = frozenset({AUTH, DATA, RESIZE, MFA, PING})
"""What a browser may send."""
SERVER_KINDS = frozenset({DATA, SESSION, MFA, EXIT, ERROR, PING})
"""What the proxy may send."""
JSON_KINDS = frozenset({RESIZE, SESSION, MFA, EXIT})
TEXT_KINDS = frozenset({AUTH, ERROR})

MAX_BROWSER_MESSAGE = 64 * 1024
"""Largest message (type byte included) a browser may send: keystrokes and pastes, not files."""
MAX_SERVER_MESSAGE = 1024 * 1024
"""Largest message the proxy sends (it cuts output into much smaller pieces)."""
MAX_TERMINAL_SIZE = 1000
"""Columns and rows each lie in 1..MAX_TERMINAL_SIZE."""

# WebSocket close codes the terminal uses (docs/web-api.md).
CLOSE_NORMAL = 1000
CLOSE_PROTOCOL_ERROR = 1002
"""A message that is not this protocol (decode raised)."""
CLOSE_POLICY = 1008
"""A request the proxy will not serve as asked (bad query parameters)."""
CLOSE_BAD_GATEWAY = 1014
"""The node could not be reached or refused the proxy's SSH connection."""
CLOSE_NOT_AUTHENTICATED = 4001
CLOSE_ACCESS_DENIED = 4003
CLOSE_NO_TOKEN = 4008

_DIRECTION = {True: ("browser", BROWSER_KINDS), False: ("proxy", SERVER_KINDS)}


@dataclass(frozen=True, slots=True)
class Resize:
    cols: int
    rows: int

    def __post_init__(self) -> None:
        for name in ("cols", "rows"):
            v = getattr(self, name)
            if type(v) is not int:
                raise ProtocolError(f"resize: {name} must be an integer, not {type(v).__name__}")
            if not 1 <= v <= MAX_TERMINAL_SIZE:
                raise ProtocolError(f"resize: {name} must be between 1 and {MAX_TERMINAL_SIZE}, not {v}")


@dataclass(frozen=True, slots=True)
class Frame:
    """One decoded message: `kind` (one letter), the raw `payload`, and `value`, the payload
    parsed: bytes for `d`, str for `a`/`e`, dict for `s`/`m`/`x`, `Resize` for `r`, None for `p`."""

    kind: str
    payload: bytes
    value: Any = None


def _kind_byte(kind: str) -> bytes:
    if kind not in KINDS:
        raise ValueError(f"unknown terminal message type {kind!r}")
    return kind.encode("ascii")


def encode_data(data: bytes | bytearray | memoryview) -> bytes:
    """`d` + terminal bytes."""
    return b"d" + bytes(data)


def encode_text(kind: str, text: str) -> bytes:
    """`a` (token) or `e` (error) with UTF-8 text."""
    _kind_byte(kind)
    if kind not in TEXT_KINDS:
        raise ValueError(f"{kind!r} does not carry text (use one of {', '.join(sorted(TEXT_KINDS))})")
    return _kind_byte(kind) + text.encode("utf-8")


def encode_json(kind: str, obj: dict[str, Any]) -> bytes:
    """`r`, `s`, `m` or `x` with a compact JSON object."""
    _kind_byte(kind)
    if kind not in JSON_KINDS:
        raise ValueError(f"{kind!r} does not carry JSON (use one of {', '.join(sorted(JSON_KINDS))})")
    if not isinstance(obj, dict):
        raise ValueError("terminal JSON payloads are objects")
    return _kind_byte(kind) + json.dumps(obj, separators=(",", ":"), allow_nan=False).encode("utf-8")


def encode_resize(cols: int, rows: int) -> bytes:
    r = Resize(cols, rows)
    return encode_json(RESIZE, {"cols": r.cols, "rows": r.rows})


def encode_ping() -> bytes:
    return b"p"


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _text(kind: str, payload: bytes) -> str:
    try:
        return payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProtocolError(
            f"{kind!r} message: payload is not UTF-8 ({exc.reason} at byte {exc.start})"
        ) from None


def _json_object(kind: str, payload: bytes) -> dict[str, Any]:
    text = _text(kind, payload)
    try:
        obj = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        why = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise ProtocolError(f"{kind!r} message: payload is not valid JSON: {why}") from None
    if not isinstance(obj, dict):
        raise ProtocolError(f"{kind!r} message: payload must be a JSON object, not {type(obj).__name__}")
    return obj


def _resize(obj: dict[str, Any]) -> Resize:
    missing = [k for k in ("cols", "rows") if k not in obj]
    if missing:
        raise ProtocolError(f"resize: missing {' and '.join(missing)}")
    return Resize(obj["cols"], obj["rows"])


def decode(msg: bytes | bytearray | memoryview, *, from_browser: bool) -> Frame:
    """Parse one WebSocket message sent by the browser (`from_browser=True`) or by the proxy."""
    who, allowed = _DIRECTION[from_browser]
    limit = MAX_BROWSER_MESSAGE if from_browser else MAX_SERVER_MESSAGE
    size = len(msg)
    if size > limit:
        raise ProtocolError(
            f"message of {size} bytes from the {who} is over the limit of {limit} bytes", kind="oversized"
        )
    if size == 0:
        raise ProtocolError(f"empty message from the {who}: every message starts with a type byte")
    data = bytes(msg)
    first = data[0]
    kind = chr(first)
    if kind not in KINDS:
        raise ProtocolError(f"unknown message type {data[:1]!r} from the {who}", kind="unknown_type")
    if kind not in allowed:
        raise ProtocolError(f"the {who} may not send {kind!r} messages", kind="wrong_direction")
    payload = data[1:]
    if kind == DATA:
        return Frame(kind, payload, payload)
    if kind in TEXT_KINDS:
        return Frame(kind, payload, _text(kind, payload))
    if kind == PING:
        if payload:
            raise ProtocolError(f"keep-alive ('p') messages are empty, this one has {len(payload)} bytes")
        return Frame(kind, payload, None)
    obj = _json_object(kind, payload)
    if kind == RESIZE:
        return Frame(kind, payload, _resize(obj))
    if kind == MFA and from_browser:
        _check_mfa_answer(obj)
    elif kind == EXIT:
        _check_exit(obj)
    return Frame(kind, payload, obj)


def _check_mfa_answer(obj: dict[str, Any]) -> None:
    """The browser answers a challenge with one factor: `{"otp": "123456"}` or `{"webauthn": {...}}`."""
    otp, webauthn = obj.get("otp"), obj.get("webauthn")
    if (otp is None) == (webauthn is None):
        raise ProtocolError("MFA answer: send exactly one of otp or webauthn")
    if otp is not None and not isinstance(otp, str):
        raise ProtocolError("MFA answer: otp must be a string")
    if webauthn is not None and not isinstance(webauthn, dict):
        raise ProtocolError("MFA answer: webauthn must be an object (the assertion JSON)")


def _check_exit(obj: dict[str, Any]) -> None:
    code, signal = obj.get("code"), obj.get("signal")
    if code is not None and type(code) is not int:
        raise ProtocolError("exit: code must be an integer or null")
    if signal is not None and not isinstance(signal, str):
        raise ProtocolError("exit: signal must be a string or null")
