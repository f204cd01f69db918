"""Every TensorBoard tag the project writes is named here (the table in docs/tags.md)."""

from __future__ import annotations

__all__ = [
    "TAG_KINDS",
    "SUMMARY_TAG",
    "ALERTS_TAG",
    "GRAD_FLOW_TAG",
    "HEALTH_MAP_TAG",
    "INPUTS_TAG",
    "DATA_TAGS",
    "tag",
    "probe_tag",
    "tag_name",
    "MOE_STATS",
    "moe_tag",
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


MOE_STATS = ("load", "router_entropy", "router_max_logit")
"""What the mixture-of-experts probe writes per MoE block: ``load`` (a histogram, one value per
expert: its share of the block's routed token assignments), ``router_entropy`` (nats, mean over
tokens) and ``router_max_logit`` (scalars)."""


def moe_tag(stat: str, module: str) -> str:
    """``moe/{stat}/{module}``, ``module`` being the MoE block (``model.layers.1.mlp``)."""
    if stat not in MOE_STATS:
        raise ValueError(f"unknown MoE statistic {stat!r}; one of {MOE_STATS}")
    return f"moe/{stat}/{module}"


def tag_name(full_tag: str) -> tuple[str, str]:
    """``("grads", "fc.weight")`` from ``"grads/fc.weight"``."""
    kind, _, name = full_tag.partition("/")
    return kind, name
