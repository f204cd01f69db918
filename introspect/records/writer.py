"""``GuardedWriter``: every write of a watch goes through it, so that a failing, slow or hung writer
never stops or stalls training.

Writes go through a bounded queue to one writer thread: the training thread hands over host-side
data (a ``HostStep``'s numbers, text, images already on the CPU) and goes on. When the queue is
full (the writer is slower than training), the logging step's data is dropped, counted, and said
once; the training step itself never waits. At the end of the watch the queue is drained: a
healthy writer writes every completed step, and one that makes no progress for
:data:`STALL_S` (a hung disk, a blocked network mount) is abandoned with a warning.
"""

from __future__ import annotations

import collections
import io
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from .._torch import any_file_writer
from ..errors import IntrospectWarning, warn
from ..runtime.registry import Registry
from . import eventfile
from .sinks import open_writer

__all__ = ["GuardedWriter", "QUEUE_SIZE", "STALL_S", "SIGNAL_STALL_S"]

QUEUE_SIZE = 64
"""Writes waiting for the writer thread at most (a few logging steps: a step is one to a few
writes); beyond that, logging-step data is dropped."""

STALL_S = 10.0
"""At the end of a watch, how long the writer may go without finishing one write before it is
abandoned (what it has written stays on disk)."""

SIGNAL_STALL_S = 0.5
"""The same after SIGTERM or Ctrl-C: the process is being stopped, and a hung writer must not keep it."""


class GuardedWriter:
    """The run's writer behind one door: the first call that fails disables writing, with one
    warning (through ``on_failure``), and training goes on. ``None`` on a rank that does not write.

    It also owns the writer's end: a writer ``watch`` opened is closed, one the user passed is
    flushed (never closed), and the event-file checksum patch is undone after.
    """

    def __init__(
        self, writer: Any, on_failure: Callable[[Exception], None], owned: bool = False, threaded: bool = True
    ) -> None:
        self.writer = writer
        self.raw = writer  # kept after a failure: finish() still flushes what was written
        self.owned = owned
        self.dropped = 0
        """Writes dropped because the queue was full (the writer slower than training)."""
        self.stall_s = STALL_S
        self._on_failure = on_failure
        self._error: Exception | None = None  # a failure on the writer thread, not yet reported
        self._pending: collections.deque[tuple[Callable[..., object], tuple]] = collections.deque()
        self._wake = threading.Condition()
        self._busy = False
        self._progress = time.monotonic()  # when the writer thread last finished a write
        self._stop = False
        self._end_error: Exception | None = None
        self._thread: threading.Thread | None = None
        if writer is not None and threaded:
            self._thread = threading.Thread(target=self._work, name="introspect-writer", daemon=True)
            self._thread.start()

    @classmethod
    def open(cls, target: Any, registry: Registry, on_failure: Callable[[Exception], None]) -> GuardedWriter:
        """The writer for ``target`` (a writer, a path, None; ``False``: this rank writes nothing),
        its end and its checksum patch registered in ``registry``."""
        raw, owned = open_writer(target) if target is not False else (None, False)
        guarded = cls(raw, on_failure, owned)
        if raw is not None:
            # Same bytes, checksummed without a pure-Python byte loop (see eventfile.py); undone
            # after the writer's end (the registry undoes last first), so the queue drains fast.
            if eventfile.speed_up(raw):
                registry.add("the event-file checksum", lambda: eventfile.restore(raw))
            registry.add("the writer", guarded.finish)
        return guarded

    def __bool__(self) -> bool:
        return self.writer is not None

    def call(self, method: str, *args: Any, **kwargs: Any) -> bool:
        """``writer.method(*args, **kwargs)`` on the writer thread (tensors copied to the host
        first); False when there is no writer, it failed, or the write was dropped."""
        args = tuple(_host(a) for a in args)
        kwargs = {k: _host(v) for k, v in kwargs.items()}
        return self.run(_invoke, method, args, kwargs)

    def run(self, write: Callable[..., object], *args: Any, now: bool = False) -> bool:
        """``write(writer, *args)`` on the writer thread (what it returns is not used); ``now``:
        on this thread, at once (the graph: its trace runs the model). False when there is no
        writer, it failed, or the write was dropped. ``args`` must be host-side data."""
        self._report_failure()
        if self.writer is None:
            return False
        if now or self._thread is None:
            return self._write(write, args)
        with self._wake:
            if self._stop:
                return False
            if len(self._pending) >= QUEUE_SIZE:
                self.dropped += 1
                first = self.dropped == 1
            else:
                self._pending.append((write, args))
                self._wake.notify()
                return True
        if first:
            warn(
                f"introspect: the writer is slower than training ({QUEUE_SIZE} writes waiting): this "
                "logging step's data is dropped, and so will later steps' be while it lags (counted "
                "in w.report()); training does not wait. Log less often (every=) or fix the writer.",
                IntrospectWarning,
            )
        return False

    def deferred(self) -> Any:
        """A writer-like object whose ``add_*`` calls go through :meth:`call` (for code that takes
        a writer, such as the first batch's input images)."""
        return _Deferred(self)

    def _write(self, write: Callable[..., object], args: tuple) -> bool:
        writer = self.writer
        if writer is None:
            return False
        try:
            write(writer, *args)
        except Exception as e:
            if self.writer is not None:
                self.writer = None
                self._error = e
            if threading.current_thread() is not self._thread:
                self._report_failure()
            return False
        return True

    def _report_failure(self) -> None:
        """A failure on the writer thread, told on the caller's (training) thread, once."""
        error, self._error = self._error, None
        if error is not None:
            self._on_failure(error)

    # ------------------------------------------------------------ the writer thread
    def _work(self) -> None:
        while True:
            with self._wake:
                while not self._pending and not self._stop:
                    self._wake.wait()
                item = self._pending.popleft() if self._pending else None
                self._busy = True
            try:
                if item is None:  # stopped and drained: the writer's own end, here too
                    self._end()
                    return
                self._write(*item)
            finally:
                with self._wake:
                    self._busy = False
                    self._progress = time.monotonic()
                    self._wake.notify_all()

    def _end(self) -> None:
        """Close a writer we opened; flush one the user passed (never close theirs)."""
        raw = self.raw
        if raw is None:
            return
        try:
            if self.owned:
                raw.close()
            else:
                raw.flush()
        except Exception as e:  # a full disk must not turn a finished run into a crash
            self._end_error = e

    def finish(self) -> None:
        """Drain the queue, then close a writer we opened or flush one the user passed, on the
        writer thread; a writer that finishes nothing for ``stall_s`` is abandoned (the watch
        ends; what was written is on disk), not waited for."""
        if self.raw is None:
            return
        thread = self._thread
        if thread is None:  # no thread, or finish() again after close (w.finish(metrics=...))
            self._end()
        else:
            with self._wake:
                self._stop = True
                self._wake.notify_all()
                self._progress = max(self._progress, time.monotonic())
                while thread.is_alive():
                    if time.monotonic() - self._progress > self.stall_s:
                        left = len(self._pending) + int(self._busy)
                        self._pending.clear()
                        self._thread, self.writer, self.raw = None, None, None
                        warn(
                            f"introspect: the writer finished nothing in {self.stall_s:g} s (a hung disk "
                            f"or writer?): abandoned with {left} writes left; what it wrote before is on disk",
                            IntrospectWarning,
                        )
                        return
                    self._wake.wait(0.05)
            thread.join(timeout=1.0)
            self._thread = None
        self._report_failure()
        if self.dropped:
            warn(
                f"introspect: {self.dropped} writes were dropped: the writer was slower than training",
                IntrospectWarning,
            )
        error, self._end_error = self._end_error, None
        if error is not None:
            warn(f"introspect: could not flush the writer: {error}", IntrospectWarning)


