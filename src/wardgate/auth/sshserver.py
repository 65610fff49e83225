"""Certificate-only SSH servers, shared by the SSH node and the proxy's recording mode for
agentless nodes: only user certificates signed by the user CA are accepted, each (login,
certificate) is decided once per connection, a client that keeps offering refused certificates
is disconnected, and the roles' `disconnect_expired_cert` and `client_idle_timeout` end the
connection when due."""

from __future__ import annotations

import abc
import asyncio
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, Protocol

import asyncssh

from wardgate.api.resources import RoleOptions
from wardgate.auth.certs import rfc3339
from wardgate.auth.identity import Identity
from wardgate.durations import format_duration

MAX_AUTH_TRIES = 6


class Decision(Protocol):
    allowed: bool


def key_line(key: object) -> str:
    """`<type> <base64>` of an SSH public key given as a line or as an asyncssh key."""
    if isinstance(key, str):
        return " ".join(key.split()[:2])
    data = key.export_public_key("openssh")  # type: ignore[attr-defined]
    return " ".join(data.decode("ascii").split()[:2])


def is_cert_blob(blob: bytes) -> bool:
    """Whether an SSH public-key blob is an OpenSSH certificate (its type ends in -cert-v01)."""
    n = int.from_bytes(blob[:4], "big")
    return 0 < n <= 64 and blob[4 : 4 + n].endswith(b"-cert-v01@openssh.com")


class CertificateAuthServer(asyncssh.SSHServer, abc.ABC):
    """Subclasses say which CA keys to trust, decide per login and certificate, and refuse."""

    conn: Any = None

    def __init__(self) -> None:
        self._decisions: dict[tuple[str, bytes], Any] = {}
        self._refusals = 0
        self.identity: Identity | None = None
        self.options = RoleOptions()
        self.last_activity = 0.0
        self._timers: list[asyncio.TimerHandle] = []
        self._closing = False

    @abc.abstractmethod
    def trusted_user_ca_keys(self) -> Sequence[str]: ...

    @abc.abstractmethod
    def decide(self, username: str, blob: bytes) -> Decision:
        """May this certificate log in as `username`? Called once per pair per connection."""

    @abc.abstractmethod
    def refused(self, username: str, blob: bytes, decision: Any) -> None:
        """Tell the user (banner) and the audit log why."""

    @abc.abstractmethod
    def terminate(self, reason: str) -> None:
        """End the connection with a word to the user (lock, expiry, idle, shutdown)."""

    def decision_for(self, username: str, blob: bytes) -> Any:
        return self._decisions.get((username, blob))

    def begin_auth(self, username: str) -> bool:
        return True

    def public_key_auth_supported(self) -> bool:
        return True

    def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        return False  # certificates only

    def validate_ca_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        line = key_line(key)
        return any(key_line(k) == line for k in self.trusted_user_ca_keys())

    def authorize(self, username: str, key_data: bytes) -> bool:
        """The decision for this login and certificate: computed (and audited if refused) once."""
        blob = bytes(key_data)
        if not is_cert_blob(blob):
            return False
        d = self._decisions.get((username, blob))
        if d is None:
            d = self.decide(username, blob)
            self._decisions[username, blob] = d
            if not d.allowed:
                self.refused(username, blob, d)
                self.count_refusal()
        return bool(d.allowed)

    def count_refusal(self) -> None:
        """Stop a client that keeps guessing."""
        self._refusals += 1
        if self._refusals >= MAX_AUTH_TRIES and self.conn is not None:
            self.conn.disconnect(
                asyncssh.DISC_NO_MORE_AUTH_METHODS_AVAILABLE, "too many refused certificates"
            )

    # ---- what the roles enforce once a user is in

    def auth_completed(self) -> None:
        loop = asyncio.get_running_loop()
        self.last_activity = loop.time()
        ident = self.identity
        if self.options.disconnect_expired_cert and ident is not None and ident.expires is not None:
            delay = (ident.expires - datetime.now(UTC)).total_seconds()
            reason = f"your certificate expired at {rfc3339(ident.expires)}"
            self._timers.append(loop.call_later(max(delay, 0), self.terminate, reason))
        idle = self.options.client_idle_timeout
        if idle is not None and idle.total_seconds() > 0:
            self._timers.append(loop.call_later(idle.total_seconds(), self._check_idle))

    def touch(self) -> None:
        """Client activity (input, new channels): what the idle timeout measures."""
        self.last_activity = asyncio.get_running_loop().time()

    def _check_idle(self) -> None:
        idle = self.options.client_idle_timeout
        if idle is None or self._closing:
            return
        loop = asyncio.get_running_loop()
        left = self.last_activity + idle.total_seconds() - loop.time()
        if left > 0:
            self._timers.append(loop.call_later(left, self._check_idle))
            return
        self.terminate(f"client exceeded the idle timeout of {format_duration(idle)}, disconnecting")

    def stop_timers(self) -> None:
        """The connection is going: no timer may fire on it any more."""
        self._closing = True
        for t in self._timers:
            t.cancel()
        self._timers.clear()
