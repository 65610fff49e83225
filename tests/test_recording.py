"""Session recordings: asciicast v2 that asciinema tools read, written crash-safely, read back and played."""

from __future__ import annotations

import gzip
import io
import json
import subprocess
from pathlib import Path

import pytest

from wardgate.audit.recording import (
    CastEvent,
    RecordingWriter,
    export_cast,
    export_json,
    finished_path,
    iter_events,
    mark_uploaded,
    output_text,
    part_path,
    pending_uploads,
    play,
    read_header,
    recover_orphans,
)

SID = "4d5f1a9e-6c1b-4a53-9f5e-1b2c3d4e5f60"


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def write_session(directory: Path, *, record_input: bool = False) -> tuple[RecordingWriter, Clock]:
    clock = Clock()
    w = RecordingWriter(
        directory,
        SID,
        width=120,
        height=40,
        env={"TERM": "xterm-256color", "SHELL": "/bin/bash"},
        record_input=record_input,
        timestamp=1_760_000_000,
        clock=clock,
    )
    w.output(b"$ ")
    clock.t += 0.5
    w.input(b"ls\r")
    w.output("caf\u00e9 \u2603".encode()[:4])  # "caf" + the first byte of "é"
    clock.t += 0.25
    w.output("caf\u00e9 \u2603".encode()[4:] + b"\r\n")
    w.resize(100, 30)
    clock.t += 1.0
    w.output(b"\xff bad byte\r\n")
    return w, clock


def test_round_trip_through_gzip(tmp_path: Path) -> None:
    w, _ = write_session(tmp_path)
    assert w.path == part_path(tmp_path, SID) and w.path.exists()
    done = w.close()
    assert done == finished_path(tmp_path, SID) == tmp_path / f"{SID}.cast.gz"
    assert not w.path.exists()
    assert list(iter_events(done)) == [
        CastEvent(0.0, "o", "$ "),
        CastEvent(0.5, "o", "caf"),
        CastEvent(0.75, "o", "\u00e9 \u2603\r\n"),  # the split character arrives whole
        CastEvent(0.75, "r", "100x30"),
        CastEvent(1.75, "o", "\ufffd bad byte\r\n"),
    ]
    assert output_text(done) == "$ caf\u00e9 \u2603\r\n\ufffd bad byte\r\n"


def test_header_is_what_asciinema_expects(tmp_path: Path) -> None:
    w, _ = write_session(tmp_path)
    done = w.close()
    # gzip -dc gives a plain asciicast file: one JSON object, then one JSON array per line.
    text = subprocess.run(["gzip", "-dc", str(done)], capture_output=True, check=True, timeout=10).stdout
    lines = text.decode("utf-8").splitlines()
    header = json.loads(lines[0])
    assert header == read_header(done)
    assert header["version"] == 2
    assert isinstance(header["width"], int) and isinstance(header["height"], int)
    assert (header["width"], header["height"]) == (120, 40)
    assert header["timestamp"] == 1_760_000_000
    assert header["env"] == {"TERM": "xterm-256color", "SHELL": "/bin/bash"}
    assert header["title"] == SID
    assert set(header) <= {"version", "width", "height", "timestamp", "duration", "idle_time_limit",
                           "command", "title", "env", "theme"}  # fmt: skip
    for line in lines[1:]:
        t, code, data = json.loads(line)
        assert isinstance(t, float | int) and code in {"o", "i", "r"} and isinstance(data, str)
    assert [json.loads(x)[0] for x in lines[1:]] == sorted(json.loads(x)[0] for x in lines[1:])


def test_input_is_recorded_only_when_asked(tmp_path: Path) -> None:
    w, _ = write_session(tmp_path / "no")
    assert not any(e.code == "i" for e in iter_events(w.close()))
    w, _ = write_session(tmp_path / "yes", record_input=True)
    assert [e for e in iter_events(w.close()) if e.code == "i"] == [CastEvent(0.5, "i", "ls\r")]


