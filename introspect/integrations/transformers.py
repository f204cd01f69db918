"""``IntrospectCallback`` for the Hugging Face ``Trainer``: ``watch()`` for the length of ``train()``.

>>> from introspect.integrations.transformers import IntrospectCallback  # doctest: +SKIP
>>> with IntrospectCallback(every=10) as callback:
...     Trainer(model=model, args=args, train_dataset=data, callbacks=[callback]).train()

* Log directory: ``logdir``, else ``args.logging_dir`` where the installed transformers has it
  (version 5 dropped it), else ``<output_dir>/runs``.
* Steps follow ``state.global_step``: the micro-batches of one accumulated step make one step.
* Only the main process (``state.is_world_process_zero``) watches. ``graph`` is off by default:
  the Trainer calls the model with keyword arguments only, which ``add_graph`` cannot trace.
* Hyperparameters: the usual training arguments (learning rate, batch size, epochs, ...) with
  ``hparams=`` on top; the final metrics are the last ``loss``/``train_loss``/``eval_*`` values in
  ``state.log_history``.
* Hooks are removed at ``on_train_end``. The Trainer calls no callback when ``train()`` raises, so
  use the callback as a context manager around ``train()`` (or call ``close()`` in a ``finally``)
  to remove them then too; otherwise they go at the next ``train()`` or when the callback is
  garbage-collected with its Trainer.
"""

from __future__ import annotations

import functools
import os
import weakref
from typing import Any

from ..live import Watcher, watch
from . import callback_options, final_metrics, framework_hparams, import_extra

transformers = import_extra(("transformers",), extra="transformers")

__all__ = ["IntrospectCallback"]

# TrainingArguments that decide a run's outcome most often: HPARAMS columns, not all ~150 fields.
TRAINING_HPARAMS = (
    "learning_rate",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "num_train_epochs",
    "max_steps",
    "weight_decay",
    "warmup_steps",
    "lr_scheduler_type",
    "optim",
    "seed",
)


def _is_final_metric(name: str) -> bool:
    return name in ("loss", "train_loss") or (
        name.startswith("eval_") and not name.endswith(("_runtime", "_per_second"))
    )


TrainerCallback: Any = transformers.TrainerCallback  # a base class known only at run time (the extra)


class IntrospectCallback(TrainerCallback):
    """Watch the model while ``Trainer.train`` runs; ``**watch_options`` as for ``watch()``."""

    def __init__(self, logdir: str | os.PathLike | None = None, **watch_options: Any) -> None:
        # The Trainer calls the model with keyword arguments only, which add_graph cannot trace.
        self._options = {"graph": False, **callback_options(watch_options)}
        self._logdir = logdir
        self._watcher: Watcher | None = None
        self._finalizer: weakref.finalize | None = None

    @property
    def watcher(self) -> Watcher | None:
        """The watcher of the current (or last) ``train()`` on the main process; None elsewhere."""
        return self._watcher

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        # A watch left open by a train() that raised, or by auto_find_batch_size's retry.
        self.close()
        if not state.is_world_process_zero or model is None:
            return
        logdir = (
            self._logdir
            or getattr(args, "logging_dir", None)
            or os.path.join(args.output_dir or "trainer_output", "runs")
        )
        options = dict(self._options)
        found = {
            name: getattr(getattr(args, name), "value", getattr(args, name))
            for name in TRAINING_HPARAMS
            if hasattr(args, name)
        }
        options["hparams"] = framework_hparams(found, options.get("hparams"))
        # The step function holds the state, not the callback, so the finalizer below can run.
        step_fn = functools.partial(getattr, state, "global_step")
        self._watcher = watch(model, logdir, step_fn=step_fn, **options)
        self._finalizer = weakref.finalize(self, self._watcher.close)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._watcher is None:
            return
        entries = [(k, v) for log in state.log_history for k, v in log.items() if _is_final_metric(k)]
        try:
            self._watcher.finish(metrics=final_metrics(entries))
        finally:
            self.close()

    def close(self) -> None:
        """Remove every hook and write what is left (done at ``on_train_end`` and on leaving ``with``)."""
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        if self._watcher is not None:
            self._watcher.close()

    def __enter__(self) -> IntrospectCallback:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
