"""Terminal session recordings in asciicast v2, so `asciinema play` and asciinema-player read them as-is.

Life of a recording on a node:

* While the session is live, events are appended to `<dir>/<sid>.cast.part` (plain asciicast:
  one JSON header line, then one `[time, code, data]` line per event) and flushed at least every
  `FLUSH_INTERVAL` seconds, so a crash or restart loses at most that much.
* When the session ends, the file is gzipped to `<dir>/<sid>.cast.gz` (written to a temporary
  name and renamed, so a `.cast.gz` is always complete) and the `.part` is removed.
* `pending_uploads(dir)` lists finished recordings for the uploader; after shipping one it calls
  `mark_uploaded(path)`. `recover_orphans(dir, live)` finishes `.part` files that no live session
  owns (left by a crash), so they are uploaded too.

Event codes: `o` output, `i` input (only when input recording is on), `r` resize (`"COLSxROWS"`),
as asciicast v2 defines them. Terminal bytes are decoded with an incremental UTF-8 decoder per
stream, so a character split across two reads is kept whole; invalid bytes become U+FFFD.
"""

from __future__ import annotations

import asyncio
import codecs
import gzip
import io
import json
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Container, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

__all__ = [
    "FLUSH_INTERVAL",
    "CastEvent",
    "PendingRecording",
    "RecordingWriter",
    "export_cast",
    "export_json",
    "finished_path",
    "iter_events",
    "mark_uploaded",
    "output_text",
    "part_path",
    "pending_uploads",
    "play",
    "read_header",
    "recover_orphans",
]

FLUSH_INTERVAL = 0.25
"""Longest time a recorded event waits in memory before it reaches the `.part` file."""
_FLUSH_BYTES = 64 * 1024
_SID_RE = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
_PART, _DONE = ".cast.part", ".cast.gz"


def part_path(directory: str | os.PathLike[str], sid: str) -> Path:
    """Where a live session's recording grows."""
    return Path(directory) / f"{_check_sid(sid)}{_PART}"


def finished_path(directory: str | os.PathLike[str], sid: str) -> Path:
    """Where a finished (gzipped) recording waits for upload."""
    return Path(directory) / f"{_check_sid(sid)}{_DONE}"


def _check_sid(sid: str) -> str:
    """Session ids become file names: refuse anything that could escape the directory."""
    if not _SID_RE.match(sid) or sid in {".", ".."}:
        raise ValueError(f"invalid session id {sid!r} for a recording file name")
    return sid


# ---------------------------------------------------------------- writing


