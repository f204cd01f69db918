"""Non-finite inputs to a statistic are not a verdict (issue 25, item 4): a NaN run of a tiny
Qwen2 has no attention finding, its attention is counted as not measurable, every tag keeps its
prefix, and the health map draws only modules."""

from __future__ import annotations

import warnings

import pytest
import torch

from introspect import NonFiniteWarning, watch
from introspect.analysis.health_map_render import health_map_from_events
from introspect.probes.transformer import logit_stats
from tests.support import QUIET
from tests.support.events import read_events
from tests.support.hf_models import tiny_decoder

transformers = pytest.importorskip("transformers")

VOCAB, SEQ = 64, 10
ATTENTION_KINDS = {"attention_entropy_collapse", "attention_logit_growth"}


def tiny_qwen2(impl: str) -> torch.nn.Module:
    return tiny_decoder("qwen2", impl)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_a_nan_run_has_no_attention_finding(tmp_path, impl):
    model = tiny_qwen2(impl)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    ids = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NonFiniteWarning)
        with watch(model, tmp_path, every=1, **QUIET) as w:
            for step in range(4):
                if step == 2:
                    with torch.no_grad():
                        model.model.layers[0].self_attn.k_proj.weight[0, 0] = float("nan")
                loss = model(input_ids=ids, labels=ids).loss
                opt.zero_grad()
                loss.backward()
                opt.step()
    kinds = {a.kind for a in w.alerts}
    assert "nonfinite" in kinds, w.report()
    assert not kinds & ATTENTION_KINDS, w.report()
    first = min((a for a in w.alerts if a.cause is None), key=lambda a: a.step)
    assert first.kind == "nonfinite" and first.step == 2, w.report()
    assert all(a.cause is first for a in w.alerts if a.step > 2 and a is not first), w.report()

    acc = read_events(tmp_path)
    scalars = set(acc.Tags()["scalars"])
    attention = "model.layers.0.self_attn"
    # Counted: at step 2 the 2 query heads that share the key head with the NaN weight (grouped-
    # query attention), at step 3 all 4 (the optimizer spread the NaN to every weight).
    counted = {e.step: e.value for e in acc.Scalars(f"attention/not_measurable/{attention}")}
    assert counted == {2: 2.0, 3: 4.0}
    entropy = {e.step: e.value for e in acc.Scalars(f"attention/entropy/{attention}")}
    assert set(entropy) == {0, 1, 2} and all(v > 0.5 for v in entropy.values())  # step 2: the 2 good heads; 3: none
    # Every tag keeps its prefix: no "nonfinite/max_logit_heads/..." that reads like a module.
    modules = {name for name, _ in model.named_modules() if name}
    params = {name for name, _ in model.named_parameters()}
    for full in (t for t in scalars if t.startswith("nonfinite/")):
        name = full.removeprefix("nonfinite/")
        assert name.split("/")[0] in modules | params or name.startswith(("attention/", "moe/")), full
    assert not [t for t in scalars if "heads" in t and not t.startswith(("attention/", "nonfinite/attention/"))]
    # The health map's rows are modules.
    hm = health_map_from_events(tmp_path)
    assert hm.rows and all(row.split("/")[0] in modules for row in hm.rows), hm.rows


def test_logit_stats_of_nan_logits_are_not_measurable():
    """A NaN score fails the mask test (NaN > x is False): read as masked, it would shrink a row
    to the keys left and fake a collapse. The head is not measurable instead; the other head is."""
    logits = torch.randn(1, 2, 4, 6)
    logits[0, 0, 1, 2] = float("nan")
    max_logit, entropy, normalised = logit_stats(logits, logits, logits > -1e30)
    assert torch.isnan(max_logit[0]) and torch.isnan(entropy[0]) and torch.isnan(normalised[0])
    assert torch.isfinite(max_logit[1]) and torch.isfinite(entropy[1]) and entropy[1] > 0.5
    assert 0 < normalised[1] <= 1
    masked = logits.clone()
    masked[0, 1, :, 3:] = float("-inf")  # a mask, not a fault: still measurable
    _, entropy, normalised = logit_stats(masked, masked, masked > -1e30)
    assert torch.isfinite(entropy[1]) and torch.isfinite(normalised[1])
