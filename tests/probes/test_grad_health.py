"""The gradient-flow figure (``diagnostics/grad_flow``) under the live figures' one budget
(``ProbeContext.figures``, shared with the health map): the first figure at once, later news when
it fits ``RENDER_SHARE`` of the run's time, and always at close."""

from __future__ import annotations

import torch
from torch import nn

from introspect import watch
from introspect.records.tags import GRAD_FLOW_TAG
from tests.support import QUIET
from tests.support.events import read_events


def relu_stack() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 1))


SILENCE = {2: 2, 5: 4}
"""Step -> the layer whose weights become 0 then: every layer below it gets no gradient from then
on (a new gradient finding at each of those steps: layer 0 at step 2, layer 2 at step 5)."""


def train(logdir, steps: int = 8):  # type: ignore[no-untyped-def]
    model = relu_stack()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(1)
    with watch(model, logdir, every=1, optimizer=opt, **QUIET) as w:
        for step in range(steps):
            if step in SILENCE:
                with torch.no_grad():
                    model[SILENCE[step]].weight.zero_()
            x = torch.randn(32, 8, generator=g)
            loss = nn.functional.mse_loss(model(x), x[:, :1])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return w


def grad_flow_steps(logdir) -> list[int]:  # type: ignore[no-untyped-def]
    return [e.step for e in read_events(logdir).Images(GRAD_FLOW_TAG)]


def test_news_waits_for_the_figures_budget_and_is_drawn_at_close(tmp_path):
    w = train(tmp_path / "run")
    news = sorted({a.step for a in w.alerts if a.kind in ("vanishing_gradient", "exploding_gradient")})
    assert news == sorted(SILENCE), w.alerts
    # The first news is drawn at once; the figures' budget (0.5% of a ~1 s run) is then spent, so
    # the next news waits: for the close, which draws the latest state.
    steps = grad_flow_steps(tmp_path / "run")
    assert steps == [news[0], 7], (steps, news)


def test_with_time_to_spend_every_news_is_drawn_when_it_comes(tmp_path, monkeypatch):
    from introspect.probes import time_share

    monkeypatch.setattr(time_share, "RENDER_SHARE", float("inf"))
    w = train(tmp_path / "run")
    news = sorted({a.step for a in w.alerts if a.kind in ("vanishing_gradient", "exploding_gradient")})
    steps = grad_flow_steps(tmp_path / "run")
    assert news == sorted(SILENCE) and set(news) <= set(steps) and steps[-1] == 7, steps