def _invoke(writer: Any, method: str, args: tuple, kwargs: dict) -> None:
    if method == "add_image" and kwargs == {"dataformats": "HWC"} and _png_event(writer, *args):
        return
    getattr(writer, method)(*args, **kwargs)


def _png_event(writer: Any, *args: Any) -> bool:
    """``add_image(tag, image, step, dataformats="HWC")`` of an RGB(A) uint8 array on torch's
    ``SummaryWriter``, written without its float round trip: the same event (the same PNG bytes,
    ``Summary.Image`` fields and step) as ``add_image``, at a third of its cost.

    torch's ``summary.image`` turns a uint8 image into float32, scales it by 1, clips it, casts it
    back, copies it (a resize to its own size) and encodes it; on the 201-module stack's live
    figures that was ~2/3 of the writer thread's time, taken from training's cores. False (the
    caller writes it the ordinary way) for anything else."""
    if len(args) != 3:
        return False
    tag, image, step = args
    if not (isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] in (3, 4)):
        return False
    from torch.utils.tensorboard import SummaryWriter

    if not isinstance(writer, SummaryWriter):
        return False
    file_writer = any_file_writer(writer)
    if file_writer is None:
        return False
    from PIL import Image
    from tensorboard.compat.proto.summary_pb2 import Summary

    height, width, channels = image.shape
    out = io.BytesIO()
    Image.fromarray(image).save(out, format="PNG")
    encoded = Summary.Image(height=height, width=width, colorspace=channels, encoded_image_string=out.getvalue())
    file_writer.add_summary(Summary(value=[Summary.Value(tag=tag, image=encoded)]), step, None)
    return True


def _host(value: Any) -> Any:
    """A tensor argument as a CPU copy the queue may hold (never a device tensor or a graph)."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    return value


class _Deferred:
    """A writer-like object for :meth:`GuardedWriter.deferred`."""

    def __init__(self, guarded: GuardedWriter) -> None:
        self._guarded = guarded

    def __getattr__(self, name: str) -> Any:
        if not name.startswith("add_") or not callable(getattr(self._guarded.raw, name, None)):
            raise AttributeError(name)
        return lambda *args, **kwargs: self._guarded.call(name, *args, **kwargs)
