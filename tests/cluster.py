"""Real `wardgate start` processes for end-to-end tests: config, start, wait, stop."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, deadline: float) -> bool:
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return True
        time.sleep(0.05)
    return False


class Process:
    """One `wardgate start -c CONFIG` with its log; `ready` is a file or port to wait for."""

    def __init__(
        self, root: Path, config: str, *, wait_for: Path | None = None, wait_ports: tuple[int, ...] = ()
    ):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.config = root / "wardgate.yaml"
        self.config.write_text(config)
        self.log_path = root / "wardgate.log"
        self.wait_for, self.wait_ports = wait_for, wait_ports
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        log = open(self.log_path, "a")  # noqa: SIM115 - handed to the child, closed below
        self.proc = subprocess.Popen(
            [str(BIN / "wardgate"), "start", "-c", str(self.config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "COLUMNS": "200"},
        )
        log.close()
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline:
            if (
                "Press Ctrl-C to stop." in self.output()
                and all(wait_port(p, deadline) for p in self.wait_ports)
                and (self.wait_for is None or self.wait_for.exists())
            ):
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        self.stop()
        raise AssertionError("wardgate did not start:\n" + self.output())

    def output(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


def wardctl(
    data_dir: Path, *args: str, check: bool = True, stdin: str | None = None
) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [str(BIN / "wardctl"), "--data-dir", str(data_dir), *args],
        capture_output=True,
        text=True,
        input=stdin,
        timeout=60,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"wardctl {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
        )
    return proc


def audit(data_dir: Path, *args: str) -> list[dict]:
    return json.loads(
        wardctl(data_dir, "audit", "search", "--format", "json", "--limit", "500", *args).stdout
    )
