"""Certificate-only SSH server authentication, shared by the SSH node and the proxy's recording
mode for agentless nodes: only user certificates signed by the user CA are accepted, each
(login, certificate) is decided once per connection, and a client that keeps offering refused
certificates is disconnected."""

from __future__ import annotations

import abc
from collections.abc import Sequence
from typing import Any, Protocol

import asyncssh

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

    @abc.abstractmethod
    def trusted_user_ca_keys(self) -> Sequence[str]: ...

    @abc.abstractmethod
    def decide(self, username: str, blob: bytes) -> Decision:
        """May this certificate log in as `username`? Called once per pair per connection."""

    @abc.abstractmethod
    def refused(self, username: str, blob: bytes, decision: Any) -> None:
        """Tell the user (banner) and the audit log why."""

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
