"""The one line a proxy sends a service before a client's own bytes: a JSON object of strings.

Database and app services both get their connections this way (in this process or through a
reverse tunnel): the client's certificate, so the service verifies the identity itself, plus
what the client asked for and who is connecting. `encode_header`/`decode_header` are the framing
and its limits; which fields a service needs is the service's business (`required`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from wardgate.protocols.errors import ProtocolError

MAX_HEADER = 64 * 1024
"""A certificate chain fits many times over; anything longer is not from a proxy."""


def encode_header(**fields: str) -> bytes:
    """`{"field": "value", ...}` + newline (JSON escapes any newline inside a value)."""
    return json.dumps(fields).encode() + b"\n"


def decode_header(line: bytes, *, required: Sequence[str]) -> dict[str, str]:
    """The fields of a header line; `ProtocolError` if it is too long, not a JSON object, or
    lacks one of `required` as a string. Other values are turned into strings."""
    if len(line) > MAX_HEADER:
        raise ProtocolError(f"connection header of {len(line)} bytes exceeds {MAX_HEADER}")
    try:
        data = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ProtocolError("malformed connection header from the proxy") from None
    if not isinstance(data, dict) or not all(isinstance(data.get(k), str) for k in required):
        raise ProtocolError(f"the connection header needs {' and '.join(required)}")
    return {str(k): str(v) for k, v in data.items()}
