"""The ``introspect`` command: a thin shell over the library (see ``introspect --help``).

Every command is an :class:`IntrospectCommand` (``@main.command()`` makes one): it gets a
``--debug`` flag, and any error becomes one line ``error: ...`` on stderr with a non-zero exit code
(see ``EXIT_CODES``) instead of a traceback; ``IntrospectWarning``\\ s become ``warning: ...`` lines
and torch's own warnings are silenced. ``--debug`` shows the traceback and every warning.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable
from typing import Any

import click

from .._version import __version__
from ..errors import (
    ArchitectureError,
    InputShapeError,
    IntrospectError,
    IntrospectWarning,
    KeyMismatchError,
    LoadError,
    UnsafeLoadError,
    warn,
)
from ..load.model_inputs import InputSpec
from ..terminal import escape, escape_lines
from .options import (
    FOUND_EXIT,
    MODEL_PATH,
    BatchSizes,
    ByteSize,
    fail_on_option,
    input_options,
    model_options,
)

__all__ = ["main", "IntrospectCommand", "EXIT_CODES", "FOUND_EXIT"]

EXIT_CODES: tuple[tuple[type[BaseException], int], ...] = (
    (UnsafeLoadError, 4),
    (KeyMismatchError, 6),
    (LoadError, 3),
    (ArchitectureError, 5),
    (InputShapeError, 7),
    (IntrospectError, 1),
)
"""The exit code of each error (the first class that matches); click's usage errors exit with 2,
anything unexpected with 1, Ctrl-C with 130; ``--fail-on`` exits with ``FOUND_EXIT`` (8)."""

_WARNINGS_SHOWN = "introspect_warnings_shown"
"""``ctx.meta`` key: how many IntrospectWarning lines the command showed (``--fail-on warning``)."""


class IntrospectCommand(click.Command):
    """A command with ``--debug`` and one-line errors; ``main``'s default command class."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.params.append(
            click.Option(["--debug"], is_flag=True, help="Show the full traceback of an error, and every warning.")
        )

    def invoke(self, ctx: click.Context) -> Any:
        debug = bool(ctx.params.pop("debug", False))
        ctx.meta[_WARNINGS_SHOWN] = 0
        with warnings.catch_warnings():
            shown = warnings.showwarning

            def show(message: Any, category: Any, *where: Any, **more: Any) -> None:
                if isinstance(category, type) and issubclass(category, IntrospectWarning):
                    ctx.meta[_WARNINGS_SHOWN] += 1
                (shown if debug else _warning_line)(message, category, *where, **more)

            if not debug:
                warnings.simplefilter("ignore")
                warnings.simplefilter("default", IntrospectWarning)
            warnings.showwarning = show
            try:
                return super().invoke(ctx)
            except (click.exceptions.Exit, click.ClickException, click.Abort):
                raise
            except KeyboardInterrupt:
                click.echo("interrupted", err=True)
                ctx.exit(130)
            except Exception as e:
                if debug:
                    raise
                code = next((c for cls, c in EXIT_CODES if isinstance(e, cls)), 1)
                # One line, and names from files in it shown, not obeyed (see terminal.escape).
                message = escape(str(e).strip().replace("\n", " ") or type(e).__name__)
                if not isinstance(e, IntrospectError):
                    message = f"{type(e).__name__}: {message} (run again with --debug for the traceback)"
                click.echo(f"error: {message}", err=True)
                ctx.exit(code)


