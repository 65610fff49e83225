"""Running a session's process as the login user, and moving its bytes without blocking the loop.

The child is started with `subprocess.Popen` (fork/exec in C: setgroups, setgid, setuid happen
there, before our optional `preexec_fn`), in a new session so the whole job can be signalled
as a process group. Its exit is noticed through a pidfd on the event loop (no SIGCHLD handler,
no thread per child), and its stdio are plain non-blocking fds polled with `add_reader` /
`add_writer`, which both the default loop and uvloop support for pipes and PTY masters alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import grp
import os
import pwd
import signal
import struct
import subprocess
import termios
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

__all__ = [
    "Child",
    "FdReader",
    "FdWriter",
    "LoginError",
    "LoginUser",
    "Pty",
    "lookup_login",
    "spawn",
]

READ_SIZE = 64 * 1024
WRITE_HIGH_WATER = 256 * 1024
"""Bytes queued for a child's stdin before we stop reading from the SSH channel."""


class LoginError(Exception):
    """The requested login cannot be used on this host; the message says why."""


@dataclass(frozen=True, slots=True)
class LoginUser:
    name: str
    uid: int
    gid: int
    home: str
    shell: str
    groups: tuple[int, ...]


def lookup_login(name: str) -> LoginUser:
    """The local account for `name`, checked against what this process may become."""
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        raise LoginError(f'login "{name}" does not exist on this host') from None
    euid = os.geteuid()
    if euid != 0 and pw.pw_uid != euid:
        me = pwd.getpwuid(euid).pw_name if _has_uid(euid) else str(euid)
        raise LoginError(
            f'this node runs as "{me}", not root, so it can only open sessions as "{me}", not "{name}"'
        )
    try:
        groups = tuple(os.getgrouplist(pw.pw_name, pw.pw_gid))
    except OSError:
        groups = (pw.pw_gid,)
    return LoginUser(pw.pw_name, pw.pw_uid, pw.pw_gid, pw.pw_dir or "/", pw.pw_shell or "/bin/sh", groups)


def _has_uid(uid: int) -> bool:
    try:
        pwd.getpwuid(uid)
    except KeyError:
        return False
    return True


# ---------------------------------------------------------------- PTY


# RFC 4254 §8 terminal mode opcodes → (termios attribute index or "cc", termios name).
_CC_MODES = {
    1: "VINTR", 2: "VQUIT", 3: "VERASE", 4: "VKILL", 5: "VEOF", 6: "VEOL", 7: "VEOL2", 8: "VSTART",
    9: "VSTOP", 10: "VSUSP", 11: "VDSUSP", 12: "VREPRINT", 13: "VWERASE", 14: "VLNEXT", 15: "VFLUSH",
    16: "VSWTCH", 17: "VSTATUS", 18: "VDISCARD",
}  # fmt: skip
_FLAG_MODES = {
    30: (0, "IGNPAR"), 31: (0, "PARMRK"), 32: (0, "INPCK"), 33: (0, "ISTRIP"), 34: (0, "INLCR"),
    35: (0, "IGNCR"), 36: (0, "ICRNL"), 37: (0, "IUCLC"), 38: (0, "IXON"), 39: (0, "IXANY"),
    40: (0, "IXOFF"), 41: (0, "IMAXBEL"), 42: (0, "IUTF8"),
    50: (3, "ISIG"), 51: (3, "ICANON"), 52: (3, "XCASE"), 53: (3, "ECHO"), 54: (3, "ECHOE"),
    55: (3, "ECHOK"), 56: (3, "ECHONL"), 57: (3, "NOFLSH"), 58: (3, "TOSTOP"), 59: (3, "IEXTEN"),
    60: (3, "ECHOCTL"), 61: (3, "ECHOKE"), 62: (3, "PENDIN"),
    70: (1, "OPOST"), 71: (1, "OLCUC"), 72: (1, "ONLCR"), 73: (1, "OCRNL"), 74: (1, "ONOCR"),
    75: (1, "ONLRET"),
    90: (2, "CS7"), 91: (2, "CS8"), 92: (2, "PARENB"), 93: (2, "PARODD"),
}  # fmt: skip


