"""``introspect map RUN --out FILE``: which files it writes, and that it says so."""

from __future__ import annotations

import torch
from click.testing import CliRunner
from PIL import Image
from torch import nn

from introspect import watch
from introspect.cli.commands import main


def tiny_run(logdir) -> None:
    """Two logged steps of a small MLP: activations and their gradients, so at least two statistics."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    with watch(model, logdir, every=1, summary=False, graph=False):
        for _ in range(2):
            model(torch.randn(16, 4)).sum().backward()


def test_one_statistic_is_drawn_into_out_itself(tmp_path):
    tiny_run(tmp_path / "run")
    out = tmp_path / "map.png"
    result = CliRunner().invoke(main, ["map", str(tmp_path / "run"), "--stat", "grad_rms", "--out", str(out)])
    assert result.exit_code == 0, result.output
    with Image.open(out) as image:
        assert image.format == "PNG"
    assert sorted(p.name for p in tmp_path.glob("map*.png")) == ["map.png"]
    assert "one PNG each" not in result.stderr


def test_several_statistics_are_one_file_each_and_the_command_says_so(tmp_path):
    tiny_run(tmp_path / "run")
    out = tmp_path / "map.png"
    result = CliRunner().invoke(main, ["map", str(tmp_path / "run"), "--out", str(out)])
    assert result.exit_code == 0, result.output
    written = sorted(p.name for p in tmp_path.glob("map*.png"))
    assert len(written) >= 2 and "map.png" not in written and "map_grad_rms.png" in written, written
    # The user asked for map.png and got map_{stat}.png: the command says why and how to get map.png.
    assert f"one PNG each (not {out}); --stat NAME draws one into {out}" in result.stderr


def test_the_help_says_which_files_out_names():
    result = CliRunner().invoke(main, ["map", "--help"])
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    assert "--out map.png writes map_grad_rms.png" in text
    assert "exactly this file" in text
