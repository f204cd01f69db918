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

If no safe point comes within :data:`GRACE_S` (the loop is blocked in data loading, in a hung
writer's call, in ``open()`` of a FIFO, or the signal came after the last step), a watchdog thread
sends the signal to the main thread again, and that second delivery goes through unconditionally:
the handler restores the previous handler and hands the signal to it right there
(``KeyboardInterrupt``, ``SystemExit(143)``, or the user's own handler), whatever frame it
interrupted (and if the main thread runs no Python for :data:`HANDLER_S` after that, stuck in C
code, the process ends with ``os._exit(128 + signum)``). The watcher's teardown then runs from the ``with`` block's exit, and may be cut short
(a hung writer is abandoned after :data:`~introspect.records.writer.SIGNAL_STALL_S`); what is on
disk stays there. A second signal while one is pending (Ctrl-C twice, SIGTERM after Ctrl-C) goes
through the same way at once. The handler never takes a lock: it stores attributes, writes one
byte down a pipe, or raises.
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

__all__ = ["SignalGuard", "GRACE_S", "HANDLER_S", "WATCHED_SIGNALS"]

GRACE_S = 2.0
"""How long a signal waits for the next step boundary before the watchdog passes it on."""

HANDLER_S = 0.5
"""After the grace period, how long the main thread has to run the handler before the process ends
without it (``os._exit``)."""

WATCHED_SIGNALS = tuple(s for s in (getattr(signal, "SIGTERM", None), signal.SIGINT) if s is not None)


class _Exit:
    code: int | None = None
    """Set when a signal's default action became ``SystemExit``: the exit status to end with."""
    interrupt = False
    """Set when Ctrl-C became ``KeyboardInterrupt`` (Python's own handler): if it ends the program
    uncaught, the program ends as Python ends it then, by SIGINT's default action."""


_EXIT = _Exit()


def _exit_without_teardown() -> None:
    """The end of a process that a signal's default action stops: after the ``finally`` blocks
    and the exit handlers registered after the watch began, end at once, as the default action
    ends a process, rather than tear the interpreter down (with torch imported that takes 1 to 2
    s on a loaded machine, most of what "SIGTERM took 4 s" was). The logging handlers and the
    standard streams are flushed first; files written are on disk already."""
    code = _EXIT.code
    interrupted = _EXIT.interrupt and isinstance(getattr(sys, "last_value", None), KeyboardInterrupt)
    if code is None and not interrupted:
        return
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    if code is None:  # an uncaught KeyboardInterrupt: the status a shell expects of Ctrl-C
        try:
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGINT)
        except (OSError, ValueError):
            pass
        code = 128 + signal.SIGINT
    os._exit(code)


class SignalGuard:
    """Deferred SIGTERM/SIGINT for one watcher (installed from the main thread only).

    ``close`` is the watcher's ``close()``: it writes the open step, undoes everything (this
    guard's handlers included) and then calls :meth:`deliver`.
    """

    def __init__(self, close: Callable[[], None]) -> None:
        self.pending: int | None = None  # the signal waiting for a safe point
        self.handled = False  # a safe point took it
        self._close = close
        self.signalled_at: float | None = None  # time.monotonic() of the first signal
        self._previous: dict[int, Any] = {}  # the handlers ours replaced, until restored
        self._original: dict[int, Any] = {}  # the same, kept for passing the signal on
        self._fds: tuple[int, int] | None = None
        self._watchdog: threading.Thread | None = None
        self._main = threading.main_thread().ident

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
        atexit.unregister(_exit_without_teardown)  # once, however many watches
        atexit.register(_exit_without_teardown)
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
        if _EXIT.code is None and not _EXIT.interrupt and self.pending is None:  # (a pending signal needs it)
            atexit.unregister(_exit_without_teardown)
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
        if self.pending is None and not self.handled:
            self.pending = signum
            self.signalled_at = time.monotonic()
            if self._original.get(signum) is signal.default_int_handler:
                _EXIT.interrupt = True  # a KeyboardInterrupt will end the program (see _Exit)
            fds = self._fds
            if fds is not None:
                try:
                    os.write(fds[1], b"s")
                except OSError:  # a full pipe already holds a wake-up
                    pass
            return
        # A second signal (the user insists, or the watchdog after the grace period): through,
        # now, whatever frame it interrupted; the watch's teardown runs as the exception leaves.
        self._pass_on(signum, frame)

    def _pass_on(self, signum: int, frame: Any) -> None:
        """Hand the signal to the previous handler now; the pending one is not delivered again,
        and every signal after this one meets the previous handlers (a third SIGTERM kills)."""
        self.handled = True
        self.pending = None
        for other, previous in self._original.items():
            try:
                if signal.getsignal(other) == self._on_signal:
                    signal.signal(other, previous)
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
        if self._original.get(signum, signal.SIG_DFL) not in (signal.SIG_DFL, signal.default_int_handler):
            atexit.unregister(_exit_without_teardown)  # a handler of its own: the usual end
        self._run_previous(signum, sys._getframe(1))

    def _run_previous(self, signum: int, frame: Any) -> None:
        """Python's own (``KeyboardInterrupt``) or the user's handler is called; the default
        action becomes ``SystemExit(128 + signum)``, so ``finally`` blocks and ``with`` exits
        still run (a user's own SummaryWriter closes), and the exit status is the shell's."""
        previous = self._original.get(signum, signal.SIG_DFL)
        if previous is signal.default_int_handler:
            _EXIT.interrupt = True
        if callable(previous):
            previous(signum, frame)
        elif previous == signal.SIG_DFL:
            _EXIT.code = 128 + signum  # and no interpreter teardown after the exit handlers
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
            signum = self.pending
            if self._done() or signum is None or self._main is None:
                return
            try:  # no safe point came: the signal again, which goes through this time
                signal.pthread_kill(self._main, signum)
            except (OSError, ValueError):
                return
            deadline = time.monotonic() + HANDLER_S
            while time.monotonic() < deadline and not self._done():
                time.sleep(0.02)
            if not self._done():
                # The main thread runs no Python (stuck in C code that does not return on a
                # signal): Python's handler can never run, so the process ends here, as the
                # signal's default action would have ended it; what is on disk stays there.
                os._exit(128 + signum)
            return

    def _done(self) -> bool:
        return self.handled or self._fds is None or self.pending is None
