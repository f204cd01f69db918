"""``introspect weights A B``: a tensor that was zero in A changed by an absolute amount, never "inf"."""

from __future__ import annotations

import math

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from introspect.analysis.weight_stats import compare_weights, format_weight_changes
from introspect.cli.commands import main


def two_checkpoints() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A Linear whose bias starts at zero (as many inits do), and the same layer a few steps later."""
    torch.manual_seed(0)
    layer = nn.Linear(16, 4)
    nn.init.zeros_(layer.bias)
    a = {k: v.clone() for k, v in layer.state_dict().items()}
    with torch.no_grad():
        layer.weight.mul_(1.5)  # a relative change of 0.5
        layer.bias.add_(1e-3)  # tiny in absolute terms, "inf" relative to zero
    return a, {k: v.clone() for k, v in layer.state_dict().items()}


def test_a_change_from_zero_is_absolute_and_never_ranks_first():
    a, b = two_checkpoints()
    changes = {c.name: c for c in compare_weights(a, b)}
    bias, weight = changes["bias"], changes["weight"]
    assert bias.from_zero and math.isnan(bias.relative_change)
    assert bias.absolute_change == pytest.approx(1e-3 * 2)  # |(1e-3,) * 4| = 2e-3
    assert not weight.from_zero and weight.relative_change == pytest.approx(0.5)
    text = format_weight_changes(list(changes.values()))
    assert "inf" not in text.lower()
    assert "2 tensors compared, 2 changed; most: weight (5.000e-01 relative)" in text
    assert "1 zero in A, changed by an absolute amount (largest: bias, |B - A| = 2.000e-03)" in text
    bias_row = next(line for line in text.splitlines() if line.startswith("bias"))
    assert "2.000e-03 abs" in bias_row and "zero in A: absolute change" in bias_row


def test_zero_in_both_is_unchanged_and_nan_is_not_a_number():
    a = {"z": torch.zeros(3), "n": torch.tensor([1.0, float("nan")])}
    b = {"z": torch.zeros(3), "n": torch.tensor([2.0, float("nan")])}
    changes = {c.name: c for c in compare_weights(a, b)}
    assert changes["z"].relative_change == 0.0 and not changes["z"].from_zero
    assert math.isnan(changes["n"].relative_change) and not changes["n"].from_zero
    text = format_weight_changes(list(changes.values()))
    assert "1 tensors compared, 0 changed; 1 not comparable" in text and "NaN/Inf values" in text


def test_the_cli_reports_the_zero_bias_as_absolute(tmp_path):
    a, b = two_checkpoints()
    torch.save(a, tmp_path / "a.pt")
    torch.save(b, tmp_path / "b.pt")
    result = CliRunner().invoke(main, ["weights", str(tmp_path / "a.pt"), str(tmp_path / "b.pt")])
    assert result.exit_code == 0, result.output
    assert "most: weight" in result.stdout and "inf" not in result.stdout.lower()
