"""One SSH session channel on the node: a shell, a command or the SFTP subsystem, run as the login.

The session relays bytes between the channel and the child's PTY master or pipes, and on the
way records (PTY sessions, asciicast), fans output out to joined participants, and audits
(`session.start`, `session.end`, `exec`, `scp`, `sftp`). It exits with the child's status or
signal once the child has exited and its output is drained.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import logging
import os
import shlex
import signal
import sys
import termios
import time
import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING

import asyncssh

from wardgate.agent.ssh.join import SUBSYSTEM as JOIN_SUBSYSTEM
from wardgate.agent.ssh.join import JoinHandler
from wardgate.agent.ssh.proc import (
    SSH_SIGNALS,
    Child,
    FdReader,
    FdWriter,
    Pty,
    signal_by_name,
    spawn,
)
from wardgate.agent.ssh.registry import LiveSession, Participant
from wardgate.audit.recording import RecordingWriter
from wardgate.protocols.sftp import SftpOp, SftpWatcher

if TYPE_CHECKING:
    from wardgate.agent.ssh.service import _NodeServer

__all__ = ["NodeSession", "env_allowed", "scp_request"]

log = logging.getLogger(__name__)

PTY_EXIT_GRACE = 0.25
"""After the shell exits, how long to wait for its last output if something else holds the PTY."""


def env_allowed(name: str, patterns: Sequence[str]) -> bool:
    """Whether a client-sent variable may reach the session (exact names or `*` globs)."""
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def scp_request(command: str) -> tuple[str, str] | None:
    """`("upload"|"download", path)` when `command` is the remote end of legacy scp (`scp -t`/`-f`)."""
    try:
        argv = shlex.split(command)
    except ValueError:
        return None
    if not argv or os.path.basename(argv[0]) != "scp":
        return None
    action = ""
    paths: list[str] = []
    only_paths = False
    for arg in argv[1:]:
        if only_paths or not arg.startswith("-") or arg == "-":
            paths.append(arg)
        elif arg == "--":
            only_paths = True
        elif "t" in arg[1:]:
            action = "upload"
        elif "f" in arg[1:]:
            action = "download"
    if not action:
        return None
    return action, paths[-1] if paths else ""


class NodeSession(asyncssh.SSHServerSession[bytes]):
    """asyncssh calls these methods for one session channel; see the module docstring."""

    def __init__(self, server: _NodeServer) -> None:
        self.server = server
        self.service = server.service
        self.loop = asyncio.get_running_loop()
        self.sid = str(uuid.uuid4())
        self.chan: asyncssh.SSHServerChannel[bytes] | None = None
        self.term_type = ""
        self.term_size = (80, 24, 0, 0)
        self.term_modes: dict[int, int] = {}
        self.want_pty = False
        self.kind = ""
        self.command = ""
        self.pty: Pty | None = None
        self.child: Child | None = None
        self.stdin: FdWriter | None = None
        self.readers: list[FdReader] = []
        self.recorder: RecordingWriter | None = None
        self.live: LiveSession | None = None
        self.sftp: SftpWatcher | None = None
        self.joiner: JoinHandler | None = None
        self.bytes_in = 0
        self.bytes_out = 0
        self.started_at = time.time()
        self.exit_code: int | None = None
        self.exit_signal = ""
        self._grace: asyncio.TimerHandle | None = None
        self._chan_open = False
        self._finished = False
        self._started = False

    # ------------------------------------------------------------ requests

    def connection_made(self, chan: asyncssh.SSHServerChannel[bytes]) -> None:  # type: ignore[override]
        self.chan = chan
        self._chan_open = True

    def pty_requested(self, term_type: str, term_size: tuple[int, int, int, int], term_modes: dict) -> bool:
        self.want_pty = True
        self.term_type = term_type or "xterm"
        self.term_size = term_size
        self.term_modes = dict(term_modes)
        return True

    def shell_requested(self) -> bool:
        self.kind = "shell"
        return True

    def exec_requested(self, command: str) -> bool:
        self.kind, self.command = "exec", command
        return True

    def subsystem_requested(self, subsystem: str) -> bool:
        if subsystem == JOIN_SUBSYSTEM:
            self.kind = "join"
            return True
        if subsystem != "sftp" or not self.service.options.allow_sftp:
            return False
        self.kind = "sftp"
        return True

    # ------------------------------------------------------------ start

    def session_started(self) -> None:
        if self.kind == "join":
            self.joiner = JoinHandler(self)
            self.joiner.start()
            return
        self._started = True
        try:
            self._start()
        except Exception as e:
            log.warning("session %s could not start: %s", self.sid, e, exc_info=not isinstance(e, OSError))
            self._cleanup_io()
            self._say(f"wardgate: cannot start the session: {e}")
            self._exit_channel(1, "")
            self._finished = True

    def _env(self) -> dict[str, str]:
        srv, login = self.server, self.server.login
        assert login is not None and self.chan is not None
        env: dict[str, str] = {}
        patterns = self.service.options.env_allow
        for k, v in self.chan.get_environment().items():
            if "\0" in k or "\0" in v or "=" in k or not k:
                continue
            if env_allowed(k, patterns):
                env[k] = v
        (raddr, rport), (laddr, lport) = srv.remote_addr, srv.local_addr
        env.update(
            HOME=login.home,
            USER=login.name,
            LOGNAME=login.name,
            SHELL=login.shell,
            PATH=self.service.options.default_path,
            MAIL=f"/var/mail/{login.name}",
            SSH_CONNECTION=f"{raddr} {rport} {laddr} {lport}",
            SSH_CLIENT=f"{raddr} {rport} {lport}",
            WARD_SESSION_ID=self.sid,
            WARD_USER=srv.identity.user if srv.identity else "",
        )
        if self.service.cluster:
            env["WARD_CLUSTER"] = self.service.cluster
        agent = self.chan.get_agent_path()
        if agent:
            env["SSH_AUTH_SOCK"] = agent
        return env

    def _start(self) -> None:
        srv, login = self.server, self.server.login
        assert login is not None and self.chan is not None
        env = self._env()
        shell = login.shell
        executable: str | None = None
        if self.kind == "sftp":
            version = str(srv.conn.get_extra_info("client_version", "") if srv.conn else "")
            groups = ",".join(str(g) for g in login.groups)
            argv = [sys.executable, "-I", "-m", "wardgate.agent.ssh.sftp_child",
                    str(login.uid), str(login.gid), groups, login.home, version]  # fmt: skip
            switch_user = False  # it drops privileges itself, after loading Python as root
            self.sftp = SftpWatcher(self._sftp_op)
        elif self.kind == "exec":
            argv, switch_user = [shell, "-c", self.command], True
        else:
            argv, executable, switch_user = ["-" + os.path.basename(shell)], shell, True
        use_pty = self.want_pty and self.kind != "sftp"
        if use_pty:
            cols, rows, xpix, ypix = self.term_size
            self.pty = Pty(cols, rows, xpix, ypix, self.term_modes)
            self.pty.give_to(login)
            env["TERM"] = self.term_type
            env["SSH_TTY"] = self.pty.name
            self._open_recording(env)
            self.child = spawn(
                argv, login=login, env=env, cwd=login.home, pty=self.pty, executable=executable
            )
            self.readers.append(FdReader(self.loop, self.pty.master, self._out, self._pty_eof, owns_fd=False))
            self.stdin = FdWriter(
                self.loop,
                os.dup(self.pty.master),
                pause=self.chan.pause_reading,
                resume=self.chan.resume_reading,
            )
        else:
            self.child = spawn(
                argv, login=login, env=env, cwd=login.home, executable=executable, switch_user=switch_user
            )
            self.readers.append(FdReader(self.loop, self.child.stdout, self._out, self._pipe_eof))
            self.readers.append(FdReader(self.loop, self.child.stderr, self._err, self._pipe_eof))
            self.stdin = FdWriter(
                self.loop, self.child.stdin, pause=self.chan.pause_reading, resume=self.chan.resume_reading
            )
        self.service._child_started(self.child)
        self.child.watch(self.loop, self._exited)
        if use_pty:
            self._register_live()
        srv.sessions.add(self)
        self.service._emit(
            "session.start",
            user=srv.user,
            sid=self.sid,
            **srv.event_fields(),
            interactive=use_pty,
            session_type=self.kind,
            command=self.command or None,
            subsystem="sftp" if self.kind == "sftp" else None,
            terminal_size=f"{self.term_size[0]}x{self.term_size[1]}" if use_pty else None,
            recorded=self.recorder is not None,
        )

    def _open_recording(self, env: dict[str, str]) -> None:
        opts = self.server.options
        if not opts.record_session:
            return
        cols, rows = self.term_size[0] or 80, self.term_size[1] or 24
        # Fail closed: a role that wants sessions recorded gets no unrecorded session.
        self.recorder = RecordingWriter(
            self.service.recordings_dir,
            self.sid,
            width=cols,
            height=rows,
            env={"TERM": env.get("TERM", ""), "SHELL": env.get("SHELL", "")},
            record_input=self.service.options.record_input or opts.record_input,
            loop=self.loop,
        )

    def _register_live(self) -> None:
        srv = self.server
        self.live = LiveSession(
            sid=self.sid,
            user=srv.user,
            login=srv.login.name if srv.login else "",
            server_id=self.service.server_id,
            interactive=True,
            size=(self.term_size[0], self.term_size[1]),
            input_sink=self._peer_input,
            on_join=self._joined,
            on_leave=self._left,
        )
        self.service.sessions.add(self.live)

    def _joined(self, p: Participant) -> None:
        self.service._emit(
            "session.join", user=p.user, sid=self.sid, mode=p.mode, **self.server.event_fields()
        )

    def _left(self, p: Participant, reason: str) -> None:
        if not self._finished:
            self.service._emit(
                "session.leave", user=p.user, sid=self.sid, mode=p.mode, reason=reason,
                **self.server.event_fields(),
            )  # fmt: skip

    # ------------------------------------------------------------ data both ways

    def _out(self, data: bytes) -> None:
        self.bytes_out += len(data)
        if self.sftp is not None:
            self.sftp.server_data(data)
        if self.recorder is not None:
            self.recorder.output(data)
        if self.live is not None:
            self.live.broadcast(data)
        if self._chan_open and self.chan is not None:
            self.chan.write(data)

    def _err(self, data: bytes) -> None:
        self.bytes_out += len(data)
        if self._chan_open and self.chan is not None:
            self.chan.write_stderr(data)

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        self.server.touch()
        if self.joiner is not None:
            self.joiner.input(data)
            return
        self.bytes_in += len(data)
        if self.sftp is not None:
            self.sftp.client_data(data)
        if self.recorder is not None:
            self.recorder.input(data)
        if self.stdin is not None:
            self.stdin.write(data)

    def _peer_input(self, data: bytes) -> None:
        if self.recorder is not None:
            self.recorder.input(data)
        if self.stdin is not None:
            self.stdin.write(data)

    def eof_received(self) -> bool:
        # A terminal cannot be half-closed; for pipes the child sees EOF on stdin.
        if self.pty is None and self.stdin is not None:
            self.stdin.close_when_drained()
        return True  # keep the channel open for the rest of the output

    def pause_writing(self) -> None:
        for r in self.readers:
            r.pause()

    def resume_writing(self) -> None:
        for r in self.readers:
            r.resume()

    def terminal_size_changed(self, width: int, height: int, pixwidth: int, pixheight: int) -> None:
        self.server.touch()
        self.term_size = (width, height, pixwidth, pixheight)
        if self.pty is not None:
            self.pty.resize(width, height, pixwidth, pixheight)
        if self.recorder is not None:
            self.recorder.resize(width, height)
        if self.live is not None:
            self.live.resized(width, height)

    def signal_received(self, signal: str) -> None:
        sig = signal_by_name(signal)
        if sig is not None and self.child is not None:
            self.child.signal_group(sig)

    def break_received(self, msec: int) -> bool:
        if self.pty is None or self.pty.master < 0:
            return False
        with contextlib.suppress(termios.error):
            termios.tcsendbreak(self.pty.master, 0)
        return True

    # ------------------------------------------------------------ the end

    def _sftp_op(self, op: SftpOp) -> None:
        self.service._emit(
            "sftp",
            user=self.server.user,
            sid=self.sid,
            success=op.success,
            **self.server.event_fields(),
            action=op.action,
            path=op.path,
            target=op.target or None,
            error=op.error or None,
        )

    def _pty_eof(self) -> None:
        if self.exit_code is not None:
            self._finish()

    def _pipe_eof(self) -> None:
        if self.exit_code is not None and all(r.eof for r in self.readers):
            self._finish()

    def _exited(self, rc: int) -> None:
        if self.child is not None:
            self.service._child_exited(self.child)
        if rc < 0:
            self.exit_signal = signal.Signals(-rc).name[3:] if -rc in signal.valid_signals() else str(-rc)
            self.exit_code = 128 - rc
        else:
            self.exit_code = rc
        if self._finished:
            return
        if all(r.eof for r in self.readers):
            self._finish()
        elif self.pty is not None:
            # Something else (a background job) may hold the terminal: take what is there and end.
            self._grace = self.loop.call_later(PTY_EXIT_GRACE, self._finish)

    def _exit_channel(self, code: int, sig: str) -> None:
        if not self._chan_open or self.chan is None:
            return
        with contextlib.suppress(OSError):
            if sig and sig in SSH_SIGNALS:
                self.chan.exit_with_signal(sig, False, f"killed by signal {sig}")
            else:
                self.chan.exit(code)

    def _say(self, text: str) -> None:
        """A line for the person at the other end (stderr, or the terminal with a PTY)."""
        if not self._chan_open or self.chan is None:
            return
        line = f"\r\n{text}\r\n" if self.pty is not None else f"{text}\n"
        with contextlib.suppress(OSError):
            if self.pty is not None:
                self.chan.write(line.encode())
            else:
                self.chan.write_stderr(line.encode())

    def _cleanup_io(self) -> None:
        if self._grace is not None:
            self._grace.cancel()
            self._grace = None
        for r in self.readers:
            if not r.eof:
                r.drain()
            r.close()
        if self.stdin is not None:
            self.stdin.close()
        if self.pty is not None:
            self.pty.close()

    def _finish(self, reason: str = "") -> None:
        """Drain, close, report the exit to the client, and write the closing audit events."""
        if self._finished:
            return
        self._finished = True
        self._cleanup_io()
        if reason:
            self._say(f"wardgate: {reason}")
        if self.exit_code is not None:
            self._exit_channel(self.exit_code, self.exit_signal)
        elif self._chan_open and self.chan is not None:
            self.chan.close()
        self._report_end(reason)

    def _report_end(self, reason: str) -> None:
        srv = self.server
        srv.sessions.discard(self)
        fields = srv.event_fields()
        if self.kind == "exec":
            self.service._emit(
                "exec",
                user=srv.user,
                sid=self.sid,
                success=self.exit_code == 0,
                **fields,
                command=self.command,
                exit_code=self.exit_code,
                signal=self.exit_signal or None,
            )
            scp = scp_request(self.command)
            if scp is not None:
                self.service._emit(
                    "scp",
                    user=srv.user,
                    sid=self.sid,
                    success=self.exit_code == 0,
                    **fields,
                    action=scp[0],
                    path=scp[1],
                    command=self.command,
                )
        participants = list(self.live.history) if self.live is not None else [srv.user]
        if self.live is not None:
            self.service.sessions.remove(self.sid, reason or "session ended")
        self.service._emit(
            "session.end",
            user=srv.user,
            sid=self.sid,
            **fields,
            interactive=self.pty is not None or self.live is not None,
            session_type=self.kind,
            duration=round(time.time() - self.started_at, 3),
            bytes_in=self.bytes_in,
            bytes_out=self.bytes_out,
            participants=participants,
            exit_code=self.exit_code,
            reason=reason or None,
        )
        if self.recorder is not None:
            self.service._background(self._close_recording(self.recorder))
            self.recorder = None

    async def _close_recording(self, rec: RecordingWriter) -> None:
        try:
            await rec.aclose()
        except OSError:
            log.exception("could not finish the recording of session %s", rec.sid)

    def terminate(self, reason: str) -> None:
        """End the session from our side (lock, idle timeout, expiry, node shutdown)."""
        if self.child is not None:
            self.child.signal_group(signal.SIGHUP)
        self._finish(reason)

    def connection_lost(self, exc: Exception | None) -> None:
        self._chan_open = False
        if self.joiner is not None:
            self.joiner.stop()
            return
        if not self._started:
            return
        if not self._finished:
            # The client went away first: hang up on the job, as closing a terminal does.
            if self.child is not None and self.child.returncode is None:
                self.child.signal_group(signal.SIGHUP)
            self._finish("client disconnected" if exc is None else f"connection lost: {exc}")
