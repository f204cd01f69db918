"""``introspect board``: TensorBoard as a child process that never outlives the command.

>>> serve("runs", port=6006, host="127.0.0.1")   # blocks until Ctrl-C or SIGTERM  # doctest: +SKIP

``subprocess.call`` is not enough: when the command is killed, tensorboard goes on serving the
port, re-parented to PID 1, with nobody left to stop it. So tensorboard runs in a process group of
its own, SIGTERM, SIGINT and SIGHUP sent to the command are passed on to that group, and the group
is ended whenever the command ends (tensorboard exiting by itself included). On Linux the kernel
also stops tensorboard if the command dies without a chance to clean up (SIGKILL).

Before tensorboard starts, the log directory is listed once (links not followed): tensorboard
follows every link, so a link to ``/`` in it made tensorboard read the whole filesystem (5.2 GB
in 33 s), and a FIFO named like an event file blocks its reader. Either is refused, named, with
the fix. A port already taken is refused too, before the URL is printed: the URL would be someone
else's server.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import ConfigError, IntrospectWarning
from ..load.files import scan_logdir

__all__ = ["serve", "tensorboard_command", "is_loopback", "pick_port", "board_url", "check_port", "check_logdir"]

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
GRACE_S = 5.0
"""How long tensorboard gets to stop after SIGTERM before its group is killed."""

# Run in the child between fork and exec of tensorboard: ask the kernel for SIGTERM when the
# parent dies, then exit at once if it already has (its pid then is no longer the one we passed).
_LAUNCHER = (
    "import ctypes, os, signal, sys; "
    "ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM); "  # PR_SET_PDEATHSIG
    "signal.signal(signal.SIGINT, signal.SIG_DFL); "  # a shell starts background jobs ignoring it
    "os.getppid() == int(sys.argv[1]) or sys.exit(143); "
    "os.execv(sys.argv[2], sys.argv[2:])"
)


def is_loopback(host: str) -> bool:
    """Whether ``host`` is reachable only from this machine (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to any interface
        return False


def pick_port(host: str) -> int:
    """A free port on ``host``: tensorboard would pick one for ``--port 0`` but not say which."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def board_url(host: str, port: int) -> str:
    """Where to open the board: the machine's name for a wildcard address, an IPv6 one bracketed."""
    shown = socket.gethostname() if host in ("0.0.0.0", "::") else (f"[{host}]" if ":" in host else host)
    return f"http://{shown}:{port}/"


def check_port(host: str, port: int) -> None:
    """``ConfigError`` when ``port`` on ``host`` cannot be served: another server holds it, or it
    needs privileges. Other failures (a host name that does not resolve here) are left to
    tensorboard, which says so itself."""
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as tensorboard's server: TIME_WAIT is free
            s.bind((host.strip("[]"), port))
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise ConfigError(
                f"port {port} on {host} is taken (another TensorBoard?); give another --port, or --port 0 for a free one"
            ) from None
        if e.errno == errno.EACCES:
            raise ConfigError(f"port {port} on {host} needs privileges here; give a --port above 1023") from None


def check_logdir(folder: Path) -> None:
    """``ConfigError`` naming the links in ``folder`` that leave it (or loop) and the event files
    that are not regular files: tensorboard would follow or block on them."""
    refused = scan_logdir(folder).refused
    if refused:
        more = f" and {len(refused) - 3} more" if len(refused) > 3 else ""
        raise ConfigError(
            f"not serving {folder}: {'; '.join(refused[:3])}{more}. TensorBoard follows every link and "
            "reads every event file under its log directory: remove these, or serve their targets with --logdir"
        )


def tensorboard_command(logdir: str | os.PathLike, port: int, host: str) -> list[str]:
    """The command line that serves ``logdir``: the ``tensorboard`` script beside this Python, or
    ``python -m tensorboard.main``."""
    exe = shutil.which(
        "tensorboard", path=os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    )
    command = [exe] if exe else [sys.executable, "-m", "tensorboard.main"]
    return command + ["--logdir", str(logdir), "--port", str(port), "--host", host]


def serve(logdir: str | os.PathLike, port: int, host: str, announce: Callable[[], None] | None = None) -> int:
    """Run TensorBoard on ``logdir`` until it exits or the command is signalled; its exit code
    (128 + the signal's number when a signal ended it, as a shell reports it). ``announce`` is
    called once the arguments are known to be good, just before tensorboard starts.

    Raises:
        ConfigError: ``logdir`` is not an existing directory, holds a link that leaves it (or
            loops) or an event file that is not a regular file, or ``port`` is taken.
    """
    folder = Path(logdir)
    if not is_loopback(host):
        warnings.warn(
            f"--host {host} serves {folder} to anyone who can reach this machine: TensorBoard has no "
            "login and shows every log under it (use --host 127.0.0.1 and an SSH tunnel to share it safely)",
            IntrospectWarning,
            stacklevel=2,
        )
    if not folder.is_dir():
        raise ConfigError(f"no such log directory: {folder}" if not folder.exists() else f"not a directory: {folder}")
    check_logdir(folder)
    check_port(host, port)
    command = tensorboard_command(folder, port, host)
    if sys.platform.startswith("linux"):
        command = [sys.executable, "-c", _LAUNCHER, str(os.getpid()), *command]
    if announce is not None:
        announce()
    received: list[int] = []

    def forward(signum: int, frame: Any) -> None:
        received.append(signum)
        _signal_group(proc.pid, signum)

    proc = subprocess.Popen(command, start_new_session=True)
    previous = {s: signal.signal(s, forward) for s in FORWARDED}
    try:
        while True:
            try:
                code = proc.wait(timeout=0.5)
                break
            except subprocess.TimeoutExpired:
                if received:  # passed on, and not obeyed (a SIGINT that tensorboard ignores): end it
                    code = -received[0]
                    break
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        end_group(proc)
    if received:
        return 128 + received[0]
    return code if code >= 0 else 128 - code


def end_group(proc: subprocess.Popen) -> None:
    """SIGTERM to ``proc``'s process group (``proc`` leads it), then SIGKILL to what is left after
    ``GRACE_S``; returns once the group is gone or killed."""
    _signal_group(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + GRACE_S
    while time.monotonic() < deadline:
        if proc.poll() is not None and not _group_alive(proc.pid):
            return
        time.sleep(0.05)
    _signal_group(proc.pid, signal.SIGKILL)
    proc.wait()


def _signal_group(pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except (ProcessLookupError, PermissionError):  # gone already
        pass


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True
