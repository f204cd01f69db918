"""Reading a run back: its event files through TensorBoard's own EventAccumulator."""

from __future__ import annotations

from pathlib import Path

SIZE_GUIDANCE = {"histograms": 0, "scalars": 0, "tensors": 0, "images": 0}
"""Keep every event (EventAccumulator samples them by default)."""


def read_events(logdir: str | Path):
    """The EventAccumulator of ``logdir`` with everything loaded (call after the watcher closed)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance=SIZE_GUIDANCE)
    acc.Reload()
    return acc


def histogram_tags(acc) -> set[str]:
    return set(acc.Tags()["histograms"])


def scalar_tags(acc) -> set[str]:
    return set(acc.Tags()["scalars"])


def tags_with_prefix(acc, prefix: str) -> set[str]:
    tags = set(acc.Tags()["histograms"]) | set(acc.Tags()["scalars"])
    return {t for t in tags if t.startswith(prefix)}


def hist_steps(acc, tag: str) -> list[int]:
    """The steps at which ``tag`` has a histogram ([] when the tag does not exist)."""
    if tag not in acc.Tags()["histograms"]:
        return []
    return [e.step for e in acc.Histograms(tag)]


def hist_at(acc, tag: str, step: int):
    """The ``HistogramValue`` (min, max, num, sum, sum_squares, bucket_limit, bucket) at ``step``."""
    found = [e.histogram_value for e in acc.Histograms(tag) if e.step == step]
    assert len(found) == 1, f"{tag}: expected one histogram at step {step}, found {len(found)}"
    return found[0]


def scalar_at(acc, tag: str, step: int) -> float:
    found = [e.value for e in acc.Scalars(tag) if e.step == step]
    assert len(found) == 1, f"{tag}: expected one scalar at step {step}, found {len(found)}"
    return found[0]


def text_of(acc, tag: str) -> list[str]:
    """All texts written under ``tag`` (e.g. ``model/summary``), decoded."""
    full = f"{tag}/text_summary"
    if full not in acc.Tags()["tensors"]:
        return []
    events = acc.Tensors(full)
    return [b"".join(e.tensor_proto.string_val).decode() for e in events]
