"""The options commands share, declared once: how to read MODEL files (``@model_options``) and
where a model's inputs come from (``@input_options``, which hands the command one
:class:`~introspect.load.model_inputs.InputSpec` for :func:`~introspect.load.model_inputs.batches_from`).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from typing import Any

import click

from ..errors import IntrospectError
from ..load.model_inputs import DTYPES, InputSpec, parse_shape

__all__ = [
    "MODEL_PATH",
    "JSONObject",
    "Shape",
    "BatchSizes",
    "ByteSize",
    "model_options",
    "input_options",
    "fail_on_option",
    "FAIL_ON",
    "FOUND_EXIT",
]

MODEL_PATH = click.Path(readable=False)
"""A file argument whose checks are the loader's: a missing, unreadable or directory path is a
``LoadError`` (one ``error:`` line, exit 3), not click's usage error (exit 2). (``click.Path()``
checks that an existing path is readable by default.)"""


class JSONObject(click.ParamType):
    name = "JSON"

    def convert(self, value: Any, param: Any, ctx: Any) -> dict[str, Any]:
        if isinstance(value, dict):
            return value
        shown = value if len(value) <= 80 else value[:77] + "..."
        try:
            obj = json.loads(value)
        except RecursionError:
            self.fail(f"nested deeper than {_MAX_KWARGS_DEPTH} levels: {shown!r}", param, ctx)
        except ValueError as e:
            self.fail(f"not valid JSON ({e}): {shown!r}", param, ctx)
        if not isinstance(obj, dict):
            self.fail(f"expected a JSON object like '{{\"num_classes\": 10}}', got {shown!r}", param, ctx)
        if _depth(obj) > _MAX_KWARGS_DEPTH:  # printing or copying it would overflow Python's stack
            self.fail(f"nested deeper than {_MAX_KWARGS_DEPTH} levels: {shown!r}", param, ctx)
        return obj


_MAX_KWARGS_DEPTH = 32


def _depth(obj: Any) -> int:
    """How deep a JSON value nests (0 for a number or string), without recursion."""
    deepest, pending = 0, [(obj, 0)]
    while pending:
        node, level = pending.pop()
        deepest = max(deepest, level)
        if level > _MAX_KWARGS_DEPTH:
            break
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
        pending.extend((child, level + 1) for child in children)
    return deepest


class Shape(click.ParamType):
    name = "N,C,H,W"

    def convert(self, value: Any, param: Any, ctx: Any) -> tuple[int, ...]:
        if isinstance(value, tuple):
            return value
        try:
            return parse_shape(value)
        except IntrospectError as e:
            self.fail(str(e), param, ctx)


class BatchSizes(click.ParamType):
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


class ByteSize(click.ParamType):
    name = "SIZE"

    def convert(self, value: Any, param: Any, ctx: Any) -> int:
        from ..analysis.memory import parse_byte_size

        if isinstance(value, int):
            return value
        try:
            return parse_byte_size(value)
        except IntrospectError as e:
            self.fail(str(e), param, ctx)


FAIL_ON = ("finding", "warning", "never")
"""``--fail-on``'s choices, from the loosest trigger to none: ``finding`` fails on any finding,
``warning`` also on any ``warning:`` line, ``never`` (the default) keeps exit 0."""

FOUND_EXIT = 8
"""The exit code of a command that found something and was told to fail on it (``--fail-on``):
apart from the error codes (1-7), so CI can tell "the data is bad" from "the command broke"."""


def fail_on_option(f: Callable) -> Callable:
    """--fail-on: exit ``FOUND_EXIT`` when the command found something, for CI."""
    return click.option(
        "--fail-on",
        type=click.Choice(FAIL_ON),
        default="never",
        show_default=True,
        help=f"Exit {FOUND_EXIT} when the command finds something, for CI: finding (any finding), warning (any "
        "finding, or any warning line), never (exit 0 whatever it finds).",
    )(f)


def model_options(f: Callable) -> Callable:
    """--arch, --arch-kwargs and --unsafe: how to read MODEL files (and --input files: --unsafe
    applies to those too, through ``batches_from``)."""
    f = click.option(
        "--unsafe",
        is_flag=True,
        help="Allow unpickling arbitrary Python objects (a whole pickled nn.Module) and running TorchScript code, and skip the checks of .pt2 programs. Runs code from the file: only for files you trust.",
    )(f)
    f = click.option(
        "--arch-kwargs",
        type=JSONObject(),
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


def input_options(*, shape_only: bool = False, batch_size: int = 16) -> Callable[[Callable], Callable]:
    """The options that say where a model's inputs come from; the command gets them as one
    ``inputs`` argument, an ``InputSpec``.

    ``shape_only``: a required --input-shape and --dtype (a table or a graph needs one batch of the
    right shape, nothing more). Otherwise exactly one of --input-shape, --input and --images, with
    --batch-size (default ``batch_size``) and --image-size for the images.
    """

    def decorate(command: Callable) -> Callable:
        @functools.wraps(command)
        def parsed(*args: Any, **kwargs: Any) -> Any:
            shape, file, images = (kwargs.pop(name, None) for name in ("input_shape", "input_file", "images"))
            image_size = kwargs.pop("image_size", None)
            _check_sources(shape, file, images, image_size)
            spec = InputSpec(
                shape=shape,
                file=file,
                images=images,
                dtype=kwargs.pop("dtype"),
                batch_size=kwargs.pop("batch_size", batch_size),
                image_size=image_size,
            )
            return command(*args, inputs=spec, **kwargs)

        options = [
            click.option(
                "--dtype",
                type=click.Choice(list(DTYPES)),
                default="float32",
                show_default=True,
                help="Input dtype; a floating dtype casts the model too, int64 makes token ids.",
            )
        ]
        if shape_only:
            options.append(
                click.option("--input-shape", type=Shape(), required=True, help="Shape of one input, e.g. 1,3,32,32.")
            )
        else:
            options += [
                click.option(
                    "--image-size",
                    type=Shape(),
                    default=None,
                    metavar="H,W",
                    help="With --images: resize every image to this size.",
                ),
                click.option(
                    "--batch-size",
                    type=click.IntRange(1),
                    default=batch_size,
                    show_default=True,
                    help="With --images: images per forward.",
                ),
                click.option(
                    "--images",
                    type=click.Path(file_okay=False),
                    default=None,
                    help="A folder of images (subfolders too), read as RGB in [0, 1].",
                ),
                click.option(
                    "--input",
                    "input_file",
                    type=MODEL_PATH,
                    default=None,
                    help="A torch.save'd tensor (or tuple of tensors): the model's inputs (--unsafe applies to it too).",
                ),
                click.option(
                    "--input-shape",
                    type=Shape(),
                    default=None,
                    help="Random inputs of this shape (reproducible, see --seed).",
                ),
            ]
        for option in options:
            parsed = option(parsed)
        return parsed

    return decorate


def _check_sources(input_shape: Any, input_file: Any, images: Any, image_size: tuple[int, ...] | None) -> None:
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