def _apply_modes(fd: int, modes: Mapping[int, int]) -> None:
    """Give the PTY the client's terminal settings (erase key, echo…), as sshd does."""
    if not modes:
        return
    attrs = termios.tcgetattr(fd)
    cc = attrs[6]
    for op, value in modes.items():
        if op in _CC_MODES:
            idx = getattr(termios, _CC_MODES[op], None)
            if idx is not None and idx < len(cc):
                cc[idx] = bytes([0 if value == 255 else value & 0xFF])
        elif op in _FLAG_MODES:
            which, name = _FLAG_MODES[op]
            bit = getattr(termios, name, None)
            if bit is None:
                continue
            if name == "CS7" or name == "CS8":
                if value:
                    attrs[2] = (attrs[2] & ~termios.CSIZE) | bit
                continue
            attrs[which] = attrs[which] | bit if value else attrs[which] & ~bit
    with contextlib.suppress(termios.error):
        termios.tcsetattr(fd, termios.TCSANOW, attrs)


def _winsize(fd: int, cols: int, rows: int, xpix: int = 0, ypix: int = 0) -> None:
    def clamp(v: int) -> int:
        return max(0, min(int(v), 0xFFFF))

    packed = struct.pack("HHHH", clamp(rows), clamp(cols), clamp(xpix), clamp(ypix))
    with contextlib.suppress(OSError):
        fcntl.ioctl(fd, termios.TIOCSWINSZ, packed)


class Pty:
    """A pseudo-terminal pair; the slave goes to the child, the master stays with us."""

    def __init__(
        self, cols: int, rows: int, xpix: int = 0, ypix: int = 0, modes: Mapping[int, int] | None = None
    ) -> None:
        self.master, self.slave = os.openpty()
        os.set_inheritable(self.master, False)
        self.name = os.ttyname(self.slave)
        _winsize(self.master, cols or 80, rows or 24, xpix, ypix)
        _apply_modes(self.slave, modes or {})

    def give_to(self, user: LoginUser) -> None:
        """The login owns its terminal (mode 0620, group tty), like sshd does; needs root."""
        if os.geteuid() != 0:
            return
        try:
            tty_gid = grp.getgrnam("tty").gr_gid
        except KeyError:
            tty_gid = user.gid
        os.fchown(self.slave, user.uid, tty_gid)
        os.fchmod(self.slave, 0o620)

    def resize(self, cols: int, rows: int, xpix: int = 0, ypix: int = 0) -> None:
        """TIOCSWINSZ: the kernel then sends SIGWINCH to the foreground job."""
        _winsize(self.master, cols, rows, xpix, ypix)

    def close_slave(self) -> None:
        if self.slave >= 0:
            os.close(self.slave)
            self.slave = -1

    def close(self) -> None:
        self.close_slave()
        if self.master >= 0:
            with contextlib.suppress(OSError):
                os.close(self.master)
            self.master = -1


def _take_ctty() -> None:  # pragma: no cover - runs in the child between fork and exec
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


# ---------------------------------------------------------------- child process


