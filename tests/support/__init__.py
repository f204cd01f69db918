"""Helpers for the test suite, imported as ``tests.support...`` (fixtures live in the conftest.py files).

- ``events``: reading a run's event files back (read_events, hist_at, scalar_at, text_of, ...)
- ``hooks``: the hooks a model holds (hook_state, count_hooks), to check watch() removed its own
- ``training``: plain training loops and bitwise comparisons (train, assert_same_state, ...)
- ``zoo``: small models covering the hook edge cases; ``hf_models``: tiny transformers from configs
- ``saved_models``: a model saved in every format, hostile files, the console script
- ``torchrun``: ranks started the way torchrun starts them, running ``ddp_worker.py``/``fsdp_worker.py``
- ``image_folders``, ``hparams_records``, ``browser``: image folders, HPARAMS records, headless Chromium
"""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
"""The checkout these tests belong to (``examples`` and ``introspect`` are imported from it)."""

GOLDEN = REPO_ROOT / "tests" / "golden"
"""The checked-in golden runs (tests/live/test_golden.py)."""

# watch() without its first-batch extras: no torchinfo pass on stdout, no graph trace. Most tests
# check something else and should neither pay for nor print those.
QUIET = dict(summary=False, graph=False)