def _warning_line(message: Any, category: Any, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
    click.echo(f"warning: {escape(str(message).removeprefix('introspect: ').replace(chr(10), ' '))}", err=True)


def _fail_on(fail_on: str, findings: int) -> None:
    """``--fail-on``: exit ``FOUND_EXIT`` (after the output, with one line saying why) when the
    command found ``findings`` things, or with ``warning`` showed a warning line."""
    ctx = click.get_current_context()
    warned = int(ctx.meta.get(_WARNINGS_SHOWN, 0))
    if fail_on == "never" or not (findings or (fail_on == "warning" and warned)):
        return
    why = [f"{findings} finding{'s' if findings != 1 else ''}"] if findings else []
    if fail_on == "warning" and warned:
        why.append(f"{warned} warning{'s' if warned != 1 else ''}")
    click.echo(f"exit {FOUND_EXIT}: {' and '.join(why)} (--fail-on {fail_on})", err=True)
    ctx.exit(FOUND_EXIT)


class _IntrospectGroup(click.Group):
    command_class = IntrospectCommand


@click.group(cls=_IntrospectGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="introspect")
def main() -> None:
    """See inside PyTorch models: summaries, graphs, histograms and a debugger, in TensorBoard.

    MODEL files are read safely: a state_dict or checkpoint dict (with --arch), a TorchScript
    archive (its weights, with --arch), a torch.export program (.pt2), a safetensors file, or a
    Hugging Face save_pretrained folder (built from its config.json, offline). A pickled
    nn.Module, and a TorchScript archive run as it is, need --unsafe: unpickling and TorchScript
    run arbitrary code.
    """


# --------------------------------------------------------------------------- commands
@main.command()
@click.argument("model", type=MODEL_PATH)
@input_options(shape_only=True)
@click.option(
    "--depth", type=click.IntRange(0), default=3, show_default=True, help="How deep the table goes into submodules."
)
@model_options
def summary(
    model: str,
    inputs: InputSpec,
    depth: int,
    arch: str | None,
    arch_kwargs: dict | None,
    unsafe: bool,
) -> None:
    """Print MODEL's torchinfo table.

    Layers, output shapes and parameter counts, from one forward of a random input.

    \b
    Example:
      introspect summary weights.pt --arch torchvision:resnet18 --input-shape 1,3,224,224
    """
    from ..analysis.summary import summary as model_summary
    from ..load.model_inputs import batches_from
    from ..load.models import load_model

    fed = batches_from(load_model(model, arch, arch_kwargs, unsafe), inputs, unsafe=unsafe)
    click.echo(escape_lines(model_summary(fed.model, *fed.first(), depth=depth)))


@main.command()
@click.argument("model", type=MODEL_PATH)
@input_options(shape_only=True)
@click.option(
    "--batch-size",
    "batch_sizes",
    type=BatchSizes(),
    default=None,
    help="Batch sizes to measure in place of the input's first dimension, e.g. 1,8,32: with two or more, how memory grows with the batch.",
)
@click.option(
    "--optimizer",
    type=click.Choice(["adam", "adamw", "sgd", "none"]),
    default="adam",
    show_default=True,
    help="The optimizer whose state the step holds (sgd: momentum 0.9; none: no optimizer step).",
)
@click.option(
    "--budget",
    type=ByteSize(),
    default=None,
    help="Memory to fit in, e.g. 24GB (K, M, G in powers of 1024): the largest batch that fits, from the line through --batch-size's steps.",
)
@click.option(
    "--depth", type=click.IntRange(1), default=3, show_default=True, help="How deep the table goes into submodules."
)
@model_options
def memory(
    model: str,
    inputs: InputSpec,
    batch_sizes: tuple[int, ...] | None,
    optimizer: str,
    budget: int | None,
    depth: int,
    arch: str | None,
    arch_kwargs: dict | None,
    unsafe: bool,
) -> None:
    """Measure one training step of MODEL: where its memory goes, module by module.

    A forward in training mode, the backward of its output's sum (of its own loss, for a model that
    takes labels: a Hugging Face language model gets labels = its token ids) and an optimizer step,
    on a random input. Per module: parameters and buffers, gradients, optimizer state, and the
    activations saved for backward (counted as autograd saves them, each storage once); then the
    predicted peak (their sum, with the saved activations at their peak) and the largest holders.
    With several --batch-size values, one step each and the line peak = fixed + per-sample x batch
    through them; with --budget, the largest batch that fits.

    \b
    Examples:
      introspect memory weights.pt --arch torchvision:resnet18 --input-shape 8,3,224,224
      introspect memory hf_folder --input-shape 1,512 --dtype int64 --batch-size 1,8,32 --budget 24GB
    """
    from ..analysis.memory import memory_growth, step_inputs
    from ..load.model_inputs import DTYPES, cast_model, check_input, random_input
    from ..load.models import load_model

    assert inputs.shape is not None  # input_options(shape_only=True): --input-shape is required
    input_shape, dtype = inputs.shape, inputs.dtype
    net, torch_dtype = cast_model(load_model(model, arch, arch_kwargs, unsafe), dtype), DTYPES[dtype]
    sizes = list(batch_sizes or (input_shape[0],))

    def inputs_for(batch: int) -> tuple[tuple[Any, ...], dict[str, Any]]:
        return step_inputs(net, random_input(net, (batch, *input_shape[1:]), torch_dtype))

    args, kwargs = inputs_for(sizes[0])
    check_input(net, args)
    growth = memory_growth(net, inputs_for, sizes, optimizer=optimizer)
    shown = max(range(len(sizes)), key=lambda i: sizes[i])
    shape = ",".join(map(str, (sizes[shown], *input_shape[1:])))
    loss = "the model's own loss (labels = the input)" if kwargs else "the sum of its output"
    click.echo(
        f"{escape(model)}: one training step on an input of shape {shape} ({dtype}); backward of {loss}; optimizer {optimizer}"
    )
    click.echo(growth.steps[shown].table(depth))
    if len(sizes) > 1 or budget is not None:
        click.echo("")
        click.echo(growth.table(budget))


@main.command()
@click.argument("model", type=MODEL_PATH)
@input_options(shape_only=True)
@click.option(
    "--logdir", required=True, type=click.Path(file_okay=False), help="Where to write the graph for TensorBoard."
)
@model_options
def graph(
    model: str,
    inputs: InputSpec,
    logdir: str,
    arch: str | None,
    arch_kwargs: dict | None,
    unsafe: bool,
) -> None:
    """Write the graph of MODEL for TensorBoard's GRAPHS tab.

    \b
    Example:
      introspect graph weights.pt --arch examples.models:SeedCNN --input-shape 1,3,32,32 --logdir runs/graph
    """
    from ..analysis.summary import write_graph
    from ..load.model_inputs import batches_from
    from ..load.models import load_model
    from ..records.sinks import logdir_writer

    fed = batches_from(load_model(model, arch, arch_kwargs, unsafe), inputs, unsafe=unsafe)
    with logdir_writer(logdir) as writer:
        written = write_graph(writer, fed.model, fed.first())
    if not written:  # write_graph has warned why
        raise IntrospectError(f"no graph written for {model}")
    click.echo(
        f"graph of {escape(getattr(fed.model, 'original_name', type(fed.model).__name__))} written to {escape(logdir)}"
    )


@main.command()
@click.argument("models", nargs=-1, required=True, type=MODEL_PATH, metavar="MODEL [MODEL_B]")
@click.option(
    "--logdir",
    type=click.Path(file_okay=False),
    default=None,
    help="Also write weights/{name} histograms here (MODEL at step 0, MODEL_B at step 1); with --spectral, spectral/ scalars.",
)
@click.option(
    "--spectral",
    "spectral_",
    is_flag=True,
    help="Spectral analysis instead: sigma_max, stable rank, power-law alpha and Marchenko-Pastur outliers of every weight matrix.",
)
@model_options
def weights(
    models: tuple[str, ...],
    logdir: str | None,
    spectral_: bool,
    arch: str | None,
    arch_kwargs: dict | None,
    unsafe: bool,
) -> None:
    """Weight statistics of MODEL, or how they changed from A to B.

    One row per tensor: shape, mean, std, min, max, share of zeros, NaN/Inf count; with two
    files, each tensor's relative change |B - A| / |A| (a tensor all zero in A, such as a zero-initialised
    bias: its absolute change |B - A|, never ranked as the most changed). A bare state_dict needs no --arch here:
    every floating tensor in it is shown.
    With --spectral, one row per weight matrix, and alpha outside WeightWatcher's 2-6 band flagged.

    \b
    Examples:
      introspect weights ckpt.pt --logdir runs/weights
      introspect weights epoch1.pt epoch9.pt
      introspect weights ckpt.pt --spectral --arch torchvision:resnet18 --logdir runs/spectral
    """
    from ..analysis.weight_stats import (
        compare_weights,
        format_weight_changes,
        format_weight_stats,
        weight_stats,
        write_weight_histograms,
    )
    from ..load.models import load_weights

    if len(models) > 2:
        raise click.UsageError(f"give one MODEL, or two to compare; got {len(models)}")
    if spectral_:
        return _spectral_command(models, logdir, arch, arch_kwargs, unsafe)
    loaded = [load_weights(m, arch=arch, arch_kwargs=arch_kwargs, unsafe=unsafe) for m in models]
    _one_or_two(
        models,
        loaded,
        lambda named: format_weight_stats(weight_stats(named, show_progress=True)),
        lambda a, b: format_weight_changes(compare_weights(a, b, show_progress=True)),
        write_weight_histograms,
        logdir,
        f"histograms of {sum(len(n) for n in loaded)} tensors",
    )


@main.command()
@click.argument("models", nargs=-1, required=True, type=MODEL_PATH, metavar="MODEL [MODEL_B]")
@click.option(
    "--logdir",
    type=click.Path(file_okay=False),
    default=None,
    help="Also write spectral/ scalars here (MODEL at step 0, MODEL_B at step 1).",
)
@model_options
def spectral(
    models: tuple[str, ...],
    logdir: str | None,
    arch: str | None,
    arch_kwargs: dict | None,
    unsafe: bool,
) -> None:
    """Spectral analysis of MODEL's weight matrices: the same as weights --spectral.

    One row per weight matrix: sigma_max, stable rank, power-law alpha and Marchenko-Pastur
    outliers, alpha outside WeightWatcher's 2-6 band flagged; with two files, A and B side by side.

    \b
    Example:
      introspect spectral ckpt.pt --arch torchvision:resnet18 --logdir runs/spectral
    """
    if len(models) > 2:
        raise click.UsageError(f"give one MODEL, or two to compare; got {len(models)}")
    _spectral_command(models, logdir, arch, arch_kwargs, unsafe)


def _one_or_two(
    models: tuple[str, ...],
    items: list[Any],
    show_one: Callable[[Any], str],
    show_two: Callable[[Any, Any], str],
    write: Callable[[Any, Any, int], None],
    logdir: str | None,
    written: str,
) -> None:
    """Print one file's table or A -> B's, and with ``logdir`` write each file at its own step (A 0, B 1)."""
    from ..records.sinks import write_steps

    if len(items) == 1:
        click.echo(show_one(items[0]))
    else:
        click.echo(f"A = {escape(models[0])}\nB = {escape(models[1])}")
        click.echo(show_two(items[0], items[1]))
    if logdir is not None:
        write_steps(logdir, write, items)
        click.echo(f"{written} written to {escape(logdir)}")


def _spectral_command(
    models: tuple[str, ...], logdir: str | None, arch: str | None, arch_kwargs: dict | None, unsafe: bool
) -> None:
    """``weights --spectral``: the spectra of one file, or of two side by side (A -> B)."""
    from ..analysis.spectral import (
        compare_spectral,
        format_spectral,
        format_spectral_changes,
        spectral,
        write_spectral_scalars,
    )
    from ..load.models import load_module_or_state_dict

    analysed = [spectral(load_module_or_state_dict(m, arch, arch_kwargs, unsafe), show_progress=True) for m in models]
    if not analysed[0]:
        raise IntrospectError(f"{models[0]} holds no weight matrix (no floating tensor of two or more dimensions)")
    _one_or_two(
        models,
        analysed,
        format_spectral,
        lambda a, b: format_spectral_changes(compare_spectral(a, b)),
        write_spectral_scalars,
        logdir,
        f"spectral/ scalars of {sum(len(a) for a in analysed)} matrices",
    )


@main.command()
@click.argument("model", type=MODEL_PATH)
@input_options(batch_size=16)
@click.option("--logdir", required=True, type=click.Path(file_okay=False), help="Where to write the histograms.")
@click.option(
    "--batches",
    type=click.IntRange(1),
    default=1,
    show_default=True,
    help="With --input-shape: how many random batches.",
)
@click.option("--backward", is_flag=True, help="Also backpropagate the output's sum (or --target's) and log gradients.")
@click.option(
    "--target", type=int, default=None, help="With --backward: the output unit (e.g. class index) to backpropagate."
)
@click.option("--train-mode", is_flag=True, help="Run in training mode (dropout on, BatchNorm on batch statistics).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random inputs.")
@fail_on_option
@model_options
def activations(
    model: str,
    inputs: InputSpec,
    logdir: str,
    batches: int,
    backward: bool,
    target: int | None,
    train_mode: bool,
    seed: int,
    fail_on: str,
    arch: str | None,
    arch_kwargs: dict | None,
    unsafe: bool,
) -> None:
    """Run inputs through MODEL under watch(); report the findings.

    Writes activation histograms (with --backward also the gradients) and prints the debugger's
    findings. Give exactly one of --input-shape, --input or --images. Each batch is one step in TensorBoard.
    An image file of --images that cannot be read (corrupt, not an image, a FIFO) is skipped, and
    named in a data_unreadable finding.

    \b
    Examples:
      introspect activations weights.pt --arch examples.models:SeedCNN --input-shape 8,3,32,32 --logdir runs/acts
      introspect activations model.pt2 --images data/val --batch-size 32 --logdir runs/acts --backward --target 0
    """
    from ..live.record_activations import record_activations
    from ..load.model_inputs import batches_from
    from ..load.models import load_model

    fed = batches_from(load_model(model, arch, arch_kwargs, unsafe), inputs, unsafe=unsafe, seed=seed, count=batches)
    w = record_activations(
        fed.model,
        fed.batches,
        logdir,
        backward=backward,
        target=target,
        train_mode=train_mode,
        show_progress=True,
        total=fed.total,
        unreadable=fed.skipped,
    )
    click.echo(f"{w.step + 1} step(s) of {len(w.module_names)} modules written to {escape(logdir)}")
    click.echo(w.report())
    _fail_on(fail_on, len(w.alerts))


@main.command()
@click.argument("model_a", type=MODEL_PATH)
@click.argument("model_b", type=MODEL_PATH)
@input_options(batch_size=8)
@click.option(
    "--backward",
    is_flag=True,
    help="Also backpropagate each output's sum and compare the gradients w.r.t. every module output.",
)
@click.option(
    "--autocast",
    type=click.Choice(["bf16", "fp16"]),
    default=None,
    help="Run MODEL_B under torch.autocast with this dtype (MODEL_A as it is).",
)
@click.option(
    "--rtol",
    type=click.FloatRange(0),
    default=1e-4,
    show_default=True,
    help="A module diverges when max|a-b| > atol + rtol * max|a|.",
)
@click.option("--atol", type=click.FloatRange(0), default=0.0, show_default=True, help="See --rtol.")
@click.option(
    "--seed", type=int, default=0, show_default=True, help="Seed of the random input and of both forwards' RNG."
)
@click.option(
    "--out", type=click.Path(dir_okay=False), default=None, help="Also draw the per-module difference to this PNG."
)
@click.option(
    "--arch-b",
    default=None,
    metavar="MODULE:CLASS",
    help="MODEL_B's architecture, when it differs from --arch (a refactored class).",
)
@fail_on_option
@model_options
def compare(
    model_a: str,
    model_b: str,
    inputs: InputSpec,
    backward: bool,
    autocast: str | None,
    rtol: float,
    atol: float,
    seed: int,
    out: str | None,
    arch_b: str | None,
    fail_on: str,
    arch: str | None,
    arch_kwargs: dict | None,
    unsafe: bool,
) -> None:
    """Find the first module where MODEL_A and MODEL_B diverge on the same batch.

    Both run the same input from the same RNG state; every module output (with --backward, every
    gradient w.r.t. one) is compared in execution order: exact equality, max |a-b|, max |a-b|
    relative to max |a|, cosine. Modules are matched by name. Give exactly one of --input-shape,
    --input or --images (the first --batch-size images).

    \b
    Examples:
      introspect compare epoch1.pt epoch2.pt --arch examples.models:SeedCNN --input-shape 8,3,32,32
      introspect compare ckpt.pt ckpt.pt --arch torchvision:resnet18 --input-shape 2,3,64,64 --autocast bf16 --out diff.png
    """
    from ..analysis.compare import first_divergence
    from ..load.model_inputs import batches_from, cast_model
    from ..load.models import load_model
    from ..records.visuals import save_png

    fed = batches_from(load_model(model_a, arch, arch_kwargs, unsafe), inputs, unsafe=unsafe, seed=seed)
    net_b = cast_model(load_model(model_b, arch_b or arch, arch_kwargs, unsafe), inputs.dtype)
    result = first_divergence(
        fed.model, net_b, *fed.first(), backward=backward, autocast=autocast, rtol=rtol, atol=atol, seed=seed
    )
    if fed.skipped:  # --images: the batch was made of the files that could be read
        path, why = fed.skipped[0]
        warn(f"skipped {len(fed.skipped)} unreadable image file(s) of --images (the first, {path}: {why})")
    click.echo(f"A = {escape(model_a)}\nB = {escape(model_b)}" + (f" (under autocast {autocast})" if autocast else ""))
    click.echo(str(result))
    if out is not None:
        save_png(result.image(), out)
        click.echo(f"figure written to {escape(out)}")
    _fail_on(fail_on, len(result.findings()))


@main.command("map")
@click.argument("rundir", type=click.Path())
@click.option(
    "--stat",
    "stats",
    multiple=True,
    type=click.Choice(["grad_rms", "activation_std", "dead_fraction", "update_ratio", "nonfinite", "saved_bytes"]),
    help="Which statistic to draw (repeatable); default: every one the run has.",
)
@click.option(
    "--out",
    type=click.Path(dir_okay=False),
    default="health_map.png",
    show_default=True,
    help="The PNG: with one statistic (one --stat, or a run that has only one) exactly this file; with several, "
    "one file each, OUT's name + _{stat}: --out map.png writes map_grad_rms.png, map_activation_std.png, ...",
)
def health_map(rundir: str, stats: tuple[str, ...], out: str) -> None:
    """Draw the training health map of a watch() run from its event files.

    Rows are the watched modules in execution order, columns the logging steps, the colour one
    statistic; cells with a debugger finding are outlined in red. RUNDIR is one run's directory
    (or a directory holding exactly one run). Nothing is rerun. One statistic is drawn into --out
    itself; several (the default: every one the run has) into one file each, --out's name with
    _{stat} added (map.png: map_grad_rms.png, ...).

    \b
    Examples:
      introspect map runs/exp1
      introspect map runs/broken/nan --stat nonfinite --out nan.png
    """
    from ..analysis.health_map_render import STATS, health_map_from_events, save_health_maps

    hm = health_map_from_events(rundir)
    saved = save_health_maps(hm, stats, out, rundir)
    for stat, path in saved:
        click.echo(f"{stat}: {escape(path)}")
    if len(saved) > 1:  # the user asked for one file and got several: say why, and how to get the one
        click.echo(
            f"{len(saved)} statistics, one PNG each (not {escape(out)}); --stat NAME draws one into {escape(out)}",
            err=True,
        )
    click.echo(
        f"{len(hm.rows)} modules x {len(hm.steps)} logging steps, {len(hm.findings)} findings "
        f"(statistics: {', '.join(s for s in STATS if s in hm.available())})",
        err=True,
    )


@main.command()
@click.option("--logdir", required=True, type=click.Path(), help="Directory of runs to show (it must exist).")
@click.option(
    "--port", default=6006, show_default=True, type=click.IntRange(0, 65535), help="Port to serve on (0: any free one)."
)
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Address to bind; 0.0.0.0 exposes it to the network (with a warning).",
)
def board(logdir: str, port: int, host: str) -> None:
    """Start TensorBoard on LOGDIR and print its URL.

    It binds 127.0.0.1 (this machine only) unless --host says otherwise. TensorBoard stops
    with the command: Ctrl-C, SIGTERM or a closed terminal end it too.

    \b
    Example:
      introspect board --logdir runs
    """
    from .board import board_url, pick_port, serve

    if port == 0:
        port = pick_port(host)

    def announce() -> None:
        click.echo(board_url(host, port))
        click.echo(f"TensorBoard for {escape(logdir)} (Ctrl-C to stop)", err=True)
        sys.stdout.flush()

    raise SystemExit(serve(logdir, port, host, announce))


