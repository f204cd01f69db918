"""Processes of their own for what must not share one, and the environment they all get.

Each model's worker is forked from the harness once torch is imported and before any torch op
has run (no OpenMP pool to inherit, no CUDA context): a fresh process without paying the imports
again. Memory is measured in one more process per variant (forked on CPU, a fresh interpreter
on CUDA, whose context cannot be forked). The harness follows each worker's stderr with no
thread of its own, so the next fork happens in a process with one thread only.
"""

from __future__ import annotations

import collections
import contextlib
import importlib.metadata
import importlib.util
import io
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

from benchmarks.models import MODELS

__all__ = [
    "REPO",
    "call_forked",
    "error_line",
    "failure",
    "in_fresh_process",
    "installed_version",
    "log",
    "one_thread",
    "outcome",
    "pin_env",
    "preimport",
    "quiet",
    "resolve_device",
    "run_in_session",
]

REPO = Path(__file__).resolve().parent.parent


def log(msg: str) -> None:
    """Progress, on stderr: the harness echoes a worker's stderr line by line."""
    print(msg, file=sys.stderr, flush=True)


def quiet() -> contextlib.AbstractContextManager:
    """Swallow stdout (torchinfo summaries, wandb's notes) while a measurement runs."""
    return contextlib.redirect_stdout(io.StringIO())


def failure(limit: int | None = 4) -> str:
    """The exception being handled, as a traceback to put in a result."""
    return traceback.format_exc(limit=limit)


def error_line(text: str, width: int | None = None) -> str:
    """The last line of a traceback or error text (``width`` characters at most)."""
    return text.strip().splitlines()[-1][:width]


def outcome(fn: Callable[[], object], limit: int = 6) -> dict:
    """{"ok": fn()} or {"error": its traceback}: a result that crosses a process boundary."""
    try:
        return {"ok": fn()}
    except BaseException:  # noqa: BLE001 - everything goes back to the parent as text
        return {"error": failure(limit)}


def installed_version(package: str) -> str | None:
    """``package``'s version, or None when it is not installed (found without importing it)."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None if importlib.util.find_spec(package) is None else "unknown version"


def pin_env() -> None:
    """What every worker needs in its environment, set once in the harness before it forks."""
    os.environ.update(
        MPLBACKEND="Agg", WANDB_MODE="offline", WANDB_SILENT="true", WANDB_CONSOLE="off", WANDB_DISABLE_GIT="true"
    )


def preimport(models) -> None:
    """Imports every variant of ``models`` needs, before any fork. Runs no parallel torch op (no
    OpenMP pool may be inherited by a forked child) and does not touch CUDA."""
    import torch
    from torch.utils.tensorboard import SummaryWriter  # noqa: F401

    for name in models:
        for module in MODELS[name].imports if name in MODELS else ():
            importlib.import_module(module)
    # Adam's first construction imports torch._dynamo lazily (~2 s): once here, not in each child.
    torch.optim.Adam([torch.zeros(1, requires_grad=True)])


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """torch on one intra-op thread for the block. For tiny tensors on a shared 2-core machine:
    two OpenMP threads spin against each other (a 3 ms step of the fault CNN took 230 ms so)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def resolve_device(requested: str) -> tuple[str, str | None]:
    """(device to run on, a note when it is not the one asked for). CUDA is probed in a
    subprocess: the harness must not make a CUDA context before it forks."""
    if requested != "cuda":
        return "cpu", None
    probe = subprocess.run(
        [sys.executable, "-c", "import torch; print(torch.cuda.is_available())"], capture_output=True, text=True
    )
    if probe.stdout.strip() == "True":
        return "cuda", None
    return "cpu", "--device cuda was asked for but CUDA is not available here; ran on CPU instead."