class RecordingWriter:
    """Appends one session's events to `<dir>/<sid>.cast.part`; `close()` gzips it.

    Not thread-safe: one event loop (or one thread) owns a writer. Times are taken from a
    monotonic clock (injectable for tests) relative to the moment the writer was created.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        sid: str,
        *,
        width: int,
        height: int,
        env: dict[str, str] | None = None,
        record_input: bool = False,
        timestamp: int | None = None,
        clock: Callable[[], float] = time.monotonic,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self.sid = sid
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.path = part_path(self.directory, sid)
        self.record_input = record_input
        self._clock = clock
        self._start = clock()
        self._loop = loop
        self._flush_handle: asyncio.TimerHandle | None = None
        self._decoders = {
            "o": codecs.getincrementaldecoder("utf-8")("replace"),
            "i": codecs.getincrementaldecoder("utf-8")("replace"),
        }
        self._buf: list[str] = []
        self._buf_len = 0
        self._last_time = 0.0
        self.closed = False
        self.header: dict[str, Any] = {
            "version": 2,
            "width": max(1, int(width)),
            "height": max(1, int(height)),
            "timestamp": int(time.time()) if timestamp is None else int(timestamp),
            "env": dict(env or {}),
            "title": sid,
        }
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        self._file: IO[str] = open(fd, "w", encoding="utf-8", newline="\n")  # noqa: SIM115 - owned
        self._file.write(json.dumps(self.header, ensure_ascii=False) + "\n")
        self._file.flush()

    # ------------------------------------------------------------ events

    def _now(self) -> float:
        # Never let time run backwards in the file, whatever the clock does.
        t = max(self._clock() - self._start, self._last_time)
        self._last_time = t
        return t

    def _event(self, code: str, text: str) -> None:
        if self.closed or not text:
            return
        line = json.dumps([round(self._now(), 6), code, text], ensure_ascii=False) + "\n"
        self._buf.append(line)
        self._buf_len += len(line)
        if self._buf_len >= _FLUSH_BYTES or self._loop is None:
            self.flush()
        elif self._flush_handle is None:
            self._flush_handle = self._loop.call_later(FLUSH_INTERVAL, self.flush)

    def output(self, data: bytes) -> None:
        """Terminal output (what the user saw)."""
        self._event("o", self._decoders["o"].decode(data))

    def input(self, data: bytes) -> None:
        """Keystrokes; dropped unless the writer records input."""
        if self.record_input:
            self._event("i", self._decoders["i"].decode(data))

    def resize(self, cols: int, rows: int) -> None:
        """A window size change, as asciicast's `"COLSxROWS"`."""
        self._event("r", f"{int(cols)}x{int(rows)}")

    def flush(self) -> None:
        """Push buffered events to the `.part` file (not fsync: a node crash, not a power cut)."""
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        if self._buf and not self.closed:
            self._file.write("".join(self._buf))
            self._file.flush()
        self._buf.clear()
        self._buf_len = 0

    @property
    def duration(self) -> float:
        return self._clock() - self._start

    # ------------------------------------------------------------ finishing

    def _finish_text(self) -> None:
        for code, dec in self._decoders.items():
            tail = dec.decode(b"", final=True)
            if tail and (code == "o" or self.record_input):
                self._event(code, tail)
        self.flush()
        self.closed = True
        self._file.close()

    def close(self) -> Path:
        """Finish the recording: gzip it to `<sid>.cast.gz`, remove the `.part`, return the new path."""
        if self.closed:
            return finished_path(self.directory, self.sid)
        self._finish_text()
        return _gzip_part(self.path)

    async def aclose(self) -> Path:
        """`close()` with the gzip done in a worker thread, so a long session does not stall the loop."""
        if self.closed:
            return finished_path(self.directory, self.sid)
        self._finish_text()
        return await asyncio.to_thread(_gzip_part, self.path)


def _gzip_part(part: Path) -> Path:
    """`x.cast.part` → `x.cast.gz`, atomically (tmp + rename), then delete the part."""
    name = part.name[: -len(_PART)]
    done = part.with_name(name + _DONE)
    tmp = part.with_name(name + _DONE + ".tmp")
    with open(part, "rb") as src, open(tmp, "wb") as raw:
        with gzip.GzipFile(filename=name + ".cast", mode="wb", fileobj=raw, compresslevel=6) as gz:
            shutil.copyfileobj(src, gz, 1024 * 1024)
        raw.flush()
        os.fsync(raw.fileno())
    os.chmod(tmp, 0o600)
    os.replace(tmp, done)
    part.unlink()
    return done


# ---------------------------------------------------------------- upload queue


@dataclass(frozen=True, slots=True)
class PendingRecording:
    sid: str
    path: Path
    size: int
    mtime: float


def pending_uploads(directory: str | os.PathLike[str]) -> list[PendingRecording]:
    """Finished recordings not yet shipped, oldest first."""
    d = Path(directory)
    if not d.is_dir():
        return []
    out: list[PendingRecording] = []
    for p in d.iterdir():
        if not p.name.endswith(_DONE) or not p.is_file():
            continue
        try:
            st = p.stat()
        except FileNotFoundError:
            continue
        out.append(PendingRecording(p.name[: -len(_DONE)], p, st.st_size, st.st_mtime))
    return sorted(out, key=lambda r: (r.mtime, r.sid))


def mark_uploaded(path: str | os.PathLike[str]) -> None:
    """Forget a recording once the uploader has stored it elsewhere."""
    Path(path).unlink(missing_ok=True)


