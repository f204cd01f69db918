"""Every TensorBoard tag the project writes is named here (the table in docs/tags.md)."""

from __future__ import annotations

__all__ = [
    "TAG_KINDS",
    "SUMMARY_TAG",
    "ALERTS_TAG",
    "GRAD_FLOW_TAG",
    "HEALTH_MAP_TAG",
    "INPUTS_TAG",
    "MEMORY_TEXT_TAG",
    "MEMORY_STATS",
    "memory_tag",
    "DATA_TAGS",
    "tag",
    "probe_tag",
    "tag_name",
]

TAG_KINDS = (
    "activations",
    "activation_grads",
    "weights",
    "grads",
    "grad_norm",
    "update_ratio",
    "feature_maps",
    "nonfinite",
    "hparams",
    "spectral",
)


SUMMARY_TAG = "model/summary"


ALERTS_TAG = "diagnostics/alerts"


GRAD_FLOW_TAG = "diagnostics/grad_flow"


HEALTH_MAP_TAG = "diagnostics/health_map"


INPUTS_TAG = "data/inputs"


MEMORY_TEXT_TAG = "model/memory"
"""The per-module memory table of a measured step (``log=[..., "memory"]``)."""

MEMORY_STATS = ("saved", "saved_peak", "cuda_max_allocated", "cuda_reserved")


DATA_TAGS = {
    "batch": "data/batch",
    "first_image": "data/first_image",
    "samples": "data/samples",
    "class_balance": "data/class_balance",
    "channel_stats": "data/channel_stats",
    "findings": "data/findings",
}


def tag(kind: str, name: str) -> str:
    """The TensorBoard tag for ``name`` (a module or parameter name, maybe with an output suffix)."""
    if kind not in TAG_KINDS:
        raise ValueError(f"unknown tag kind {kind!r}; one of {TAG_KINDS}")
    return f"{kind}/{name}"


def probe_tag(probe: str, key: str, where: str) -> str:
    """A user probe's scalar: ``{probe.name}/{key}/{module}`` (see ``introspect.Probe``)."""
    return f"{probe}/{key}/{where}"


def memory_tag(stat: str, module: str | None = None) -> str:
    """A memory scalar: ``memory/saved/{module}`` (bytes saved for backward while the module's
    forward ran, its children's included), or a step's own ``memory/saved_peak``,
    ``memory/cuda_max_allocated``, ``memory/cuda_reserved``."""
    if stat not in MEMORY_STATS or (stat == "saved") != (module is not None):
        raise ValueError(f"unknown memory tag {stat!r} (module {module!r}); one of {MEMORY_STATS}, saved with a module")
    return f"memory/{stat}/{module}" if module is not None else f"memory/{stat}"


def tag_name(full_tag: str) -> tuple[str, str]:
    """``("grads", "fc.weight")`` from ``"grads/fc.weight"``."""
    kind, _, name = full_tag.partition("/")
    return kind, name
