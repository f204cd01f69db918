"""The ``introspect`` command: a thin shell over the library (see ``introspect --help``).

Every command is an :class:`IntrospectCommand` (``@main.command()`` makes one): it gets a
``--debug`` flag, and any error becomes one line ``error: ...`` on stderr with a non-zero exit code
(see ``EXIT_CODES``) instead of a traceback; ``IntrospectWarning``\\ s become ``warning: ...`` lines
and torch's own warnings are silenced. ``--debug`` shows the traceback and every warning.
"""

from __future__ import annotations

import json
import socket
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
)
from ..records.sinks import open_writer

__all__ = ["main", "IntrospectCommand", "model_options", "EXIT_CODES"]

EXIT_CODES: tuple[tuple[type[BaseException], int], ...] = (
    (UnsafeLoadError, 4),
    (KeyMismatchError, 6),
    (LoadError, 3),
    (ArchitectureError, 5),
    (InputShapeError, 7),
    (IntrospectError, 1),
)
"""The exit code of each error (the first class that matches); click's usage errors exit with 2,
anything unexpected with 1, Ctrl-C with 130."""


class IntrospectCommand(click.Command):
    """A command with ``--debug`` and one-line errors; ``main``'s default command class."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.params.append(
            click.Option(["--debug"], is_flag=True, help="Show the full traceback of an error, and every warning.")
        )

    def invoke(self, ctx: click.Context) -> Any:
        debug = bool(ctx.params.pop("debug", False))
        with warnings.catch_warnings():
            if not debug:
                warnings.simplefilter("ignore")
                warnings.simplefilter("default", IntrospectWarning)
                warnings.showwarning = _warning_line
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
                message = str(e).strip().replace("\n", " ") or type(e).__name__
                if not isinstance(e, IntrospectError):
                    message = f"{type(e).__name__}: {message} (run again with --debug for the traceback)"
                click.echo(f"error: {message}", err=True)
                ctx.exit(code)


def _warning_line(message: Any, category: Any, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
    click.echo(f"warning: {str(message).removeprefix('introspect: ')}", err=True)


class _IntrospectGroup(click.Group):
    command_class = IntrospectCommand


@click.group(cls=_IntrospectGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="introspect")
def main() -> None:
    """See inside PyTorch models: summaries, graphs, histograms and a debugger, in TensorBoard.

    MODEL files are read safely: a state_dict or checkpoint dict (with --arch), a TorchScript
    archive, a torch.export program (.pt2), a safetensors file, or a Hugging Face save_pretrained
    folder (built from its config.json, offline). A pickled nn.Module needs --unsafe, because
    unpickling runs arbitrary code.
    """


# --------------------------------------------------------------------------- shared options
class _JSONObject(click.ParamType):
    name = "JSON"

    def convert(self, value: Any, param: Any, ctx: Any) -> dict[str, Any]:
        if isinstance(value, dict):
            return value
        try:
            obj = json.loads(value)
        except ValueError as e:
            self.fail(f"not valid JSON ({e}): {value!r}", param, ctx)
        if not isinstance(obj, dict):
            self.fail(f"expected a JSON object like '{{\"num_classes\": 10}}', got {value!r}", param, ctx)
        return obj


class _Shape(click.ParamType):
    name = "N,C,H,W"

    def convert(self, value: Any, param: Any, ctx: Any) -> tuple[int, ...]:
        from ..load.model_inputs import parse_shape

        if isinstance(value, tuple):
            return value
        try:
            return parse_shape(value)
        except IntrospectError as e:
            self.fail(str(e), param, ctx)


def model_options(f: Callable) -> Callable:
    """--arch, --arch-kwargs and --unsafe: how to read MODEL files."""
    f = click.option(
        "--unsafe",
        is_flag=True,
        help="Allow unpickling arbitrary Python objects (a whole pickled nn.Module). Runs code from the file: only for files you trust.",
    )(f)
    f = click.option(
        "--arch-kwargs",
        type=_JSONObject(),
        default=None,
        help="Keyword arguments for --arch, as JSON: '{\"num_classes\": 10}'.",
    )(f)
    f = click.option(
        "--arch",
        default=None,
        metavar="MODULE:CLASS",
        help="Architecture the weights belong to: package.module:Class (importable, or in the current directory), torchvision:resnet18 or timm:resnet18 (never downloads).",
    )(f)
    return f


def _input_options(f: Callable) -> Callable:
    f = click.option(
        "--dtype",
        type=click.Choice(["float32", "float64", "float16", "bfloat16", "int64"]),
        default="float32",
        show_default=True,
        help="Input dtype; a floating dtype casts the model too, int64 makes token ids.",
    )(f)
    return f


def _load(model: str, arch: str | None, arch_kwargs: dict | None, unsafe: bool) -> Any:
    from ..load.models import load_model

    return load_model(model, arch=arch, arch_kwargs=arch_kwargs, unsafe=unsafe)


def _cast(model: Any, dtype: str) -> tuple[Any, Any]:
    """The model cast to ``dtype`` when it is a floating type, and that torch dtype."""
    from ..load.model_inputs import DTYPES

    torch_dtype = DTYPES[dtype]
    return (model.to(torch_dtype) if torch_dtype.is_floating_point else model), torch_dtype


def _shaped_input(model: Any, shape: tuple[int, ...], dtype: str) -> tuple[Any, tuple[Any, ...]]:
    """The model cast to a floating ``dtype``, and a checked random input of ``shape``."""
    from ..load.model_inputs import check_input, random_input

    model, torch_dtype = _cast(model, dtype)
    inputs = (random_input(model, shape, torch_dtype),)
    check_input(model, inputs)
    return model, inputs


class _BatchSizes(click.ParamType):
    name = "N[,N...]"

    def convert(self, value: Any, param: Any, ctx: Any) -> tuple[int, ...]:
        if isinstance(value, tuple):
            return value
        try:
            sizes = tuple(int(p) for p in str(value).split(","))
        except ValueError:
            self.fail(f"expected positive integers separated by commas like 1,8,32, got {value!r}", param, ctx)
        if not sizes or min(sizes) < 1:
            self.fail(f"expected positive integers separated by commas like 1,8,32, got {value!r}", param, ctx)
        return sizes


class _ByteSize(click.ParamType):
    name = "SIZE"

    def convert(self, value: Any, param: Any, ctx: Any) -> int:
        from ..analysis.memory import parse_byte_size

        if isinstance(value, int):
            return value
        try:
            return parse_byte_size(value)
        except IntrospectError as e:
            self.fail(str(e), param, ctx)


_MODEL_PATH = click.Path()
"""A file argument whose checks are the loader's: a missing, unreadable or directory path is a
``LoadError`` (one ``error:`` line, exit 3), not click's usage error (exit 2)."""


