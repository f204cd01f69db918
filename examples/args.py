"""The command line every example shares: ``--logdir``, ``--quick`` (for tests), ``--seed``."""

from __future__ import annotations

import argparse

__all__ = ["example_parser", "count"]


def count(text: str) -> int:
    """An argparse type: an integer >= 1 (epochs, steps)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def example_parser(doc: str, logdir: str, quick: str) -> argparse.ArgumentParser:
    """A parser described by the first line of the example's docstring, with the shared options."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--logdir", default=logdir, help="TensorBoard log directory (default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help=quick)
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    return parser
