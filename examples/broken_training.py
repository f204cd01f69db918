"""Broken training: four small runs that go wrong in known ways, and what the debugger says.

Each run trains under ``watch(...)`` with its own log directory, then prints ``w.report()``:

* ``nan``: a deep tanh network with an L2 normalisation (``x / ||x||``) after its 4th block. Halfway
  through, one batch carries an all-zero padding row; the bias-free layers before the division
  keep it zero, and 0 / 0 is NaN. Every later layer turns NaN too; the report names the
  normalisation layer and the step, not the layers downstream.
* ``exploding``: a regression MLP trained by SGD with lr=1, ten times what trains it well; the
  loss and the gradient norms grow by orders of magnitude per step until they overflow.
* ``dead_relu``: a hidden layer whose bias was initialised to -10: its ReLU outputs zero for every
  sample, so nothing before it ever gets a gradient.
* ``vanishing``: a 12-layer sigmoid MLP with default initialisation; a sigmoid's slope is at most
  1/4, so the gradient shrinks 5-9x per layer on its way back and the first layers hardly learn.

    python examples/broken_training.py                 # logs in runs/broken/{nan,exploding,...}
    python examples/broken_training.py --quick         # fewer steps, a few seconds
    tensorboard --logdir runs/broken --host 127.0.0.1  # TEXT: diagnostics/alerts, IMAGES: grad flow
"""

from __future__ import annotations

import argparse
import math
import sys
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path

# Run as `python examples/broken_training.py` from anywhere: make the repo importable.
REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from examples.cli import example_parser  # noqa: E402
from introspect import Alert, watch

SCENARIOS = ("nan", "exploding", "dead_relu", "vanishing")
# The point here is the debugger: no model summary on stdout, no graph.
OPTIONS = dict(summary=False, graph=False)


# --------------------------------------------------------------------------- models
class Block(nn.Module):
    def __init__(self, width: int, bias: bool = True) -> None:
        super().__init__()
        self.linear = nn.Linear(width, width, bias=bias)
        self.act = nn.Tanh()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.linear(x))


