"""Inputs for a saved model with no training script around it: a shape, a tensor file, or images.

A wrong input is the commonest mistake on the command line, and PyTorch's own message names the
failing layer's weight shapes, not the input it wanted; :func:`check_input` runs one forward and
turns a failure into an :class:`InputShapeError` that shows the input's shape and, when the first
layer tells us, the shape the model expects.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, InputShapeError, LoadError, first_line
from ..runtime.preserved import preserved_state
from .files import read_image, walk_files

__all__ = [
    "DTYPES",
    "IMAGE_SUFFIXES",
    "InputSpec",
    "ModelBatches",
    "batches_from",
    "cast_model",
    "parse_shape",
    "random_input",
    "load_input_file",
    "image_files",
    "image_batches",
    "expected_input",
    "check_input",
]

DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def parse_shape(text: str) -> tuple[int, ...]:
    """``(1, 3, 32, 32)`` from ``"1,3,32,32"`` (or ``"1x3x32x32"``)."""
    parts = [p.strip() for p in str(text).replace("x", ",").split(",")]
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        raise ConfigError(f"a shape is comma-separated positive integers like 1,3,32,32; got {text!r}") from None
    if not shape or any(d < 1 for d in shape):
        raise ConfigError(f"a shape is comma-separated positive integers like 1,3,32,32; got {text!r}")
    return shape


def random_input(
    model: nn.Module, shape: Sequence[int], dtype: torch.dtype = torch.float32, seed: int = 0
) -> torch.Tensor:
    """A reproducible input: standard normal values, or for an integer dtype token ids below the
    first embedding's size (so an embedding model gets indices it can look up)."""
    g = torch.Generator().manual_seed(seed)
    if dtype.is_floating_point:
        return torch.randn(tuple(shape), generator=g).to(dtype)
    high = next((m.num_embeddings for m in model.modules() if isinstance(m, nn.Embedding)), 2)
    return torch.randint(0, high, tuple(shape), generator=g, dtype=dtype)


def load_input_file(path: str | os.PathLike, unsafe: bool = False) -> tuple[torch.Tensor, ...]:
    """The positional inputs saved with ``torch.save``: one tensor, or a tuple/list of them.

    Read as a model file is (``detect_format``, then ``torch.load(weights_only=True)``): a text
    file or a directory is one clear error, and a pickle of other objects needs ``unsafe``.
    """
    from .formats import detect_format, torch_load

    path = Path(path)
    kind = detect_format(path)
    if kind != "torch":
        raise LoadError(f"{path} is a {kind} file; --input takes a torch.save'd tensor or tuple of tensors")
    obj = torch_load(path, unsafe, "cpu")
    if isinstance(obj, torch.Tensor):
        return (obj,)
    if isinstance(obj, (tuple, list)) and obj and all(isinstance(t, torch.Tensor) for t in obj):
        return tuple(obj)
    raise LoadError(
        f"{path} holds a {type(obj).__name__}; expected a tensor or a tuple of tensors (the model's inputs)"
    )


def image_files(folder: str | os.PathLike) -> list[Path]:
    """Every image under ``folder`` (class subfolders included), in a stable order."""
    folder = Path(folder)
    if not folder.is_dir():
        raise LoadError(f"{folder}: no such directory")
    files = walk_files(folder, IMAGE_SUFFIXES)  # symlink loops not followed, each file once
    if not files:
        raise LoadError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {folder}")
    return files


