"""One story per fault: findings linked to the root cause they follow from (debugger/story.py),
the report and the ``diagnostics/alerts`` table that open with the roots, and a table written
once per step (records/findings.py)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from introspect import watch
from introspect.analysis.health_map_render import parse_alerts, read_alerts
from introspect.debugger.alerts import ADVICE, ROWS_PER_KIND, Alert, alerts_markdown, format_report
from introspect.debugger.story import Story
from tests.support import QUIET
from tests.support.events import read_events, text_of

ORDER = ["conv1", "bn1", "relu1", "conv2", "bn2", "relu2", "fc"]


def linked(story: Story, *alerts: Alert) -> list[str | None]:
    for alert in alerts:
        story.link(alert)
    return [a.cause.where if a.cause is not None else None for a in alerts]


# =========================================================================== the rules
def test_gradients_before_a_dead_layer_follow_from_it_even_when_it_is_named_later():
    story = Story(ORDER, window=5)
    grads = [Alert("vanishing_gradient", m, 3, "tiny") for m in ("conv1", "bn1")]
    spike = Alert("exploding_gradient", "fc", 4, "big")
    dead = Alert("dead_units", "relu2", 7, "100% dead")  # 4 steps after the gradients it silenced
    later_dead = Alert("dead_units", "relu1", 7, "dead too")  # before relu2: the earlier module is the root
    assert linked(story, *grads, spike) == [None, None, None]
    linked(story, dead, later_dead)
    assert [a.cause for a in (*grads, spike, dead)] == [later_dead] * 4
    assert later_dead.cause is None
    assert story.roots == [later_dead]
    assert story.followers(later_dead) == [dead, *grads, spike]  # the adopted root, then what it had


def test_a_dead_layer_does_not_adopt_what_lies_outside_its_window():
    story = Story(ORDER, window=5)
    old = Alert("vanishing_gradient", "conv1", 0, "tiny")
    far = Alert("vanishing_gradient", "conv2", 20, "tiny")
    dead = Alert("dead_units", "relu2", 10, "dead")
    assert linked(story, old, dead, far) == [None, None, None]
    assert story.roots == [old, dead, far]


def test_a_dead_unit_upstream_is_not_a_consequence_of_one_downstream():
    story = Story(ORDER, window=5)
    first = Alert("dead_units", "relu2", 3, "dead")
    upstream = Alert("dead_units", "relu1", 7, "dead")  # explains relu2, is not explained by it
    linked(story, first, upstream)
    assert first.cause is upstream and upstream.cause is None


def test_a_saturated_layer_explains_vanishing_gradients_not_exploding_ones():
    """examples/broken_training.py's lr=1 run: the weights blow up, tanh saturates and gradients
    explode at the same step; the saturation does not make gradients explode."""
    story = Story(ORDER, window=5)
    exploding = Alert("exploding_gradient", "conv1", 5, "big")
    vanishing = Alert("vanishing_gradient", "bn1", 5, "tiny")
    saturated = Alert("saturated_units", "relu1", 5, "90% at the bounds")
    assert linked(story, exploding, vanishing, saturated) == [None, "relu1", None]  # adopted
    assert vanishing.cause is saturated and exploding.cause is None


def test_everything_after_a_nan_step_follows_from_it_nothing_before():
    story = Story(ORDER, window=2)
    before = Alert("exploding_gradient", "fc", 4, "big")
    nan = Alert("nonfinite", "bn2", 5, "NaN here", phase="forward")
    weights = Alert("nonfinite", "conv1.weight", 6, "weights NaN")
    same_step_other = Alert("nonfinite", "conv2", 5, "NaN too")  # another origin at the NaN step: its own root
    attention = Alert("attention_entropy_collapse", "fc", 400, "collapse")  # no window: the NaN stays
    assert linked(story, before, nan, weights, same_step_other, attention) == [None, None, "bn2", None, "bn2"]


def test_a_spike_explains_what_follows_it_within_the_window():
    story = Story(ORDER, window=3)
    spike = Alert("grad_norm_spike", "model", 10, "spike")
    divergence = Alert("logit_divergence", "model", 12, "diverged")
    nan = Alert("nonfinite", "fc", 11, "NaN")
    same_step_nan = Alert("nonfinite", "conv1", 10, "NaN")  # not after the spike: the NaN came first
    assert linked(story, spike, divergence, nan, same_step_nan) == [None, "model", "model", None]
    story = Story(ORDER, window=3)
    too_late = Alert("logit_divergence", "fc", 14, "diverged")
    assert linked(story, Alert("grad_norm_spike", "model", 10, "spike"), too_late) == [None, None]


def test_logit_growth_explains_a_collapse_of_its_module_or_one_after_it():
    story = Story(["a", "b"], window=2)
    growth = Alert("attention_logit_growth", "b", 6, "grows")
    before = Alert("attention_entropy_collapse", "a", 6, "collapse")
    same = Alert("attention_entropy_collapse", "b", 5, "collapse")
    assert linked(story, growth, before, same) == [None, None, "b"]


def test_cause_is_always_a_root_and_never_compared():
    story = Story(ORDER, window=5)
    grad = Alert("vanishing_gradient", "conv1", 3, "tiny")
    dead = Alert("dead_units", "relu2", 4, "dead")
    root = Alert("dead_units", "relu1", 4, "dead")
    linked(story, grad, dead, root)
    assert grad.cause is root and dead.cause is root  # moved under the new root, not chained
    assert Alert("vanishing_gradient", "conv1", 3, "tiny") == grad  # cause takes no part in ==


def test_linking_is_incremental(monkeypatch):
    """Each finding is checked against the open roots that have a rule (a few), not every finding,
    and a root named later looks back once over the roots it may adopt: checks grow with the
    findings, not with their square (10,000 gradient findings, a dead layer, 10,000 more)."""
    order = [f"layer{i}" for i in range(20_000)] + ["relu"]
    story = Story(order, window=5)
    calls = []
    real = story.explains
    monkeypatch.setattr(story, "explains", lambda r, a: calls.append(1) or real(r, a))
    for i in range(10_000):
        story.link(Alert("vanishing_gradient", f"layer{i}", 0, "tiny"))
    assert calls == []  # no root with a rule: nothing to check against
    dead = Alert("dead_units", "relu", 3, "dead")
    story.link(dead)  # adopts the 10,000 it explains, looking at each once (both ways)
    assert len(calls) <= 2 * 10_000
    for i in range(10_000, 20_000):
        story.link(Alert("vanishing_gradient", f"layer{i}", 4, "tiny"))
    assert len(calls) <= 3 * 10_000  # then one open root to check each new finding against
    assert story.roots == [dead] and len(story.followers(dead)) == 20_000


# =========================================================================== the texts
def story_alerts() -> list[Alert]:
    story = Story(ORDER, window=5)
    alerts = [Alert("vanishing_gradient", m, 3, f"RMS gradient 1e-{9 + i}") for i, m in enumerate(ORDER[:4])]
    alerts.append(
        Alert("dead_units", "relu2", 7, "100% of the units of relu2 (ReLU) output zero", {"dead_fraction": 1.0})
    )
    alerts.append(Alert("stuck_parameter", "fc.bias", 8, "not learning"))
    for a in alerts:
        story.link(a)
    return alerts


def test_report_opens_with_the_root_and_its_story():
    text = format_report(story_alerts(), 10)
    lines = text.splitlines()
    assert lines[0] == "introspect: 6 findings in 10 steps: 2 root causes first, then what followed"
    assert lines[2].split()[:3] == ["7", "dead_units", "relu2"]
    assert lines[3].strip() == f"try: {ADVICE['dead_units']}"
    assert lines[4].strip() == (
        "followed by 4 findings: vanishing_gradient at conv1 (step 3), vanishing_gradient at bn1 (step 3), "
        "vanishing_gradient at relu1 (step 3), and 1 more"
    )
    assert lines[5].split()[:3] == ["8", "stuck_parameter", "fc.bias"]
    assert "conv2" not in text  # listed only as "1 more"


def test_markdown_roots_first_and_read_back_with_their_links():
    alerts = story_alerts()
    text = alerts_markdown(alerts)
    rows = text.splitlines()[2:]
    assert rows[0].startswith("| 7 | dead_units | `relu2` | 100% of the units")
    assert "**Try:** check the BatchNorm" in rows[0] and "**Followed by 4 findings: " in rows[0]
    assert rows[1].startswith("| 8 | stuck_parameter | `fc.bias` |")
    assert rows[2] == "| 3 | vanishing_gradient | `conv1` | after dead_units at `relu2` (step 7): RMS gradient 1e-9 |"
    back = parse_alerts(text)
    assert [(a.kind, a.where, a.step, a.message) for a in back] == [
        (a.kind, a.where, a.step, a.message) for a in [alerts[4], alerts[5], *alerts[:4]]
    ]
    assert [a.cause.where if a.cause else None for a in back] == [None, None] + ["relu2"] * 4


def test_rows_per_kind_and_step_are_capped_and_the_rest_counted():
    alerts = [Alert("vanishing_gradient", f"l{i}", 2, "tiny") for i in range(2_420)]
    text = alerts_markdown(alerts)
    assert len(parse_alerts(text)) == ROWS_PER_KIND
    assert text.splitlines()[-1] == "- and 2,400 more vanishing_gradient findings at step 2"
    report = format_report(alerts, 3)
    assert report.splitlines()[-1].strip() == "and 2,400 more vanishing_gradient findings at step 2"
    assert len(report.splitlines()) == 2 + ROWS_PER_KIND + 1 + 1  # title, header, rows, one "try" (per kind), rest
    assert report.splitlines()[0] == "introspect: 2,420 findings in 3 steps"


# =========================================================================== end to end
class Ladder(nn.Module):
    """``n`` tiny Linear layers, each scaling by 1e-3: the gradient reaching the first layers is
    ~0, so every one of them is a vanishing_gradient finding (the issue's 1,000-layer case)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(2, 2) for _ in range(n))
        with torch.no_grad():
            for layer in self.layers:
                layer.weight.copy_(torch.eye(2) * 1e-3)
                layer.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x) * 1e3 if layer is self.layers[-1] else layer(x) + 1.0
        return x


