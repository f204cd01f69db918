"""The ``introspect`` command: a thin shell over the library (see ``introspect --help``)."""

from __future__ import annotations

import shutil
import subprocess
import sys

import click

from . import __version__

__all__ = ["main"]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="introspect")
def main() -> None:
    """See inside PyTorch models: summaries, graphs, histograms and a debugger, in TensorBoard."""


@main.command()
@click.option("--logdir", required=True, type=click.Path(file_okay=False), help="Directory of runs to show.")
@click.option("--port", default=6006, show_default=True, type=click.IntRange(0, 65535), help="Port to serve on (0: any free one).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind; 0.0.0.0 exposes it to the network.")
def board(logdir: str, port: int, host: str) -> None:
    """Start TensorBoard on LOGDIR, bound to 127.0.0.1 unless --host says otherwise.

    Example: introspect board --logdir runs
    """
    exe = shutil.which("tensorboard")
    command = [exe] if exe else [sys.executable, "-m", "tensorboard.main"]
    command += ["--logdir", logdir, "--port", str(port), "--host", host]
    click.echo(f"TensorBoard for {logdir} at http://{host}:{port}/ (Ctrl-C to stop)", err=True)
    try:
        raise SystemExit(subprocess.call(command))
    except KeyboardInterrupt:
        raise SystemExit(130) from None


if __name__ == "__main__":  # pragma: no cover
    main()
