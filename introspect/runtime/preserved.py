"""Extra forwards that leave no trace: modes, parameters, buffers, tensor attributes of modules and
RNG streams put back afterwards (the summary, the graph, the replay and the CLI's inputs all run
through ``preserved_state``)."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from .._torch import tensor_version

__all__ = ["preserved_state", "cuda_devices"]


def cuda_devices(model: nn.Module) -> list[int]:
    """The CUDA devices whose RNG the model's forward may draw from (its parameters' and buffers')."""
    return sorted({t.device.index or 0 for t in (*model.parameters(), *model.buffers()) if t.is_cuda})


@dataclass
class _Slot:
    """One tensor a module holds under ``name`` (in ``_parameters``, ``_buffers`` or its
    ``__dict__``): the object bound there, a copy of its values and its in-place version."""

    table: dict
    name: str
    tensor: torch.Tensor
    saved: torch.Tensor
    version: int


class _Held(threading.local):
    """Per thread, the ids of the modules an open ``preserved_state`` will put back: a nested one
    on the same model (the summary's FLOP count inside the first batch's) copies nothing again."""

    def __init__(self) -> None:
        self.modules: set[int] = set()


_HELD = _Held()


def _slots(model: nn.Module) -> list[_Slot]:
    """Every parameter, buffer and plain tensor attribute of ``model``'s modules, copied once
    (a tensor shared by several modules is copied once and put back in each)."""
    copies: dict[int, torch.Tensor] = {}
    slots: list[_Slot] = []
    with torch.no_grad():
        for module in model.modules():
            tables: list[dict] = [module._parameters, module._buffers]
            tables.append({k: v for k, v in vars(module).items() if isinstance(v, torch.Tensor)})
            for index, table in enumerate(tables):
                for name, tensor in table.items():
                    if not isinstance(tensor, torch.Tensor) or (index == 2 and isinstance(tensor, nn.Parameter)):
                        continue
                    if tensor.is_meta:  # nothing to copy (a model on the meta device)
                        continue
                    saved = copies.get(id(tensor))
                    if saved is None:
                        saved = copies[id(tensor)] = _local(tensor).detach().clone()
                    owner = vars(module) if index == 2 else table
                    slots.append(_Slot(owner, name, tensor, saved, tensor_version(tensor)))
    return slots


def _put_back(slots: list[_Slot]) -> None:
    """Rebind what a forward rebound, and write back the values it changed. Only the tensors
    the forwards changed are written: a write bumps a tensor's in-place version, and a forward
    between the real forward and its backward (the attention probe's eager rerun under
    torch.compile) must leave alone what that forward saved for its backward (a rotary
    embedding's ``inv_freq``), or the backward refuses to run. Written in place, under no_grad,
    so a parameter stays the object the optimizer holds."""
    done: set[int] = set()
    with torch.no_grad():
        for slot in slots:
            # ``self.queue = torch.cat(...)`` rebinds (a TorchScript module's tables are no dicts,
            # and its forward cannot rebind)
            if isinstance(slot.table, dict) and slot.table.get(slot.name) is not slot.tensor:
                slot.table[slot.name] = slot.tensor
            if id(slot.tensor) in done:
                continue
            done.add(id(slot.tensor))
            tensor = slot.tensor
            # (a write through .data leaves the version as it was: the values say so then)
            local = _local(tensor)
            if tensor_version(tensor) != slot.version or not _same(local, slot.saved):
                if local.shape != slot.saved.shape or local.dtype != slot.saved.dtype:
                    local.data = slot.saved  # ``p.data = ...`` changed its shape: take the copy whole
                else:
                    local.copy_(slot.saved)


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's own shard (FSDP2): copied, compared and written back on each rank alone, so
    putting state back runs no collective (a replay may run on one rank only)."""
    to_local = getattr(tensor, "to_local", None)
    return to_local() if callable(to_local) else tensor


def _same(tensor: torch.Tensor, saved: torch.Tensor) -> bool:
    if tensor.shape != saved.shape or tensor.dtype != saved.dtype or tensor.device != saved.device:
        return False
    # torch.equal says NaN != NaN: a tensor holding NaN is written back (its own values again)
    return bool(torch.equal(tensor, saved))


@contextlib.contextmanager
def preserved_state(model: nn.Module) -> Iterator[None]:
    """Run side-effect-free forwards: restore modes, parameters, buffers, the tensors modules hold
    as plain attributes (a MoCo queue, its pointer) and RNG streams afterwards.

    Parameters count: a momentum teacher (MoCo, BYOL, DINO) updates its weights inside
    ``forward``. Everything is copied once, when the outermost ``preserved_state`` on a model
    opens (one copy of the parameters and buffers for the first batch's summary and graph
    together), and written back, in place, where it changed. What is not a tensor held by a
    module (a Python ``int`` counter, a list of tensors, a cache dict) cannot be put back:
    docs/training-setups.md says so."""
    if id(model) in _HELD.modules:  # an outer preserved_state on this model puts everything back
        with torch.random.fork_rng(devices=cuda_devices(model)), torch.no_grad():
            yield
        return
    modes = [(m, m.training) for m in model.modules()]
    slots = _slots(model)
    held = {id(m) for m in model.modules()} - _HELD.modules
    _HELD.modules |= held
    try:
        with torch.random.fork_rng(devices=cuda_devices(model)), torch.no_grad():
            yield
    finally:
        _HELD.modules -= held
        _put_back(slots)
        for module, mode in modes:
            module.training = mode