class Child:
    """A started process: its pid, process group and (for pipes) our ends of its stdio."""

    def __init__(
        self,
        popen: subprocess.Popen[bytes],
        *,
        stdin: int = -1,
        stdout: int = -1,
        stderr: int = -1,
    ) -> None:
        self.popen = popen
        self.pid = popen.pid
        self.stdin, self.stdout, self.stderr = stdin, stdout, stderr
        self.returncode: int | None = None
        self._waiters: list[asyncio.Future[int]] = []
        self._pidfd = -1
        self._poll: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def watch(self, loop: asyncio.AbstractEventLoop, on_exit: Callable[[int], None]) -> None:
        """Call `on_exit(returncode)` once the process ends (negative: killed by that signal)."""
        self._loop = loop

        def reap() -> None:
            rc = self.popen.poll()
            if rc is None:
                return
            self._stop_watching()
            self.returncode = rc
            on_exit(rc)

        try:
            self._pidfd = os.pidfd_open(self.pid)
        except (AttributeError, OSError):
            self._pidfd = -1
        if self._pidfd >= 0:
            loop.add_reader(self._pidfd, reap)
        else:  # old kernel: poll

            def tick() -> None:
                reap()
                if self.returncode is None:
                    self._poll = loop.call_later(0.05, tick)

            self._poll = loop.call_later(0.05, tick)
        loop.call_soon(reap)  # it may already be gone

    def _stop_watching(self) -> None:
        if self._pidfd >= 0 and self._loop is not None:
            self._loop.remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = -1
        if self._poll is not None:
            self._poll.cancel()
            self._poll = None

    def signal_group(self, sig: int) -> None:
        """Signal the whole job (the child leads its own session and process group)."""
        if self.returncode is not None:
            return
        try:
            os.killpg(self.pid, sig)
        except (ProcessLookupError, PermissionError):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(self.pid, sig)


def spawn(
    argv: Sequence[str],
    *,
    login: LoginUser,
    env: Mapping[str, str],
    cwd: str,
    pty: Pty | None = None,
    executable: str | None = None,
    switch_user: bool = True,
) -> Child:
    """Start `argv` as `login`: real uid/gid and supplementary groups, new session, umask 022.

    With a PTY the child gets the slave as stdin/stdout/stderr and as its controlling
    terminal; without one it gets three pipes whose other ends (non-blocking) are returned.
    `switch_user=False` is for a helper that drops privileges itself (the SFTP server).
    """
    switch = switch_user and os.geteuid() == 0
    creds: dict[str, object] = (
        {"user": login.uid, "group": login.gid, "extra_groups": list(login.groups)} if switch else {}
    )
    if not os.path.isdir(cwd) or not os.access(cwd, os.X_OK):
        cwd = "/"
    if pty is not None:
        popen = subprocess.Popen(
            list(argv),
            executable=executable,
            stdin=pty.slave,
            stdout=pty.slave,
            stderr=pty.slave,
            env=dict(env),
            cwd=cwd,
            start_new_session=True,
            preexec_fn=_take_ctty,
            umask=0o022,
            close_fds=True,
            **creds,  # type: ignore[arg-type]
        )
        pty.close_slave()
        return Child(popen)
    fds: list[int] = []
    try:
        in_r, in_w = os.pipe2(os.O_CLOEXEC)
        fds += [in_r, in_w]
        out_r, out_w = os.pipe2(os.O_CLOEXEC)
        fds += [out_r, out_w]
        err_r, err_w = os.pipe2(os.O_CLOEXEC)
        fds += [err_r, err_w]
        popen = subprocess.Popen(
            list(argv),
            executable=executable,
            stdin=in_r,
            stdout=out_w,
            stderr=err_w,
            env=dict(env),
            cwd=cwd,
            start_new_session=True,
            umask=0o022,
            close_fds=True,
            **creds,  # type: ignore[arg-type]
        )
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    for fd in (in_r, out_w, err_w):
        os.close(fd)
    for fd in (in_w, out_r, err_r):
        os.set_blocking(fd, False)
    return Child(popen, stdin=in_w, stdout=out_r, stderr=err_r)


# ---------------------------------------------------------------- fd pumps


