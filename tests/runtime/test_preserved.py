"""Extra forwards leave no trace, even for a model that changes its own state in ``forward``: a
MoCo/BYOL-style student with a momentum (EMA) teacher updated inside ``forward`` and a queue of
keys with its pointer, kept as plain tensor attributes (one of them rebound, one written in place).
The first batch's summary and graph, and the non-finite replay, run that ``forward`` again; the
watched run must end bitwise where the unwatched twin ends."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from introspect import watch
from introspect.runtime.preserved import preserved_state

QUEUE = 12


class MoCo(nn.Module):
    """Student, EMA teacher (momentum 0.9, updated in forward), a queue written in place at a
    pointer tensor, a second queue rebound each call, BatchNorm buffers and dropout's RNG."""

    def __init__(self) -> None:
        super().__init__()
        self.student = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 4))
        self.teacher = copy.deepcopy(self.student)
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.queue = F.normalize(torch.randn(QUEUE, 4), dim=1)  # a plain attribute, written in place
        self.ptr = torch.zeros((), dtype=torch.long)  # a plain attribute, advanced in place
        self.recent = torch.zeros(3, 4)  # a plain attribute, rebound every call
        self.nan_at: int | None = None
        self.step = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.nan_at == self.step:
            x = x * float("nan")
        q = F.normalize(self.student(x), dim=1)
        with torch.no_grad():
            for ps, pt in zip(self.student.parameters(), self.teacher.parameters()):
                pt.mul_(0.9).add_(ps.detach(), alpha=0.1)
            k = F.normalize(self.teacher(x + 0.01 * torch.randn_like(x)), dim=1)
        positive = (q * k).sum(1, keepdim=True)
        negative = q @ self.queue.clone().T  # (MoCo reads a copy: the queue changes below)
        logits = torch.cat([positive, negative], dim=1) / 0.2
        with torch.no_grad():
            start = int(self.ptr)
            self.queue[start : start + k.shape[0]] = k
            self.ptr.copy_((self.ptr + k.shape[0]) % QUEUE)
            self.recent = torch.cat([k[:1], self.recent[:-1]])
        return logits


def _state(model: MoCo) -> dict[str, torch.Tensor]:
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state.update(queue=model.queue.clone(), ptr=model.ptr.clone(), recent=model.recent.clone())
    return state


def _assert_bitwise(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], when: str) -> None:
    assert a.keys() == b.keys()
    for key in a:
        x, y = a[key], b[key]
        same = torch.equal(x, y) or (
            x.is_floating_point() and torch.equal(x.isnan(), y.isnan()) and torch.equal(x.nan_to_num(), y.nan_to_num())
        )
        assert same, f"{when}: {key} differs by {(x.float() - y.float()).abs().nan_to_num().max().item()}"


def _run(
    watched: bool, tmp_path, steps: int = 3, nan_at: int | None = None, first_batch: bool = True
) -> tuple[list, list, object]:
    torch.manual_seed(0)
    model = MoCo()
    model.nan_at = nan_at
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    states, losses = [], []
    w = None

    def loop() -> None:
        for i in range(steps):
            model.step = i
            x = torch.randn(4, 6)
            logits = model(x)
            loss = F.cross_entropy(logits, torch.zeros(4, dtype=torch.long))
            opt.zero_grad()
            loss.backward()
            states.append(("after backward", _state(model)))
            opt.step()
            states.append(("after the step", _state(model)))
            losses.append(loss.detach().clone())

    if watched:
        with watch(model, str(tmp_path / "run"), every=1, summary=first_batch, graph=first_batch) as w:
            loop()
    else:
        loop()
    return states, losses, w


def test_momentum_teacher_and_queue_bitwise_with_summary_and_graph(tmp_path, capsys):
    bare, bare_losses, _ = _run(False, tmp_path)
    seen, seen_losses, w = _run(True, tmp_path)
    assert "Linear" in capsys.readouterr().out  # the summary ran (its forwards are the point)
    assert len(bare) == len(seen) == 6
    for i, ((when, a), (_, b)) in enumerate(zip(bare, seen)):
        _assert_bitwise(a, b, f"step {i // 2} {when}")
    for a, b in zip(bare_losses, seen_losses):
        assert torch.equal(a, b)
    assert int(seen[-1][1]["ptr"]) == (3 * 4) % QUEUE  # the real forwards moved it, ours did not


def test_momentum_teacher_and_queue_bitwise_through_a_nan_replay(tmp_path):
    bare, _, _ = _run(False, tmp_path, steps=3, nan_at=1)
    seen, _, w = _run(True, tmp_path, steps=3, nan_at=1, first_batch=False)  # the replay alone
    origins = [a for a in w.alerts if a.kind == "nonfinite" and a.step == 1]
    assert origins, [str(a) for a in w.alerts]  # the replay ran and named an origin
    assert origins[0].where.startswith("student"), str(origins[0])
    for i, ((when, a), (_, b)) in enumerate(zip(bare, seen)):
        _assert_bitwise(a, b, f"step {i // 2} {when}")


def test_a_rebound_buffer_and_a_resized_parameter_are_put_back():
    model = nn.Linear(3, 2)
    model.register_buffer("count", torch.zeros(2))
    weight, count = model.weight, model.count
    before = weight.detach().clone()
    with preserved_state(model):
        model.count = model.count + 1  # rebinds the registered buffer
        model.weight.data = torch.ones(5, 5)  # a different shape through .data
        model.weight.add_(1)
    assert model.count is count and torch.equal(count, torch.zeros(2))
    assert model.weight is weight and torch.equal(model.weight, before)


def test_nested_preserved_state_copies_once_and_still_restores():
    model = nn.Linear(3, 2)
    before = model.weight.detach().clone()
    with preserved_state(model):
        with preserved_state(model):
            model.weight.mul_(2)
        model.weight.mul_(3)
    assert torch.equal(model.weight, before)


def test_a_torchscript_module_is_put_back():
    """A scripted module's tables are not dicts (``OrderedDictWrapper``): values still go back."""
    model = torch.jit.script(nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2)))
    weight, mean = model[0].weight.detach().clone(), model[1].running_mean.clone()
    with preserved_state(model):
        model[0].weight.add_(1)
        model.train()(torch.randn(4, 3))  # updates the running mean
    assert torch.equal(model[0].weight, weight) and torch.equal(model[1].running_mean, mean)