def image_batches(
    files: Sequence[Path],
    batch_size: int,
    size: Sequence[int] | None = None,
    channels: int = 3,
    skipped: list[tuple[str, str]] | None = None,
) -> Iterator[torch.Tensor]:
    """Batches of images as floats in [0, 1], ``channels`` (1 or 3) deep, resized to ``size`` (H, W)
    when given; without a size every image must have the first one's.

    A file that cannot be read (corrupt, not an image, too large, a FIFO or a link to one: never
    opened, see :func:`~introspect.load.files.read_image`) is a ``LoadError``; with ``skipped``,
    it is left out and ``(path, why)`` appended there as the batches are read, as ``introspect
    data`` does, and only a folder with no readable image at all is an error."""
    from torchvision.transforms.functional import pil_to_tensor, resize

    if batch_size < 1:
        raise ConfigError(f"batch size must be >= 1, got {batch_size}")
    mode = {1: "L", 3: "RGB"}.get(channels)
    if mode is None:
        raise ConfigError(f"images can be read with 1 or 3 channels, not {channels}")
    first_size: tuple[int, int] | None = None
    batch: list[torch.Tensor] = []
    read = 0
    for file in files:
        try:
            x = pil_to_tensor(read_image(file, mode)).float() / 255.0
        except Exception as e:
            if skipped is None:
                raise LoadError(f"cannot read image {file}: {e}") from e
            skipped.append((os.fspath(file), f"{type(e).__name__}: {first_line(e)}"))
            continue
        read += 1
        if size is not None:
            x = resize(x, list(size), antialias=True)
        elif first_size is None:
            first_size = (x.shape[1], x.shape[2])
        elif (x.shape[1], x.shape[2]) != first_size:
            raise ConfigError(
                f"images differ in size ({first_size[0]}x{first_size[1]} and {x.shape[1]}x{x.shape[2]} "
                f"at {file}); give a size (--image-size H,W) to resize them all"
            )
        batch.append(x)
        if len(batch) == batch_size:
            yield torch.stack(batch)
            batch = []
    if batch:
        yield torch.stack(batch)
    if read == 0 and skipped:
        path, why = skipped[0]
        raise LoadError(f"none of the {len(skipped)} images could be read (the first, {path}: {why})")