@pytest.mark.parametrize("layers", [100, 1000])
def test_the_alerts_text_is_written_once_per_step_and_grows_with_the_findings(tmp_path, layers):
    """Issue 30: 1,000 small layers made 2,937 findings and a 531 MB event file in 2 steps (the
    table rewritten on every finding). Now: at most one text per step plus the whole story once,
    each table at most ROWS_PER_KIND rows per kind and step, so its size is bounded by rows."""
    model = Ladder(layers)
    steps = 2
    log = ("grads",)  # gradients only: the findings are what this test is about
    with watch(model, tmp_path, every=1, log=log, **QUIET) as w:
        for _ in range(steps):
            model(torch.randn(4, 2)).sum().backward()
    found = len(w.alerts)
    assert found >= layers // 2  # most layers' gradients vanish
    texts = text_of(read_events(tmp_path), "diagnostics/alerts")
    assert 1 <= len(texts) <= steps + 1
    for text in texts:
        rows = parse_alerts(text)
        kinds_steps = {(a.kind, a.step) for a in rows}
        assert len(rows) <= ROWS_PER_KIND * len(kinds_steps)
        assert len(text) <= 400 * (len(rows) + 4)  # a row's size, not the table's
    assert "more vanishing_gradient findings at step 0" in texts[-1]
    assert sum(map(len, texts)) <= 400 * (steps + 1) * (ROWS_PER_KIND * 2 + 4)  # not O(findings²), nor O(findings)


