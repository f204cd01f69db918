"""``open_writer`` and ``thresholds=``: wrong types and values raise before any hook exists."""

from __future__ import annotations

import math
import os

import pytest
import torch
from torch import nn
from torch.utils.tensorboard import SummaryWriter

from introspect import watch
from introspect.errors import ConfigError, ConfigTypeError
from introspect.records.sinks import open_writer
from tests.support.hooks import count_hooks, hook_state


def tiny() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))


def assert_refused_before_hooks(error: type[BaseException], match: str, **options) -> BaseException:
    model = tiny()
    with pytest.raises(error, match=match) as raised:
        watch(model, **options)
    assert count_hooks(hook_state(model)) == 0
    assert "\n" not in str(raised.value)
    return raised.value


@pytest.mark.parametrize("writer", [42, 3.5, b"runs/x", ["runs"], object()])
def test_a_writer_of_the_wrong_type(writer):
    error = assert_refused_before_hooks(
        ConfigTypeError, "writer must be a SummaryWriter .*a log directory path, or None", writer=writer
    )
    assert isinstance(error, TypeError) and isinstance(error, ConfigError)


def test_a_writer_path_that_is_a_file(tmp_path):
    assert_refused_before_hooks(ConfigError, "/etc/passwd exists and is not a directory", writer="/etc/passwd")
    (tmp_path / "notes").write_text("x")
    assert_refused_before_hooks(ConfigError, "cannot create the log directory", writer=tmp_path / "notes" / "run")


def test_a_writer_turned_into_text_makes_no_directory(tmp_path, monkeypatch):
    """How ``<torch.utils.tensorboard.writer.SummaryWriter object at 0x7f15e58df290>/`` came to be
    committed: a test helper passed ``str(writer)``, and it was taken for a log directory."""
    from introspect.analysis.data import inspect_data

    monkeypatch.chdir(tmp_path)
    writer = SummaryWriter(str(tmp_path / "run"))
    try:
        assert_refused_before_hooks(ConfigTypeError, r"is the str\(\) of an object", writer=str(writer))
        with pytest.raises(ConfigTypeError, match="pass the writer itself"):
            inspect_data(torch.rand(4, 3, 8, 8), str(writer), show_progress=False, verbose=False)
        with pytest.raises(ConfigTypeError):
            open_writer(os.path.join("runs", str(writer)))
    finally:
        writer.close()
    assert sorted(os.listdir(tmp_path)) == ["run"]


def test_writers_and_paths_still_work(tmp_path):
    writer = SummaryWriter(str(tmp_path / "a"))
    assert open_writer(writer) == (writer, False)
    writer.close()
    made, owned = open_writer(tmp_path / "b")
    assert owned and made.log_dir == str(tmp_path / "b")
    made.close()


# --------------------------------------------------------------------------- thresholds
def test_a_threshold_that_is_not_a_number(tmp_path):
    error = assert_refused_before_hooks(
        ConfigTypeError,
        "dead_fraction must be a number, got 'abc'",
        writer=tmp_path,
        thresholds={"dead_fraction": "abc"},
    )
    assert isinstance(error, TypeError)
    assert_refused_before_hooks(
        ConfigTypeError, "must be a number, got True", writer=tmp_path, thresholds={"exploding_norm": True}
    )


@pytest.mark.parametrize("value", [math.nan, -0.5, math.inf, -math.inf])
def test_a_threshold_that_is_nan_or_negative(tmp_path, value):
    error = assert_refused_before_hooks(
        ConfigError,
        rf"vanishing_ratio must be a finite number >= 0, got vanishing_ratio={value!r}",
        writer=tmp_path,
        thresholds={"vanishing_ratio": value},
    )
    assert not isinstance(error, TypeError)


def test_a_hand_built_thresholds_is_checked_too(tmp_path):
    from introspect import Thresholds

    assert_refused_before_hooks(
        ConfigError,
        "dead_fraction must be a finite number",
        writer=tmp_path,
        thresholds=Thresholds(dead_fraction=math.nan),
    )
    assert_refused_before_hooks(
        ConfigTypeError, "takes a dict or introspect.Thresholds, got list", writer=tmp_path, thresholds=[0.5]
    )


def test_numbers_of_any_real_type_are_taken(tmp_path):
    import numpy as np

    model = tiny()
    with watch(model, tmp_path, thresholds={"dead_fraction": np.float32(0.25), "exploding_jump": 10}) as w:
        model(torch.randn(2, 4)).sum().backward()
    assert w.thresholds.dead_fraction == pytest.approx(0.25) and w.thresholds.exploding_jump == 10.0
