"""Shared fixtures and helpers for the watch() test suite.

Helpers are plain functions (import them with ``from conftest import ...``); fixtures wrap the
ones tests usually want (a seeded seed CNN, a log directory, a writer).
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.tensorboard import SummaryWriter

# The examples package (examples.models.SeedCNN, the broken-training models) is imported by tests.
REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

# Tiny tensors: one thread is faster than two, and keeps timings sane on a busy 2-core runner.
torch.set_num_threads(1)

# watch() without its first-batch extras: no torchinfo pass on stdout, no graph trace. Most tests
# check something else and should neither pay for nor print those.
QUIET = dict(summary=False, graph=False)

SIZE_GUIDANCE = {"histograms": 0, "scalars": 0, "tensors": 0, "images": 0}

MODULE_HOOK_ATTRS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
)


# --------------------------------------------------------------------------- event files
def read_events(logdir: str | Path):
    """The EventAccumulator of ``logdir`` with everything loaded (call after the watcher closed)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance=SIZE_GUIDANCE)
    acc.Reload()
    return acc


def histogram_tags(acc) -> set[str]:
    return set(acc.Tags()["histograms"])


def scalar_tags(acc) -> set[str]:
    return set(acc.Tags()["scalars"])


def tags_with_prefix(acc, prefix: str) -> set[str]:
    tags = set(acc.Tags()["histograms"]) | set(acc.Tags()["scalars"])
    return {t for t in tags if t.startswith(prefix)}


def hist_steps(acc, tag: str) -> list[int]:
    """The steps at which ``tag`` has a histogram ([] when the tag does not exist)."""
    if tag not in acc.Tags()["histograms"]:
        return []
    return [e.step for e in acc.Histograms(tag)]


def hist_at(acc, tag: str, step: int):
    """The ``HistogramValue`` (min, max, num, sum, sum_squares, bucket_limit, bucket) at ``step``."""
    found = [e.histogram_value for e in acc.Histograms(tag) if e.step == step]
    assert len(found) == 1, f"{tag}: expected one histogram at step {step}, found {len(found)}"
    return found[0]


def scalar_at(acc, tag: str, step: int) -> float:
    found = [e.value for e in acc.Scalars(tag) if e.step == step]
    assert len(found) == 1, f"{tag}: expected one scalar at step {step}, found {len(found)}"
    return found[0]


def text_of(acc, tag: str) -> list[str]:
    """All texts written under ``tag`` (e.g. ``model/summary``), decoded."""
    full = f"{tag}/text_summary"
    if full not in acc.Tags()["tensors"]:
        return []
    events = acc.Tensors(full)
    return [b"".join(e.tensor_proto.string_val).decode() for e in events]


# --------------------------------------------------------------------------- hooks
def hook_state(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[Any, dict]:
    """Every hook the model, its parameters and the optimizer hold, as comparable dicts."""
    state: dict[Any, dict] = {}
    for name, module in model.named_modules():
        for attr in MODULE_HOOK_ATTRS:
            state[("module", name, attr)] = dict(getattr(module, attr, None) or {})
    for name, param in model.named_parameters():
        state[("param", name, "post_accumulate")] = dict(getattr(param, "_post_accumulate_grad_hooks", None) or {})
        state[("param", name, "backward")] = dict(param._backward_hooks or {})
    if optimizer is not None:
        state[("optimizer", "pre")] = dict(optimizer._optimizer_step_pre_hooks)
        state[("optimizer", "post")] = dict(optimizer._optimizer_step_post_hooks)
    from torch.nn.modules import module as module_mod

    for attr in ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks"):
        state[("global", attr)] = dict(getattr(module_mod, attr, None) or {})
    return state


def count_hooks(state: dict[Any, dict]) -> int:
    return sum(len(v) for v in state.values())


# --------------------------------------------------------------------------- training
def train(
    model: nn.Module,
    make_input: Callable[[], tuple[Any, Any]],
    loss_fn: Callable[[Any, Any], torch.Tensor],
    steps: int,
    optimizer: torch.optim.Optimizer | None = None,
    after_step: Callable[[int], None] | None = None,
) -> list[torch.Tensor]:
    """A plain training loop; returns the detached losses. Batches come from the global RNG."""
    if optimizer is None:
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    losses = []
    for i in range(steps):
        x, y = make_input()
        loss = loss_fn(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.detach().clone())
        if after_step is not None:
            after_step(i)
    return losses


def make_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)


def assert_same_state(a: nn.Module, b: nn.Module) -> None:
    """Bitwise equal parameters and buffers (BatchNorm running stats included)."""
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), f"{key} differs"


def assert_same_losses(a: Iterable[torch.Tensor], b: Iterable[torch.Tensor]) -> None:
    a, b = list(a), list(b)
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b)):
        assert torch.equal(x, y), f"loss {i}: {x.item()!r} != {y.item()!r}"


# --------------------------------------------------------------------------- options
def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--update-golden",
        action="store_true",
        default=False,
        help="rewrite tests/golden/*.json from the current code instead of comparing with them",
    )


# --------------------------------------------------------------------------- fixtures
@pytest.fixture
def logdir(tmp_path: Path) -> Path:
    return tmp_path / "run"


@pytest.fixture
def writer(logdir: Path):
    w = SummaryWriter(str(logdir))
    yield w
    w.close()


@pytest.fixture
def seed_cnn():
    """The seed CNN with weights from seed 0."""
    from examples.models import SeedCNN

    torch.manual_seed(0)
    return SeedCNN()


@pytest.fixture
def quiet():
    """Turn introspect's warnings into errors unless a test expects them."""
    from introspect import IntrospectWarning

    with warnings.catch_warnings():
        warnings.simplefilter("error", IntrospectWarning)
        yield


_REPOSITORY = Path(__file__).resolve().parent.parent
_NOT_SEARCHED = {".venv", ".git", "node_modules", "__pycache__", ".pytest_cache", ".hypothesis"}


def _event_files_in_repository() -> set[Path]:
    found = set()
    for folder, subfolders, names in os.walk(_REPOSITORY):
        subfolders[:] = [d for d in subfolders if d not in _NOT_SEARCHED]
        found.update(Path(folder) / n for n in names if n.startswith("events.out.tfevents."))
    return found


@pytest.fixture(scope="session", autouse=True)
def no_runs_left_in_the_repository():
    """Tests write under tmp_path. An event file that appears in the checkout is how a directory
    named ``<torch.utils.tensorboard.writer.SummaryWriter object at 0x...>`` once got committed (a
    writer passed as ``str(writer)`` and taken for a path): the session fails instead."""
    before = _event_files_in_repository()
    yield
    left = sorted(_event_files_in_repository() - before)
    assert not left, (
        f"tests wrote event files into the repository: {[str(p.relative_to(_REPOSITORY)) for p in left[:5]]}"
    )
