"""Reading an SFTP v3 byte stream as it passes, just enough to audit file operations.

The node relays SFTP between the SSH channel and the SFTP child unchanged; this watcher sees
the same bytes. It keeps only each packet's first bytes (type, id, paths) and skips the rest,
so bulk READ/WRITE data costs a length check per packet, not a copy. Requests that change or
read files are matched with their replies (STATUS or HANDLE) to report success or the error.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["SftpOp", "SftpWatcher"]

_HEAD = 8192
_MAX_PENDING = 4096

FXP_OPEN, FXP_SETSTAT, FXP_REMOVE, FXP_MKDIR, FXP_RMDIR, FXP_RENAME, FXP_SYMLINK = 3, 9, 13, 14, 15, 18, 20
FXP_EXTENDED, FXP_STATUS, FXP_HANDLE = 200, 101, 102
FXF_WRITE, FXF_APPEND, FXF_CREAT, FXF_TRUNC = 0x2, 0x4, 0x8, 0x10


@dataclass(frozen=True, slots=True)
class SftpOp:
    action: str
    """`read` or `write` (a file opened for that), `remove`, `mkdir`, `rmdir`, `rename`, `symlink`,
    `link`, `setstat`."""
    path: str
    target: str = ""
    success: bool = True
    error: str = ""


class _Splitter:
    """Cuts a stream into SFTP packets, handing over each packet's head (up to `_HEAD` bytes)."""

    def __init__(self, on_packet: Callable[[bytes], None]) -> None:
        self._on_packet = on_packet
        self._len = bytearray()
        self._remaining = 0
        self._head = bytearray()
        self._head_needed = 0

    def feed(self, data: bytes) -> None:
        mv = memoryview(data)
        i, n = 0, len(mv)
        while i < n:
            if self._head_needed:
                take = min(self._head_needed, n - i)
                self._head += mv[i : i + take]
                i += take
                self._head_needed -= take
                self._remaining -= take
                if not self._head_needed:
                    self._on_packet(bytes(self._head))
            elif self._remaining:
                skip = min(self._remaining, n - i)
                i += skip
                self._remaining -= skip
            else:
                take = min(4 - len(self._len), n - i)
                self._len += mv[i : i + take]
                i += take
                if len(self._len) == 4:
                    length = int.from_bytes(self._len, "big")
                    self._len.clear()
                    self._remaining = length
                    self._head = bytearray()
                    self._head_needed = min(length, _HEAD)


class _Fields:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def byte(self) -> int:
        if self.pos >= len(self.data):
            raise ValueError("short packet")
        v = self.data[self.pos]
        self.pos += 1
        return v

    def uint32(self) -> int:
        if self.pos + 4 > len(self.data):
            raise ValueError("short packet")
        v = int.from_bytes(self.data[self.pos : self.pos + 4], "big")
        self.pos += 4
        return v

    def string(self) -> bytes:
        n = self.uint32()
        if self.pos + n > len(self.data):
            raise ValueError("short packet")
        v = self.data[self.pos : self.pos + n]
        self.pos += n
        return v

    def text(self) -> str:
        return self.string().decode("utf-8", "replace")


class SftpWatcher:
    """Feed it both directions; it calls `report(SftpOp)` when a watched request is answered."""

    def __init__(self, report: Callable[[SftpOp], None]) -> None:
        self._report = report
        self._pending: OrderedDict[int, tuple[str, str, str]] = OrderedDict()
        self._client = _Splitter(self._client_packet)
        self._server = _Splitter(self._server_packet)

    def client_data(self, data: bytes) -> None:
        """Bytes from the SSH client to the SFTP server."""
        self._client.feed(data)

    def server_data(self, data: bytes) -> None:
        """Bytes from the SFTP server to the SSH client."""
        self._server.feed(data)

    def _client_packet(self, head: bytes) -> None:
        f = _Fields(head)
        try:
            kind = f.byte()
            if kind not in (FXP_OPEN, FXP_SETSTAT, FXP_REMOVE, FXP_MKDIR, FXP_RMDIR, FXP_RENAME,
                            FXP_SYMLINK, FXP_EXTENDED):  # fmt: skip
                return
            req = f.uint32()
            target = ""
            if kind == FXP_EXTENDED:
                name = f.string()
                if name == b"posix-rename@openssh.com":
                    action = "rename"
                elif name == b"hardlink@openssh.com":
                    action = "link"
                else:
                    return
                path, target = f.text(), f.text()
            elif kind == FXP_OPEN:
                path = f.text()
                flags = f.uint32()
                action = "write" if flags & (FXF_WRITE | FXF_APPEND | FXF_CREAT | FXF_TRUNC) else "read"
            elif kind in (FXP_RENAME, FXP_SYMLINK):
                path, target = f.text(), f.text()
                action = "rename" if kind == FXP_RENAME else "symlink"
            else:
                path = f.text()
                action = {FXP_SETSTAT: "setstat", FXP_REMOVE: "remove", FXP_MKDIR: "mkdir",
                          FXP_RMDIR: "rmdir"}[kind]  # fmt: skip
        except ValueError:
            return
        self._pending[req] = (action, path, target)
        while len(self._pending) > _MAX_PENDING:
            self._pending.popitem(last=False)

    def _server_packet(self, head: bytes) -> None:
        f = _Fields(head)
        try:
            kind = f.byte()
            if kind not in (FXP_STATUS, FXP_HANDLE):
                return
            req = f.uint32()
            op = self._pending.pop(req, None)
            if op is None:
                return
            action, path, target = op
            if kind == FXP_HANDLE:
                self._report(SftpOp(action, path, target))
                return
            code = f.uint32()
            try:
                msg = f.text()
            except ValueError:
                msg = ""
        except ValueError:
            return
        if code == 0:
            self._report(SftpOp(action, path, target))
        else:
            self._report(SftpOp(action, path, target, False, msg or f"SFTP status {code}"))