@dataclass(frozen=True)
class InputSpec:
    """Where a saved model's inputs come from: exactly one of ``shape`` (random inputs), ``file``
    (a ``torch.save``'d tensor or tuple of them) and ``images`` (a folder), as the command line's
    ``--input-shape``, ``--input`` and ``--images`` give them."""

    shape: tuple[int, ...] | None = None
    file: str | os.PathLike | None = None
    images: str | os.PathLike | None = None
    dtype: str = "float32"
    """A name in ``DTYPES``: a floating dtype casts the model too, ``int64`` makes token ids."""
    batch_size: int = 16
    """Images per batch."""
    image_size: tuple[int, ...] | None = None
    """(H, W) every image is resized to; without it every image must have the first one's size."""

    def __post_init__(self) -> None:
        given = [name for name in ("shape", "file", "images") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ConfigError(f"inputs come from exactly one of shape, file or images; got {given or 'none'}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {list(DTYPES)}, got {self.dtype!r}")


@dataclass
class ModelBatches:
    """A model cast to its inputs' dtype, and the batches of positional inputs it runs on."""

    model: nn.Module
    batches: Iterable[tuple[torch.Tensor, ...]]
    """A list, or for images a generator that reads them one batch at a time."""
    total: int
    """How many batches there are (for a progress bar)."""
    skipped: list[tuple[str, str]] = field(default_factory=list)
    """``(path, why)`` of each image file left out because it could not be read, filled in as the
    batches are read (see :func:`image_batches`)."""

    def first(self) -> tuple[torch.Tensor, ...]:
        """The first batch: all a table, a graph or a comparison runs on."""
        return next(iter(self.batches))


def cast_model(model: nn.Module, dtype: str) -> nn.Module:
    """``model`` cast to ``dtype`` (a name in ``DTYPES``) when that is a floating type; an integer
    dtype is for token ids and leaves the model as it is."""
    torch_dtype = DTYPES[dtype]
    return model.to(torch_dtype) if torch_dtype.is_floating_point else model


def batches_from(model: nn.Module, spec: InputSpec, *, unsafe: bool, seed: int = 0, count: int = 1) -> ModelBatches:
    """The batches ``spec`` describes, for ``model`` (cast to ``spec.dtype``): ``count`` random
    batches seeded ``seed``, ``seed + 1``, ...; the file's tensors, read as a model file is (a
    pickle of other objects needs ``unsafe``, like the model's own file); or the images, one batch
    of ``spec.batch_size`` at a time. A shape or a file is checked with one forward first, so a
    wrong one is an :class:`InputShapeError` that says what the model expects.

    >>> net = load_model("w.pt", arch="torchvision:resnet18")                      # doctest: +SKIP
    >>> fed = batches_from(net, InputSpec(shape=(1, 3, 224, 224)), unsafe=False)    # doctest: +SKIP
    >>> fed.model(*fed.first())                                                    # doctest: +SKIP
    """
    model = cast_model(model, spec.dtype)
    torch_dtype = DTYPES[spec.dtype]
    if spec.images is not None:
        files = image_files(spec.images)
        skipped: list[tuple[str, str]] = []
        images = image_batches(files, spec.batch_size, spec.image_size, skipped=skipped)
        batches_of = ((x.to(torch_dtype),) for x in images)
        return ModelBatches(model, batches_of, -(-len(files) // spec.batch_size), skipped)
    batches: list[tuple[torch.Tensor, ...]]
    if spec.shape is not None:
        batches = [(random_input(model, spec.shape, torch_dtype, seed=seed + i),) for i in range(count)]
    else:
        assert spec.file is not None  # InputSpec holds exactly one source
        batches = [load_input_file(spec.file, unsafe=unsafe)]
    check_input(model, batches[0])
    return ModelBatches(model, batches, len(batches))


def expected_input(model: nn.Module) -> str | None:
    """What the model's first layer takes, e.g. ``"[N, 3, H, W] (conv1 is a Conv2d with 3 input
    channels)"``; None when the first layer does not say. Works on TorchScript modules too."""
    for name, module in model.named_modules():
        kind = getattr(module, "original_name", None) or type(module).__name__
        if kind in ("Conv1d", "Conv2d", "Conv3d"):
            c = getattr(module, "in_channels", None)
            dims = {"Conv1d": "L", "Conv2d": "H, W", "Conv3d": "D, H, W"}[kind]
            if c is not None:
                return f"[N, {c}, {dims}] ({name} is a {kind} with {c} input channels)"
        elif kind == "Linear":
            f = getattr(module, "in_features", None)
            if f is not None:
                return f"[..., {f}] ({name} is a Linear with {f} input features)"
        elif kind == "Embedding":
            n = getattr(module, "num_embeddings", None)
            if n is not None:
                return f"integer token ids below {n} ({name} is an Embedding; use --dtype int64)"
        elif kind in ("LSTM", "GRU", "RNN"):
            f = getattr(module, "input_size", None)
            if f is not None:
                return f"[N, L, {f}] or [L, N, {f}] ({name} is an {kind} with input_size {f})"
        else:
            continue
        return None
    return None


def check_input(model: nn.Module, inputs: Sequence[Any]) -> Any:
    """One forward on ``inputs`` (no grad, state put back); a failure becomes ``InputShapeError``."""
    try:
        with preserved_state(model):
            return model(*inputs)
    except Exception as e:
        raise input_error(model, inputs, e) from e


def input_error(model: nn.Module, inputs: Sequence[Any], error: BaseException) -> InputShapeError:
    """The one-line explanation of a forward that failed on these inputs."""
    root = error
    while root.__cause__ is not None:  # torchinfo wraps the model's own error
        root = root.__cause__
    reason = first_line(root)
    shapes = ", ".join(
        f"{list(x.shape)} {str(x.dtype).replace('torch.', '')}" if isinstance(x, torch.Tensor) else type(x).__name__
        for x in inputs
    )
    expected = expected_input(model)
    name = getattr(model, "original_name", None) or type(model).__name__
    return InputShapeError(
        f"{name} rejected an input of shape {shapes}: {reason}" + (f"; it expects {expected}" if expected else "")
    )
