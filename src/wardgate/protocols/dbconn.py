"""The one line a proxy sends a database service before a client's database protocol bytes.

`{"cert": PEM, "db": NAME, "client_addr": "ip:port"}` + newline: the client's own certificate
(so the service verifies the identity itself), the database asked for, and who is connecting.
"""

from __future__ import annotations

import json

from wardgate.protocols.errors import ProtocolError

MAX_HEADER = 64 * 1024


def encode_header(cert_pem: str, db: str, client_addr: str) -> bytes:
    return json.dumps({"cert": cert_pem, "db": db, "client_addr": client_addr}).encode() + b"\n"


def decode_header(line: bytes) -> dict[str, str]:
    if len(line) > MAX_HEADER:
        raise ProtocolError(f"connection header of {len(line)} bytes exceeds {MAX_HEADER}")
    try:
        data = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ProtocolError("malformed connection header from the proxy") from None
    if not isinstance(data, dict) or not all(isinstance(data.get(k), str) for k in ("cert", "db")):
        raise ProtocolError("the connection header needs cert and db")
    return {k: str(v) for k, v in data.items()}
