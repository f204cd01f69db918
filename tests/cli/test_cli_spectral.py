"""``introspect spectral``: the name a user tries first for ``weights --spectral``, the same command."""

from __future__ import annotations

import torch
from click.testing import CliRunner
from torch import nn

from introspect.cli.commands import main
from tests.support.events import read_events


def saved(tmp_path, seed: int) -> str:
    torch.manual_seed(seed)
    path = tmp_path / f"m{seed}.pt"
    torch.save(nn.Sequential(nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 8)).state_dict(), path)
    return str(path)


def test_spectral_is_weights_spectral(tmp_path):
    a, b = saved(tmp_path, 0), saved(tmp_path, 1)
    runner = CliRunner()
    for files in ([a], [a, b]):
        alias = runner.invoke(main, ["spectral", *files])
        original = runner.invoke(main, ["weights", *files, "--spectral"])
        assert alias.exit_code == 0 == original.exit_code, alias.output + original.output
        assert alias.stdout == original.stdout and "0.weight" in alias.stdout


def test_spectral_writes_the_same_scalars(tmp_path):
    a = saved(tmp_path, 0)
    result = CliRunner().invoke(main, ["spectral", a, "--logdir", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    assert any(t.startswith("spectral/") for t in read_events(tmp_path / "run").Tags()["scalars"])


def test_spectral_takes_at_most_two_files(tmp_path):
    a = saved(tmp_path, 0)
    result = CliRunner().invoke(main, ["spectral", a, a, a])
    assert result.exit_code == 2 and "give one MODEL, or two to compare; got 3" in result.output
