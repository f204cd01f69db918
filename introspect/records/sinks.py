"""Writing to a SummaryWriter-like object: a finished step, and a log directory's own writer. The
tags come from ``tags.py``, the one tag table.
"""

from __future__ import annotations

import datetime
import os
import re
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .._torch import any_file_writer
from ..errors import ConfigError, ConfigTypeError
from .stats import HistogramRecord
from .step import HostStep
from .tags import nonfinite_tag, tag, tag_name

__all__ = ["open_writer", "logdir_writer", "write_steps", "histogram_fields", "write_step"]


_WRITER_METHODS = ("add_histogram_raw", "add_scalar", "add_text", "flush")


def open_writer(writer: Any) -> tuple[Any, bool]:
    """``(writer, owned)``: a writer object is used as is; a path or None gets a new SummaryWriter.

    Raises:
        ConfigTypeError: ``writer`` is neither a path, None, nor a writer (``writer=42``), or it is
            a string that is an object's ``str()`` (``"<...SummaryWriter object at 0x...>"``).
        ConfigError: the path exists and is not a directory (``"/etc/passwd"``).
    """
    if isinstance(writer, (str, os.PathLike)):
        return _new_summary_writer(writer), True
    if writer is None:
        return _new_summary_writer(Path("runs") / datetime.datetime.now().strftime("%Y%m%d-%H%M%S")), True
    missing = [m for m in _WRITER_METHODS if not callable(getattr(writer, m, None))]
    if missing:
        raise ConfigTypeError(
            f"writer must be a SummaryWriter (torch.utils.tensorboard or tensorboardX), a log "
            f"directory path, or None; got {type(writer).__name__}"
            + (f", which lacks {missing}" if len(missing) < len(_WRITER_METHODS) else "")
        )
    return writer, False


@contextmanager
def logdir_writer(logdir: str | os.PathLike) -> Iterator[Any]:
    """A new SummaryWriter on ``logdir`` for the length of a ``with`` block, closed at its end
    (an error's too: what was written is on disk)."""
    writer, _ = open_writer(logdir)
    try:
        yield writer
    finally:
        writer.close()


def write_steps(logdir: str | os.PathLike, write: Callable[[Any, Any, int], None], items: Iterable[Any]) -> None:
    """``write(writer, item, step)`` for each item at its own step (0, 1, ...) into ``logdir``: two
    files side by side in TensorBoard (``introspect weights A B --logdir``) are A at 0, B at 1."""
    with logdir_writer(logdir) as writer:
        for step, item in enumerate(items):
            write(writer, item, step)


# What str() of an object without __str__ gives: a path like this is a writer (or another object)
# turned into text by mistake, and would create a directory of that name.
_OBJECT_REPR = re.compile(r"<[\w.]+ object at 0x[0-9a-fA-F]+>")


def _new_summary_writer(log_dir: str | os.PathLike) -> Any:
    """A new torch SummaryWriter on ``log_dir``, after checking that the path can be a log directory."""
    from torch.utils.tensorboard import SummaryWriter

    text = os.fspath(log_dir)
    if isinstance(text, bytes):
        text = os.fsdecode(text)
    if _OBJECT_REPR.search(text):
        raise ConfigTypeError(
            f"writer={text!r} is the str() of an object, not a log directory: pass the writer "
            "itself (watch(model, writer)), or its log_dir"
        )
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"writer={text!r}: {path} exists and is not a directory; give a log directory")
    try:
        return SummaryWriter(log_dir=text)
    except OSError as e:  # a parent that is a file, no permission
        raise ConfigError(f"writer={text!r}: cannot create the log directory ({e.strerror or e})") from e


