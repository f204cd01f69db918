"""``IntrospectCallback`` for Lightning: ``watch()`` for the length of ``trainer.fit``.

>>> from introspect.integrations.lightning import IntrospectCallback     # doctest: +SKIP
>>> trainer = L.Trainer(max_epochs=3, callbacks=[IntrospectCallback(every=10)])
>>> trainer.fit(module, loader)

* Writes through the trainer's ``TensorBoardLogger`` (``logger.experiment``), so the tags sit in the
  logger's run beside Lightning's own scalars; without one, in
  ``<default_root_dir>/introspect/version_N``.
* Steps follow ``trainer.global_step`` (read at each ``on_train_batch_start``): the tags of a batch
  carry the step Lightning logs it under, batches of one accumulated step make one step, and the
  steps count even when ``training_step`` calls the module's children rather than ``self(x)``.
* Only global rank 0 watches. Every hook is removed at the end of ``fit``, and on an exception
  (``on_exception``, Ctrl-C included).
* Hyperparameters: the LightningModule's ``hparams`` (``save_hyperparameters()``) with
  ``hparams=`` on top; the final metrics are ``trainer.callback_metrics`` at the end of ``fit``.
  Lightning's ``TensorBoardLogger`` writes its own HPARAMS experiment with a placeholder
  ``hp_metric`` unless made with ``default_hp_metric=False``; TensorBoard keeps the first, so pass
  that to see the callback's metric columns.
* ``optimizer=`` is not supported: Lightning runs forward and backward inside ``optimizer.step``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..live import Watcher, watch
from . import callback_options, final_metrics, framework_hparams, import_extra

pl = import_extra(("lightning.pytorch", "pytorch_lightning"), extra="lightning")

__all__ = ["IntrospectCallback"]


Callback: Any = pl.Callback  # a base class known only at run time: whichever Lightning is installed


class IntrospectCallback(Callback):
    """Watch the LightningModule while ``trainer.fit`` runs; ``**watch_options`` as for ``watch()``."""

    def __init__(self, **watch_options: Any) -> None:
        options = callback_options(watch_options)
        if options.get("optimizer") is not None:
            raise ConfigError(
                "IntrospectCallback cannot take optimizer=: Lightning runs the forward and backward "
                "inside optimizer.step(closure); steps follow trainer.global_step instead"
            )
        self._options = options
        self._watcher: Watcher | None = None
        self._global_step = 0

    @property
    def watcher(self) -> Watcher | None:
        """The watcher of the current (or last) fit on rank 0; None elsewhere."""
        return self._watcher

    def _step(self) -> int:
        return self._global_step

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        self.close()  # a watch left by an earlier fit on this callback
        if not trainer.is_global_zero:
            return
        self._global_step = trainer.global_step
        options = dict(self._options)
        options["hparams"] = framework_hparams(dict(getattr(pl_module, "hparams", {}) or {}), options.get("hparams"))
        self._watcher = watch(pl_module, _writer_for(trainer), step_fn=self._step, **options)

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self._global_step = trainer.global_step

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        if self._watcher is not None:
            self._watcher.finish(metrics=final_metrics(trainer.callback_metrics.items()))

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self.close()

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self.close()

    def close(self) -> None:
        """Remove every hook and write what is left (also done at the end of fit and on errors)."""
        if self._watcher is not None:
            self._watcher.close()


def _writer_for(trainer: Any) -> Any:
    """The first TensorBoardLogger's SummaryWriter, else a directory of our own."""
    for logger in trainer.loggers:
        if isinstance(logger, pl.loggers.TensorBoardLogger):
            return logger.experiment
    root = Path(trainer.default_root_dir) / "introspect"
    version = 0
    while (root / f"version_{version}").exists():
        version += 1
    return root / f"version_{version}"
