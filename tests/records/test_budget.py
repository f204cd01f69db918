"""The tag budget of a large model (records/budget.py): which modules' tags are written, the
block roll-ups, the ceiling, and the health-data text that keeps every module on the map."""

from __future__ import annotations

import math

import pytest

from introspect.debugger.alerts import Alert
from introspect.records.budget import (
    MAX_BLOCKS,
    OTHER_BLOCK,
    TagBudget,
    blocks_of,
    evenly_spaced,
    health_data_text,
    parse_health_data,
)
from introspect.records.stats import HistogramRecord
from introspect.records.step import HostStep
from introspect.records.tags import block_tag, tag


def record(values: list[float], nonfinite: float = 0.0) -> HistogramRecord:
    return HistogramRecord(
        numel=len(values) + int(nonfinite),
        nonfinite=nonfinite,
        min=min(values),
        max=max(values),
        sum=sum(values),
        sum_squares=sum(v * v for v in values),
        counts=(float(len(values)),),
    )


def test_evenly_spaced_keeps_first_and_last():
    names = [str(i) for i in range(10)]
    assert evenly_spaced(names, 4) == ["0", "3", "6", "9"]
    assert evenly_spaced(names, 20) == names
    assert evenly_spaced(names, 1) == ["0"]


def test_blocks_of_a_decoder_and_of_a_long_flat_stack():
    decoder = ["model.embed_tokens", "model.layers.0.self_attn.q_proj", "model.layers.0.mlp", "model.layers.11.mlp"]
    decoder += ["model.norm", "lm_head"]
    blocks = blocks_of(decoder)
    assert blocks["model.layers.0.self_attn.q_proj"] == blocks["model.layers.0.mlp"] == "model.layers.0"
    assert blocks["model.layers.11.mlp"] == "model.layers.11"
    assert blocks["lm_head"] == blocks["model.norm"] == OTHER_BLOCK
    flat = [str(i) for i in range(800)]  # nn.Sequential of 800 modules: names are the indices
    groups = set(blocks_of(flat).values())
    assert len(groups) == MAX_BLOCKS
    assert blocks_of(flat)["0"] == "0-24" and blocks_of(flat)["799"] == "775-799"


def test_a_small_model_writes_everything():
    budget = TagBudget(["a", "b"], {"a.weight": "a"}, max_modules=100)
    host = HostStep(0, {tag("activations", "a"): record([1.0, 2.0])}, {}, {})
    assert not budget.active and budget.select(host) is host


def large(count: int = 300, max_modules: int = 20) -> TagBudget:
    modules = [str(i) for i in range(count)]
    return TagBudget(modules, {f"{m}.weight": m for m in modules}, max_modules=max_modules)


def test_a_large_model_writes_a_sample_plus_the_modules_findings_name():
    budget = large()
    assert budget.active and len(budget.kept) == 10 and {"0", "299"} <= budget.kept
    histograms = {tag("activations", m): record([1.0, -1.0]) for m in map(str, range(300))}
    histograms |= {tag("grads", f"{m}.weight"): record([3.0, 4.0]) for m in map(str, range(300))}
    host = HostStep(0, histograms, {}, {})
    written = budget.select(host)
    assert {t.split("/")[1].split(".")[0] for t in written.histograms} == budget.kept
    assert len(host.histograms) == 600  # what the health map and the debugger read is untouched
    # every module is in a block roll-up: 300 modules in ranges of ceil(300 / 32) = 10 indices
    rollups = {t: v for t, v in written.scalars.items() if t.startswith("blocks/")}
    assert len([t for t in rollups if t.startswith("blocks/grad_rms/")]) == 0  # no activation grads given
    assert len([t for t in rollups if t.startswith("blocks/activation_rms/")]) == 30
    assert rollups[block_tag("activation_rms", "0-9")] == pytest.approx(1.0)
    assert rollups[block_tag("grad_norm", "0-9")] == pytest.approx(math.sqrt(10 * 25.0))
    budget.admit([Alert("dead_units", "150", 0, "dead"), Alert("vanishing_gradient", "151.weight", 0, "small")])
    assert {"150", "151"} <= budget.kept
    assert tag("activations", "150") in budget.select(host).histograms


def test_findings_fill_at_most_the_other_half_of_the_budget():
    budget = large(max_modules=20)
    budget.admit([Alert("dead_units", str(i), 0, "dead") for i in range(1, 299)])
    assert len(budget.kept) == 20


def test_the_ceiling_holds_whatever_is_asked():
    budget = TagBudget([str(i) for i in range(300)], {}, max_modules=250, ceiling=40)
    host = HostStep(0, {tag("activations", str(i)): record([1.0]) for i in range(300)}, {}, {})
    with pytest.warns(UserWarning, match="max_modules=None"):
        written = budget.select(host)
    assert len(budget.written) <= 40 and len(written.histograms) + len(written.scalars) <= 40
    assert budget.dropped > 0


def test_an_explicit_include_keeps_every_module():
    budget = TagBudget([str(i) for i in range(300)], {}, max_modules=20, explicit=True)
    assert budget.active and len(budget.kept) == 300


def test_health_data_round_trip():
    values = {"grad_rms": {"a": 0.5, "b": 1e-9}, "activation_std": {"a": 2.0}, "dead_fraction": {}}
    rows, back = parse_health_data(health_data_text(values, ["a", "b"]))
    assert rows == ["a", "b"]
    assert back == {"grad_rms": {"a": 0.5, "b": 1e-9}, "activation_std": {"a": 2.0}}