def recover_orphans(directory: str | os.PathLike[str], live: Container[str] = ()) -> list[Path]:
    """Gzip `.part` files whose session is not live (a crash left them); returns the new paths."""
    d = Path(directory)
    if not d.is_dir():
        return []
    done: list[Path] = []
    for p in sorted(d.glob("*" + _PART)):
        sid = p.name[: -len(_PART)]
        if sid in live:
            continue
        done.append(_gzip_part(p))
    return done


# ---------------------------------------------------------------- reading


@dataclass(frozen=True, slots=True)
class CastEvent:
    time: float
    code: str
    data: str


def _open_text(path: str | os.PathLike[str]) -> IO[str]:
    """Gzip or plain, decided by the magic bytes rather than the name."""
    raw = open(path, "rb")  # noqa: SIM115 - returned wrapped
    if raw.read(2) == b"\x1f\x8b":
        raw.seek(0)
        return io.TextIOWrapper(gzip.GzipFile(fileobj=raw, mode="rb"), encoding="utf-8")
    raw.seek(0)
    return io.TextIOWrapper(raw, encoding="utf-8")


def _lines(f: IO[str]) -> Iterator[str]:
    try:
        yield from f
    except EOFError:  # a gzip stream cut short: keep what was readable
        return


def _parse_header(line: str, path: object) -> dict[str, Any]:
    try:
        header = json.loads(line)
    except ValueError:
        raise ValueError(f"{path}: not an asciicast file (the first line is not JSON)") from None
    if not isinstance(header, dict) or header.get("version") != 2:
        raise ValueError(f"{path}: not an asciicast v2 file (header version is not 2)")
    return header


def read_header(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The asciicast header (width, height, timestamp, env, title)."""
    with _open_text(path) as f:
        return _parse_header(f.readline(), path)


def iter_events(path: str | os.PathLike[str]) -> Iterator[CastEvent]:
    """Every event in file order; a truncated last line (crash mid-write) is skipped."""
    with _open_text(path) as f:
        _parse_header(f.readline(), path)
        pending: str | None = None
        for line in _lines(f):
            if pending is not None:
                raise ValueError(f"{path}: malformed event line {pending[:80]!r}")
            if not line.strip():
                continue
            try:
                t, code, data = json.loads(line)
                yield CastEvent(float(t), str(code), str(data))
            except (ValueError, TypeError):
                pending = line  # only acceptable as the very last line
        return


def output_text(path: str | os.PathLike[str]) -> str:
    """Everything the terminal showed, concatenated (for search and tests)."""
    return "".join(e.data for e in iter_events(path) if e.code == "o")


def export_json(path: str | os.PathLike[str]) -> dict[str, Any]:
    """`{"header": {...}, "events": [[t, code, data], ...]}` for the web API and `ward play --format json`."""
    return {
        "header": read_header(path),
        "events": [[e.time, e.code, e.data] for e in iter_events(path)],
    }


def export_cast(path: str | os.PathLike[str], out: IO[str]) -> None:
    """Write the recording as a plain `.cast` file, re-serialised (so a truncated tail is dropped)."""
    out.write(json.dumps(read_header(path), ensure_ascii=False) + "\n")
    for e in iter_events(path):
        out.write(json.dumps([e.time, e.code, e.data], ensure_ascii=False) + "\n")


def play(
    path: str | os.PathLike[str],
    *,
    speed: float = 1.0,
    max_idle: float | None = 2.0,
    out: IO[bytes] | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> float:
    """Replay output to `out` (default stdout) with the recorded timing; returns seconds waited.

    `speed` 2 plays twice as fast; `max_idle` caps any pause (after the speed factor), like
    asciinema's `--idle-time-limit`.
    """
    if speed <= 0:
        raise ValueError("speed must be positive, like 1 or 2.5")
    sink = out if out is not None else sys.stdout.buffer
    waited = 0.0
    last = 0.0
    for e in iter_events(path):
        if e.code != "o":
            continue
        delay = max(0.0, e.time - last) / speed
        last = e.time
        if max_idle is not None:
            delay = min(delay, max_idle)
        if delay > 0:
            sleep(delay)
            waited += delay
        sink.write(e.data.encode("utf-8"))
        sink.flush()
    return waited