def _fork(child: Callable[[], int]) -> int:
    """Fork; the child runs ``child()`` and exits with its status (1 if it raised), never
    returning into the caller's stack. The parent gets the child's pid."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        return pid
    status = 1
    try:
        status = child()
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(status)


def call_forked(fn: Callable[[], object], timeout_s: float) -> dict:
    """``outcome(fn)`` computed in a forked child (an alarm ends it after ``timeout_s``). The
    parent must not have run a parallel torch op yet (no OpenMP pool to inherit) nor touched CUDA."""
    read_fd, write_fd = os.pipe()

    def child() -> int:
        os.close(read_fd)
        signal.alarm(max(1, int(timeout_s)))
        result = outcome(fn)
        with os.fdopen(write_fd, "wb") as f:
            f.write(json.dumps(result).encode())
        return 0

    pid = _fork(child)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as f:
        data = f.read()
    _, status = os.waitpid(pid, 0)
    if not data:
        return {"error": f"memory child died (wait status {status}; timeout {timeout_s:.0f} s)"}
    return json.loads(data)


def in_fresh_process(args: list[str], timeout_s: float) -> dict:
    """``python -m benchmarks ARGS --_json PATH`` in a new interpreter; the JSON it wrote."""
    with tempfile.TemporaryDirectory(prefix="bench-memproc-") as tmp:
        path = Path(tmp) / "mem.json"
        cmd = [sys.executable, "-m", "benchmarks", *args, "--_json", str(path)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, cwd=REPO)
        except subprocess.TimeoutExpired:
            return {"error": f"memory process timed out after {timeout_s:.0f} s"}
        if path.exists():
            return json.loads(path.read_text())
        return {"error": f"memory process failed (exit {proc.returncode}): {proc.stderr[-2000:]}"}


def run_in_session(fn: Callable[[], int], label: str, timeout_s: float, stdout_path: Path) -> tuple[int, list[str]]:
    """``fn()`` in a forked child with a session of its own (so a timeout or Ctrl-C ends its own
    children too), its stdout to ``stdout_path``, its stderr echoed here prefixed with ``label``.
    (exit code, the last 25 lines of its stderr)."""
    read_fd, write_fd = os.pipe()

    def child() -> int:
        os.setsid()
        os.close(read_fd)
        log_fd = os.open(stdout_path, os.O_WRONLY | os.O_CREAT, 0o644)
        os.dup2(log_fd, 1)  # torchinfo summaries and the like
        os.dup2(write_fd, 2)
        return fn()

    pid = _fork(child)
    os.close(write_fd)
    tail: collections.deque[str] = collections.deque(maxlen=25)
    status = _follow(pid, read_fd, _Echo(label, tail), timeout_s)
    return status, list(tail)


class _Echo:
    """Echo bytes from a child's stderr as whole lines, prefixed; keep the last ones in ``tail``."""

    def __init__(self, label: str, tail: collections.deque) -> None:
        self.label = label
        self.tail = tail
        self.pending = b""

    def __call__(self, chunk: bytes, final: bool = False) -> None:
        *lines, self.pending = (self.pending + chunk).split(b"\n")
        if final and self.pending:
            lines, self.pending = lines + [self.pending], b""
        for raw in lines:
            line = raw.decode(errors="replace")
            self.tail.append(line)
            print(f"  [{self.label}] {line}", file=sys.stderr, flush=True)


def _follow(pid: int, read_fd: int, echo: _Echo, timeout_s: float) -> int:
    """Echo the child's stderr until it exits or times out; its exit code."""
    try:
        status = _wait_echoing(pid, read_fd, echo, timeout_s)
        # What is left in the pipe; a child that outlived the worker may hold it open: no EOF wait.
        while select.select([read_fd], [], [], 0)[0]:
            chunk = os.read(read_fd, 65536)
            if not chunk:
                break
            echo(chunk)
        echo(b"", final=True)
    except BaseException:
        _kill_group(pid)
        raise
    finally:
        os.close(read_fd)
    return status


def _wait_echoing(pid: int, read_fd: int, echo: _Echo, timeout_s: float) -> int:
    deadline = time.monotonic() + timeout_s
    while True:
        ready, _, _ = select.select([read_fd], [], [], 0.5)
        if ready:
            chunk = os.read(read_fd, 65536)
            if chunk:
                echo(chunk)
                continue
        done, wait_status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(wait_status)
        if time.monotonic() > deadline:
            _kill_group(pid)
            echo.tail.append(f"killed after the {timeout_s:.0f} s timeout (--timeout)")
            return -signal.SIGKILL
        if ready:  # EOF while still running (stderr closed): just wait
            time.sleep(0.5)


def _kill_group(pid: int) -> None:
    """End the child and everything in its process group (its forked memory children)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)
