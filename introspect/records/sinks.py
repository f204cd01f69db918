"""Writing a finished step to a SummaryWriter-like object. The tag table lives here, and only here.

| what                                         | kind      | tag                               |
| -------------------------------------------- | --------- | --------------------------------- |
| layer outputs                                | histogram | activations/{module}              |
| gradients w.r.t. layer outputs               | histogram | activation_grads/{module}         |
| parameters / parameter gradients             | histogram | weights/{param}, grads/{param}    |
| gradient norm, update/weight ratio           | scalar    | grad_norm/{param}, update_ratio/{param} |
| conv feature maps                            | image     | feature_maps/{module}             |
| model summary                                | text      | model/summary                     |
| debugger findings                            | text      | diagnostics/alerts                |
| gradient flow per layer                      | image     | diagnostics/grad_flow             |
| NaN/Inf count, when not zero                 | scalar    | nonfinite/{module or param}       |
| a run's final metrics (HPARAMS, finish())    | scalar    | hparams/{metric}                  |
| a user probe's values (``probes=``)          | scalar    | {probe.name}/{key}/{module}       |
| spectra of saved weights (``weights --spectral``) | scalar | spectral/{alpha,stable_rank,sigma_max,mp_outliers}/{param} |
| training health map (modules x logging steps) | image    | diagnostics/health_map/{stat}     |
| input data (``inspect_data``)                | image     | data/batch, data/first_image       |
|                                              | figure    | data/samples, data/class_balance  |
|                                              | text      | data/channel_stats, data/findings |
| the first training batch (``log_inputs``)    | image     | data/inputs                       |
| bytes saved for backward while a module ran (``log=[..., "memory"]``) | scalar | memory/saved/{module} |
| a measured step's saved peak; CUDA peak and reserved | scalar | memory/saved_peak, memory/cuda_max_allocated, memory/cuda_reserved |
| the per-module memory table                  | text      | model/memory                      |
"""

from __future__ import annotations

import datetime
import os
import re
from pathlib import Path
from typing import Any

from .._torch import any_file_writer
from ..errors import ConfigError, ConfigTypeError
from .stats import HistogramRecord
from .step import HostStep
from .tags import tag, tag_name

__all__ = ["open_writer", "histogram_fields", "write_step"]


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
            any_file_writer(self._writer).add_summary(self._summary_cls(value=self._values), step)


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
        limits, counts = record.edges(), list(record.counts)
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
            nonfinite[name] = nonfinite.get(name, 0.0) + record.nonfinite
    for name, count in nonfinite.items():
        batch.scalar(tag("nonfinite", name), count)
    for full_tag, value in host.scalars.items():
        if value != value:  # NaN: a ratio that is undefined at this step (see update_ratio)
            continue
        batch.scalar(full_tag, value)
    batch.commit(host.step)