def _check_input_options(input_shape: Any, input_file: Any, images: Any, image_size: tuple[int, ...] | None) -> None:
    """Exactly one of --input-shape, --input and --images; --image-size is H,W."""
    given = [
        name
        for name, v in (("--input-shape", input_shape), ("--input", input_file), ("--images", images))
        if v is not None
    ]
    if len(given) != 1:
        raise click.UsageError(
            "give exactly one of --input-shape, --input or --images" + (f" (got {', '.join(given)})" if given else "")
        )
    if image_size is not None and len(image_size) != 2:
        raise click.BadParameter(f"expected H,W, got {','.join(map(str, image_size))}", param_hint="--image-size")


# --------------------------------------------------------------------------- commands
@main.command()
@click.argument("model", type=_MODEL_PATH)
@click.option("--input-shape", type=_Shape(), required=True, help="Shape of one input, e.g. 1,3,32,32.")
@_input_options
@click.option(
    "--depth", type=click.IntRange(0), default=3, show_default=True, help="How deep the table goes into submodules."
)
@model_options
def summary(
    model: str,
    input_shape: tuple[int, ...],
    dtype: str,
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

    net, inputs = _shaped_input(_load(model, arch, arch_kwargs, unsafe), input_shape, dtype)
    click.echo(model_summary(net, *inputs, depth=depth))


@main.command()
@click.argument("model", type=_MODEL_PATH)
@click.option(
    "--input-shape",
    type=_Shape(),
    required=True,
    help="Shape of one input, its first dimension the batch: 8,3,32,32, or 1,128 with --dtype int64 (token ids).",
)
@click.option(
    "--batch-size",
    "batch_sizes",
    type=_BatchSizes(),
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
    type=_ByteSize(),
    default=None,
    help="Memory to fit in, e.g. 24GB (K, M, G in powers of 1024): the largest batch that fits, from the line through --batch-size's steps.",
)
@_input_options
@click.option(
    "--depth", type=click.IntRange(1), default=3, show_default=True, help="How deep the table goes into submodules."
)
@model_options
def memory(
    model: str,
    input_shape: tuple[int, ...],
    batch_sizes: tuple[int, ...] | None,
    optimizer: str,
    budget: int | None,
    dtype: str,
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
    from ..load.model_inputs import check_input, random_input

    net, torch_dtype = _cast(_load(model, arch, arch_kwargs, unsafe), dtype)
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
        f"{model}: one training step on an input of shape {shape} ({dtype}); backward of {loss}; optimizer {optimizer}"
    )
    click.echo(growth.steps[shown].table(depth))
    if len(sizes) > 1 or budget is not None:
        click.echo("")
        click.echo(growth.table(budget))


@main.command()
@click.argument("model", type=_MODEL_PATH)
@click.option("--input-shape", type=_Shape(), required=True, help="Shape of one input, e.g. 1,3,32,32.")
@_input_options
@click.option(
    "--logdir", required=True, type=click.Path(file_okay=False), help="Where to write the graph for TensorBoard."
)
@model_options
def graph(
    model: str,
    input_shape: tuple[int, ...],
    dtype: str,
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

    net, inputs = _shaped_input(_load(model, arch, arch_kwargs, unsafe), input_shape, dtype)
    writer, _ = open_writer(logdir)
    try:
        written = write_graph(writer, net, inputs)
    finally:
        writer.close()
    if not written:  # write_graph has warned why
        raise IntrospectError(f"no graph written for {model}")
    click.echo(f"graph of {getattr(net, 'original_name', type(net).__name__)} written to {logdir}")


@main.command()
@click.argument("models", nargs=-1, required=True, type=_MODEL_PATH, metavar="MODEL [MODEL_B]")
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
    files, each tensor's relative change |B - A| / |A|. A bare state_dict needs no --arch here: every floating tensor in it is shown.
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
    if len(items) == 1:
        click.echo(show_one(items[0]))
    else:
        click.echo(f"A = {models[0]}\nB = {models[1]}")
        click.echo(show_two(items[0], items[1]))
    if logdir is not None:
        writer, _ = open_writer(logdir)
        try:
            for step, item in enumerate(items):
                write(writer, item, step)
        finally:
            writer.close()
        click.echo(f"{written} written to {logdir}")


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
    from ..load.models import load_model, read_model_file

    def source(path: str) -> Any:
        # A module (with --arch, or a file that carries one) says which tensors are embeddings;
        # a bare state_dict is analysed as it is.
        if arch is not None:
            return load_model(path, arch=arch, arch_kwargs=arch_kwargs, unsafe=unsafe)
        loaded = read_model_file(path, unsafe=unsafe)
        return loaded.module if loaded.module is not None else loaded.state_dict

    analysed = [spectral(source(m), show_progress=True) for m in models]
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
@click.argument("model", type=_MODEL_PATH)
@click.option(
    "--input-shape", type=_Shape(), default=None, help="Random inputs of this shape (reproducible, see --seed)."
)
@click.option(
    "--input",
    "input_file",
    type=_MODEL_PATH,
    default=None,
    help="A torch.save'd tensor (or tuple of tensors): the model's inputs (--unsafe applies to it too).",
)
@click.option(
    "--images",
    type=click.Path(file_okay=False),
    default=None,
    help="A folder of images (subfolders too), read as RGB in [0, 1].",
)
@click.option("--logdir", required=True, type=click.Path(file_okay=False), help="Where to write the histograms.")
@click.option(
    "--batches",
    type=click.IntRange(1),
    default=1,
    show_default=True,
    help="With --input-shape: how many random batches.",
)
@click.option(
    "--batch-size", type=click.IntRange(1), default=16, show_default=True, help="With --images: images per forward."
)
@click.option(
    "--image-size", type=_Shape(), default=None, metavar="H,W", help="With --images: resize every image to this size."
)
@click.option("--backward", is_flag=True, help="Also backpropagate the output's sum (or --target's) and log gradients.")
@click.option(
    "--target", type=int, default=None, help="With --backward: the output unit (e.g. class index) to backpropagate."
)
@click.option("--train-mode", is_flag=True, help="Run in training mode (dropout on, BatchNorm on batch statistics).")
@_input_options
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random inputs.")
@model_options
def activations(
    model: str,
    input_shape: tuple[int, ...] | None,
    input_file: str | None,
    images: str | None,
    logdir: str,
    batches: int,
    batch_size: int,
    image_size: tuple[int, ...] | None,
    backward: bool,
    target: int | None,
    train_mode: bool,
    dtype: str,
    seed: int,
    arch: str | None,
    arch_kwargs: dict | None,
    unsafe: bool,
) -> None:
    """Run inputs through MODEL under watch(); report the findings.

    Writes activation histograms (with --backward also the gradients) and prints the debugger's
    findings. Give exactly one of --input-shape, --input or --images. Each batch is one step in TensorBoard.

    \b
    Examples:
      introspect activations weights.pt --arch examples.models:SeedCNN --input-shape 8,3,32,32 --logdir runs/acts
      introspect activations model.pt2 --images data/val --batch-size 32 --logdir runs/acts --backward --target 0
    """
    from ..live.record_activations import record_activations
    from ..load.model_inputs import (
        check_input,
        image_batches,
        image_files,
        load_input_file,
        random_input,
    )

    _check_input_options(input_shape, input_file, images, image_size)
    net, torch_dtype = _cast(_load(model, arch, arch_kwargs, unsafe), dtype)
    total: int | None
    if input_shape is not None:
        batch_list: Any = [(random_input(net, input_shape, torch_dtype, seed=seed + i),) for i in range(batches)]
        total = batches
    elif input_file is not None:
        batch_list, total = [load_input_file(input_file, unsafe=unsafe)], 1
    else:
        files = image_files(images)
        total = -(-len(files) // batch_size)
        batch_list = ((x.to(torch_dtype),) for x in image_batches(files, batch_size, image_size))
    if input_shape is not None or input_file is not None:
        check_input(net, batch_list[0])
    w = record_activations(
        net,
        batch_list,
        logdir,
        backward=backward,
        target=target,
        train_mode=train_mode,
        show_progress=True,
        total=total,
    )
    click.echo(f"{w.step + 1} step(s) of {len(w.module_names)} modules written to {logdir}")
    click.echo(w.report())


@main.command()
@click.argument("model_a", type=_MODEL_PATH)
@click.argument("model_b", type=_MODEL_PATH)
@click.option(
    "--input-shape", type=_Shape(), default=None, help="A random input of this shape (reproducible, see --seed)."
)
@click.option(
    "--input",
    "input_file",
    type=click.Path(dir_okay=False),
    default=None,
    help="A torch.save'd tensor (or tuple of tensors): the models' inputs.",
)
@click.option(
    "--images",
    type=click.Path(file_okay=False),
    default=None,
    help="A folder of images: the first --batch-size of them, as RGB in [0, 1].",
)
@click.option(
    "--batch-size", type=click.IntRange(1), default=8, show_default=True, help="With --images: how many images."
)
@click.option(
    "--image-size", type=_Shape(), default=None, metavar="H,W", help="With --images: resize every image to this size."
)
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
@_input_options
@model_options
def compare(
    model_a: str,
    model_b: str,
    input_shape: tuple[int, ...] | None,
    input_file: str | None,
    images: str | None,
    batch_size: int,
    image_size: tuple[int, ...] | None,
    backward: bool,
    autocast: str | None,
    rtol: float,
    atol: float,
    seed: int,
    out: str | None,
    arch_b: str | None,
    dtype: str,
    arch: str | None,
    arch_kwargs: dict | None,
    unsafe: bool,
) -> None:
    """Find the first module where MODEL_A and MODEL_B diverge on the same batch.

    Both run the same input from the same RNG state; every module output (with --backward, every
    gradient w.r.t. one) is compared in execution order: exact equality, max |a-b|, max |a-b|
    relative to max |a|, cosine. Modules are matched by name. Give exactly one of --input-shape,
    --input or --images.

    \b
    Examples:
      introspect compare epoch1.pt epoch2.pt --arch examples.models:SeedCNN --input-shape 8,3,32,32
      introspect compare ckpt.pt ckpt.pt --arch torchvision:resnet18 --input-shape 2,3,64,64 --autocast bf16 --out diff.png
    """
    from ..analysis.compare import first_divergence
    from ..load.model_inputs import (
        image_batches,
        image_files,
        load_input_file,
        random_input,
    )

    _check_input_options(input_shape, input_file, images, image_size)
    net_a, torch_dtype = _cast(_load(model_a, arch, arch_kwargs, unsafe), dtype)
    net_b, _ = _cast(_load(model_b, arch_b or arch, arch_kwargs, unsafe), dtype)
    if input_shape is not None:
        inputs: tuple[Any, ...] = (random_input(net_a, input_shape, torch_dtype, seed=seed),)
    elif input_file is not None:
        inputs = load_input_file(input_file)
    else:
        inputs = (next(iter(image_batches(image_files(images)[:batch_size], batch_size, image_size))).to(torch_dtype),)
    result = first_divergence(
        net_a, net_b, *inputs, backward=backward, autocast=autocast, rtol=rtol, atol=atol, seed=seed
    )
    click.echo(f"A = {model_a}\nB = {model_b}" + (f" (under autocast {autocast})" if autocast else ""))
    click.echo(str(result))
    if out is not None:
        _save_png(result.image(), out)
        click.echo(f"figure written to {out}")


def _save_png(image: Any, path: str) -> None:
    from PIL import Image

    try:
        Image.fromarray(image).save(path, format="PNG")
    except OSError as e:
        raise IntrospectError(f"cannot write {path}: {e}") from e


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
    help="The PNG; with several statistics, one file each: health_map_{stat}.png.",
)
def health_map(rundir: str, stats: tuple[str, ...], out: str) -> None:
    """Draw the training health map of a watch() run from its event files.

    Rows are the watched modules in execution order, columns the logging steps, the colour one
    statistic; cells with a debugger finding are outlined in red. RUNDIR is one run's directory
    (or a directory holding exactly one run). Nothing is rerun.

    \b
    Examples:
      introspect map runs/exp1
      introspect map runs/broken/nan --stat nonfinite --out nan.png
    """
    from ..analysis.health_map_render import STATS, health_map_from_events

    hm = health_map_from_events(rundir)
    chosen = list(stats) or hm.available()
    missing = [s for s in chosen if s not in hm.available()]
    if missing:
        raise IntrospectError(f"{rundir} has no data for {', '.join(missing)}; it has {', '.join(hm.available())}")
    base = out[:-4] if out.lower().endswith(".png") else out
    for stat in chosen:
        path = out if len(chosen) == 1 else f"{base}_{stat}.png"
        _save_png(hm.render(stat), path)
        click.echo(f"{stat}: {path}")
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
    from .board import pick_port, serve

    if port == 0:
        port = pick_port(host)
    shown = socket.gethostname() if host in ("0.0.0.0", "::") else (f"[{host}]" if ":" in host else host)

    def announce() -> None:
        click.echo(f"http://{shown}:{port}/")
        click.echo(f"TensorBoard for {logdir} (Ctrl-C to stop)", err=True)
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
def data(folder: str, logdir: str, limit: int) -> None:
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

    inspect_data(image_folder(folder), logdir, max_samples=limit)
    click.echo(f"pictures written to {logdir} (introspect board --logdir {logdir})", err=True)


if __name__ == "__main__":  # pragma: no cover
    main()
