"""Every TensorBoard tag the project writes is built here: a constant or a function for each.

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
| the steps before a gradient-norm spike       | text      | diagnostics/pre_spike             |
| NaN/Inf count, when not zero                 | scalar    | nonfinite/{module or param}       |
|   ... of another histogram (its tag kept)    | scalar    | nonfinite/{tag}, e.g. nonfinite/attention/entropy_heads/{module} |
| attention entropy / max logit (head mean)    | scalar    | attention/{entropy,max_logit}/{module} |
| attention heads over NaN/Inf logits (not 0)  | scalar    | attention/not_measurable/{module} |
| the same, one value per head                 | histogram | attention/{entropy,max_logit}_heads/{module} |
| a run's final metrics (HPARAMS, finish())    | scalar    | hparams/{metric}                  |
| a user probe's values (``probes=``)          | scalar    | {probe.name}/{key}/{module}       |
| spectra of saved weights (``weights --spectral``) | scalar | spectral/{alpha,stable_rank,sigma_max,mp_outliers}/{param} |
| training health map (modules x logging steps) | image    | diagnostics/health_map/{stat}     |
| every module's health-map numbers (budgeted runs) | text | diagnostics/health_data          |
| per-block roll-ups (budgeted runs)           | scalar    | blocks/{activation_rms,grad_rms,grad_norm,nonfinite}/{block} |
| input data (``inspect_data``)                | image     | data/batch, data/first_image       |
|                                              | figure    | data/samples, data/class_balance  |
|                                              | text      | data/channel_stats, data/findings |
| the first training batch (``log_inputs``)    | image     | data/inputs                       |
| bytes saved for backward while a module ran (``log=[..., "memory"]``) | scalar | memory/saved/{module} |
| a measured step's saved peak; CUDA peak and reserved | scalar | memory/saved_peak, memory/cuda_max_allocated, memory/cuda_reserved |
| the per-module memory table                  | text      | model/memory                      |

``tests/test_tag_table.py`` reads the package and fails on a tag built anywhere else.
"""

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
    "PRE_SPIKE_TAG",
    "tag",
    "probe_tag",
    "attention_tag",
    "spectral_tag",
    "health_map_tag",
    "HEALTH_DATA_TAG",
    "BLOCK_STATS",
    "block_tag",
    "stored_text_tag",
    "tag_name",
    "nonfinite_tag",
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


HEALTH_DATA_TAG = "diagnostics/health_data"
"""Every module's health-map numbers at a logging step, one markdown table (text), written when
the model is above ``max_modules`` and its per-module histograms go to a budget (records/budget.py)."""

BLOCK_STATS = ("activation_rms", "grad_rms", "grad_norm", "nonfinite")


INPUTS_TAG = "data/inputs"


PRE_SPIKE_TAG = "diagnostics/pre_spike"
"""What the model looked like on the steps before a gradient-norm spike (text)."""

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


def attention_tag(stat: str, where: str) -> str:
    """An attention module's statistic: ``attention/{entropy,max_logit}/{module}`` (scalars, the mean
    over the measurable heads), ``attention/{entropy,max_logit}_heads/{module}`` (one value per
    head) and ``attention/not_measurable/{module}`` (how many heads had NaN/Inf logits, when not 0)."""
    return f"attention/{stat}/{where}"


def spectral_tag(stat: str, param: str) -> str:
    """A weight matrix's spectral scalar: ``spectral/{alpha,stable_rank,sigma_max,mp_outliers}/{param}``."""
    return tag("spectral", f"{stat}/{param}")


def health_map_tag(stat: str) -> str:
    """The image tag of one statistic's map: ``diagnostics/health_map/{stat}``."""
    return f"{HEALTH_MAP_TAG}/{stat}"


def block_tag(stat: str, block: str) -> str:
    """A block roll-up: ``blocks/{stat}/{block}`` (``blocks/grad_rms/model.layers.3``), one per
    block of a budgeted run's modules (see ``records.budget.blocks_of``)."""
    if stat not in BLOCK_STATS:
        raise ValueError(f"unknown block statistic {stat!r}; one of {BLOCK_STATS}")
    return f"blocks/{stat}/{block}"


def stored_text_tag(text_tag: str) -> str:
    """The tag TensorBoard stores an ``add_text(text_tag, ...)`` under, to read it back."""
    return f"{text_tag}/text_summary"


def memory_tag(stat: str, module: str | None = None) -> str:
    """A memory scalar: ``memory/saved/{module}`` (bytes saved for backward while the module's
    forward ran, its children's included), or a step's own ``memory/saved_peak``,
    ``memory/cuda_max_allocated``, ``memory/cuda_reserved``."""
    if stat not in MEMORY_STATS or (stat == "saved") != (module is not None):
        raise ValueError(f"unknown memory tag {stat!r} (module {module!r}); one of {MEMORY_STATS}, saved with a module")
    return f"memory/{stat}/{module}" if module is not None else f"memory/{stat}"


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


MODULE_KINDS = ("activations", "activation_grads", "weights", "grads")
"""Tag kinds whose name is a module or a parameter (their NaN/Inf count is ``nonfinite/{name}``)."""


def nonfinite_tag(full_tag: str) -> str:
    """The NaN/Inf count of a histogram: ``nonfinite/{module or param}`` for a module's or
    parameter's histogram (``activations/fc1`` -> ``nonfinite/fc1``), ``nonfinite/{tag}`` for any
    other, its prefix kept (``attention/entropy_heads/m`` -> ``nonfinite/attention/entropy_heads/m``):
    never a name that reads like a module and is not one."""
    kind, name = tag_name(full_tag)
    return tag("nonfinite", name if kind in MODULE_KINDS else full_tag)
