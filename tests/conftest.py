"""Shared fixtures: an in-process auth server on real storage in a temp dir."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from wardgate.audit.store import SQLiteAuditLog
from wardgate.auth.identity import Identity
from wardgate.auth.server import AuthServer, AuthServerConfig
from wardgate.auth.users import AuthPreference
from wardgate.backend.sqlite import SQLiteBackend

ADMIN = Identity(user="admin", system_role="admin", host_id="admin")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FakeClock:
    """Wall clock we can move: TOTP steps and lockouts without sleeping."""

    def __init__(self, start: float) -> None:
        self.t = start

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


@pytest.fixture
def clock() -> FakeClock:
    import time

    return FakeClock(time.time())


@pytest.fixture
async def auth(tmp_path: Path, clock: FakeClock) -> AsyncIterator[AuthServer]:
    backend = SQLiteBackend(tmp_path / "backend.db", clock=clock)
    audit = SQLiteAuditLog(tmp_path / "audit.db")
    server = AuthServer(
        AuthServerConfig(
            cluster_name="test.example",
            prefs=AuthPreference(second_factor="otp", max_attempts=5),
            static_tokens=["node,app:static-secret-token-123"],
        ),
        backend,
        audit,
        clock=clock,
    )
    await server.start()
    yield server
    await server.close()
    await audit.close()
    await backend.close()
