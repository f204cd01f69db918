"""Lightning: ``IntrospectCallback`` watches the tutorial CNN through ``trainer.fit``.

The LightningModule wraps ``SeedCNN`` and trains it on the synthetic bar images (see data.py), with
the callback in the Trainer's list and nothing else changed. The callback writes through the
Trainer's TensorBoardLogger, so the histograms (``activations/model.conv1``, ``weights/...``,
``grads/...``) sit in the logger's run beside Lightning's own ``train_loss`` and ``val_acc``, at
the same ``global_step``. The module's ``save_hyperparameters()`` and the final
``callback_metrics`` become a row of TensorBoard's HPARAMS dashboard.

    python examples/lightning_callback.py --logdir runs/lightning_callback
    python examples/lightning_callback.py --quick      # a few seconds, for tests
    tensorboard --logdir runs/lightning_callback --host 127.0.0.1
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# Run as `python examples/lightning_callback.py` from anywhere: make `examples` importable.
REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import lightning.pytorch as L  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.loggers import TensorBoardLogger  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from examples.cli import example_parser, positive_int  # noqa: E402
from examples.data import synthetic_images  # noqa: E402
from examples.models import SeedCNN  # noqa: E402
from introspect.integrations.lightning import IntrospectCallback


class BarClassifier(L.LightningModule):
    """``training_step`` calls ``self.model`` directly: the callback counts steps by global_step."""

    def __init__(self, lr: float = 1e-3, batch_size: int = 64) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = SeedCNN()
        self.loss_fn = nn.BCEWithLogitsLoss()

    def training_step(self, batch, batch_idx):
        images, labels = batch
        loss = self.loss_fn(self.model(images).squeeze(1), labels)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        images, labels = batch
        logits = self.model(images).squeeze(1)
        self.log("val_acc", ((logits > 0).float() == labels).float().mean())

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = example_parser(__doc__, "lightning_callback", quick="tiny run for tests: 1 epoch on 128 images")
    parser.add_argument("--epochs", type=positive_int, default=2, help="training epochs (default: %(default)s)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    """Train, and return what happened: the log directory, steps, final metrics and findings."""
    args = parse_args(argv)
    L.seed_everything(args.seed, verbose=False)
    n_train, n_val, epochs = (64, 32, 1) if args.quick else (320, 128, args.epochs)
    train_x, train_y = synthetic_images(n_train, seed=args.seed)
    val_x, val_y = synthetic_images(n_val, seed=args.seed + 1)
    train_loader = DataLoader(TensorDataset(train_x, train_y.float()), batch_size=64, shuffle=True)
    val_loader = DataLoader(TensorDataset(val_x, val_y.float()), batch_size=256)

    # name="" and version="" put the run exactly in --logdir; default_hp_metric=False leaves the
    # HPARAMS columns to the callback's final metrics.
    logger = TensorBoardLogger(args.logdir, name="", version="", default_hp_metric=False)
    callback = IntrospectCallback(every=5)
    trainer = L.Trainer(
        max_epochs=epochs,
        logger=logger,
        callbacks=[callback],
        accelerator="cpu",
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=5,
    )
    trainer.fit(BarClassifier(), train_loader, val_loader)

    watcher = callback.watcher
    print(watcher.report())
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    print(f"global_step {trainer.global_step}, final metrics {metrics}")
    print(f"logs written to {args.logdir}")
    return {
        "logdir": args.logdir,
        "global_step": trainer.global_step,
        "metrics": metrics,
        "alerts": len(watcher.alerts),
    }


if __name__ == "__main__":
    main()
