"""Feature maps: what the seed CNN's convolutions see, as it learns, next to the debugger.

Trains ``SeedCNN`` (the tutorial's 54,273-parameter CNN) on the synthetic two-class images (a
horizontal bar for airplanes, a vertical one for automobiles; examples/data.py) under

    watch(model, writer, every=10, image_every=30, log_inputs=True)

Feature maps are on by default (``log`` includes "feature_maps"); ``image_every`` draws them more
often than the default 10 x ``every``, so a short run shows them change. In TensorBoard's IMAGES:

* ``feature_maps/conv1``, ``feature_maps/conv2``: the first sample's channels (32 of 30x30 and
  64 of 11x11), each scaled to its own min and max. Early on they are noisy copies of the image;
  after some training conv1 has channels that light up on horizontal or vertical edges;
* ``data/inputs``: the first training batch as a grid, checked for NaN, constant and 0-255 images.

The histograms, the summary and the debugger's report (``w.report()``) work as in quickstart.py.

    python examples/feature_maps.py                    # logs in runs/feature_maps
    python examples/feature_maps.py --quick            # a few steps, for tests
    tensorboard --logdir runs/feature_maps --host 127.0.0.1
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

# Run as `python examples/feature_maps.py` from anywhere: make `examples` importable.
REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.tensorboard import SummaryWriter  # noqa: E402

from examples.cli import example_parser  # noqa: E402
from examples.data import synthetic_images  # noqa: E402
from examples.models import SeedCNN  # noqa: E402
from introspect import watch

BATCH = 32


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = example_parser(__doc__, "feature_maps", quick="a few steps, for tests")
    return parser.parse_args(argv)


def shuffled_batches(images: torch.Tensor, labels: torch.Tensor, epochs: int):
    """``(images, float labels)`` batches of ``BATCH``, reshuffled every epoch."""
    for _ in range(epochs):
        order = torch.randperm(len(images))
        for start in range(0, len(images), BATCH):
            picked = order[start : start + BATCH]
            yield images[picked], labels[picked].float()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Train; returns the steps taken, the image steps, the final accuracy and the findings."""
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)  # a small CNN: one thread is as fast, and sane on a busy machine
    n, epochs, every, image_every = (64, 1, 1, 2) if args.quick else (640, 3, 10, 30)
    images, labels = synthetic_images(n, seed=args.seed)
    val_x, val_y = synthetic_images(128, seed=args.seed + 1)

    model = SeedCNN()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    with SummaryWriter(args.logdir) as writer:
        with watch(model, writer, every=every, image_every=image_every, log_inputs=True, summary=False) as w:
            for x, y in shuffled_batches(images, labels, epochs):
                loss = F.binary_cross_entropy_with_logits(model(x).squeeze(1), y)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                writer.add_scalar("train/loss", loss.item(), w.step)
        model.eval()
        with torch.no_grad():
            accuracy = ((model(val_x).squeeze(1) > 0).long() == val_y).float().mean().item()
        writer.add_scalar("val/acc", accuracy, w.step)
    steps = w.step + 1
    print(w.report())
    print(f"{steps} steps, validation accuracy {accuracy:.1%}")
    print(
        f"feature maps at steps {list(range(0, steps, image_every))}: "
        f"tensorboard --logdir {args.logdir} --host 127.0.0.1, then IMAGES"
    )
    return {
        "steps": steps,
        "image_steps": list(range(0, steps, image_every)),
        "accuracy": accuracy,
        "alerts": w.alerts,
        "logdir": Path(args.logdir),
    }


if __name__ == "__main__":
    main()
