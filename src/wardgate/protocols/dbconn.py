"""The one line a proxy sends a database service before a client's database protocol bytes.

`{"cert": PEM, "db": NAME, "client_addr": "ip:port"}` + newline: the client's own certificate
(so the service verifies the identity itself), the database asked for, and who is connecting.
The framing is `protocols/connheader.py`'s, shared with the app service.
"""

from __future__ import annotations

from wardgate.protocols.connheader import MAX_HEADER
from wardgate.protocols.connheader import decode_header as _decode
from wardgate.protocols.connheader import encode_header as _encode

__all__ = ["MAX_HEADER", "decode_header", "encode_header"]


def encode_header(cert_pem: str, db: str, client_addr: str) -> bytes:
    return _encode(cert=cert_pem, db=db, client_addr=client_addr)


def decode_header(line: bytes) -> dict[str, str]:
    return _decode(line, required=("cert", "db"))
