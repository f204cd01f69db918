"""Reading the HPARAMS plugin's records back from event files, as TensorBoard's hparams plugin does:
EventAccumulator's plugin metadata for plugin_name "hparams", parsed as HParamsPluginData."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def hparams_records(logdir: str | Path) -> dict[str, Any]:
    """``{"start": SessionStartInfo | None, "experiment": Experiment | None, "end": SessionEndInfo | None}``
    of the run in ``logdir`` (its own event files only, not sub-runs)."""
    from tensorboard.plugins.hparams import metadata, plugin_data_pb2

    from tests.support.events import read_events

    acc = read_events(logdir)
    try:
        content = acc.PluginTagToContent(metadata.PLUGIN_NAME)
    except KeyError:  # no record of the plugin at all
        content = {}
    records: dict[str, Any] = {"start": None, "experiment": None, "end": None}
    for key, tag_name, field in (
        ("start", metadata.SESSION_START_INFO_TAG, "session_start_info"),
        ("experiment", metadata.EXPERIMENT_TAG, "experiment"),
        ("end", metadata.SESSION_END_INFO_TAG, "session_end_info"),
    ):
        if tag_name in content:
            data = plugin_data_pb2.HParamsPluginData.FromString(content[tag_name])
            records[key] = getattr(data, field)
    return records


def hparam_values(start: Any) -> dict[str, Any]:
    """The session start's hyperparameters as Python values (bool, float or str)."""
    values = {}
    for name, value in start.hparams.items():
        kind = value.WhichOneof("kind")
        values[name] = getattr(value, kind)
    return values


def metric_tags(experiment: Any) -> list[str]:
    return [m.name.tag for m in experiment.metric_infos]


def status_name(end: Any) -> str:
    from tensorboard.plugins.hparams import api_pb2

    return api_pb2.Status.Name(end.status)


def event_dirs(logdir: str | Path) -> set[Path]:
    """Every directory under ``logdir`` holding an event file: one run has exactly one."""
    return {p.parent for p in Path(logdir).rglob("events.out.tfevents.*")}
