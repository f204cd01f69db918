"""Watching under ``torch.distributed``: which rank writes where, and which rank saw a NaN first.

>>> with watch(ddp_model, "runs/exp1", ranks="all") as w:   # doctest: +SKIP
...     ...                                                 # runs/exp1/rank0, runs/exp1/rank1, ...

Why rank 0 alone by default: under DistributedDataParallel every rank holds the same weights and
(after the all-reduce) the same gradients, so N copies of those histograms help nobody; the
activations differ (each rank sees its own batches), which is what ``ranks="all"`` is for.

The non-finite check runs on every rank over that rank's own tensors, so only the rank whose batch
made the NaN can name its origin. Telling rank 0 needs communication, and a collective that one
rank enters because *it* saw a NaN while the others do not would hang them all. So the exchange is
gated on something every rank sees identically: DDP's all-reduce spreads a NaN/Inf in any rank's
gradients into every rank's averaged gradients. After DDP has finished its reduction, each rank
sums its (averaged) parameter gradients into the same one-transfer host sync as its own check; when
that sum is not finite — on every rank at once, by construction — and only then, each rank posts
which local origin it found (if any) to the process group's key-value store and reads the others',
waiting at most ``RANK_WAIT_S``. Not a collective: a rank that is not watched at all (``watch``
on rank 0 only) cannot make the others hang, it only costs them that wait, once. Off the firing
path there is no extra communication and no extra host sync; the exchange happens once per run.
"""

from __future__ import annotations

import dataclasses
import datetime
import itertools
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._torch import default_store
from ..debugger.alerts import Alert
from ..errors import ConfigError

__all__ = [
    "RANK_MODES",
    "rank_and_world",
    "writes_here",
    "rank_writer_target",
    "find_ddp",
    "ddp_syncs_gradients",
    "reduced_gradient_sum",
    "origin_ranks",
    "new_session",
    "RANK_WAIT_S",
    "origin_code",
    "rank_origin_alert",
    "nonfinite_on_rank",
    "SideGroup",
]

RANK_MODES = ("zero", "all")


def rank_and_world() -> tuple[int, int]:
    """``(rank, world size)``; ``(0, 1)`` outside an initialised process group."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def check_rank_mode(ranks: Any) -> str:
    if ranks not in RANK_MODES:
        raise ConfigError(
            f'ranks must be one of {RANK_MODES} ("zero": rank 0 writes; "all": every rank '
            f"writes its own rank{{k}} run), got ranks={ranks!r}"
        )
    return ranks


def writes_here(ranks: str) -> bool:
    """Whether this process writes events: every rank with ``ranks="all"``, else rank 0 only."""
    return ranks == "all" or rank_and_world()[0] == 0


def _writer_log_dir(writer: Any) -> str | None:
    for attr in ("log_dir", "logdir"):  # torch's SummaryWriter / tensorboardX's
        value = getattr(writer, attr, None)
        if isinstance(value, (str, os.PathLike)):
            return str(value)
    get = getattr(writer, "get_logdir", None)
    return str(get()) if callable(get) else None


def rank_writer_target(writer: Any, ranks: str) -> Any:
    """What to open on this rank: the writer (or path) itself, or ``<log dir>/rank{k}``.

    With ``ranks="all"`` in a process group every rank gets its own run under the log directory
    (a path, ``runs/<time>`` for None, or the log directory of the writer object passed on that
    rank), so TensorBoard shows ``rank0``, ``rank1``, ... side by side.
    """
    rank, world = rank_and_world()
    if ranks != "all" or world == 1:
        return writer
    if writer is None:  # ranks started together share the minute, not always the second
        base = str(Path("runs") / datetime.datetime.now().strftime("%Y%m%d-%H%M"))
    elif isinstance(writer, (str, os.PathLike)):
        base = str(writer)
    else:
        found = _writer_log_dir(writer)
        if found is None:
            raise ConfigError(
                f"ranks='all' writes rank{{k}} runs under the writer's log directory, but "
                f"{type(writer).__name__} has no log_dir; pass a log directory path instead"
            )
        base = found
    return Path(base) / f"rank{rank}"


def find_ddp(model: nn.Module) -> nn.Module | None:
    """The DistributedDataParallel wrapper the user passed (maybe under DataParallel/compile)."""
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        if isinstance(model, nn.parallel.DistributedDataParallel):
            return model
        inner = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            return None
        model = inner
    return None


def ddp_syncs_gradients(ddp: nn.Module | None) -> bool:
    """True when this backward all-reduces gradients (a DDP model outside ``no_sync()``)."""
    if ddp is None or not getattr(ddp, "require_backward_grad_sync", True):
        return False
    _, world = rank_and_world()
    return world > 1


def reduced_gradient_sum(params: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """One device scalar: finite exactly when every (averaged) gradient is, barring overflow.
    Of a sharded (DTensor, FSDP2) gradient, this rank's shard: a reduction of the whole would be
    a collective."""
    sums = [_local(p.grad).detach().sum(dtype=torch.float32) for p in params if p.grad is not None]
    if not sums:
        return None
    return torch.stack(sums).sum()


def _local(tensor: torch.Tensor) -> torch.Tensor:
    to_local = getattr(tensor, "to_local", None)  # a DTensor's own shard
    return to_local() if callable(to_local) else tensor


RANK_WAIT_S = 10.0
"""How long a rank waits for the others' word on a NaN (once per run, on the firing path only)."""

_SESSIONS = itertools.count()


