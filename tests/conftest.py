"""Pytest hooks and fixtures for the whole suite.

The suite mirrors the package: ``tests/<layer>/test_<module>.py`` tests ``introspect/<layer>/<module>.py``;
tests that cut across layers (the layering itself, the README, the examples, the browser) sit here at
the root. Helpers are plain functions in ``tests/support`` (``from tests.support.events import
read_events``); fixtures live in conftest.py files and reach tests by name, never by import. This file
keeps the ones every layer uses (a log directory, a writer, the seeded seed CNN, the model saved in
every format) and the ``--update-golden`` option, which pytest only reads from the root conftest.
"""

from __future__ import annotations

import os
import signal
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch.utils.tensorboard import SummaryWriter

from tests.support import REPO_ROOT, saved_models

# The examples package (examples.models.SeedCNN, the broken-training models) is imported by tests.
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

# Tiny tensors: one thread is faster than two, and keeps timings sane on a busy 2-core runner.
torch.set_num_threads(1)

# A shell without job control starts a background command (`scripts/test &`, `nohup ...`, some CI
# runners) with SIGINT ignored, and every child inherits that: the Ctrl-C tests' children would
# then never see their Ctrl-C, and watch() rightly leaves an ignored SIGINT alone. Take the
# suite's SIGINT back to Python's default so the suite means the same in the foreground and
# the background (children get the default at exec, as from an interactive shell).
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


# --------------------------------------------------------------------------- options
def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--update-golden",
        action="store_true",
        default=False,
        help="rewrite tests/golden/*.json from the current code instead of comparing with them",
    )


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(autouse=True)
def _module_graph_notes_afresh(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts as a new process would: the module-level graph note (printed once per model
    class per process) shows again."""
    from introspect.analysis import summary

    monkeypatch.setattr(summary, "_NOTED_CLASSES", set())


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


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """``(files, expected)``: the seed CNN (seed 0) saved in every format, and its output on X."""
    folder = tmp_path_factory.mktemp("saved")
    model = saved_models.seed_cnn()
    with torch.no_grad():
        expected = model(saved_models.X)
    return {fmt: saved_models.save_as(model, fmt, folder, saved_models.X) for fmt in saved_models.FORMATS}, expected


@pytest.fixture
def quiet():
    """Turn introspect's warnings into errors unless a test expects them."""
    from introspect import IntrospectWarning

    with warnings.catch_warnings():
        warnings.simplefilter("error", IntrospectWarning)
        yield


_NOT_SEARCHED = {".venv", ".git", "node_modules", "__pycache__", ".pytest_cache", ".hypothesis"}


def _event_files_in_repository() -> set[Path]:
    found = set()
    for folder, subfolders, names in os.walk(REPO_ROOT):
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
    assert not left, f"tests wrote event files into the repository: {[str(p.relative_to(REPO_ROOT)) for p in left[:5]]}"
