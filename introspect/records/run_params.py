"""Hyperparameters and final metrics for TensorBoard's HPARAMS dashboard, in the run's own directory.

>>> with watch(model, "runs/lr1e-3", hparams={"lr": 1e-3, "layers": [64, 64]}) as w:  # doctest: +SKIP
...     train(model)
...     w.finish(metrics={"val_acc": evaluate(model)})

``SummaryWriter.add_hparams`` writes into a new sub-run (``runs/lr1e-3/<time>``), so the
hyperparameters sit apart from the histograms they explain. Here the three records of the hparams
plugin go through the run's own writer, each when it is known:

* the session start (the hyperparameters) when the watch starts, so a run that crashes or is
  killed still shows them;
* at ``finish(metrics=...)``: the metrics as scalars ``hparams/{name}`` at the last step, the
  experiment record naming the hyperparameter and metric columns, and the session end (success);
* at ``close()`` without ``finish()``: the session end only when leaving by an exception
  (failure). TensorBoard reads the first record of each kind in a run, so nothing is rewritten.

The records are built from tensorboard's own protos rather than with
``torch.utils.tensorboard.summary.hparams``: that one stores booleans as numbers (``True`` is an
``int``), has no timestamps, and makes all three records at once, while we write them at three
different times.
"""

from __future__ import annotations

import json
import numbers
import time
from collections.abc import Mapping
from typing import Any

from .._torch import any_file_writer
from ..errors import ConfigError, IntrospectWarning, warn
from .tags import tag

__all__ = ["RunHparams", "check_hparams", "check_metrics", "plain_scalar"]

_SCALARS = (bool, int, float, str)


def plain_scalar(value: Any) -> Any:
    """NumPy scalars and one-element tensors or arrays as Python numbers; anything else unchanged."""
    if value is None or isinstance(value, (*_SCALARS, list, tuple, dict)):
        return value
    item = getattr(value, "item", None)
    numel = getattr(value, "numel", None)
    size = numel() if callable(numel) else getattr(value, "size", None)
    if callable(item) and size == 1:
        try:
            return item()
        except (TypeError, ValueError, RuntimeError):
            return value
    return value


def check_hparams(hparams: Mapping[str, Any] | None) -> dict[str, bool | int | float | str]:
    """Validate and flatten to TensorBoard's value kinds: bool, int, float and str as they are,
    ``None`` as ``"None"``, lists, tuples and dicts as their JSON text (with one warning naming
    them). Anything that is not JSON-like is a ``ConfigError`` naming its key."""
    if hparams is None:
        return {}
    if not isinstance(hparams, Mapping):
        raise ConfigError(
            f"hparams must be a dict of name -> value (e.g. {{'lr': 1e-3}}), got {type(hparams).__name__}"
        )
    values: dict[str, bool | int | float | str] = {}
    stringified: list[str] = []
    for key, raw in hparams.items():
        if not isinstance(key, str) or not key:
            raise ConfigError(f"hparams keys must be non-empty strings, got {key!r}")
        value = plain_scalar(raw)
        if isinstance(value, _SCALARS):
            values[key] = value
        elif value is None:
            values[key] = "None"
        elif isinstance(value, (list, tuple, dict)):
            try:
                values[key] = json.dumps(value)
            except (TypeError, ValueError) as e:
                raise ConfigError(
                    f"hparams[{key!r}] must hold JSON-like values (numbers, strings, booleans, None, lists, dicts): {e}"
                ) from None
            stringified.append(key)
        else:
            raise ConfigError(
                f"hparams[{key!r}] must be a number, string, boolean, None, list or dict, got "
                f"{type(raw).__name__} ({raw!r:.60})"
            )
    if stringified:
        warn(
            f"introspect: hparams {stringified} are not scalars; TensorBoard shows them as text (their JSON)",
            IntrospectWarning,
        )
    return values


