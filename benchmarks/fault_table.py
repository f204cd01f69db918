"""The fault table (``scripts/bench --faults``): planted faults on four models, at two cadences,
and what the debugger says about each — right or not, how late, where in the report, how much.

Issue 25 asks the debugger for verdicts a user can trust: every fault named at the right module and
kind, the root cause first in the report, soon (within 2 steps for a fault that changes a statistic
at once), and nothing said about healthy training. This module is the instrument that measures
exactly that, so that one command shows where the debugger stands:

* eight faults (``FAULTS``), each planted in a fresh, seeded model at a fixed step: a forward NaN, a
  NaN made only in backward, an Inf from overflow, a learning-rate jump ×1000, a dead layer (a
  BatchNorm bias, or the pre-activation bias, set to −100), attention collapse (q/k projections
  ×30, attention models only), a massive activation (one channel ×1e4 in a block's output, the
  residual stream) and an exploding init (a layer's weights ×100 before step 0);
* four models (``TABLE_MODELS``): a CNN of conv/BN/ReLU blocks, torchvision's resnet18, GPT-2 tiny
  and a Llama-style decoder (both from transformers' configs, random weights, nothing downloaded);
* two cadences (``CADENCES``): the default (every=50) and every=1. At every=50 the fault is
  planted at step 110, ten steps after a logging step, and the run goes on to step 160, past the
  next regular logging step (150): a detector that waits for the cadence shows a latency of 40,
  not a miss. At every=1 it is planted at step 20 and the run ends at step 30;
* 300 healthy steps of each model at both cadences: every finding there is a false one.

Per cell (``judge``): named right (a finding of an accepted kind at an accepted module, at or after
the fault step), the latency in steps from the fault to that finding, the root cause's rank in the
report's order (1 = first; ``report_order``: ``Alert.cause`` where it exists, else every finding is
its own root, ordered by step), and the number of findings. ``must_show`` lists the cells that miss
the issue's "Must show" at the default cadence.

Runs in the harness's own process, on CPU, one thread (the same for every cell, so cells compare).
"""

from __future__ import annotations

import contextlib
import datetime
import fnmatch
import json
import logging
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.isolation import failure, log, one_thread, quiet
from benchmarks.models import LLAMA_SIZE as SCALE_LLAMA_SIZE
from benchmarks.models import tiny_gpt2, train_loss

__all__ = [
    "CADENCES",
    "FAULTS",
    "HEALTHY_STEPS",
    "QUICK_SUBSET",
    "TABLE_MODELS",
    "Cadence",
    "PlantedFault",
    "build_table_model",
    "fault_table_markdown",
    "judge",
    "must_show",
    "report_order",
    "run_cell",
    "run_fault_table",
    "run_healthy",
    "write_fault_table",
]


# --------------------------------------------------------------------------- cadences
@dataclass(frozen=True)
class Cadence:
    """``watch(every=every)``, the fault planted at ``fault_step`` (0-based; the exploding init at
    step 0 always), the run's last step ``last_step``. ``must``: the issue's "Must show" applies."""

    every: int
    fault_step: int
    last_step: int
    must: bool


CADENCES = {
    # Logging steps 0, 50, 100, 150: the fault lands 10 steps after one, the next is 40 steps on.
    50: Cadence(50, fault_step=110, last_step=160, must=True),
    1: Cadence(1, fault_step=20, last_step=30, must=False),
}
HEALTHY_STEPS = 300
QUICK_HEALTHY_STEPS = 60
BATCH_IMAGES = 16
LM_BATCH, LM_TOKENS = 4, 32


# --------------------------------------------------------------------------- models
@dataclass(frozen=True)
class TableModel:
    """A model of the table. ``build() -> model`` (seeded by the caller); ``batch(gen) -> (x, y)``
    a fresh batch per step (``y`` None: a causal LM with its own loss); ``sites``: fault -> the
    ``Site`` it is planted at (a fault without a site does not apply to the model)."""

    build: Callable[[], Any]
    batch: Callable[[Any], tuple[Any, Any]]
    desc: str
    sites: dict[str, Site]


@dataclass(frozen=True)
class Site:
    """Where a fault is planted (``module``, a dotted name, or "" for none: the LR jump) and the
    modules a right finding may name (``accept``; a parameter of one of them counts as it; empty:
    any module, for a fault with no module of its own)."""

    module: str
    accept: tuple[str, ...] = ()


