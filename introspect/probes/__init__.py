"""The built-in probes of ``watch``: one concern each, all on the public :class:`introspect.Probe`
protocol (see :mod:`introspect.probes.base`).

Their order is the order events reach them: the non-finite check comes first (its sums are reused
by the activation and gradient histograms of the same tensors, and it decides whether a step's
gradients overflowed before gradient health reads them), but for the gradient-norm spike, whose
norm joins the per-module check's one transfer (the sentinel computes the norm itself).
"""

from __future__ import annotations

from .base import Probe, ProbeContext, WatchOptions

__all__ = ["built_in_probes"]


def built_in_probes(config: WatchOptions, ctx: ProbeContext) -> list[Probe]:
    """The probes ``config`` asks for, in dispatch order."""
    from .activation_grads import ActivationGrads
    from .activations import Activations
    from .divergence import RankDivergence, divergence_wanted
    from .feature_maps import FeatureMaps
    from .first_batch import FirstBatch
    from .grad_health import GradHealth
    from .grad_spike import GradNormSpike
    from .grads import FlatShardGrads, Grads
    from .health_map import HealthMapProbe
    from .hparams import Hparams
    from .init_scale import InitScale
    from .inputs import Inputs
    from .moe import MixtureOfExperts
    from .nonfinite.per_module import NonFiniteCheck, NonFiniteNumbers
    from .nonfinite.sentinel import NonFiniteSentinel
    from .step_memory import MemoryProbe
    from .transformer import AttentionProbe, LogitDivergence, MassiveActivations
    from .unit_health import UnitHealth
    from .update_ratio import UpdateRatio
    from .weights import Weights

    log = config.log
    probes: list[Probe] = []
    if config.summary or config.graph:
        probes.append(FirstBatch())
    if config.log_inputs:
        probes.append(Inputs())
    probes.append(GradNormSpike())  # before the check: its norm joins the check's one transfer
    if ctx.check_mode == "replay":
        probes.append(NonFiniteSentinel())
    elif ctx.check_mode == "per_module":
        probes.append(NonFiniteCheck())
        probes.append(NonFiniteSentinel(compiled_only=True))  # a compiled graph calls no per-module hook
    probes.append(NonFiniteNumbers())
    if "weights" in log:
        probes.append(Weights())
    if "activations" in log:
        probes.append(Activations())
    probes.append(UnitHealth())
    if "activation_grads" in log:
        probes.append(ActivationGrads())
    if "grads" in log:
        probes.append(Grads())
        if config.optimizer is None and ctx.shards is not None and ctx.shards.flat_views:
            probes.append(FlatShardGrads())
    if config.optimizer is not None:
        probes.append(UpdateRatio())
    probes.append(GradHealth())
    probes.append(InitScale())
    if divergence_wanted(ctx):
        probes.append(RankDivergence())
    if "feature_maps" in log:
        probes.append(FeatureMaps())
    probes.append(MemoryProbe())  # always: the out-of-memory post-mortem; measures with log=[..., "memory"]
    if "health_map" in log:
        probes.append(HealthMapProbe())
    probes += [AttentionProbe(), MassiveActivations(), LogitDivergence(), MixtureOfExperts()]
    probes.append(Hparams())
    return probes