# --------------------------------------------------------------------------- introspect data
@main.command("data")
@click.argument("folder", type=click.Path())
@click.option(
    "--logdir", required=True, type=click.Path(file_okay=False), help="Where to write the pictures for TensorBoard."
)
@click.option(
    "--limit",
    default=1000,
    show_default=True,
    type=click.IntRange(1),
    help="Scan at most this many images, spread over the folder.",
)
@fail_on_option
def data(folder: str, logdir: str, limit: int, fail_on: str) -> None:
    """Look at an ImageFolder tree and report what is wrong with it.

    FOLDER holds one subfolder of images per class. Writes an image grid, a 3x3 figure of labeled
    samples, the class balance and per-channel statistics for TensorBoard, and prints the
    findings: NaN/Inf, constant or all-black, 0-255 and duplicate images, unreadable files, class
    imbalance.

    \b
    Example:
      introspect data data/train --logdir runs/data --limit 500
    """
    from ..analysis.data import image_folder, inspect_data

    report = inspect_data(image_folder(folder), logdir, max_samples=limit)
    shown = escape(logdir)
    click.echo(f"pictures written to {shown} (introspect board --logdir {shown})", err=True)
    _fail_on(fail_on, len(report.alerts))


if __name__ == "__main__":  # pragma: no cover
    main()
