"""Ring classification: the tutorial's Keras-style fit loop, with early stopping, under ``watch``.

4000 positives on a ring of radius 5 ± 1 and 4000 negatives at radius 8 ± 1 (uniform angle), split
70/30 at random. A 2→16→8→1 MLP (193 parameters, ReLU) learns which ring a point is on with
BCEWithLogitsLoss and Adam (lr 1e-4, batch 16); training stops when val_acc has not improved for
10 epochs (at most 100), and the best epoch's weights are put back, as the tutorial's ``fit`` did.
The tutorial stopped at epoch 69 with val_acc 0.9204.

The loop logs ``train/loss``, ``train/acc``, ``val/loss`` and ``val/acc`` once per epoch against
``w.step``; ``watch(model, writer, optimizer=optimizer, every=<steps per epoch>)`` adds, once per
epoch, histograms of every layer's output and gradient and of every weight and its gradient, the
gradient norms and update/weight ratios, the summary and the graph — the tutorial's
``TensorBoardCallback(log_weight=True)`` and more, without a callback.

    python examples/ring.py --logdir runs/ring          # about a minute on a laptop CPU
    python examples/ring.py --quick                     # 3 epochs, for tests
    tensorboard --logdir runs/ring --host 127.0.0.1
"""

from __future__ import annotations

import copy
import math
import sys
import time
from argparse import Namespace
from pathlib import Path
from typing import Any

# Run as `python examples/ring.py` from anywhere: make the repo importable.
REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset, random_split  # noqa: E402
from torch.utils.tensorboard import SummaryWriter  # noqa: E402

from examples.cli import example_parser, positive_int  # noqa: E402
from introspect import watch

# The tutorial's settings. Kept in one dict so they can be logged as TensorBoard hyperparameters.
HPARAMS = {"lr": 1e-4, "batch_size": 16, "hidden": "16-8", "patience": 10, "max_epochs": 100}


class RingMLP(nn.Module):
    """2 → 16 → 8 → 1 with ReLU; one logit out (the loss applies the sigmoid). 193 parameters.

    The tutorial calls ``F.relu``; ReLU modules here give the activations after each ReLU their
    own tags (``activations/act1``) and let the debugger check them for dead units.
    """

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(2, 16)
        self.act1 = nn.ReLU()
        self.fc2 = nn.Linear(16, 8)
        self.act2 = nn.ReLU()
        self.fc3 = nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(self.act2(self.fc2(self.act1(self.fc1(x)))))


def ring_data(n_positive: int = 4000, n_negative: int = 4000, seed: int = 0) -> TensorDataset:
    """Points ``(x, y)`` with label 1 at radius 5 ± 1 and label 0 at radius 8 ± 1."""
    g = torch.Generator().manual_seed(seed)

    def ring(n: int, radius: float) -> torch.Tensor:
        r = radius + torch.randn(n, 1, generator=g)
        theta = 2 * math.pi * torch.rand(n, 1, generator=g)
        return torch.cat([r * torch.cos(theta), r * torch.sin(theta)], dim=1)

    x = torch.cat([ring(n_positive, 5.0), ring(n_negative, 8.0)])
    y = torch.cat([torch.ones(n_positive, 1), torch.zeros(n_negative, 1)])
    return TensorDataset(x, y)


def evaluate(model: nn.Module, loader: DataLoader, loss_fn: nn.Module) -> tuple[float, float]:
    """Mean loss and accuracy over ``loader``, in eval mode without gradients (not a watched step)."""
    model.eval()
    total_loss, correct, n = 0.0, 0, 0
    with torch.no_grad():
        for x, y in loader:
            logits = model(x)
            total_loss += loss_fn(logits, y).item() * len(y)
            correct += int(((logits > 0).float() == y).sum())
            n += len(y)
    return total_loss / n, correct / n


def parse_args(argv: list[str] | None = None) -> Namespace:
    parser = example_parser(__doc__, "ring", quick="at most 3 epochs, for tests")
    parser.add_argument(
        "--epochs",
        type=positive_int,
        default=HPARAMS["max_epochs"],
        help="at most this many epochs (default: %(default)s)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Train until early stopping; returns the per-epoch history, the best epoch and its val_acc."""
    args = parse_args(argv)
    # A 193-parameter model: one thread is faster than several (no fork/join per tiny op).
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    max_epochs = min(args.epochs, 3) if args.quick else args.epochs

    dataset = ring_data(seed=args.seed)
    n_train = int(len(dataset) * 0.7)
    split = torch.Generator().manual_seed(args.seed)
    train_set, val_set = random_split(dataset, [n_train, len(dataset) - n_train], generator=split)
    train_loader = DataLoader(
        train_set, batch_size=HPARAMS["batch_size"], shuffle=True, generator=torch.Generator().manual_seed(args.seed)
    )
    val_loader = DataLoader(val_set, batch_size=HPARAMS["batch_size"])

    model = RingMLP()
    loss_fn = nn.BCEWithLogitsLoss()
    optimizer = torch.optim.Adam(model.parameters(), lr=HPARAMS["lr"])

    history: list[dict[str, float]] = []
    best = {"epoch": 0, "val_acc": -1.0, "state": None}
    started = time.perf_counter()
    # hparams= and finish(metrics=) put this run in TensorBoard's HPARAMS tab, beside other runs.
    with SummaryWriter(args.logdir) as writer:
        with watch(model, writer, optimizer=optimizer, every=len(train_loader), hparams=HPARAMS) as w:
            for epoch in range(1, max_epochs + 1):
                model.train()
                total_loss, correct = 0.0, 0
                for x, y in train_loader:
                    logits = model(x)
                    loss = loss_fn(logits, y)
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
                    total_loss += loss.item() * len(y)
                    correct += int(((logits.detach() > 0).float() == y).sum())
                val_loss, val_acc = evaluate(model, val_loader, loss_fn)
                row = {
                    "epoch": epoch,
                    "train/loss": total_loss / n_train,
                    "train/acc": correct / n_train,
                    "val/loss": val_loss,
                    "val/acc": val_acc,
                }
                history.append(row)
                for name in ("train/loss", "train/acc", "val/loss", "val/acc"):
                    writer.add_scalar(name, row[name], w.step)
                print(
                    f"epoch {epoch:3d}: train_loss {row['train/loss']:.4f} train_acc {row['train/acc']:.4f}"
                    f"  val_loss {val_loss:.4f} val_acc {val_acc:.4f}"
                )
                if val_acc > best["val_acc"]:
                    best = {"epoch": epoch, "val_acc": val_acc, "state": copy.deepcopy(model.state_dict())}
                elif epoch - best["epoch"] >= HPARAMS["patience"]:
                    print(f"val_acc without improvement in {HPARAMS['patience']} epochs: early stopping")
                    break
            w.finish(metrics={"best_val_acc": best["val_acc"], "best_epoch": best["epoch"], "epochs": len(history)})
    seconds = time.perf_counter() - started

    model.load_state_dict(best["state"])  # the best epoch's weights, as the tutorial's fit() restores them
    print(w.report())
    print(
        f"stopped after epoch {len(history)} in {seconds:.1f} s; best val_acc {best['val_acc']:.4f} "
        f"at epoch {best['epoch']}"
    )
    print(f"logs written to {args.logdir}")
    return {
        "history": history,
        "epochs": len(history),
        "best_epoch": best["epoch"],
        "best_val_acc": best["val_acc"],
        "seconds": seconds,
        "hparams": dict(HPARAMS),
        "model": model,
    }


if __name__ == "__main__":
    main()
