"""A logging step makes few Python objects per module: each Python object brings the next garbage
collection nearer, and on a large process heap a full one costs hundreds of milliseconds.

Counted, not timed: the hook handles torch makes (``RemovableHandle`` ids, one per handle ever
made) on a logging step after the first, on MLP stacks of 11 and 41 modules; and the host side of
a step (records, measures) against the device values it came from.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle

from introspect import watch
from introspect.records.stats import HistogramRecord, RecordBatch
from introspect.records.step import StepBuffer, one_transfer, transfer_array
from tests.support import QUIET


def mlp(modules: int) -> nn.Sequential:
    """(modules - 1) / 2 blocks of (Linear 32->32, ReLU)."""
    layers: list[nn.Module] = []
    for _ in range((modules - 1) // 2):
        layers += [nn.Linear(32, 32), nn.ReLU()]
    return nn.Sequential(*layers)


def handles_per_logging_step(modules: int, tmp_path) -> int:
    """Hook handles made during the third logging step (and the step that closes it)."""
    torch.manual_seed(0)
    model = mlp(modules)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x, y = torch.randn(8, 32), torch.randn(8, 32)

    def step() -> None:
        loss = F.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    with watch(model, tmp_path / str(modules), every=2, **QUIET) as w:
        for _ in range(4):  # logging steps 0 and 2: every hook has been made once
            step()
        before = RemovableHandle.next_id
        step()  # step 4 logs
        step()  # and step 5 closes it
        made = RemovableHandle.next_id - before
        assert w.step == 5
    return made


def test_a_logging_step_makes_one_hook_handle_per_module_output_and_no_other(tmp_path):
    small = handles_per_logging_step(11, tmp_path)
    large = handles_per_logging_step(41, tmp_path)
    # 30 more modules (15 Linear, 15 ReLU; 30 more parameters): one gradient hook on each new
    # output tensor (a fresh tensor every step, so a fresh handle), none for the modules' forward
    # hooks or the parameters' accumulation hooks, which are put back under their old handles.
    assert large - small == 30, (small, large)


def test_records_on_the_host_are_the_rows_of_one_array():
    batch = RecordBatch()
    tensors = [torch.randn(50), torch.randn(3, 7), torch.tensor([1.0, math.nan, 2.0]), torch.zeros(4)]
    for t in tensors:
        batch.add(t)
    rows = batch.compute()
    fixed = batch.masked_rows([2])
    one_by_one = []
    for i, t in enumerate(tensors):
        row = (fixed[0] if i == 2 else rows[i]).tolist()
        one_by_one.append(HistogramRecord.from_row(t.numel(), row))
    host = rows.cpu().to(torch.float64).numpy().copy()
    host[2] = fixed[0].cpu().numpy()
    together = HistogramRecord.from_rows(batch.numels, host)
    for a, b in zip(one_by_one, together):
        assert (a.numel, a.nonfinite, a.min, a.max, a.sum, a.sum_squares) == (
            b.numel,
            b.nonfinite,
            b.min,
            b.max,
            b.sum,
            b.sum_squares,
        )
        assert type(b.min) is float and type(b.sum) is float
        assert b.count_list() == list(a.counts)
        assert all(type(c) is float for c in b.count_list())
    assert not host.flags.writeable  # the records' counts are views of it: frozen
    assert HistogramRecord.merge(together[:2]) == HistogramRecord.merge(one_by_one[:2])


def test_one_array_transfer_holds_the_same_values_as_the_list():
    parts = [torch.randn(5, dtype=torch.float32), torch.tensor([1.5, -2.25]), torch.randn(3, dtype=torch.float64)]
    assert transfer_array(parts).tolist() == one_transfer(parts)
    scalars = [torch.tensor(0.1), torch.tensor(3.0)]
    assert transfer_array(scalars).tolist() == one_transfer(scalars)
    assert transfer_array([]).shape == (0,)


def test_measures_added_as_a_block_read_back_in_order_and_the_last_value_wins():
    buffer = StepBuffer(step=0, logging=True, checking=False)
    buffer.add_measure("first", torch.tensor(1.0))
    buffer.add_measures(("dead/a", "dead/b", "dead/c"), torch.tensor([0.1, 0.2, 0.3]))
    buffer.add_measure("dead/b", torch.tensor(0.9))  # a second call of module b: the later value
    buffer.add_measures(("dead/c", "other"), torch.tensor([0.7, 0.8]))  # c again: one at a time
    buffer.add_measure("last", torch.tensor(2.0))
    assert buffer.measure("dead/a") is not None and buffer.measure("nothing") is None
    host = buffer.to_host()
    assert list(host.measures) == ["first", "dead/a", "dead/b", "dead/c", "other", "last"]
    got = np.array(list(host.measures.values()))
    want = np.array([1.0, 0.1, 0.9, 0.7, 0.8, 2.0], dtype=np.float32).astype(np.float64)
    assert got.tolist() == want.tolist()