def _bn_cnn():
    import torch.nn.functional as F
    from torch import nn

    def block(cin: int, cout: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())

    class BlockCNN(nn.Module):
        """Two conv/BN/ReLU blocks (a ModuleList: the blocks a massive-activation check looks at),
        pooled to 4x4, then fc1/ReLU/fc2: names like a MobileNet's (``blocks.1.2`` is a ReLU)."""

        def __init__(self) -> None:
            super().__init__()
            self.blocks = nn.ModuleList([block(3, 16), block(16, 32)])
            self.pool = nn.AdaptiveAvgPool2d(4)
            self.fc1 = nn.Linear(32 * 16, 64)
            self.fc2 = nn.Linear(64, 1)

        def forward(self, x):
            for b in self.blocks:
                x = b(x)
            return self.fc2(F.relu(self.fc1(self.pool(x).flatten(1))))

    return BlockCNN()


def _image_batch(size: int):
    def batch(gen):
        import torch

        x = torch.randn(BATCH_IMAGES, 3, size, size, generator=gen)
        # A label the model can learn (is the red channel's mean above 0?): training that goes
        # somewhere, as healthy training does, not noise fitted to noise.
        return x, (x[:, 0].mean(dim=(1, 2)) > 0).float().unsqueeze(1)

    return batch


def _resnet18():
    import torchvision

    return torchvision.models.resnet18(weights=None, num_classes=1)


def _gpt2():
    return tiny_gpt2()


LLAMA_SIZE = {**SCALE_LLAMA_SIZE, "num_hidden_layers": 2, "vocab_size": 1024}
"""The scale axis's Llama-style decoder (benchmarks/models.py), two layers deep: a fault table cell trains it 160 steps."""


