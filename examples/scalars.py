"""Scalars: SGD (lr 0.01) minimises f(x) = x² - 2x + 1 from x = 0; after 500 steps x ≈ 1, y ≈ 0.

The tutorial's ``add_scalar`` example, with f written as a module whose one parameter is x, so
``watch`` can follow it too. The loop logs its own ``x`` and ``y`` against ``w.step``; the watcher
adds, every 10 steps, ``grad_norm/x`` (|f'(x)| = |2x - 2|, shrinking by 2% a step), ``update_ratio/x``
(how far each SGD step moves x, relative to x) and histograms of x, its gradient and f's output.

    python examples/scalars.py --logdir runs/scalars
    tensorboard --logdir runs/scalars --host 127.0.0.1      # SCALARS: x, y, grad_norm/x
"""

from __future__ import annotations

import sys
from argparse import Namespace
from pathlib import Path
from typing import Any

# Run as `python examples/scalars.py` from anywhere: make the repo importable.
REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.tensorboard import SummaryWriter  # noqa: E402

from examples.cli import example_parser, positive_int  # noqa: E402
from introspect import watch


class Parabola(nn.Module):
    """f(x) = a·x² + b·x + c, with x the only trainable parameter (it starts at ``x0``)."""

    def __init__(self, a: float = 1.0, b: float = -2.0, c: float = 1.0, x0: float = 0.0) -> None:
        super().__init__()
        self.x = nn.Parameter(torch.tensor(x0))
        self.register_buffer("coefficients", torch.tensor([a, b, c]))

    def forward(self) -> torch.Tensor:
        a, b, c = self.coefficients
        return a * self.x**2 + b * self.x + c


def parse_args(argv: list[str] | None = None) -> Namespace:
    parser = example_parser(__doc__, "scalars", quick="for tests (the same 500 steps: about a second)")
    parser.add_argument("--steps", type=positive_int, default=500, help="SGD steps (default: %(default)s)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Minimise f; returns the final x and y and the number of steps."""
    args = parse_args(argv)
    torch.set_num_threads(1)
    f = Parabola()
    optimizer = torch.optim.SGD(f.parameters(), lr=0.01)

    # f takes no input, so there is nothing to summarise or trace: summary=False, graph=False.
    with SummaryWriter(args.logdir) as writer:
        with watch(f, writer, optimizer=optimizer, every=10, summary=False, graph=False) as w:
            for _ in range(args.steps):
                y = f()
                optimizer.zero_grad()
                y.backward()
                optimizer.step()
                writer.add_scalar("x", f.x.item(), w.step)  # x after this step's update
                writer.add_scalar("y", y.item(), w.step)  # f at the x this step started from

    x, y = f.x.item(), f().item()
    print(f"after {args.steps} steps: x = {x:.5f}, y = {y:.2e}")
    print(w.report())
    print(f"logs written to {args.logdir}")
    return {"x": x, "y": y, "steps": args.steps}


if __name__ == "__main__":
    main()
