"""One rank of a 2-process DistributedDataParallel run on CPU (gloo), for tests/runtime/test_distributed.py.

Started like torchrun starts a worker (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT in the
environment); usage: ``ddp_worker.py LOGDIR RANKS_MODE RESULT_JSON [ON_NONFINITE [WATCHED [CHECK_MODE]]]``
(WATCHED: "all" ranks call watch, or "0": rank 0 only). Each rank
trains on batches of its own size (rank k: 3 + 2k samples), so rank-local and averaged numbers
differ. On rank 1 only, ``poison`` writes NaN into its output at step 2, and ``side`` puts NaN into
an output nobody reads at step 4 (a NaN that never reaches the gradients, so no rank but rank 1
can know of it, and only its per-module check: the sentinel looks at outputs and gradients). The rank writes what it saw to RESULT_JSON.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path

# Run as a script (``python tests/support/ddp_worker.py ...``): the checkout's root on sys.path, so that
# ``tests.support`` and this checkout's ``introspect`` are the ones imported.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import introspect.runtime.distributed
from introspect import NonFiniteError, watch

introspect.runtime.distributed.RANK_WAIT_S = 3.0  # a silent rank costs this once; keep the test short

torch.set_num_threads(1)


class Poison(nn.Module):
    """NaN at the chosen steps (``step`` is set by the training loop: a replay meets it again)."""

    def __init__(self, at: set[int]) -> None:
        super().__init__()
        self.at, self.step = at, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.step in self.at:
            x = x.clone()
            x[:, 0] = float("nan")
        return x


class Side(nn.Module):
    """Returns its input and a side tensor the model drops."""

    def __init__(self, at: set[int]) -> None:
        super().__init__()
        self.at, self.step = at, 0

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        side = x.detach().mean(dim=1)
        if self.step in self.at:
            side = side * float("nan")
        return x, side


class Net(nn.Module):
    def __init__(self, rank: int) -> None:
        super().__init__()
        self.lin1 = nn.Linear(4, 8)
        self.poison = Poison({2} if rank == 1 else set())
        self.side = Side({4} if rank == 1 else set())
        self.lin2 = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.side(self.poison(self.lin1(x)))
        return self.lin2(h)


def main() -> None:
    logdir, ranks, result_path = sys.argv[1:4]
    on_nonfinite = sys.argv[4] if len(sys.argv) > 4 else "warn"
    watched = sys.argv[5] if len(sys.argv) > 5 else "all"
    check_mode = sys.argv[6] if len(sys.argv) > 6 else "replay"
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    net = Net(rank)
    model = nn.parallel.DistributedDataParallel(net)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(100 + rank)
    grads: list[dict[str, list[float]]] = []
    raised: list[int] = []
    w = None
    if watched == "all" or rank == 0:
        w = watch(
            model,
            logdir,
            every=1,
            ranks=ranks,
            on_nonfinite=on_nonfinite,
            check_mode=check_mode,
            summary=False,
            graph=False,
        )
    with w or contextlib.nullcontext():
        names = w.module_names if w else []
        for step in range(6):
            net.poison.step = net.side.step = step
            x = torch.randn(3 + 2 * rank, 4, generator=gen)
            y = torch.randn(3 + 2 * rank, 2, generator=gen)
            opt.zero_grad()
            loss = F.mse_loss(model(x), y)
            try:
                loss.backward()
            except NonFiniteError:
                raised.append(step)
            # The averaged gradients (identical on every rank): what grads/ must show.
            grads.append(
                {
                    n: [p.grad.min().item(), p.grad.max().item(), p.grad.double().sum().item()]
                    for n, p in net.named_parameters()
                }
            )
            if all(torch.isfinite(p.grad).all() for p in net.parameters()):  # the same on all ranks
                opt.step()
    result = {
        "rank": rank,
        "module_names": names,
        "writes": w is not None and w.writer is not None,
        "alerts": alerts_of(w),
        "grads": grads,
        "raised": raised,
    }
    finish(result, result_path)


def alerts_of(w) -> list[dict]:  # type: ignore[no-untyped-def]
    """A watcher's findings as JSON (none without a watcher)."""
    return [
        {"kind": a.kind, "where": a.where, "step": a.step, "message": a.message, "numbers": a.numbers}
        for a in (w.alerts if w else [])
    ]


def finish(result: dict, result_path: str) -> None:
    """Write this rank's result, then leave the process group together."""
    with open(result_path, "w") as f:
        json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    main()
