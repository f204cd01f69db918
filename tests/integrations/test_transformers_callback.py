"""introspect.integrations.transformers: the callback inside a real Hugging Face Trainer, on a tiny
randomly initialised BERT (built from a config: nothing is downloaded)."""

from __future__ import annotations

import gc
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from transformers import (  # noqa: E402,E501
    BertConfig,
    BertForSequenceClassification,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from introspect import ConfigError
from introspect.integrations.transformers import IntrospectCallback
from tests.support.events import hist_steps, read_events, tags_with_prefix  # noqa: E402
from tests.support.hooks import count_hooks, hook_state  # noqa: E402
from tests.support.hparams_records import event_dirs, hparam_values, hparams_records, metric_tags, status_name  # noqa: E402

pytestmark = pytest.mark.slow  # each Trainer run takes a few seconds on a 2-core CPU

CONTRACT = {
    "activations/bert.embeddings.LayerNorm",
    "activations/bert.encoder.layer.0.output.dense",
    "activations/classifier",
    "activation_grads/classifier",
    "activation_grads/bert.encoder.layer.0.attention.self.query",
    "weights/classifier.weight",
    "weights/bert.embeddings.word_embeddings.weight",
    "grads/classifier.weight",
    "grads/bert.encoder.layer.0.output.dense.weight",
    "grad_norm/classifier.weight",
}


def tiny_bert() -> BertForSequenceClassification:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=32,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        num_labels=2,
    )
    return BertForSequenceClassification(config)


class Tokens(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 32

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(i)
        return {"input_ids": torch.randint(0, 32, (8,), generator=g), "labels": torch.tensor(i % 2)}


class RaiseAt(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise RuntimeError("training failed on purpose")


class RecordSteps(TrainerCallback):
    def __init__(self) -> None:
        self.steps: list[int] = []

    def on_step_begin(self, args, state, control, **kwargs):
        self.steps.append(state.global_step)


def _args(tmp_path: Path, **kwargs) -> TrainingArguments:
    options = dict(
        output_dir=str(tmp_path / "out"),
        max_steps=4,
        per_device_train_batch_size=4,
        report_to="none",
        use_cpu=True,
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
        learning_rate=1e-3,
    )
    options.update(kwargs)
    return TrainingArguments(**options)


def test_tags_under_output_dir_runs_with_global_step(tmp_path):
    model = tiny_bert()
    before = count_hooks(hook_state(model))
    callback, steps = IntrospectCallback(every=2, summary=False), RecordSteps()
    args = _args(tmp_path, gradient_accumulation_steps=2)
    trainer = Trainer(model=model, args=args, train_dataset=Tokens(), callbacks=[callback, steps])
    trainer.train()

    assert trainer.state.global_step == 4 and steps.steps == [0, 1, 2, 3]
    # transformers 5 has no TrainingArguments.logging_dir: <output_dir>/runs
    run = Path(getattr(args, "logging_dir", None) or tmp_path / "out" / "runs")
    assert event_dirs(tmp_path) == {run}
    acc = read_events(run)
    assert CONTRACT <= tags_with_prefix(acc, "")
    for name in CONTRACT - {"grad_norm/classifier.weight"}:
        assert hist_steps(acc, name) == [0, 2], name
    # Two micro-batches of 4 sequences of 8 tokens (16 features each) merged into one step.
    assert int(acc.Histograms("activations/bert.embeddings.LayerNorm")[0].histogram_value.num) == 2 * 4 * 8 * 16
    assert count_hooks(hook_state(model)) == before

    records = hparams_records(run)
    values = hparam_values(records["start"])
    assert values["learning_rate"] == pytest.approx(1e-3)
    assert values["gradient_accumulation_steps"] == 2 and values["max_steps"] == 4
    assert set(metric_tags(records["experiment"])) == {"hparams/loss", "hparams/train_loss"}
    assert status_name(records["end"]) == "STATUS_SUCCESS"


def test_explicit_logdir_and_user_hparams(tmp_path):
    callback = IntrospectCallback(logdir=tmp_path / "mine", every=1, summary=False, hparams={"variant": "b"})
    Trainer(model=tiny_bert(), args=_args(tmp_path, max_steps=2), train_dataset=Tokens(), callbacks=[callback]).train()
    assert event_dirs(tmp_path) == {tmp_path / "mine"}
    assert hist_steps(read_events(tmp_path / "mine"), "weights/classifier.weight") == [0, 1]
    assert hparam_values(hparams_records(tmp_path / "mine")["start"])["variant"] == "b"


def test_hooks_removed_when_train_raises_inside_with(tmp_path):
    model = tiny_bert()
    before = count_hooks(hook_state(model))
    with pytest.raises(RuntimeError, match="failed on purpose"):
        with IntrospectCallback(every=1, summary=False) as callback:
            trainer = Trainer(
                model=model, args=_args(tmp_path), train_dataset=Tokens(), callbacks=[callback, RaiseAt(2)]
            )
            trainer.train()
    assert count_hooks(hook_state(model)) == before
    run = tmp_path / "out" / "runs"
    assert hist_steps(read_events(run), "weights/classifier.weight") == [0, 1]
    assert status_name(hparams_records(run)["end"]) == "STATUS_FAILURE"


def test_a_failed_train_is_cleaned_up_by_the_next_train_or_by_gc(tmp_path):
    model = tiny_bert()
    before = count_hooks(hook_state(model))
    callback = IntrospectCallback(every=1, summary=False)
    trainer = Trainer(model=model, args=_args(tmp_path), train_dataset=Tokens(), callbacks=[callback, RaiseAt(1)])
    with pytest.raises(RuntimeError, match="failed on purpose"):
        trainer.train()
    assert count_hooks(hook_state(model)) > before  # no callback runs when train() raises...
    trainer.remove_callback(RaiseAt)
    trainer.train()  # ...the next train() closes the stale watch before its own
    assert count_hooks(hook_state(model)) == before

    callback = IntrospectCallback(every=1, summary=False)
    trainer = Trainer(model=model, args=_args(tmp_path), train_dataset=Tokens(), callbacks=[callback, RaiseAt(1)])
    with pytest.raises(RuntimeError, match="failed on purpose") as excinfo:
        trainer.train()
    assert count_hooks(hook_state(model)) > before
    del trainer, callback, excinfo  # the trainer (and so the callback) goes: its finalizer closes
    gc.collect()
    assert count_hooks(hook_state(model)) == before


def test_only_the_main_process_watches(tmp_path):
    from types import SimpleNamespace

    model = tiny_bert()
    before = count_hooks(hook_state(model))
    callback = IntrospectCallback()
    state = SimpleNamespace(is_world_process_zero=False, global_step=0)
    callback.on_train_begin(_args(tmp_path), state, None, model=model)
    assert callback.watcher is None and count_hooks(hook_state(model)) == before


def test_bad_options_fail_when_the_callback_is_made():
    with pytest.raises(ConfigError, match="unknown watch options"):
        IntrospectCallback(evry=3)
    with pytest.raises(ConfigError, match="itself"):
        IntrospectCallback(step_fn=lambda: 0)
