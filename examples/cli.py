"""The command line every example shares: ``--logdir``, ``--quick`` and ``--seed``."""

from __future__ import annotations

import argparse

__all__ = ["example_parser", "positive_int"]


def positive_int(text: str) -> int:
    """An argparse ``type`` for counts (steps, epochs): an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def example_parser(doc: str, name: str, quick: str) -> argparse.ArgumentParser:
    """A parser described by ``doc``'s first line, logging to ``runs/<name>`` by default;
    ``quick`` says what ``--quick`` (the test suite's mode) changes. Add an example's own options to it."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--logdir", default=f"runs/{name}", help="TensorBoard log directory (default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help=quick)
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    return parser