def test_a_step_with_no_new_finding_writes_no_alerts_text(tmp_path):
    from examples.broken_training import mlp

    torch.manual_seed(0)
    model = mlp([8, 32, 32, 1], nn.ReLU)
    with torch.no_grad():
        model.fc2.bias.fill_(-10.0)  # act2 dead from the start: every finding at step 0
    with watch(model, tmp_path, every=2, **QUIET) as w:
        for _ in range(5):
            F.mse_loss(model(torch.randn(64, 8)), torch.randn(64, 1)).backward()
    assert [(a.kind, a.where, a.cause.where if a.cause else None) for a in w.alerts] == [
        ("dead_units", "act2", None),
        ("vanishing_gradient", "fc2", "act2"),
        ("vanishing_gradient", "fc1", "act2"),
    ]
    acc = read_events(tmp_path)
    steps = [e.step for e in acc.Tensors("diagnostics/alerts/text_summary")]
    assert steps == [0]  # one text: step 0's findings were all of them, and nothing came after
    assert [(a.kind, a.where, a.step) for a in read_alerts(acc)] == [
        (a.kind, a.where, a.step) for a in [x for x in w.alerts if x.cause is None] + [x for x in w.alerts if x.cause]
    ]


def test_mobilenet_dead_batchnorm_is_the_first_root_with_the_gradients_attached(tmp_path):
    """Issue 25's case: MobileNetV3-small, one BatchNorm's bias set to -100 at step 3, so the
    ReLU after it (features.1.block.0.2) is dead. Its gradient findings come at once; the dead
    verdict needs 64 samples, so it comes a few steps later and adopts them."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v3_small(weights=None, num_classes=10)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
    with watch(model, tmp_path, every=1, log=("activations", "grads"), **QUIET) as w:
        for step in range(9):
            if step == 3:
                with torch.no_grad():
                    model.features[1].block[0][1].bias.fill_(-100.0)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    roots = [a for a in w.alerts if a.cause is None]
    assert roots, w.report()
    first = min(roots, key=lambda a: a.step)
    assert (first.kind, first.where) == ("dead_units", "features.1.block.0.2"), w.report()
    gradients = [a for a in w.alerts if a.kind in ("vanishing_gradient", "exploding_gradient") and a.step >= 3]
    assert gradients and all(a.cause is first for a in gradients), w.report()
    report = w.report().splitlines()
    assert report[2].split()[:3] == [str(first.step), "dead_units", "features.1.block.0.2"]
    assert report[3].strip().startswith("try: check the BatchNorm")
    assert report[4].strip().startswith(f"followed by {sum(1 for a in w.alerts if a.cause is first)} findings")
    table = text_of(read_events(tmp_path), "diagnostics/alerts")[-1]
    assert table.splitlines()[2].startswith(f"| {first.step} | dead_units | `features.1.block.0.2` |")
    assert not math.isnan(first.numbers["dead_fraction"])