def new_session() -> int:
    """A number for this watcher's store keys; ranks that make their watchers alike agree on it."""
    return next(_SESSIONS)


def origin_ranks(local_code: int, session: int, step: int) -> list[int | None]:
    """Every rank's ``local_code`` (0: no local origin; None: no word from that rank).

    Exchanged through the process group's key-value store, not a collective: each rank posts its
    code and waits at most ``RANK_WAIT_S`` for the others'. A rank that is not watched (say only
    rank 0 calls ``watch``) or whose check is off costs that wait once and is reported as silent;
    nothing can hang. Call it on a condition every rank shares (see the module docstring).
    """
    rank, world = rank_and_world()
    store = default_store()
    codes: list[int | None] = [None] * world
    codes[rank] = local_code
    if store is None:
        return codes
    keys = [f"introspect/nonfinite/{session}/{step}/{r}" for r in range(world)]
    try:
        store.set(keys[rank], str(local_code))
        store.wait(keys, datetime.timedelta(seconds=RANK_WAIT_S))
    except Exception:  # a timeout: some rank did not answer
        pass
    for r, key in enumerate(keys):
        try:
            if r != rank and store.check([key]):
                codes[r] = int(store.get(key))
        except Exception:
            pass
    return codes


def origin_code(alert: Alert | None, modules: Sequence[str]) -> int:
    """This rank's NaN origin as one number for :func:`origin_ranks`: 0 none, else
    ``1 + 2 * index + backward`` with ``index`` into the watched module names (the same list on
    every rank), ``len(modules)`` for the input batch, ``len(modules) + 1`` for anything else."""
    if alert is None:
        return 0
    base = alert.where.split("/")[0]
    names = list(modules)
    index = names.index(base) if base in names else len(names) if alert.where == "input" else len(names) + 1
    return 1 + 2 * index + (alert.phase == "backward")


def rank_origin_alert(
    step: int, codes: Sequence[int | None], modules: Sequence[str], carrier: str = "DDP's all-reduce"
) -> Alert:
    """The finding every rank records once DDP (or FSDP's reduce-scatter, ``carrier``) has spread
    a NaN/Inf to all of them."""
    names = list(modules)
    found = [(rank, code) for rank, code in enumerate(codes) if code]
    silent = [rank for rank, code in enumerate(codes) if code is None]
    unheard = f"; no word from rank{'s' if len(silent) > 1 else ''} {silent} (not watched there?)" if silent else ""
    if not found:
        return Alert(
            "nonfinite_rank",
            "gradients",
            step,
            f"NaN/Inf reached the gradients {carrier} reduced, but no rank's watched modules made it "
            "(code outside the watched modules, e.g. the loss, or a rank whose check is off)" + unheard,
            {"ranks": 0.0, "silent_ranks": float(len(silent))},
            phase="backward",
        )
    rank, code = found[0]
    index, backward = divmod(code - 1, 2)
    where = names[index] if index < len(names) else "input" if index == len(names) else "an unwatched part"
    others = [r for r, _ in found[1:]]
    also = f" (ranks {others} found one too)" if others else ""
    phase = "backward" if backward else "forward"
    return Alert(
        "nonfinite_rank",
        where,
        step,
        f"NaN/Inf first appeared on rank {rank}{also}, in the {phase} of {where}; {carrier} "
        "carried it into every rank's gradients (that rank's own finding has the details; "
        "ranks='all' writes it)" + unheard,
        {"rank": float(rank), "ranks": float(len(found)), "silent_ranks": float(len(silent))},
        phase=phase,
    )


def nonfinite_on_rank(alert: Alert) -> Alert:
    """A local finding, marked with this rank when there are several."""
    rank, world = rank_and_world()
    if world == 1:
        return alert
    return dataclasses.replace(
        alert, message=f"on rank {rank}: {alert.message}", numbers={**alert.numbers, "rank": float(rank)}
    )


class SideGroup:
    """A gloo process group of the watcher's own, for the small collectives it runs on logging
    steps (shard statistics, rank divergence), created on first use.

    Its own group, so a collective of ours can never pair with one of the user's (or FSDP's) on
    the default group; gloo, on host tensors, whatever the training backend; and its timeout
    (``RANK_WAIT_S``) bounds every wait: a rank that does not come (not watched, or failed) costs
    the others that wait once, and then ``broken`` is True for good (callers warn and stop).
    """

    def __init__(self) -> None:
        self._group: Any = None
        self.broken = False

    def _get(self) -> Any:
        if self._group is None:
            timeout = datetime.timedelta(seconds=RANK_WAIT_S)
            self._group = torch.distributed.new_group(backend="gloo", timeout=timeout)
        return self._group

    def all_reduce(self, tensor: torch.Tensor, op: Any) -> None:
        """In place, on a host tensor; raises (and breaks the group) when a rank does not come."""
        self._run(lambda: torch.distributed.all_reduce(tensor, op=op, group=self._get()))

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """``(world, *tensor.shape)``: every rank's ``tensor``, by rank."""
        world = rank_and_world()[1]
        parts = [torch.empty_like(tensor) for _ in range(world)]
        self._run(lambda: torch.distributed.all_gather(parts, tensor, group=self._get()))
        return torch.stack(parts)

    def _run(self, collective: Any) -> None:
        if self.broken:
            raise RuntimeError("an earlier collective of the watcher's group failed")
        try:
            collective()
        except Exception:
            self.broken = True
            raise
