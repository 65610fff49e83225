"""The SFTP server process: `python -I -m wardgate.agent.ssh.sftp_child UID GID GROUPS HOME [CLIENT]`.

It serves as the login user (real, effective and saved uid/gid and the supplementary groups,
cwd = home), so every file operation is checked by the kernel against that user, as with
OpenSSH's sftp-server. The node starts it as root and it drops privileges itself, after its
imports and before it reads a byte from the client: the interpreter and Wardgate may be
installed where the login cannot read (a venv under /root), which rules out switching user
before exec. It speaks SFTP v3 on stdin/stdout with asyncssh's SFTP server; the node relays
the bytes to and from the SSH channel and audits the requests it sees pass.

Importing this module must stay cheap: it runs once per SFTP session.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from typing import Any


class _Channel:
    """The little of an SSH channel that asyncssh's SFTP server consults."""

    def __init__(self, logger: Any, transport: asyncio.WriteTransport) -> None:
        self.logger = logger
        self._transport = transport

    def get_environment(self) -> dict[str, str]:
        return dict(os.environ)

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def get_connection(self) -> None:
        return None


class _Reader:
    def __init__(self, reader: asyncio.StreamReader, logger: Any, client_version: str) -> None:
        self._reader = reader
        self.logger = logger
        self._client_version = client_version

    async def readexactly(self, n: int) -> bytes:
        return await self._reader.readexactly(n)  # IncompleteReadError is an EOFError

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._client_version if name == "client_version" else default


class _Out(asyncio.Protocol):
    """Tells us when everything written has left (the transport calls connection_lost after flushing)."""

    def __init__(self) -> None:
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)


class _Writer:
    def __init__(self, transport: asyncio.WriteTransport, channel: _Channel) -> None:
        self._transport = transport
        self.channel = channel

    def write(self, data: bytes) -> None:
        self._transport.write(data)

    def close(self) -> None:
        self._transport.close()


def _become(uid: int, gid: int, groups: list[int], home: str) -> None:
    """Drop to the login for good (no way back to root), then start in its home directory."""
    if os.geteuid() == 0:
        os.setgroups(groups)
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
    if os.getresuid() != (uid, uid, uid) or os.getresgid() != (gid, gid, gid):
        raise SystemExit(f"wardgate sftp: cannot run as uid {uid} gid {gid}")
    try:
        os.chdir(home)
    except OSError:
        os.chdir("/")


async def _serve(client_version: str) -> None:
    from asyncssh.logging import logger
    from asyncssh.sftp import SFTPServer, run_sftp_server

    loop = asyncio.get_running_loop()
    stream = asyncio.StreamReader(limit=1 << 20)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stream), os.fdopen(0, "rb", 0))
    transport, out = await loop.connect_write_pipe(_Out, os.fdopen(1, "wb", 0))
    chan = _Channel(logger, transport)
    server = SFTPServer(chan)  # type: ignore[arg-type]
    await run_sftp_server(
        server,
        _Reader(stream, logger, client_version),  # type: ignore[arg-type]
        _Writer(transport, chan),  # type: ignore[arg-type]
        3,
    )
    # Let the last replies leave before the process exits.
    transport.close()
    await out.closed


def main() -> None:
    if len(sys.argv) < 5:
        raise SystemExit("usage: python -m wardgate.agent.ssh.sftp_child UID GID GROUPS HOME [CLIENT]")
    uid, gid = int(sys.argv[1]), int(sys.argv[2])
    groups = [int(g) for g in sys.argv[3].split(",") if g]
    home = sys.argv[4]
    client_version = sys.argv[5] if len(sys.argv) > 5 else ""
    # Everything the server will need is imported while we can still read the install.
    import grp  # noqa: F401 - asyncssh looks up group names lazily
    import pwd  # noqa: F401

    import asyncssh.sftp  # noqa: F401

    _become(uid, gid, groups, home)
    with contextlib.suppress(BrokenPipeError, ConnectionResetError, KeyboardInterrupt):
        asyncio.run(_serve(client_version))


if __name__ == "__main__":
    main()
