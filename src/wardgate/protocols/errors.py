"""The one error the sans-IO codecs raise: the peer sent bytes that are not the protocol."""

from __future__ import annotations

from wardgate.errors import WardgateError


class ProtocolError(WardgateError):
    """Bytes from a peer that do not follow the protocol; `str()` says what was wrong.

    `kind` is a short stable word (`not_tls`, `plain_http`, `malformed`, `oversized`, …) that
    callers use for counters and metrics without parsing messages.
    """

    status = 400
    code = "protocol_error"

    def __init__(self, message: str, *, kind: str = "malformed") -> None:
        super().__init__(message)
        self.kind = kind