class _EventBatch:
    """A step's histograms and scalars as one TensorBoard event (torch's SummaryWriter).

    tensorboard's event writer checksums every event in pure Python on a thread that holds the
    GIL, and wakes that thread once per event; one event per step instead of one per tag saves
    the per-event framing and most of the thread ping-pong. TensorBoard reads several values from
    one event as it does from many events (TensorFlow's merged summaries are written this way).
    """

    def __init__(self, writer: Any) -> None:
        from tensorboard.compat.proto.summary_pb2 import HistogramProto, Summary

        self._writer = writer
        self._summary_cls = Summary
        self._value_cls = Summary.Value
        self._histogram_cls = HistogramProto
        self._values: list[Any] = []

    # The protos are built directly: the same bytes as torch's summary.histogram_raw / scalar,
    # without a Summary wrapper per value (and, for scalars, a numpy round trip) to unpack again.
    def histogram(self, full_tag: str, **fields: Any) -> None:
        histo = self._histogram_cls(
            min=fields["min"],
            max=fields["max"],
            num=fields["num"],
            sum=fields["sum"],
            sum_squares=fields["sum_squares"],
            bucket_limit=fields["bucket_limits"],
            bucket=fields["bucket_counts"],
        )
        self._values.append(self._value_cls(tag=full_tag, histo=histo))

    def scalar(self, full_tag: str, value: float) -> None:
        self._values.append(self._value_cls(tag=full_tag, simple_value=float(value)))

    def commit(self, step: int) -> None:
        if self._values:
            file_writer = any_file_writer(self._writer)
            assert file_writer is not None  # made only for a SummaryWriter, which has one (``_batch_for``)
            file_writer.add_summary(self._summary_cls(value=self._values), step)


class _PerTagCalls:
    """Any other SummaryWriter-like object (tensorboardX, a user's wrapper): its public methods."""

    def __init__(self, writer: Any, step: int) -> None:
        self._writer = writer
        self._step = step

    def histogram(self, full_tag: str, **fields: Any) -> None:
        self._writer.add_histogram_raw(full_tag, global_step=self._step, **fields)

    def scalar(self, full_tag: str, value: float) -> None:
        self._writer.add_scalar(full_tag, value, self._step)

    def commit(self, step: int) -> None:
        pass


def _batch_for(writer: Any, step: int) -> Any:
    from torch.utils.tensorboard import SummaryWriter

    if isinstance(writer, SummaryWriter) and callable(getattr(writer, "_get_file_writer", None)):
        return _EventBatch(writer)
    return _PerTagCalls(writer, step)


def histogram_fields(record: HistogramRecord) -> dict[str, Any] | None:
    """``add_histogram_raw`` arguments for the finite values; None when there are none."""
    n = int(round(record.finite_count))
    if n <= 0:
        return None
    if record.max == record.min:
        limits, counts = [record.max], [float(n)]
    else:
        limits, counts = record.edges(), record.count_list()
    return dict(
        min=record.min,
        max=record.max,
        num=n,
        sum=record.sum,
        sum_squares=record.sum_squares,
        bucket_limits=limits,
        bucket_counts=counts,
    )


def write_step(writer: Any, host: HostStep) -> None:
    """Histograms, derived scalars (gradient norms, NaN/Inf counts) and scalars of one step."""
    if not host.histograms and not host.scalars:
        return
    batch = _batch_for(writer, host.step)
    nonfinite: dict[str, float] = {}
    for full_tag, record in host.histograms.items():
        fields = histogram_fields(record)
        if fields is not None:
            batch.histogram(full_tag, **fields)
        kind, name = tag_name(full_tag)
        if kind == "grads":
            batch.scalar(tag("grad_norm", name), record.norm)
        if record.nonfinite > 0:
            counted = nonfinite_tag(full_tag)  # an activation's and a grad's of one module add up
            nonfinite[counted] = nonfinite.get(counted, 0.0) + record.nonfinite
    for counted, count in nonfinite.items():
        batch.scalar(counted, count)
    for full_tag, value in host.scalars.items():
        if value != value:  # NaN: a ratio that is undefined at this step (see update_ratio)
            continue
        batch.scalar(full_tag, value)
    batch.commit(host.step)
