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
| NaN/Inf count, when not zero                 | scalar    | nonfinite/{module or param}       |
"""

from __future__ import annotations

import datetime
import os
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .stats import HistogramRecord
from .step import HostStep

__all__ = ["tag", "open_writer", "write_histogram", "write_step", "TAG_KINDS"]

TAG_KINDS = (
    "activations",
    "activation_grads",
    "weights",
    "grads",
    "grad_norm",
    "update_ratio",
    "feature_maps",
    "nonfinite",
)

SUMMARY_TAG = "model/summary"
ALERTS_TAG = "diagnostics/alerts"

_WRITER_METHODS = ("add_histogram_raw", "add_scalar", "add_text", "flush")


def tag(kind: str, name: str) -> str:
    """The TensorBoard tag for ``name`` (a module or parameter name, maybe with an output suffix)."""
    if kind not in TAG_KINDS:
        raise ValueError(f"unknown tag kind {kind!r}; one of {TAG_KINDS}")
    return f"{kind}/{name}"


def tag_name(full_tag: str) -> tuple[str, str]:
    """``("grads", "fc.weight")`` from ``"grads/fc.weight"``."""
    kind, _, name = full_tag.partition("/")
    return kind, name


def open_writer(writer: Any) -> tuple[Any, bool]:
    """``(writer, owned)``: a writer object is used as is; a path or None gets a new SummaryWriter."""
    if writer is None or isinstance(writer, (str, os.PathLike)):
        from torch.utils.tensorboard import SummaryWriter

        if writer is None:
            stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
            writer = Path("runs") / stamp
        return SummaryWriter(log_dir=str(writer)), True
    missing = [m for m in _WRITER_METHODS if not callable(getattr(writer, m, None))]
    if missing:
        raise ConfigError(
            f"writer must be a SummaryWriter (torch.utils.tensorboard or tensorboardX), a log "
            f"directory path, or None; got {type(writer).__name__}, which lacks {missing}"
        )
    return writer, False


def write_histogram(writer: Any, full_tag: str, record: HistogramRecord, step: int) -> None:
    """One histogram of the finite values; a tensor with none gets no histogram (its count is logged)."""
    n = int(round(record.finite_count))
    if n <= 0:
        return
    if record.max == record.min:
        limits, counts = [record.max], [float(n)]
    else:
        limits, counts = record.edges(), list(record.counts)
    writer.add_histogram_raw(
        full_tag,
        min=record.min,
        max=record.max,
        num=n,
        sum=record.sum,
        sum_squares=record.sum_squares,
        bucket_limits=limits,
        bucket_counts=counts,
        global_step=step,
    )


def write_step(writer: Any, host: HostStep) -> None:
    """Histograms, derived scalars (gradient norms, NaN/Inf counts) and scalars of one step."""
    nonfinite: dict[str, float] = {}
    for full_tag, record in host.histograms.items():
        write_histogram(writer, full_tag, record, host.step)
        kind, name = tag_name(full_tag)
        if kind == "grads":
            writer.add_scalar(tag("grad_norm", name), record.norm, host.step)
        if record.nonfinite > 0:
            nonfinite[name] = nonfinite.get(name, 0.0) + record.nonfinite
    for name, count in nonfinite.items():
        writer.add_scalar(tag("nonfinite", name), count, host.step)
    for full_tag, value in host.scalars.items():
        writer.add_scalar(full_tag, value, host.step)
