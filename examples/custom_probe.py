"""A statistic of your own: an ``introspect.Probe`` that watch computes on logging steps.

Two probes on the tutorial's CNN:

* ``Sparsity`` — the share of exactly-zero outputs of every ReLU (how much of the layer is off),
  written as ``sparsity/zero_fraction/{module}``;
* ``Peak`` — the largest |value| of each convolution's output and of the gradient that reaches
  it, ``peak/out/{module}`` and ``peak/grad/{module}``: an early sign of a layer blowing up.

Their values are 1-element tensors: they stay on the model's device until the step's single
transfer, like watch's own statistics, and cost nothing off the logging cadence.

    python examples/custom_probe.py --quick
    tensorboard --logdir runs/custom_probe --host 127.0.0.1      # SCALARS: sparsity/, peak/
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402

import introspect  # noqa: E402
from examples.cli import example_parser  # noqa: E402
from examples.data import synthetic_images  # noqa: E402
from examples.models import SeedCNN  # noqa: E402


class Sparsity(introspect.Probe):
    name = "sparsity"

    def select(self, name: str, module: nn.Module) -> bool:
        return isinstance(module, nn.ReLU)

    def on_output(self, name: str, module: nn.Module, output: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"zero_fraction": (output == 0).float().mean()}


class Peak(introspect.Probe):
    name = "peak"

    def select(self, name: str, module: nn.Module) -> bool:
        return isinstance(module, nn.Conv2d)

    def on_output(self, name: str, module: nn.Module, output: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"out": output.detach().abs().amax()}

    def on_output_grad(self, name: str, module: nn.Module, grad: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"grad": grad.abs().amax()}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = example_parser(__doc__, "custom_probe", "train 20 steps instead of 200")
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    steps = 20 if args.quick else 200
    images, labels = synthetic_images(32 if args.quick else 256, seed=args.seed)
    model = SeedCNN()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = nn.BCEWithLogitsLoss()
    with introspect.watch(model, args.logdir, every=5, probes=[Sparsity(), Peak()], summary=False) as w:
        for _i in range(steps):
            index = torch.randint(0, len(images), (32,))
            loss = loss_fn(model(images[index]).squeeze(1), labels[index].float())
            opt.zero_grad()
            loss.backward()
            opt.step()
    print(w.report())
    print(f"scalars in {args.logdir}: sparsity/zero_fraction/{{module}}, peak/out/{{module}}, peak/grad/{{module}}")
    return {"steps": steps, "logdir": args.logdir, "modules": w.module_names}


if __name__ == "__main__":
    main()
