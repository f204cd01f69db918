"""Histograms: a normal distribution sliding from mean -10 to 9, then a real model's weights moving.

Two runs (HISTOGRAMS, or DISTRIBUTIONS for the same data as bands):

* ``normal``: the tutorial's example verbatim, by hand: ``add_histogram("w", randn(100, 20) + mean,
  step)`` for mean = -10, -9, ..., 9 — one ridge per step, each one to the right of the last.
* ``cnn``: the same picture for something real, with no ``add_histogram`` at all: the tutorial's
  CNN learns the synthetic two-class images under ``watch(model, writer, every=10)``, which writes
  ``weights/{param}`` (and ``grads/``, ``activations/``, ``activation_grads/``) every 10 steps.
  The weights start where PyTorch's initialisation put them and spread as Adam moves them.

    python examples/histograms.py --logdir runs/histograms
    python examples/histograms.py --quick               # 40 training steps instead of 200
    tensorboard --logdir runs/histograms --host 127.0.0.1
"""

from __future__ import annotations

import sys
from argparse import Namespace
from pathlib import Path
from typing import Any

# Run as `python examples/histograms.py` from anywhere: make the repo importable.
REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.tensorboard import SummaryWriter  # noqa: E402

from examples.cli import example_parser  # noqa: E402
from examples.data import synthetic_images  # noqa: E402
from examples.models import SeedCNN  # noqa: E402
from introspect import watch

MEANS = range(-10, 10)
EVERY = 10
WATCHED_PARAM = "linear1.weight"  # whose mean the loop notes down, for the tests to compare with


def shifting_normal(logdir: Path, seed: int) -> list[float]:
    """The tutorial's loop; returns the sample mean of each step's tensor."""
    g = torch.Generator().manual_seed(seed)
    means = []
    with SummaryWriter(str(logdir)) as writer:
        for step, mean in enumerate(MEANS):
            w = 1.0 * torch.randn((100, 20), generator=g) + mean
            writer.add_histogram("w", w, step)
            means.append(w.mean().item())
    return means


def watched_weights(logdir: Path, steps: int, seed: int) -> dict[int, float]:
    """Train the seed CNN under watch; returns ``{step: mean of WATCHED_PARAM}`` at each logging step,
    as the step's forward saw it (what ``weights/linear1.weight`` at that step must show)."""
    torch.manual_seed(seed)
    images, labels = synthetic_images(512, seed=seed)
    model = SeedCNN()
    weight = dict(model.named_parameters())[WATCHED_PARAM]
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = nn.BCEWithLogitsLoss()
    g = torch.Generator().manual_seed(seed)
    seen: dict[int, float] = {}
    with watch(model, str(logdir), every=EVERY, summary=False) as w:
        for step in range(steps):
            index = torch.randint(0, len(images), (32,), generator=g)
            if step % EVERY == 0:
                seen[step] = weight.mean().item()
            loss = loss_fn(model(images[index]).squeeze(1), labels[index].float())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            w.writer.add_scalar("train/loss", loss.item(), w.step)
    print(w.report())
    return seen


def parse_args(argv: list[str] | None = None) -> Namespace:
    parser = example_parser(__doc__, "histograms", quick="40 training steps instead of 200, for tests")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Write both runs; returns the normal's sample means and the watched weight's means by step."""
    args = parse_args(argv)
    torch.set_num_threads(1)
    logdir = Path(args.logdir)
    normal = shifting_normal(logdir / "normal", args.seed)
    weights = watched_weights(logdir / "cnn", 40 if args.quick else 200, args.seed)
    print(f"logs written to {logdir}/{{normal,cnn}}; see them with:")
    print(f"  tensorboard --logdir {logdir} --host 127.0.0.1")
    return {"normal_means": normal, "weight_means": weights, "param": WATCHED_PARAM}


if __name__ == "__main__":
    main()
