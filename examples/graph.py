"""Model structure: the tutorials' CNN graphs and summary, one introspect call each.

Two runs, one per tutorial (open GRAPHS and pick the run; the summary is under TEXT):

* ``seed000_cnn224``: the first tutorial's CNN (``SigmoidCNN``: conv-pool-conv-pool-adaptive
  pool-linear-relu-linear-sigmoid) traced on one 1x3x224x224 image — its ``add_graph`` call.
* ``seed001_cnn32``: the second tutorial's CNN (``SeedCNN``, with dropout, 54,273 parameters) on
  one 1x3x32x32 image: its torchinfo summary, printed and written as ``model/summary``, and its graph.

Both go through the functions ``watch`` itself uses on the first batch (``introspect.summary``,
``write_graph``), so the model's RNG, buffers and train/eval flags are put back afterwards, and a
model that cannot be traced gets one warning instead of a traceback. Inside a training loop,
``watch(model, writer)`` does both on the first real batch with no extra line at all.

    python examples/graph.py --logdir runs/graph
    tensorboard --logdir runs/graph --host 127.0.0.1      # GRAPHS, TEXT
"""

from __future__ import annotations

import sys
from argparse import Namespace
from pathlib import Path
from typing import Any

# Run as `python examples/graph.py` from anywhere: make the repo importable.
REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402
from torch.utils.tensorboard import SummaryWriter  # noqa: E402

import introspect  # noqa: E402
from examples.cli import example_parser  # noqa: E402
from examples.models import SeedCNN, SigmoidCNN  # noqa: E402
from introspect.analysis.summary import summary_markdown, write_graph
from introspect.records.tags import SUMMARY_TAG

RUNS = ("seed000_cnn224", "seed001_cnn32")


def parse_args(argv: list[str] | None = None) -> Namespace:
    parser = example_parser(__doc__, "graph", quick="for tests (the same run: it takes a second anyway)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Write both runs; returns the summary text, the parameter count and whether each graph was written."""
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    logdir = Path(args.logdir)

    # Seed 000: writer.add_graph(model, input_to_model=torch.rand(1, 3, 224, 224)).
    with SummaryWriter(str(logdir / RUNS[0])) as writer:
        graph224 = write_graph(writer, SigmoidCNN(), (torch.rand(1, 3, 224, 224),))

    # Seed 001: summary(net, input_shape=(3, 32, 32)), then add_graph(net, torch.rand(1, 3, 32, 32)).
    net = SeedCNN()
    image = torch.rand(1, 3, 32, 32)
    text = introspect.summary(net, image)
    print(text)
    with SummaryWriter(str(logdir / RUNS[1])) as writer:
        writer.add_text(SUMMARY_TAG, summary_markdown(text))
        graph32 = write_graph(writer, net, (image,))

    print(f"graphs written to {logdir}/{{{','.join(RUNS)}}}; see them with:")
    print(f"  tensorboard --logdir {logdir} --host 127.0.0.1")
    return {
        "summary": text,
        "params": sum(p.numel() for p in net.parameters()),
        "graphs": dict(zip(RUNS, (graph224, graph32))),
    }


if __name__ == "__main__":
    main()