class FdReader:
    """Calls `on_data(bytes)` as a non-blocking fd becomes readable, `on_eof()` once at the end.

    EIO counts as end of file: it is how a PTY master reports that every slave is closed.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        fd: int,
        on_data: Callable[[bytes], None],
        on_eof: Callable[[], None],
        *,
        owns_fd: bool = True,
    ) -> None:
        self._loop, self.fd = loop, fd
        self._on_data, self._on_eof = on_data, on_eof
        self._owns = owns_fd
        self._paused = False
        self.eof = False
        os.set_blocking(fd, False)
        loop.add_reader(fd, self._readable)

    def _readable(self) -> None:
        try:
            data = os.read(self.fd, READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            if e.errno not in (errno.EIO, errno.EBADF):
                raise
            data = b""
        if data:
            self._on_data(data)
        else:
            self._finish()

    def drain(self) -> None:
        """Read whatever is ready right now (used when the child exits while we were paused)."""
        while not self.eof:
            try:
                data = os.read(self.fd, READ_SIZE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            if not data:
                self._finish()
                return
            self._on_data(data)

    def _finish(self) -> None:
        if self.eof:
            return
        self.eof = True
        self.close()
        self._on_eof()

    def pause(self) -> None:
        if not self._paused and not self.eof:
            self._paused = True
            self._loop.remove_reader(self.fd)

    def resume(self) -> None:
        if self._paused and not self.eof:
            self._paused = False
            self._loop.add_reader(self.fd, self._readable)

    def close(self) -> None:
        if self.fd < 0:
            return
        if not self._paused:
            self._loop.remove_reader(self.fd)
        if self._owns:
            with contextlib.suppress(OSError):
                os.close(self.fd)
        self.fd = -1
        self.eof = True


class FdWriter:
    """Writes to a non-blocking fd, queueing what does not fit; tells the producer to pause and resume."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        fd: int,
        *,
        pause: Callable[[], None] | None = None,
        resume: Callable[[], None] | None = None,
    ) -> None:
        self._loop, self.fd = loop, fd
        self._pause_cb, self._resume_cb = pause, resume
        self._buf = bytearray()
        self._paused = False
        self._close_when_drained = False
        self._watching = False
        os.set_blocking(fd, False)

    def write(self, data: bytes) -> None:
        if self.fd < 0 or self._close_when_drained or not data:
            return
        if not self._buf:
            try:
                n = os.write(self.fd, data)
            except (BlockingIOError, InterruptedError):
                n = 0
            except OSError:  # EPIPE/EIO: the child is gone; drop input like a closed pipe would
                self.close()
                return
            data = data[n:]
            if not data:
                return
        self._buf += data
        if not self._watching:
            self._loop.add_writer(self.fd, self._writable)
            self._watching = True
        if len(self._buf) > WRITE_HIGH_WATER and not self._paused:
            self._paused = True
            if self._pause_cb is not None:
                self._pause_cb()

    def _writable(self) -> None:
        try:
            n = os.write(self.fd, self._buf)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.close()
            return
        del self._buf[:n]
        if self._buf:
            return
        self._loop.remove_writer(self.fd)
        self._watching = False
        if self._paused:
            self._paused = False
            if self._resume_cb is not None:
                self._resume_cb()
        if self._close_when_drained:
            self.close()

    def close_when_drained(self) -> None:
        """EOF for the child: close our end once everything queued is written."""
        self._close_when_drained = True
        if not self._buf:
            self.close()

    def close(self) -> None:
        if self.fd < 0:
            return
        if self._watching:
            self._loop.remove_writer(self.fd)
            self._watching = False
        with contextlib.suppress(OSError):
            os.close(self.fd)
        self.fd = -1
        self._buf.clear()
        if self._paused:
            self._paused = False
            if self._resume_cb is not None:
                self._resume_cb()


def signal_by_name(name: str) -> int | None:
    """SSH signal names ("INT", "TERM", …) to numbers; None for names we do not pass on."""
    try:
        return int(signal.Signals["SIG" + name.upper()])
    except KeyError:
        return None


SSH_SIGNALS = frozenset({"ABRT", "ALRM", "FPE", "HUP", "ILL", "INT", "KILL", "PIPE", "QUIT", "SEGV",
                         "TERM", "USR1", "USR2"})  # fmt: skip
"""Signal names RFC 4254 defines for `exit-signal`."""