def _llama():
    import transformers

    config = transformers.LlamaConfig(**LLAMA_SIZE, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return transformers.LlamaForCausalLM(config)


def _token_batch(gen):
    import torch

    return torch.randint(0, 1024, (LM_BATCH, LM_TOKENS), generator=gen), None


_H1 = "transformer.h.1"
_L = "model.layers"
TABLE_MODELS: dict[str, TableModel] = {
    "cnn": TableModel(
        _bn_cnn,
        _image_batch(16),
        f"two conv/BN/ReLU blocks, fc1/ReLU/fc2; batch {BATCH_IMAGES} of 3x16x16, BCEWithLogits, Adam 1e-3",
        {
            "forward_nan": Site("blocks.1.0", ("blocks.1.0",)),
            "backward_nan": Site("fc1", ("fc1",)),
            "inf_overflow": Site("blocks.0.0", ("blocks.0.0",)),
            "lr_jump": Site(""),
            "dead_layer": Site("blocks.1.1", ("blocks.1.1", "blocks.1.2")),
            "massive_activation": Site("blocks.0", ("blocks.0",)),
            "exploding_init": Site("fc1", ("fc1",)),
        },
    ),
    "resnet18": TableModel(
        _resnet18,
        _image_batch(32),
        f"torchvision resnet18 (weights=None, 1 class); batch {BATCH_IMAGES} of 3x32x32, BCEWithLogits, Adam 1e-3",
        {
            "forward_nan": Site("layer2.0.conv1", ("layer2.0.conv1",)),
            "backward_nan": Site("layer3.0.conv2", ("layer3.0.conv2",)),
            "inf_overflow": Site("layer1.1.conv1", ("layer1.1.conv1",)),
            "lr_jump": Site(""),
            # BasicBlock calls one ReLU twice: ``layer2.1.relu`` is the ReLU after bn1 and after the sum.
            "dead_layer": Site("layer2.1.bn1", ("layer2.1.bn1", "layer2.1.relu")),
            "massive_activation": Site("layer2.0", ("layer2.0",)),
            "exploding_init": Site("fc", ("fc",)),
        },
    ),
    "gpt2": TableModel(
        _gpt2,
        _token_batch,
        f"GPT-2 tiny (GPT2Config: 2 blocks, 4 heads, n_embd 128, vocab 1024); batch {LM_BATCH} of "
        f"{LM_TOKENS} random tokens, its own LM loss, Adam 1e-3",
        {
            "forward_nan": Site(f"{_H1}.mlp.c_fc", (f"{_H1}.mlp.c_fc",)),
            "backward_nan": Site("transformer.h.0.attn.c_attn", ("transformer.h.0.attn.c_attn",)),
            "inf_overflow": Site("transformer.h.0.mlp.c_proj", ("transformer.h.0.mlp.c_proj",)),
            "lr_jump": Site(""),
            # No BatchNorm: the bias before the activation (c_fc's, before GELU), set to -100.
            "dead_layer": Site(f"{_H1}.mlp.c_fc", (f"{_H1}.mlp.c_fc", f"{_H1}.mlp.act")),
            "attention_collapse": Site(f"{_H1}.attn", (f"{_H1}.attn",)),
            "massive_activation": Site("transformer.h.0", ("transformer.h.0",)),
            "exploding_init": Site(
                "transformer.h.0.mlp.c_fc",
                ("transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.act", "transformer.h.0.mlp", "transformer.h.0"),
            ),
        },
    ),
    "llama": TableModel(
        _llama,
        _token_batch,
        "Llama-style decoder (LlamaConfig: 2 layers, 4 heads, 2 KV heads, hidden 64, SwiGLU 128, "
        f"vocab 1024, sdpa); batch {LM_BATCH} of {LM_TOKENS} random tokens, its own LM loss, Adam 1e-3",
        {
            "forward_nan": Site(f"{_L}.1.mlp.up_proj", (f"{_L}.1.mlp.up_proj",)),
            "backward_nan": Site(f"{_L}.0.self_attn.v_proj", (f"{_L}.0.self_attn.v_proj",)),
            "inf_overflow": Site(f"{_L}.0.mlp.down_proj", (f"{_L}.0.mlp.down_proj",)),
            "lr_jump": Site(""),
            # gate_proj has no bias (mlp_bias=False, as in Llama): -100 is added to its output,
            # before SiLU, from the fault step on (a bias the optimizer cannot move back).
            "dead_layer": Site(f"{_L}.1.mlp.gate_proj", (f"{_L}.1.mlp.gate_proj", f"{_L}.1.mlp.act_fn")),
            "attention_collapse": Site(f"{_L}.1.self_attn", (f"{_L}.1.self_attn",)),
            "massive_activation": Site(f"{_L}.0", (f"{_L}.0",)),
            "exploding_init": Site(
                f"{_L}.0.mlp.up_proj", (f"{_L}.0.mlp.up_proj", f"{_L}.0.mlp", f"{_L}.0.mlp.act_fn", f"{_L}.0")
            ),
        },
    ),
}


def build_table_model(name: str):
    """(model, batch function) of table model ``name``, seeded (the same weights every call)."""
    import torch

    torch.manual_seed(0)
    return TABLE_MODELS[name].build(), TABLE_MODELS[name].batch


# --------------------------------------------------------------------------- faults
class Plant:
    """What a fault does to a run: ``before_step(step)`` runs before each step's forward (a
    parameter or learning-rate change at the fault step); a forward fault wraps the site module's
    forward (an instance attribute, set before ``watch``, as a user's bug would be) and reads
    ``step`` when it runs."""

    def __init__(self, model, opt, site: Site, fault_step: int) -> None:
        self.model, self.opt, self.site, self.fault_step = model, opt, site, fault_step
        self.step = -1

    def before_step(self, step: int) -> None:
        self.step = step

    @property
    def module(self):
        return self.model.get_submodule(self.site.module)

    def wrap_output(self, change: Callable[[Any], Any], always_after: bool = False) -> None:
        """``change`` the site module's output at the fault step (from it on: ``always_after``)."""
        module = self.module
        forward = module.forward

        def planted_forward(*args, **kwargs):
            out = forward(*args, **kwargs)
            if self.step == self.fault_step or (always_after and self.step >= self.fault_step):
                if isinstance(out, tuple):  # a block that returns (hidden_states, ...)
                    return (change(out[0]), *out[1:])
                return change(out)
            return out

        module.forward = planted_forward


def _forward_nan(p: Plant) -> None:
    p.wrap_output(lambda out: out * float("nan"))


def _backward_nan(p: Plant) -> None:
    import torch

    # Forward: sqrt(0) = 0, the output is unchanged. Backward: d sqrt/dx at 0 is inf, so the
    # gradient leaving the module's output for its inside is inf/NaN: only the gradient is hit.
    p.wrap_output(lambda out: out + torch.sqrt(out - out.detach()))


def _inf_overflow(p: Plant) -> None:
    p.wrap_output(lambda out: out * 1e38 * 1e38)  # +-inf wherever out is not 0; no NaN made here


class _AtStep(Plant):
    """A fault done once, before the forward of the fault step: ``act()``."""

    def act(self) -> None:
        raise NotImplementedError

    def before_step(self, step: int) -> None:
        super().before_step(step)
        if step == self.fault_step:
            import torch

            with torch.no_grad():
                self.act()


class _LrJump(_AtStep):
    def act(self) -> None:
        for group in self.opt.param_groups:
            group["lr"] *= 1000  # Adam 1e-3 -> 1: this step's update is the first at the new rate


class _DeadLayer(_AtStep):
    """The BatchNorm's (or the pre-activation layer's) bias set to -100 at the fault step; a layer
    without a bias (Llama's gate_proj) gets -100 added to its output from the fault step on."""

    def __init__(self, model, opt, site: Site, fault_step: int) -> None:
        super().__init__(model, opt, site, fault_step)
        if getattr(self.module, "bias", None) is None:
            self.wrap_output(lambda out: out - 100.0, always_after=True)

    def act(self) -> None:
        bias = getattr(self.module, "bias", None)
        if bias is not None:
            bias.fill_(-100.0)


class _QkScale(_AtStep):
    def act(self) -> None:
        attn = self.module
        if hasattr(attn, "q_proj"):  # Llama-style: separate projections
            for proj in (attn.q_proj, attn.k_proj):
                proj.weight.mul_(30)
                if proj.bias is not None:
                    proj.bias.mul_(30)
        else:  # GPT-2: c_attn is one Conv1D, [n_embd, 3 n_embd] = q | k | v
            n = attn.c_attn.weight.shape[1] // 3
            attn.c_attn.weight[:, : 2 * n].mul_(30)
            attn.c_attn.bias[: 2 * n].mul_(30)


def _massive(p: Plant) -> None:
    def one_channel(out):
        import torch

        # Channel 3 of the block's output (dim 1 of a conv map, the last of a token stream), x 1e4.
        dim = 1 if out.dim() == 4 else out.dim() - 1
        shape = [1] * out.dim()
        shape[dim] = out.shape[dim]
        scale = torch.ones(shape, dtype=out.dtype, device=out.device)
        scale.view(-1)[3] = 1e4
        return out * scale

    p.wrap_output(one_channel, always_after=True)


class _ExplodingInit(_AtStep):
    def act(self) -> None:
        self.module.weight.mul_(100)


@dataclass(frozen=True)
class PlantedFault:
    """One fault: ``plant`` makes the ``Plant`` of a run (a class, or a function that sets up a
    ``Plant``); ``kinds``: the finding kinds that name it right; ``at_once``: it changes a
    statistic at once (the Must show's latency ≤ 2 applies); ``at_step_0``: planted before step 0."""

    label: str
    plant: Any
    kinds: tuple[str, ...]
    at_once: bool = True
    at_step_0: bool = False

    def make(self, model, opt, site: Site, fault_step: int) -> Plant:
        if isinstance(self.plant, type):
            return self.plant(model, opt, site, fault_step)
        plant = Plant(model, opt, site, fault_step)
        self.plant(plant)
        return plant


# Kinds a right finding may have (fnmatch patterns). The learning-rate jump has no module of its
# own: it is named by a model-wide kind (a spike of the global gradient norm, of the logits, an
# exploding gradient, or a loss or update-size kind, whatever its name); an exploding init by any
# finding at the scaled layer (or the block holding it): its output, its gradient, its update.
_NONFINITE = ("nonfinite",)
_LR_KINDS = ("grad_norm_spike", "logit_divergence", "exploding_gradient", "loss*", "update*")
_INIT_KINDS = ("*",)
FAULTS: dict[str, PlantedFault] = {
    "forward_nan": PlantedFault("forward NaN: a layer's output × NaN, one step", _forward_nan, _NONFINITE),
    "backward_nan": PlantedFault(
        "backward-only NaN: + sqrt(out − out.detach()), 0 forward, inf grad", _backward_nan, _NONFINITE
    ),
    "inf_overflow": PlantedFault(
        "Inf from overflow: a layer's output × 1e38 × 1e38, one step", _inf_overflow, _NONFINITE
    ),
    "lr_jump": PlantedFault("learning rate × 1000 (Adam 1e-3 → 1), from the fault step on", _LrJump, _LR_KINDS),
    "dead_layer": PlantedFault("dead layer: BN bias (pre-activation bias) = −100", _DeadLayer, ("dead_units",)),
    "attention_collapse": PlantedFault(
        "attention collapse: q/k projection weights × 30",
        _QkScale,
        ("attention_entropy_collapse", "attention_logit_growth"),
    ),
    "massive_activation": PlantedFault(
        "massive activation: one channel × 1e4 in a block's output, from the fault step on",
        _massive,
        ("massive_activation",),
    ),
    "exploding_init": PlantedFault(
        "exploding init: a layer's weights × 100 before step 0",
        _ExplodingInit,
        _INIT_KINDS,
        at_once=False,
        at_step_0=True,
    ),
}

QUICK_SUBSET = {
    "models": ("cnn", "gpt2"),
    "faults": ("forward_nan", "lr_jump", "dead_layer", "attention_collapse"),
}


# --------------------------------------------------------------------------- a run
@dataclass
class RunResult:
    """What one watched run left: its findings, the steps it ran, seconds, and its error if any;
    the escalations of the cheap signals it granted and skipped (their time budget)."""

    alerts: list = field(default_factory=list)
    steps: int = 0
    seconds: float = 0.0
    error: str | None = None
    escalations: int = 0
    escalations_skipped: int = 0


@contextlib.contextmanager
def _silenced() -> Iterator[None]:
    """The debugger's warnings and log lines, and the models' own, kept off the terminal: the
    table reads the findings from ``w.alerts``."""
    loggers = [logging.getLogger(n) for n in ("introspect", "transformers")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings(), quiet():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _train(name: str, every: int, steps: int, logdir: Path, fault: str | None = None, fault_step: int = 0):
    """Train table model ``name`` for ``steps`` steps under ``watch(every=every, optimizer=opt)``,
    with ``fault`` planted at ``fault_step``; the watcher's findings after it exits."""
    import torch

    from introspect import watch

    model, batch = build_table_model(name)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    plant = None
    if fault is not None:
        plant = FAULTS[fault].make(model, opt, TABLE_MODELS[name].sites[fault], fault_step)
    gen = torch.Generator().manual_seed(1)
    result = RunResult()
    t0 = time.perf_counter()
    w = None
    try:
        with _silenced(), watch(model, str(logdir), every=every, optimizer=opt, summary=False, graph=False) as w:
            for step in range(steps):
                if plant is not None:
                    plant.before_step(step)
                x, y = batch(gen)
                loss = train_loss(model, x, y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                result.steps = step + 1
    except Exception:  # noqa: BLE001 - a cell that fails is reported as failed, the table goes on
        result.error = failure()
    result.seconds = time.perf_counter() - t0
    result.alerts = list(w.alerts) if w is not None else []
    if w is not None:
        clock = w.ctx.clock
        result.escalations = getattr(clock, "escalations", 0)
        result.escalations_skipped = getattr(clock, "escalations_skipped", 0)
    return result


# --------------------------------------------------------------------------- judging
def _cause(alert) -> Any:
    """The finding ``alert`` follows from, where the debugger links them (``Alert.cause``)."""
    return getattr(alert, "cause", None)


def report_order(alerts: list) -> list:
    """The root causes in the order ``w.report()`` opens with them: earliest first. Where findings
    carry no ``cause`` (before the linking of issue 25), every finding is its own root."""
    return sorted((a for a in alerts if _cause(a) is None), key=lambda a: a.step)


def _module_of(where: str) -> str:
    return where.split("/")[0]


def _names(model_name: str, site: Site) -> set[str]:
    """The names a right finding may give: the accepted modules and their own parameters."""
    if not site.accept:
        return set()
    model, _ = build_table_model(model_name)
    names = set(site.accept)
    for module in site.accept:
        names |= {f"{module}.{p}" for p, _ in model.get_submodule(module).named_parameters(recurse=False)}
    return names


def _is_right(alert, fault: str, names: set[str], fault_step: int) -> bool:
    if alert.step < fault_step or not any(fnmatch.fnmatchcase(alert.kind, k) for k in FAULTS[fault].kinds):
        return False
    return not names or _module_of(alert.where) in names


def _said(alert) -> str:
    phase = f" ({alert.phase})" if getattr(alert, "phase", "") else ""
    return f"{alert.kind}{phase} `{alert.where}` @{alert.step}"


def findings_json(alerts: list) -> list[dict]:
    """Every finding of a run, for the JSON: kind, where, step, phase and the index of its
    ``cause`` in the list (None: a root, or no linking)."""
    index = {id(a): i for i, a in enumerate(alerts)}
    return [
        {
            "kind": a.kind,
            "where": a.where,
            "step": a.step,
            "phase": getattr(a, "phase", ""),
            "cause": None if _cause(a) is None else index.get(id(_cause(a)), -1),
        }
        for a in alerts
    ]


def judge(alerts: list, fault: str, names: set[str], fault_step: int) -> dict:
    """One cell's numbers: ``right`` (a finding of an accepted kind at an accepted module, at or
    after the fault step), ``latency`` (its step − the fault's), ``rank`` (the first right root
    cause's place in ``report_order``, 1 = first; None when no right finding is a root: missed, or
    attached to another finding as its consequence), ``findings`` (all of them), ``roots``,
    ``early`` (findings before the fault step: false ones), ``first`` (the first finding at or
    after the fault step, as said) and ``right_said``."""
    right = [a for a in alerts if _is_right(a, fault, names, fault_step)]
    first_right = min(right, key=lambda a: a.step) if right else None
    roots = report_order(alerts)
    rank = next((i + 1 for i, a in enumerate(roots) if _is_right(a, fault, names, fault_step)), None)
    after = [a for a in alerts if a.step >= fault_step]
    first = min(after, key=lambda a: a.step) if after else None
    return {
        "right": first_right is not None,
        "latency": None if first_right is None else first_right.step - fault_step,
        "rank": rank,
        "attached": first_right is not None and rank is None,
        "findings": len(alerts),
        "roots": len(roots),
        "early": sum(a.step < fault_step for a in alerts),
        "first": None if first is None else _said(first),
        "first_root": _said(roots[0]) if roots else None,
        "right_said": None if first_right is None else _said(first_right),
        "kinds": sorted({a.kind for a in alerts}),
    }


def run_cell(name: str, fault: str, every: int, logdir: Path, cadence: Cadence | None = None) -> dict:
    """Plant ``fault`` in a fresh table model ``name``, train it under ``watch(every=every)`` and
    judge what the debugger found."""
    cadence = cadence or CADENCES[every]
    fault_step = 0 if FAULTS[fault].at_step_0 else cadence.fault_step
    site = TABLE_MODELS[name].sites[fault]
    run = _train(name, every, cadence.last_step + 1, logdir, fault, fault_step)
    cell = {"model": name, "fault": fault, "every": every, "fault_step": fault_step, "steps": run.steps}
    cell["expected"] = {"modules": list(site.accept) or ["(any: model-wide)"], "kinds": list(FAULTS[fault].kinds)}
    cell.update(judge(run.alerts, fault, _names(name, site), fault_step))
    cell["seconds"] = round(run.seconds, 1)
    cell["escalations"] = [run.escalations, run.escalations_skipped]
    cell["alerts"] = findings_json(run.alerts)
    if run.error:
        cell["error"] = run.error
    return cell


def run_healthy(name: str, every: int, steps: int, logdir: Path) -> dict:
    """``steps`` healthy steps of table model ``name``: every finding is a false one."""
    run = _train(name, every, steps, logdir)
    cell = {
        "model": name,
        "every": every,
        "steps": run.steps,
        "false_findings": len(run.alerts),
        "escalations": run.escalations,
        "escalations_skipped": run.escalations_skipped,
        "said": [_said(a) for a in run.alerts[:5]],
        "kinds": sorted({a.kind for a in run.alerts}),
        "seconds": round(run.seconds, 1),
        "alerts": findings_json(run.alerts),
    }
    if run.error:
        cell["error"] = run.error
    return cell


def run_fault_table(
    models: list[str] | None = None,
    faults: list[str] | None = None,
    cadences: list[int] | None = None,
    healthy_steps: int = HEALTHY_STEPS,
    quick: bool = False,
) -> dict:
    """Every fault that applies to every model at every cadence, then the healthy runs
    (``healthy_steps`` 0: none). ``quick``: the smoke subset (``QUICK_SUBSET``, 60 healthy steps)
    unless models or faults are given."""
    if quick:
        models = models or list(QUICK_SUBSET["models"])
        faults = faults or list(QUICK_SUBSET["faults"])
        healthy_steps = min(healthy_steps, QUICK_HEALTHY_STEPS)
    models = models or list(TABLE_MODELS)
    faults = faults or list(FAULTS)
    cadences = cadences or list(CADENCES)
    for n in models:
        if n not in TABLE_MODELS:
            raise ValueError(f"unknown fault-table model {n!r}; choose from {', '.join(TABLE_MODELS)}")
    for f in faults:
        if f not in FAULTS:
            raise ValueError(f"unknown fault {f!r}; choose from {', '.join(FAULTS)}")
    t0 = time.perf_counter()
    table: dict = {"cells": [], "healthy": [], "healthy_steps": healthy_steps, "cadences": {}}
    table["cadences"] = {str(e): vars(CADENCES[e]) for e in cadences}
    with one_thread(), tempfile.TemporaryDirectory(prefix="bench-fault-table-") as tmp_s:
        tmp = Path(tmp_s)
        for name in models:
            m0 = time.perf_counter()
            for fault in faults:
                if fault not in TABLE_MODELS[name].sites:
                    continue
                for every in cadences:
                    try:
                        cell = run_cell(name, fault, every, tmp / f"{name}-{fault}-{every}")
                    except Exception:  # noqa: BLE001 - one cell failing must not stop the table
                        cell = {"model": name, "fault": fault, "every": every, "error": failure()}
                    table["cells"].append(cell)
            if healthy_steps:
                for every in cadences:
                    table["healthy"].append(run_healthy(name, every, healthy_steps, tmp / f"{name}-healthy-{every}"))
            log(f"fault table {name}: {time.perf_counter() - m0:.0f} s")
    table["models"] = {n: TABLE_MODELS[n].desc for n in models}
    table["seconds"] = round(time.perf_counter() - t0, 1)
    table["must_show"] = must_show(table)
    return table


# --------------------------------------------------------------------------- the Must show
def must_show(table: dict) -> list[str]:
    """The cells that miss the issue's "Must show" at the default cadence: named right, root cause
    first, latency ≤ 2 for a fault that changes a statistic at once; 0 false findings in the
    healthy steps. One line each, for the note to the lead."""
    misses = []
    for c in table["cells"]:
        cadence = CADENCES.get(c["every"])
        if cadence is None or not cadence.must:
            continue
        where = f"{c['model']} / {c['fault']} (every={c['every']})"
        if "error" in c and "right" not in c:
            misses.append(f"{where}: the run failed")
            continue
        why = []
        if not c["right"]:
            why.append(f"not named right (first said: {c['first'] or 'nothing'})")
        elif c["rank"] != 1:
            why.append("root cause attached to another finding" if c["attached"] else f"root cause rank {c['rank']}")
        if c["right"] and FAULTS[c["fault"]].at_once and c["latency"] > 2:
            why.append(f"latency {c['latency']} steps")
        if why:
            misses.append(f"{where}: " + "; ".join(why))
    for h in table["healthy"]:
        cadence = CADENCES.get(h["every"])
        if cadence is not None and cadence.must and (h["false_findings"] or "error" in h):
            what = "failed" if "error" in h else f"{h['false_findings']} false finding(s): {', '.join(h['kinds'])}"
            misses.append(f"{h['model']} healthy {h['steps']} steps (every={h['every']}): {what}")
    return misses


# --------------------------------------------------------------------------- markdown and files
FAULT_TABLE_BEGIN = "<!-- fault table: `scripts/bench --faults --out docs/benchmarks.md` rewrites from here -->"
FAULT_TABLE_END = "<!-- fault table: to here -->"


def _cell_text(c: dict | None) -> str:
    if c is None:
        return "—"
    if "right" not in c:
        return "error"
    if not c["right"]:
        return f"**missed** ({c['findings']}; first: {c['first'] or 'nothing'})"
    rank = "attached" if c["attached"] else f"#{c['rank']}"
    text = f"✓ +{c['latency']} {rank} ({c['findings']})"
    return text if c["rank"] == 1 else f"{text}; report opens with {_first_root_text(c)}"


def _first_root_text(c: dict) -> str:
    return c.get("first_root") or "—"


FAULT_TABLE_METHOD = (
    "Each cell plants one fault in a fresh, seeded model and trains it with Adam (lr 1e-3) under "
    "`watch(model, logdir, every=E, optimizer=opt, summary=False, graph=False)` on a fresh batch each "
    "step, on CPU with one thread. At every=50 the fault is planted at step {f50} (ten steps after the "
    "logging step 100) and the run ends at step {l50}, past the next regular logging step (150), so a "
    "finding that waits for the cadence shows as a latency of 40, not as a miss; at every=1 it is "
    "planted at step {f1} and the run ends at step {l1}. The exploding init is planted before step 0 "
    "(latency counts from 0). A cell reads: ✓ when a finding of an accepted kind names an accepted "
    "module at or after the fault step, then `+latency` in steps from the fault to the first such "
    "finding, `#rank` of the first right finding among the root causes in the report's order "
    "(earliest first; where findings carry `Alert.cause`, only those without one are roots, and "
    "`attached` means the right finding hangs under another one), and (N) the number of findings in "
    "the run. **missed** gives the first finding after the fault instead. The accepted modules and "
    "kinds of each cell are in the JSON (`--json`); in short: NaN/Inf faults → `nonfinite` at the "
    "planted layer; LR jump → any model-wide `grad_norm_spike`, `logit_divergence`, "
    "`exploding_gradient` or any kind named `loss*`/`update*`; dead layer → `dead_units` at the BN/pre-activation "
    "layer or the activation after it; q/k ×30 → `attention_entropy_collapse` or "
    "`attention_logit_growth` at the attention module; massive activation → `massive_activation` at the "
    "block; exploding init → any finding at the scaled layer (or the block holding it)."
)


def fault_table_markdown(table: dict, heading: str = "## Fault table") -> str:
    """The table as markdown: one row per model and fault, a column per cadence; the healthy runs;
    the cells that miss the Must show."""
    cad = table["cadences"]
    f50, f1 = cad.get("50", {}), cad.get("1", {})
    lines = [
        heading,
        "",
        FAULT_TABLE_METHOD.format(
            f50=f50.get("fault_step", "—"),
            l50=f50.get("last_step", "—"),
            f1=f1.get("fault_step", "—"),
            l1=f1.get("last_step", "—"),
        ),
        "",
        "Models: " + "; ".join(f"**{n}**: {d}" for n, d in table.get("models", {}).items()) + ".",
        "",
    ]
    everies = [int(e) for e in cad]
    lines += [
        "| model | fault | planted at | " + " | ".join(f"every={e}" for e in everies) + " |",
        "| --- | --- | --- |" + " --- |" * len(everies),
    ]
    cells = {(c["model"], c["fault"], c["every"]): c for c in table["cells"]}
    for name in table.get("models", {}):
        for fault, spec in FAULTS.items():
            if not any((name, fault, e) in cells for e in everies):
                continue
            site = TABLE_MODELS[name].sites[fault].module or "(optimizer)"
            row = " | ".join(_cell_text(cells.get((name, fault, e))) for e in everies)
            lines.append(f"| {name} | {spec.label} | `{site}` | {row} |")
    lines.append("")
    if table["healthy"]:
        lines += [
            f"Healthy runs ({table['healthy_steps']} steps, no fault): false findings, and the "
            "escalations of the cheap every-step signals (granted / skipped by their time budget, "
            "`escalate_share`): one granted before the fault step spends budget the fault's own "
            "escalation may need.",
            "",
            "| model | every | false findings | escalations (granted / skipped) | kinds (first few said) |",
            "| --- | ---: | ---: | ---: | --- |",
        ]
        for hr in table["healthy"]:
            count = "error" if "error" in hr else str(hr["false_findings"])
            escalations = f"{hr.get('escalations', '—')} / {hr.get('escalations_skipped', '—')}"
            said = ", ".join(hr["kinds"]) + (f" ({'; '.join(hr['said'][:3])})" if hr["said"] else "")
            lines.append(f"| {hr['model']} | {hr['every']} | {count} | {escalations} | {said or '—'} |")
        lines.append("")
    misses = table.get("must_show", [])
    lines += [f"Cells that miss the Must show of issue 25 (default cadence): {len(misses)}.", ""]
    lines += [f"- {m}" for m in misses]
    lines += ["", f"The table ran in {table['seconds']:.0f} s."]
    return "\n".join(lines) + "\n"


def write_fault_table(table: dict, md: str, out: Path | None, json_out: Path | None) -> None:
    """``json_out``: the table as JSON. ``out``: where it holds the fault-table markers (as
    docs/benchmarks.md does), the text between them is replaced by ``md`` (dated); the caller
    writes any other file."""
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(table, indent=1, default=str) + "\n")
    if out is not None and out.exists():
        text = out.read_text()
        if FAULT_TABLE_BEGIN in text and FAULT_TABLE_END in text:
            head, rest = text.split(FAULT_TABLE_BEGIN, 1)
            _, tail = rest.split(FAULT_TABLE_END, 1)
            out.write_text(f"{head}{FAULT_TABLE_BEGIN}\n\n{md}\n{FAULT_TABLE_END}{tail}")


def has_markers(out: Path) -> bool:
    """Whether ``out`` holds the fault-table markers (only that region is then rewritten)."""
    return out.exists() and FAULT_TABLE_BEGIN in out.read_text() and FAULT_TABLE_END in out.read_text()


def dated(md: str, machine: str) -> str:
    """``md`` with the date and machine under its heading."""
    first, _, rest = md.partition("\n")
    today = datetime.date.today().isoformat()
    return f"{first}\n\nRun {today} on {machine}.\n{rest}"