def check_metrics(metrics: Mapping[str, Any] | None) -> dict[str, float]:
    """Final metrics as floats; a value that is not a real number is a ``ConfigError`` naming its key."""
    if metrics is None:
        return {}
    if not isinstance(metrics, Mapping):
        raise ConfigError(
            f"metrics must be a dict of name -> number (e.g. {{'val_acc': 0.92}}), got {type(metrics).__name__}"
        )
    values: dict[str, float] = {}
    for key, raw in metrics.items():
        if not isinstance(key, str) or not key:
            raise ConfigError(f"metrics keys must be non-empty strings, got {key!r}")
        value = plain_scalar(raw)
        if not isinstance(value, numbers.Real):
            raise ConfigError(f"metrics[{key!r}] must be a number, got {type(raw).__name__} ({raw!r:.60})")
        values[key] = float(value)
    return values


def _summary(tag_name: str, data: Any) -> Any:
    from tensorboard.compat.proto.summary_pb2 import Summary
    from tensorboard.plugins.hparams import metadata

    return Summary(value=[Summary.Value(tag=tag_name, metadata=metadata.create_summary_metadata(data))])


class RunHparams:
    """One run's hyperparameters and the state of its HPARAMS session (started, finished)."""

    def __init__(self, hparams: Mapping[str, Any] | None) -> None:
        self.values = check_hparams(hparams)
        self.started = False
        self.ended = False

    def start(self, writer: Any) -> None:
        """The session start: the hyperparameters, readable even if the run never finishes."""
        from tensorboard.plugins.hparams import metadata, plugin_data_pb2

        if self.started:
            return
        self.started = True
        info = plugin_data_pb2.SessionStartInfo(start_time_secs=time.time())
        for key, value in self.values.items():
            if isinstance(value, bool):
                info.hparams[key].bool_value = value
            elif isinstance(value, str):
                info.hparams[key].string_value = value
            else:
                info.hparams[key].number_value = value
        _add_summary(
            writer,
            _summary(metadata.SESSION_START_INFO_TAG, plugin_data_pb2.HParamsPluginData(session_start_info=info)),
            0,
        )

    def finish(self, writer: Any, metrics: Mapping[str, float], step: int) -> None:
        """Metrics as scalars, the experiment naming the columns, and the session's successful end."""
        from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2

        self.start(writer)
        for key, value in metrics.items():
            writer.add_scalar(tag("hparams", key), value, step)
        if metrics:
            kinds = {bool: "DATA_TYPE_BOOL", str: "DATA_TYPE_STRING"}
            experiment = api_pb2.Experiment(
                time_created_secs=time.time(),
                hparam_infos=[
                    api_pb2.HParamInfo(name=key, type=kinds.get(type(value), "DATA_TYPE_FLOAT64"))
                    for key, value in self.values.items()
                ],
                metric_infos=[api_pb2.MetricInfo(name=api_pb2.MetricName(tag=tag("hparams", key))) for key in metrics],
            )
            _add_summary(
                writer,
                _summary(metadata.EXPERIMENT_TAG, plugin_data_pb2.HParamsPluginData(experiment=experiment)),
                step,
            )
        self.end(writer, failed=False, step=step)

    def end(self, writer: Any, failed: bool, step: int) -> None:
        """The session end, once: success from ``finish()``, failure when the run died of an error."""
        from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2

        if self.ended:
            return
        self.ended = True
        status = api_pb2.STATUS_FAILURE if failed else api_pb2.STATUS_SUCCESS
        info = plugin_data_pb2.SessionEndInfo(status=status, end_time_secs=time.time())
        _add_summary(
            writer,
            _summary(metadata.SESSION_END_INFO_TAG, plugin_data_pb2.HParamsPluginData(session_end_info=info)),
            step,
        )


def _add_summary(writer: Any, summary: Any, step: int) -> None:
    """Plugin records need the writer's file writer (torch's and tensorboardX's SummaryWriter)."""
    file_writer = any_file_writer(writer)
    if file_writer is None:
        raise TypeError(
            f"{type(writer).__name__} has no file writer; hyperparameters need a "
            "torch.utils.tensorboard or tensorboardX SummaryWriter"
        )
    file_writer.add_summary(summary, step)