class L2Normalize(nn.Module):
    """Projects each sample's features onto the unit sphere, as cosine-similarity heads do:
    ``x / ||x||``. Fine for every real sample; a zero row has norm 0, and 0 / 0 is NaN."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x / x.norm(dim=-1, keepdim=True)


class DeepTanhNet(nn.Module):
    """A stem and 8 tanh blocks with the normalisation after the 4th (``body.normalize``).

    The layers before it have no bias (as layers before a normalisation often do), so an all-zero
    input row stays exactly zero until it reaches the division.
    """

    def __init__(self, width: int = 32, depth: int = 8) -> None:
        super().__init__()
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        for i in range(depth):
            if i == depth // 2:
                layers["normalize"] = L2Normalize()
            layers[f"block{i}"] = Block(width, bias=i >= depth // 2)
        self.stem = nn.Linear(8, width, bias=False)
        self.body = nn.Sequential(layers)
        self.head = nn.Linear(width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(torch.tanh(self.stem(x))))


def mlp(widths: list[int], activation: Callable[[], nn.Module]) -> nn.Sequential:
    """``Linear, act, Linear, act, ..., Linear`` with names ``fc1, act1, fc2, act2, ..., out``."""
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    for i, (a, b) in enumerate(zip(widths[:-2], widths[1:-1]), start=1):
        layers[f"fc{i}"] = nn.Linear(a, b)
        layers[f"act{i}"] = activation()
    layers["out"] = nn.Linear(widths[-2], widths[-1])
    return nn.Sequential(layers)


# --------------------------------------------------------------------------- data
def regression_data(n: int, features: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A smooth target of a few input features, plus a little noise."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=g)
    y = torch.sin(x[:, :1]) + 0.5 * x[:, 1:2] * x[:, 2:3] + 0.1 * torch.randn(n, 1, generator=g)
    return x, y


def batches(
    x: torch.Tensor, y: torch.Tensor, size: int, steps: int, seed: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``steps`` random mini-batches of ``size`` samples."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        index = torch.randint(0, len(x), (size,), generator=g)
        yield x[index], y[index]


# --------------------------------------------------------------------------- one run
def train(
    name: str,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data: Iterator[tuple[torch.Tensor, torch.Tensor]],
    logdir: Path,
    every: int,
) -> list[Alert]:
    """A plain training loop under ``watch``: the loop itself knows nothing of the debugger.

    Two common guards: a step whose loss is NaN/Inf is skipped (so one bad batch does not poison
    the weights), and three such steps in a row end the run (it has diverged). The watcher's
    ``on_nonfinite="warn"`` (the default) warns once per origin and lets training go on;
    "raise" would stop at the first one, inside ``loss.backward()``.
    """
    losses: list[float] = []
    bad_in_a_row = 0
    with watch(model, logdir / name, every=every, on_nonfinite="warn", **OPTIONS) as w:
        for x, y in data:
            loss = F.mse_loss(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            value = loss.item()
            losses.append(value)
            w.writer.add_scalar("train/loss", value, w.step)
            if math.isfinite(value):
                optimizer.step()
                bad_in_a_row = 0
            else:
                bad_in_a_row += 1
                if bad_in_a_row == 3:
                    print(f"the loss is {value} for the 3rd step in a row: stopping at step {w.step}")
                    break
    finite = [v for v in losses if math.isfinite(v)]
    last = f"{finite[-1]:.3g}" if finite else "never finite"
    print(
        f"{len(losses)} steps; loss {losses[0]:.3g} at the start, {last} at the last finite step; "
        f"{len(losses) - len(finite)} non-finite"
    )
    print(w.report())
    return w.alerts


def heading(title: str) -> None:
    print()
    print(title)
    print("=" * len(title))


# --------------------------------------------------------------------------- scenarios
def nan_in_a_deep_layer(logdir: Path, steps: int, seed: int) -> list[Alert]:
    heading("(a) NaN born in one deep layer: x / ||x|| of an all-zero padding row")
    torch.manual_seed(seed)
    model = DeepTanhNet()
    x, y = regression_data(2048, 8, seed)
    bad_step = steps // 2

    def data() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for step, (xb, yb) in enumerate(batches(x, y, 32, steps, seed)):
            if step == bad_step:
                xb = xb.clone()
                xb[5] = 0.0  # a padding row that slipped into the batch
            yield xb, yb

    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    return train("nan", model, optimizer, data(), logdir, every=10)


def exploding_learning_rate(logdir: Path, steps: int, seed: int) -> list[Alert]:
    heading("(b) Exploding gradients: SGD with lr=1 (lr=0.1 trains fine)")
    torch.manual_seed(seed)
    model = mlp([8, 64, 64, 1], nn.Tanh)
    x, y = regression_data(2048, 8, seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    return train("exploding", model, optimizer, batches(x, y, 32, steps, seed), logdir, every=5)


def dead_relus(logdir: Path, steps: int, seed: int) -> list[Alert]:
    heading("(c) Dead ReLUs: a hidden layer's bias initialised to -10")
    torch.manual_seed(seed)
    model = mlp([8, 64, 64, 1], nn.ReLU)
    nn.init.constant_(model.fc2.bias, -10.0)  # meant -0.1? Every unit of act2 starts (and stays) off
    x, y = regression_data(2048, 8, seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    return train("dead_relu", model, optimizer, batches(x, y, 64, steps, seed), logdir, every=10)


def vanishing_gradients(logdir: Path, steps: int, seed: int) -> list[Alert]:
    heading("(d) Vanishing gradients: a 12-layer sigmoid MLP")
    torch.manual_seed(seed)
    model = mlp([8] + [32] * 12 + [1], nn.Sigmoid)
    x, y = regression_data(2048, 8, seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    return train("vanishing", model, optimizer, batches(x, y, 64, steps, seed), logdir, every=10)


# --------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = example_parser(__doc__, "broken", quick="fewer steps, for tests")
    parser.add_argument("--only", choices=SCENARIOS, action="append", help="run only this scenario (repeatable)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, list[Alert]]:
    """Run the scenarios; returns each one's findings (``w.alerts``) by name."""
    args = parse_args(argv)
    # These models are tiny: one thread is faster than several (no fork/join per op) and does not
    # slow to a crawl when the machine is busy with something else.
    torch.set_num_threads(1)
    logdir = Path(args.logdir)
    steps = 20 if args.quick else 200
    runs = {
        "nan": nan_in_a_deep_layer,
        "exploding": exploding_learning_rate,
        "dead_relu": dead_relus,
        "vanishing": vanishing_gradients,
    }
    found = {}
    for name in args.only or SCENARIOS:
        found[name] = runs[name](logdir, steps, args.seed)
    print()
    print(f"logs written to {logdir}/{{{','.join(found)}}}; see them with:")
    print(f"  tensorboard --logdir {logdir} --host 127.0.0.1")
    return found


if __name__ == "__main__":
    main()
