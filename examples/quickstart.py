"""Quickstart: watch a small CNN learn, then look inside it in TensorBoard.

Trains ``SeedCNN`` (the tutorial's 54,273-parameter CNN) to tell two kinds of synthetic 32x32
images apart, entirely inside ``with watch(model, writer, every=10) as w:``. That one line gives,
with no other change to the training loop:

* the model summary (printed on the first batch, and under TEXT as ``model/summary``),
* the model graph (GRAPHS),
* every 10 steps, histograms of each layer's output (``activations/...``), of the gradient
  w.r.t. that output (``activation_grads/...``), of every parameter (``weights/...``) and of its
  gradient (``grads/...``), plus gradient norms (SCALARS, ``grad_norm/...``),
* a check of every layer's output for NaN/Inf, summed up by ``w.report()`` at the end.

The loop logs its own ``train/loss``, ``train/acc`` and ``val/acc`` against ``w.step``, so they line
up with the histograms. Nothing is downloaded: the images are made in memory (see data.py).

    python examples/quickstart.py                    # 3 epochs of 1,280 images, logs in runs/quickstart
    python examples/quickstart.py --quick            # 1 epoch on 128 images, a few seconds
    tensorboard --logdir runs/quickstart --host 127.0.0.1
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# Run as `python examples/quickstart.py` from anywhere: make `examples` importable.
REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402
from torch.utils.tensorboard import SummaryWriter  # noqa: E402

from examples.cli import example_parser, positive_int  # noqa: E402
from examples.data import synthetic_images  # noqa: E402
from examples.models import SeedCNN  # noqa: E402
from introspect import watch


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = example_parser(__doc__, "quickstart", quick="tiny run for tests: 1 epoch on 128 images")
    parser.add_argument("--epochs", type=positive_int, default=3, help="training epochs (default: %(default)s)")
    return parser.parse_args(argv)


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return ((logits > 0).float() == labels).float().mean().item()


def main(argv: list[str] | None = None) -> float:
    args = parse_args(argv)
    torch.manual_seed(args.seed)

    n_train, n_val, epochs = (64, 32, 1) if args.quick else (640, 256, args.epochs)
    train_x, train_y = synthetic_images(n_train, seed=args.seed)
    val_x, val_y = synthetic_images(n_val, seed=args.seed + 1)
    train_loader = DataLoader(TensorDataset(train_x, train_y.float()), batch_size=64, shuffle=True)
    val_loader = DataLoader(TensorDataset(val_x, val_y.float()), batch_size=256)

    model = SeedCNN()
    loss_fn = nn.BCEWithLogitsLoss()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    val_acc = 0.0
    with SummaryWriter(args.logdir) as writer:
        with watch(model, writer, every=10) as w:
            for epoch in range(epochs):
                model.train()
                for images, labels in train_loader:
                    logits = model(images).squeeze(1)
                    loss = loss_fn(logits, labels)
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
                    writer.add_scalar("train/loss", loss.item(), w.step)
                    writer.add_scalar("train/acc", accuracy(logits, labels), w.step)

                model.eval()
                correct = 0.0
                with torch.no_grad():
                    for images, labels in val_loader:
                        correct += accuracy(model(images).squeeze(1), labels) * len(labels)
                val_acc = correct / len(val_loader.dataset)
                writer.add_scalar("val/acc", val_acc, w.step)
                print(f"epoch {epoch + 1}/{epochs}: loss {loss.item():.4f}, val accuracy {val_acc:.3f}")

    print(w.report())
    print(f"final val accuracy: {val_acc:.3f}")
    print(f"logs written to {args.logdir}")
    return val_acc


if __name__ == "__main__":
    main()
