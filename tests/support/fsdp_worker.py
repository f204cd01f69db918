"""One rank of a sharded (FSDP2 ``fully_shard``) run on CPU with gloo, for tests/runtime/test_fsdp.py.

Started like torchrun starts a worker; usage: ``fsdp_worker.py LOGDIR MODE RESULT_JSON [EVERY]``
with MODE ``watched``, ``plain`` (the same run unwatched), ``nan`` (watched; rank 1 alone gets a
NaN in its input at step 2), ``nan-linear`` (watched; rank 1's first Linear makes NaN at step 1), ``scaled`` (watched; rank 2 alone gets its input x100 at step
3, on 3 ranks), ``rank0`` (only rank 0 calls watch: it must not hang), or ``fsdp1``
/ ``fsdp1-flat`` (FSDP1 with one unit per Linear, with / without ``use_orig_params``). The model
has a block under activation checkpointing (``_checkpoint_wrapped_module.`` in its module
names), a layer of 4096 weights (the large-tensor path of the statistics) and a bias of one value
(rank 1's shard of it is empty). The rank writes what it saw to RESULT_JSON: the exact full
weights and gradients of each step (gathered with ``full_tensor()``, in both watched and plain
runs alike), the final weights, the watcher's names and findings, and its hook counts.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
import warnings
from pathlib import Path

# Run as a script (``python tests/support/fsdp_worker.py ...``): the checkout's root on sys.path, so that
# ``tests.support`` and this checkout's ``introspect`` are the ones imported.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    checkpoint_wrapper,
)
from torch.distributed.fsdp import fully_shard

import introspect.runtime.distributed
from introspect import watch
from introspect.records.stats import tensor_record
from tests.support.ddp_worker import alerts_of, finish

introspect.runtime.distributed.RANK_WAIT_S = 3.0  # a rank that never joins costs this once

torch.set_num_threads(1)


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 64)
        self.act = nn.Tanh()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.fc(x))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(6, 64)
        self.block = checkpoint_wrapper(Block())
        self.out = nn.Linear(64, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.block(torch.relu(self.inp(x))))


def full_stats(tensors: dict[str, torch.Tensor | None]) -> dict[str, list[float]]:
    """[numel, min, max, sum, bucket counts...] of each full (gathered) tensor."""
    found = {}
    for name, t in tensors.items():
        if t is None:
            continue
        full = (t.full_tensor() if hasattr(t, "full_tensor") else t).detach()
        row = tensor_record(full).tolist()
        found[name] = [full.numel(), row[1], row[2], full.double().sum().item(), *row[5:]]
    return found


def gathered(model: nn.Module):
    """FSDP1: the full parameters and gradients for a moment (FSDP2 gathers with full_tensor())."""
    if type(model).__name__ != "FullyShardedDataParallel":
        return contextlib.nullcontext()
    return type(model).summon_full_params(model, with_grads=model._use_orig_params)


def hook_counts(model: nn.Module) -> list[int]:
    return [len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()] + [
        len(getattr(p, "_post_accumulate_grad_hooks", None) or {}) for p in model.parameters()
    ]


def main() -> None:
    logdir, mode, result_path = sys.argv[1:4]
    every = int(sys.argv[4]) if len(sys.argv) > 4 else 1
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    net = Net()
    model: nn.Module = net
    if mode.startswith("fsdp1"):  # FSDP1: one unit per Linear (``_fsdp_wrapped_module.`` names)
        from torch.distributed.fsdp import FullyShardedDataParallel
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        model = FullyShardedDataParallel(
            net,
            auto_wrap_policy=ModuleWrapPolicy({nn.Linear}),
            use_orig_params=mode == "fsdp1",
            device_id=torch.device("cpu"),
        )
    else:
        for layer in (net.inp, net.block, net.out):
            fully_shard(layer)
        fully_shard(net)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(100 + rank)
    clock = [0]
    if mode == "nan-linear" and rank == 1:  # the user's own hook, before watch's: the Linear's output

        def poison(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
            return output * float("nan") if clock[0] == 1 else None

        poison_handle = net.inp.register_forward_hook(poison)
    before = hook_counts(model)
    weights, grads, times = [], [], []
    w = None
    caught = warnings.catch_warnings(record=True)
    seen = caught.__enter__()
    warnings.simplefilter("always")
    if mode != "plain" and (mode != "rank0" or rank == 0):
        w = watch(model, logdir, every=every, summary=False, graph=False)
    with w or contextlib.nullcontext():
        for step in range(5):
            clock[0] = step
            x = torch.randn(4, 6, generator=gen)
            y = torch.randn(4, 1, generator=gen)
            if mode == "nan" and rank == 1 and step == 2:
                x[0, 0] = float("nan")
            if mode == "scaled" and rank == 2 and step == 3:
                x = x * 100
            with gathered(model):
                weights.append(full_stats(dict(net.named_parameters())))
            opt.zero_grad()
            start = time.perf_counter()
            loss = F.mse_loss(model(x), y)
            times.append(time.perf_counter() - start)
            loss.backward()
            with gathered(model):
                grads.append(full_stats({n: p.grad for n, p in net.named_parameters()}))
            opt.step()
    caught.__exit__(None, None, None)
    if mode == "nan-linear" and rank == 1:
        poison_handle.remove()
    with gathered(model):
        final = {
            n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().tolist()
            for n, p in net.named_parameters()
        }
    result = {
        "rank": rank,
        "module_names": w.module_names if w else [],
        "parameter_names": w.parameter_names if w else [],
        "writes": w is not None and w.writer is not None,
        "alerts": alerts_of(w),
        "weights": weights,
        "grads": grads,
        "final": final,
        "hooks_before": before,
        "hooks_after": hook_counts(model),
        "forward_s": times,
        "warnings": [str(m.message) for m in seen if "introspect" in str(m.message)],
    }
    finish(result, result_path)


if __name__ == "__main__":
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    main()