def test_live_part_is_readable_and_orphans_are_recovered(tmp_path: Path) -> None:
    w, _ = write_session(tmp_path)
    w.flush()
    # The node "crashes" here, in the middle of writing a line.
    with open(w.path, "a", encoding="utf-8") as f:
        f.write('[2.5, "o", "half a li')
    assert "bad byte" in output_text(w.path)  # a live .part reads like a finished recording
    assert pending_uploads(tmp_path) == []
    assert recover_orphans(tmp_path, live={SID}) == []  # still live: left alone
    [done] = recover_orphans(tmp_path)
    assert done == tmp_path / f"{SID}.cast.gz" and not w.path.exists()
    events = list(iter_events(done))
    assert events[-1] == CastEvent(1.75, "o", "\ufffd bad byte\r\n")  # the torn line is dropped


def test_a_torn_line_in_the_middle_is_an_error(tmp_path: Path) -> None:
    p = tmp_path / "x.cast"
    p.write_text('{"version": 2, "width": 80, "height": 24}\n[0.1, "o", "a"]\nnot json\n[0.2, "o", "b"]\n')
    with pytest.raises(ValueError, match="malformed event line"):
        list(iter_events(p))
    p.write_text('{"version": 1}\n')
    with pytest.raises(ValueError, match="not an asciicast v2 file"):
        read_header(p)


def test_pending_uploads_and_mark_uploaded(tmp_path: Path) -> None:
    assert pending_uploads(tmp_path / "missing") == []
    w, _ = write_session(tmp_path)
    done = w.close()
    other = RecordingWriter(tmp_path, "second", width=80, height=24, timestamp=0).close()
    pending = pending_uploads(tmp_path)
    assert {p.sid for p in pending} == {SID, "second"}
    assert {p.path for p in pending} == {done, other}
    assert all(p.size == p.path.stat().st_size for p in pending)
    mark_uploaded(done)
    assert [p.sid for p in pending_uploads(tmp_path)] == ["second"]


def test_play_keeps_time_with_speed_and_idle_cap(tmp_path: Path) -> None:
    w, _ = write_session(tmp_path)
    done = w.close()
    out = io.BytesIO()
    sleeps: list[float] = []
    waited = play(done, speed=2.0, max_idle=0.4, out=out, sleep=sleeps.append)
    assert out.getvalue() == "$ caf\u00e9 \u2603\r\n\ufffd bad byte\r\n".encode()
    # gaps 0.5, 0.25, 1.0 at double speed: 0.25, 0.125, 0.5 capped at 0.4
    assert sleeps == [0.25, 0.125, 0.4] and waited == pytest.approx(0.775)
    with pytest.raises(ValueError, match="speed must be positive"):
        play(done, speed=0, out=out, sleep=sleeps.append)


def test_exports(tmp_path: Path) -> None:
    w, _ = write_session(tmp_path)
    done = w.close()
    data = export_json(done)
    assert data["header"]["title"] == SID
    assert data["events"][3] == [0.75, "r", "100x30"]
    buf = io.StringIO()
    export_cast(done, buf)
    plain = tmp_path / "plain.cast"
    plain.write_text(buf.getvalue())
    assert list(iter_events(plain)) == list(iter_events(done))
    assert gzip.decompress(done.read_bytes()).decode() == buf.getvalue()


@pytest.mark.parametrize("sid", ["../etc/passwd", "a/b", "", ".."])
def test_session_ids_cannot_escape_the_directory(tmp_path: Path, sid: str) -> None:
    with pytest.raises(ValueError, match="invalid session id"):
        RecordingWriter(tmp_path, sid, width=80, height=24)


async def test_writer_flushes_on_a_timer(tmp_path: Path) -> None:
    import asyncio

    w = RecordingWriter(tmp_path, "timed", width=80, height=24, loop=asyncio.get_running_loop())
    w.output(b"buffered")
    assert "buffered" not in w.path.read_text()
    await asyncio.sleep(0.4)
    assert "buffered" in w.path.read_text()
    assert (await w.aclose()).exists()
