"""SIGTERM and SIGINT while watching: record the signal, act on it at a safe point.

A handler that did real work (flush, close the writer) could deadlock: Python runs it between two
bytecodes of the main thread, which may be inside tensorboard's ``EventFileWriter.write`` holding
the very lock ``close()`` needs, or inside its queue's ``put``. So the handler only notes the
signal (an attribute store and a byte down a pipe: no lock). The watcher acts at its next safe
point, a step boundary in its own hooks: it finishes and writes the step that just completed,
removes everything it changed (the previous handlers included), then raises the signal again, so
the previous handler (Python's ``KeyboardInterrupt``, or the user's own) does what it would have
done without ``watch``; SIGTERM's default action becomes ``SystemExit(143)``, so the program's
``finally`` blocks still run.

If no safe point comes within :data:`GRACE_S` (the loop is blocked in data loading, or the
signal came after the last step), a watchdog thread sends the signal to the main thread again. The
handler then looks at the frames it interrupted: outside the watcher's and tensorboard's code,
nothing of ours holds a lock or a half-built record, so it closes the watcher right there (the
open step is written) and passes the signal on; inside them, it waits a little and is asked again.
A second signal of the same kind while one is pending is passed straight on: pressing Ctrl-C twice
always stops.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

__all__ = ["SignalGuard", "GRACE_S", "WATCHED_SIGNALS"]

GRACE_S = 2.0
"""How long a signal waits for the next step boundary before the watchdog passes it on."""

WATCHED_SIGNALS = tuple(s for s in (getattr(signal, "SIGTERM", None), signal.SIGINT) if s is not None)


def _package_dirs() -> tuple[str, ...]:
    # introspect/ itself: this file is introspect/live/signals.py
    dirs = [os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]
    for name in ("tensorboard", "torch.utils.tensorboard", "tensorboardX"):
        try:
            module = __import__(name, fromlist=["__file__"])
        except Exception:
            continue
        if module.__file__:
            dirs.append(os.path.dirname(os.path.abspath(module.__file__)))
    return tuple(dirs)


def _inside(frame: Any, dirs: tuple[str, ...]) -> bool:
    """Whether any frame of the interrupted stack runs code from ``dirs`` (no locks: a walk)."""
    while frame is not None:
        if frame.f_code.co_filename.startswith(dirs):
            return True
        frame = frame.f_back
    return False


class SignalGuard:
    """Deferred SIGTERM/SIGINT for one watcher (installed from the main thread only).

    ``close`` is the watcher's ``close()``: it writes the open step, undoes everything (this
    guard's handlers included) and then calls :meth:`deliver`.
    """

    def __init__(self, close: Callable[[], None]) -> None:
        self.pending: int | None = None  # the signal waiting for a safe point
        self.handled = False  # a safe point took it
        self._close = close
        self._grace_over = False  # the watchdog is asking: close here if nothing of ours runs
        self._previous: dict[int, Any] = {}  # the handlers ours replaced, until restored
        self._original: dict[int, Any] = {}  # the same, kept for passing the signal on
        self._fds: tuple[int, int] | None = None
        self._watchdog: threading.Thread | None = None
        self._main = threading.main_thread().ident
        self._dirs = _package_dirs()

    # ------------------------------------------------------------ install / restore
    def install(self) -> bool:
        """Take over SIGTERM and SIGINT (main thread only); False when nothing was installed."""
        if threading.current_thread() is not threading.main_thread():
            return False
        for signum in WATCHED_SIGNALS:
            try:
                current = signal.getsignal(signum)
                if current in (signal.SIG_IGN, None):  # ignored, or owned by C code: leave it be
                    continue
                signal.signal(signum, self._on_signal)
            except (ValueError, OSError):  # no signals here (embedded interpreter, odd platform)
                continue
            self._previous[signum] = current
        self._original = dict(self._previous)
        if not self._previous:
            return False
        read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)
        self._fds = (read_fd, write_fd)
        self._watchdog = threading.Thread(target=self._watch, name="introspect-signal-watchdog", daemon=True)
        self._watchdog.start()
        return True

    def restore(self) -> None:
        """Put the previous handlers back (where ours is still the one installed) and stop the
        watchdog. Idempotent; from another thread only the watchdog is stopped."""
        if threading.current_thread() is threading.main_thread():
            for signum, previous in list(self._previous.items()):
                try:
                    if signal.getsignal(signum) == self._on_signal:
                        signal.signal(signum, previous)
                except (ValueError, OSError):
                    pass
            self._previous.clear()
        if self._fds is not None:
            read_fd, write_fd = self._fds
            self._fds = None
            try:
                os.write(write_fd, b"q")
            except OSError:
                pass
            if self._watchdog is not None and self._watchdog is not threading.current_thread():
                self._watchdog.join(timeout=1.0)
            for fd in (read_fd, write_fd):
                try:
                    os.close(fd)
                except OSError:
                    pass

    # ------------------------------------------------------------ the handler: no locks
    def _on_signal(self, signum: int, frame: Any) -> None:
        if self._grace_over and self.pending is not None:
            if _inside(frame, self._dirs):
                return  # our code or the writer's is running: the watchdog asks again shortly
            self._grace_over = False
            self.handled = True
            self._close()  # writes the open step; its end passes the pending signal on
            return
        if self.pending == signum:  # the same signal again: the user insists
            self._pass_on(signum, frame)
            return
        self.pending = signum
        fds = self._fds
        if fds is not None:
            try:
                os.write(fds[1], b"s")
            except OSError:  # a full pipe already holds a wake-up
                pass

    def _pass_on(self, signum: int, frame: Any) -> None:
        """Hand the signal to the previous handler now (the same signal came twice)."""
        self.handled = True
        try:
            signal.signal(signum, self._original.get(signum, signal.SIG_DFL))
        except (ValueError, OSError):
            pass
        self._run_previous(signum, frame)

    def deliver(self) -> None:
        """After the watcher has closed (and restored the previous handlers): give the pending
        signal to the handler it would have met without ``watch``."""
        signum, self.pending = self.pending, None
        if signum is None or threading.current_thread() is not threading.main_thread():
            return
        self.handled = True
        self._run_previous(signum, sys._getframe(1))

    def _run_previous(self, signum: int, frame: Any) -> None:
        """Python's own (``KeyboardInterrupt``) or the user's handler is called; the default
        action becomes ``SystemExit(128 + signum)``, so ``finally`` blocks and ``with`` exits
        still run (a user's own SummaryWriter closes), and the exit status is the shell's."""
        previous = self._original.get(signum, signal.SIG_DFL)
        if callable(previous):
            previous(signum, frame)
        elif previous == signal.SIG_DFL:
            raise SystemExit(128 + signum)

    # ------------------------------------------------------------ the watchdog thread
    def _watch(self) -> None:
        fds = self._fds
        if fds is None:
            return
        read_fd = fds[0]
        while True:
            try:
                byte = os.read(read_fd, 1)
            except OSError:
                return
            if byte in (b"q", b""):
                return
            deadline = time.monotonic() + GRACE_S
            while time.monotonic() < deadline and not self._done():
                time.sleep(0.02)
            while not self._done():  # no safe point came: ask the main thread's handler
                self._grace_over = True
                signum = self.pending
                if signum is None or self._main is None:
                    break
                try:
                    signal.pthread_kill(self._main, signum)
                except (OSError, ValueError):
                    break
                retry = time.monotonic() + 0.2
                while time.monotonic() < retry and not self._done():
                    time.sleep(0.02)
            return

    def _done(self) -> bool:
        return self.handled or self._fds is None or self.pending is None
