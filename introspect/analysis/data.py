"""Input-data debugging: look at the data the way a person would, and spot what a person would
only see by looking hard.

>>> report = inspect_data(train_set, "runs/exp1")      # doctest: +SKIP
>>> report.alerts                                       # doctest: +SKIP

``inspect_data`` scans a Dataset, a DataLoader, an image batch or an ``(images, labels)`` pair (at
most ``max_samples`` images, spread evenly over a dataset, so a class-sorted ImageFolder shows
every class) and writes what it saw to TensorBoard: a grid of images, a 3x3 figure of samples
titled with their labels, the class balance, per-channel statistics. Its findings are the
debugger's ``Alert``s: NaN/Inf, constant or all-black images, 0-255 values where 0-1 is expected,
heavy class imbalance, exact duplicates, labels outside the class range, unreadable files. A
finding names its images by file where the data set lists its files (an ImageFolder, a Subset of
one), by sample index elsewhere (a tensor, a TensorDataset).

``watch(..., log_inputs=True)`` runs the same image checks on the first training batch.

Memory does not grow with the images' size. The preview keeps each image downscaled to at most
``PREVIEW_SIDE`` pixels a side, and the statistics are sums over chunks of ``_CHUNK`` values. An
ImageFolder read here (a path, or :func:`image_folder`) is never made float at full size: each
file is decoded once as 8-bit pixels (at most ``MAX_IMAGE_PIXELS``, 67 MB as RGBA), its checks
and channel statistics are taken from those pixels (Pillow's histogram: exact, nothing
allocated), the exact-duplicate check hashes them, and only the downscaled preview becomes float.
Four 4096x4096 PNGs peaked at 5.8 GB when every image was a full-size float tensor; now a scan
stays under ``PEAK_MEMORY`` whatever the images' size (see docs/security.md).
"""

from __future__ import annotations

import hashlib
import math
import os
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..debugger.alerts import Alert, alerts_markdown
from ..errors import ConfigError, ModelTypeError
from ..load.files import FolderWalk, read_image
from ..records.sinks import open_writer
from ..records.tags import DATA_TAGS
from ..records.visuals import (
    class_balance_image,
    displayable,
    image_grid,
    labeled_samples_image,
)
from ..terminal import escape, format_table, number, progress

__all__ = [
    "inspect_data",
    "DataReport",
    "ChannelStats",
    "image_folder",
    "check_images",
    "is_image_batch",
    "log_input_batch",
    "DEFAULT_MAX_SAMPLES",
    "ImageFacts",
    "image_facts",
]

DEFAULT_MAX_SAMPLES = 1000
DEFAULT_IMBALANCE = 5.0
PREVIEW = 64  # images kept for the grid (and the 3x3 figure drawn from them)
PREVIEW_SIDE = 256
"""The longest side of a kept preview image (the 3x3 figure draws them at 220 pixels): 64 of
them take at most 50 MB as float RGB."""
_CHUNK = 1 << 20
"""Values per channel summed at once: the float64 temporaries of one chunk take a few MB."""
PEAK_MEMORY = 1.5 * 2**30
"""The documented bound on ``introspect data``'s peak resident memory, torch's own ~0.6 GB
included (measured: see docs/security.md); tests/test_untrusted_data.py checks it."""
SHOWN_INDICES = 5  # samples (files, or indices) named in a finding's "where"


@dataclass(frozen=True)
class ChannelStats:
    """One channel over every finite image scanned (what ``transforms.Normalize`` wants)."""

    mean: float
    std: float
    min: float
    max: float


@dataclass(frozen=True)
class ImageFacts:
    """What a scan needs of one image file, taken from its full-resolution 8-bit pixels by
    :func:`image_facts`, so that no float copy of the full image is ever made."""

    preview: torch.Tensor
    """(3, h, w) floats in [0, 1], the longest side at most ``PREVIEW_SIDE``."""
    shape: tuple[int, int, int]
    """(3, H, W): the image's own size."""
    digest: bytes
    """Hash of the decoded pixels and the size: equal for exact copies."""
    sums: torch.Tensor
    """(4, 3) float64: per channel the sum, sum of squares, min and max of the values in [0, 1]."""


def image_facts(path: str | os.PathLike[str]) -> ImageFacts:
    """One image file's :class:`ImageFacts`, read as RGB (as ``ToTensor`` would see it).

    The file is decoded once at full size as 8-bit (at most ``MAX_IMAGE_PIXELS``; larger ones
    and non-raster formats are refused by :func:`~introspect.load.files.read_image`). Sums come
    from Pillow's per-channel histogram, exact and in C; the preview is downscaled (box filter)
    before it becomes float.
    """
    import numpy as np
    from PIL import Image
    from torchvision.transforms.functional import pil_to_tensor

    image = read_image(path, "RGB")
    width, height = image.size
    counts = np.asarray(image.histogram(), dtype=np.float64).reshape(3, 256)
    levels = np.arange(256, dtype=np.float64) / 255.0
    present = counts > 0
    sums = np.stack(
        [
            counts @ levels,
            counts @ (levels * levels),
            np.where(present, levels, np.inf).min(1),
            np.where(present, levels, -np.inf).max(1),
        ]
    )
    digest = hashlib.blake2b(image.tobytes(), digest_size=16)
    digest.update(repr(((3, height, width), "uint8")).encode())
    if max(width, height) > PREVIEW_SIDE:
        image.thumbnail((PREVIEW_SIDE, PREVIEW_SIDE), Image.Resampling.BOX)
    preview = pil_to_tensor(image).float() / 255.0
    return ImageFacts(preview, (3, height, width), digest.digest(), torch.from_numpy(sums))


@dataclass
class DataReport:
    """What :func:`inspect_data` saw and found; ``str(report)`` is the terminal table."""

    alerts: list[Alert]
    samples: int
    """Images scanned."""
    total: int | None
    """Images in the data set, when it has a length."""
    image_shape: tuple[int, ...] | None
    dtype: str
    channels: list[ChannelStats] = field(default_factory=list)
    class_names: list[str] = field(default_factory=list)
    class_counts: list[int] = field(default_factory=list)

    def __str__(self) -> str:
        shape = "x".join(map(str, self.image_shape)) if self.image_shape else "?"
        scanned = f"{self.samples} of {self.total}" if self.total not in (None, self.samples) else f"{self.samples}"
        count = len(self.alerts)
        head = (
            f"introspect: {count} finding{'s' if count != 1 else ''} in {scanned} images ({shape}, {self.dtype})"
            if count
            else f"introspect: no problems found in {scanned} images ({shape}, {self.dtype})."
        )
        lines = [head]
        if self.alerts:
            lines.append(
                format_table(("finding", "where", "details"), [(a.kind, a.where, a.message) for a in self.alerts])
            )
        if self.channels:
            lines.append("")
            lines.append(format_table(CHANNEL_COLUMNS, _channel_rows(self.channels)))
        if self.class_counts:
            lines.append("")
            lines.append(  # class names are folder names: shown, never obeyed (terminal.escape)
                "classes: " + ", ".join(f"{escape(n)} {c}" for n, c in zip(self.class_names, self.class_counts))
            )
        return "\n".join(lines)


CHANNEL_COLUMNS = ("channel", "mean", "std", "min", "max")


def _channel_rows(channels: Sequence[ChannelStats]) -> list[tuple[int, float, float, float, float]]:
    return [(i, c.mean, c.std, c.min, c.max) for i, c in enumerate(channels)]


# --------------------------------------------------------------------------- the scan
@dataclass
class _Scan:
    """Per-image checks, accumulated one image at a time (images may differ in size)."""

    expected_range: tuple[float, float] | None
    planned: int = PREVIEW
    """Images the scan expects; the preview takes ``PREVIEW`` of them spread evenly (a sorted
    ImageFolder's first 64 would all be one class)."""
    paths: Sequence[str] | None = None
    """The file of each sample index, when the data set lists them (an ImageFolder): findings
    name the files, which a person can open, rather than indices into the data set."""
    count: int = 0
    shape: tuple[int, ...] | None = None
    dtype: str = ""
    nonfinite: list[int] = field(default_factory=list)
    constant: list[tuple[int, float]] = field(default_factory=list)
    out_of_range: list[tuple[int, float, float]] = field(default_factory=list)
    unreadable: list[tuple[int, str]] = field(default_factory=list)
    first_seen: dict[bytes, int] = field(default_factory=dict)
    duplicates: list[tuple[int, int]] = field(default_factory=list)
    labels: dict[int, int] = field(default_factory=dict)
    preview: list[tuple[int, torch.Tensor, int | None]] = field(default_factory=list)
    _preview_at: frozenset[int] = frozenset()
    _pixels: int = 0
    _sums: torch.Tensor | None = None  # per channel: sum, sum of squares, min, max (float64)

    def __post_init__(self) -> None:
        n = max(self.planned, 1)
        self._preview_at = frozenset(range(n) if n <= PREVIEW else (i * n // PREVIEW for i in range(PREVIEW)))

    def add(self, index: int, image: torch.Tensor | ImageFacts, label: int | None) -> None:
        if isinstance(image, ImageFacts):
            return self._add_facts(index, image, label)
        self.count += 1
        if self.shape is None:
            self.shape, self.dtype = tuple(image.shape), str(image.dtype).replace("torch.", "")
        if label is not None:
            self.labels[index] = label
        if self.count - 1 in self._preview_at:
            self.preview.append((index, _preview_copy(image), label))  # not a view that keeps its batch alive
        digest = hashlib.blake2b(_raw_bytes(image), digest_size=16)
        digest.update(repr((tuple(image.shape), image.dtype)).encode())
        self._seen(index, digest.digest())
        sums, finite = _channel_sums(image)
        if not finite:
            self.nonfinite.append(index)
            return  # its min, max and statistics mean nothing
        self._check_values(index, float(sums[2].min()), float(sums[3].max()), image.is_floating_point())
        self._add_sums(sums, image[0].numel())

    def _add_facts(self, index: int, facts: ImageFacts, label: int | None) -> None:
        """An image file read as 8-bit pixels: the same checks, from what :func:`image_facts` took."""
        self.count += 1
        if self.shape is None:
            self.shape, self.dtype = facts.shape, "float32"  # what ToTensor would have made of it
        if label is not None:
            self.labels[index] = label
        if self.count - 1 in self._preview_at:
            self.preview.append((index, facts.preview, label))
        self._seen(index, facts.digest)
        self._check_values(index, float(facts.sums[2].min()), float(facts.sums[3].max()), True)
        self._add_sums(facts.sums, facts.shape[1] * facts.shape[2])

    def _seen(self, index: int, key: bytes) -> None:
        if key in self.first_seen:
            self.duplicates.append((index, self.first_seen[key]))
        else:
            self.first_seen[key] = index

    def _check_values(self, index: int, lo: float, hi: float, floating: bool) -> None:
        if lo == hi:
            self.constant.append((index, lo))
        if self.expected_range is not None:
            low, high = self.expected_range
            if lo < low - 1e-6 or hi > high + 1e-6:
                self.out_of_range.append((index, lo, hi))
        elif floating and lo >= 0.0 and hi > 2.0:
            self.out_of_range.append((index, lo, hi))  # 0-255 floats; 0-1 (ToTensor) is the norm

    def _add_sums(self, row: torch.Tensor, pixels: int) -> None:
        """One image's per-channel (sum, sum of squares, min, max), a (4, C) float64 tensor."""
        if self._sums is None:
            self._sums = row.clone()
        elif self._sums.shape != row.shape:
            return  # a different channel count (a grey image among colour ones): not comparable
        else:
            self._sums[:2] += row[:2]
            self._sums[2] = torch.minimum(self._sums[2], row[2])
            self._sums[3] = torch.maximum(self._sums[3], row[3])
        self._pixels += pixels

    def channels(self) -> list[ChannelStats]:
        if self._sums is None or self._pixels == 0:
            return []
        n = self._pixels
        stats = []
        for s, sq, lo, hi in self._sums.T.tolist():
            mean = s / n
            stats.append(ChannelStats(mean, math.sqrt(max(sq / n - mean * mean, 0.0)), lo, hi))
        return stats

    def name(self, index: int) -> str:
        """Sample ``index`` as a person finds it: its file, or ``sample 7`` where there is none."""
        if self.paths is not None and 0 <= index < len(self.paths):
            return self.paths[index]
        return f"sample {index}"

    def where(self, indices: Sequence[int]) -> str:
        """The first ``SHOWN_INDICES`` samples of a finding: files (``a.png, b.png (+3 more)``), or
        indices (``samples 7, 14``) for data that has no files (a tensor, a tensor dataset)."""
        more = f" (+{len(indices) - SHOWN_INDICES} more)" if len(indices) > SHOWN_INDICES else ""
        if self.paths is not None:
            return ", ".join(self.name(i) for i in indices[:SHOWN_INDICES]) + more
        shown = ", ".join(str(i) for i in indices[:SHOWN_INDICES])
        return f"sample{'s' if len(indices) > 1 else ''} {shown}{more}"

    def alerts(self, step: int, prefix: str = "") -> list[Alert]:
        """Findings about the images themselves (labels are judged with the class names)."""
        n = self.count
        found = []
        if self.unreadable:
            indices = [i for i, _ in self.unreadable]
            found.append(
                Alert(
                    "data_unreadable",
                    prefix + self.where(indices),
                    step,
                    f"{len(indices)} of {n + len(indices)} samples could not be loaded "
                    f"({self.name(self.unreadable[0][0])}: {self.unreadable[0][1]})",
                    {"samples": float(len(indices))},
                )
            )
        if self.nonfinite:
            found.append(
                Alert(
                    "data_nonfinite",
                    prefix + self.where(self.nonfinite),
                    step,
                    f"{len(self.nonfinite)} of {n} images hold NaN or Inf values; one in a batch makes the "
                    "loss and every gradient NaN",
                    {"samples": float(len(self.nonfinite))},
                )
            )
        if self.constant:
            indices = [i for i, _ in self.constant]
            black = sum(1 for _, v in self.constant if v == 0.0)
            what = f", {black} of them all black" if black else ""
            found.append(
                Alert(
                    "data_constant",
                    prefix + self.where(indices),
                    step,
                    f"{len(indices)} of {n} images are constant (every pixel the same value{what}): "
                    "empty or failed loads, padding, or a broken transform",
                    {"samples": float(len(indices)), "black": float(black)},
                )
            )
        if self.out_of_range:
            indices = [i for i, _, _ in self.out_of_range]
            lo = min(v for _, v, _ in self.out_of_range)
            hi = max(v for _, _, v in self.out_of_range)
            if self.expected_range is None:
                message = (
                    f"{len(indices)} of {n} float images have values up to {hi:.4g} and none below 0: "
                    "they look like 0-255 pixel values where 0-1 is expected (divide by 255, or use "
                    "transforms.ToTensor())"
                )
            else:
                low, high = self.expected_range
                message = (
                    f"{len(indices)} of {n} images have values outside the expected range "
                    f"[{low:g}, {high:g}] (seen [{lo:.4g}, {hi:.4g}])"
                )
            found.append(
                Alert(
                    "data_range",
                    prefix + self.where(indices),
                    step,
                    message,
                    {"samples": float(len(indices)), "min": lo, "max": hi},
                )
            )
        if self.duplicates:
            copy, original = self.duplicates[0]
            conflicting = sum(
                1
                for c, o in self.duplicates
                if c in self.labels and o in self.labels and self.labels[c] != self.labels[o]
            )
            message = (
                f"{len(self.duplicates)} of {n} images are exact copies of an earlier one "
                f"(e.g. {self.name(copy)} = {self.name(original)})"
            )
            if conflicting:
                message += f"; {conflicting} of them with a different label than the original"
            found.append(
                Alert(
                    "data_duplicates",
                    prefix + self.where([c for c, _ in self.duplicates]),
                    step,
                    message,
                    {"samples": float(len(self.duplicates)), "conflicting_labels": float(conflicting)},
                )
            )
        return found


def _raw_bytes(image: torch.Tensor) -> Any:
    """The image's bytes as a buffer (no copy of a contiguous CPU tensor)."""
    x = image.detach().cpu().contiguous()
    if x.dtype in (torch.bfloat16, torch.float16):
        x = x.view(torch.int16)  # numpy has no bfloat16; the bits are what "exact copy" compares
    elif x.dtype == torch.bool:
        x = x.view(torch.uint8)
    return memoryview(x.numpy().data).cast("B")


def _channel_sums(image: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """``((4, C) float64 of sum, sum of squares, min, max per channel, all finite)``, a chunk of
    ``_CHUNK`` values per channel at a time: no float64 copy of a whole large image."""
    flat = image.detach().flatten(1)
    parts = []
    for chunk in flat.split(_CHUNK, dim=1):
        x = chunk.double()
        if image.is_floating_point() and not bool(torch.isfinite(x).all()):
            return torch.empty(0), False
        parts.append(torch.stack([x.sum(1), x.square().sum(1), x.amin(1), x.amax(1)]))
    if len(parts) == 1:
        return parts[0], True
    stacked = torch.stack(parts)
    return torch.stack([stacked[:, 0].sum(0), stacked[:, 1].sum(0), stacked[:, 2].amin(0), stacked[:, 3].amax(0)]), True


def _preview_copy(image: torch.Tensor) -> torch.Tensor:
    """A copy of ``image`` to keep for the preview, its longest side at most ``PREVIEW_SIDE``
    (area-averaged; an integer image stays integer, so it is drawn as it would have been)."""
    import torch.nn.functional as F

    height, width = image.shape[-2:]
    if max(height, width) <= PREVIEW_SIDE:
        return image.detach().cpu().clone()
    scale = PREVIEW_SIDE / max(height, width)
    size = (max(1, round(height * scale)), max(1, round(width * scale)))
    small = F.interpolate(image.detach().cpu()[None].double(), size=size, mode="area")[0]
    return small.to(image.dtype) if image.is_floating_point() else small.round().to(image.dtype)


def _label_alerts(counts: Mapping[int, int], names: Sequence[str] | None, ratio: float, step: int) -> list[Alert]:
    """Labels outside the class range, and heavy class imbalance."""
    found = []
    n_classes = len(names) if names else None
    if n_classes is not None:
        bad = {label: c for label, c in counts.items() if not 0 <= label < n_classes}
        if bad:
            total = sum(bad.values())
            seen = ", ".join(str(v) for v in sorted(bad)[:SHOWN_INDICES])
            found.append(
                Alert(
                    "data_labels",
                    "labels",
                    step,
                    f"{total} label{' is' if total == 1 else 's are'} outside the class range 0..{n_classes - 1} (seen {seen}); "
                    "cross-entropy fails on them, or trains on a class that does not exist",
                    {"samples": float(total), "classes": float(n_classes)},
                )
            )
    per_class = _class_counts(counts, names)
    if len(per_class) >= 2:
        (big, most), (small, fewest) = max(per_class, key=lambda kv: kv[1]), min(per_class, key=lambda kv: kv[1])
        if fewest == 0:
            found.append(
                Alert(
                    "data_imbalance",
                    f"class {small}",
                    step,
                    f"class {small} has no samples (class {big} has {most})",
                    {"max_count": float(most), "min_count": 0.0},
                )
            )
        elif most / fewest >= ratio:
            found.append(
                Alert(
                    "data_imbalance",
                    f"class {small}",
                    step,
                    f"class {big} has {most / fewest:.1f}x as many samples as class {small} ({most} vs "
                    f"{fewest}): a model can score {most / sum(c for _, c in per_class):.0%} by always "
                    "answering the largest class; weight the loss or resample",
                    {"max_count": float(most), "min_count": float(fewest), "ratio": most / fewest},
                )
            )
    return found


def _class_counts(counts: Mapping[int, int], names: Sequence[str] | None) -> list[tuple[str, int]]:
    """``[(class name, samples)]`` in class order; every named class, present or not."""
    if names:
        return [(name, counts.get(i, 0)) for i, name in enumerate(names)]
    return [(str(label), counts[label]) for label in sorted(counts)]


# --------------------------------------------------------------------------- reading the data
def image_folder(path: str | os.PathLike[str]) -> Any:
    """An ImageFolder (``path/<class>/<image>``) of 0-1 float tensors, or a ``ConfigError`` that
    says what is wrong with the folder."""
    from torchvision.transforms import ToTensor

    root = Path(path)
    if not root.exists():
        raise ConfigError(f"no such folder: {root}")
    if not root.is_dir():
        raise ConfigError(f"not a folder: {root}")
    try:
        entries = [e for e in root.iterdir() if not e.name.startswith(".")]
    except OSError as e:
        raise ConfigError(f"cannot list {root}: {e.strerror or e}") from None
    if not entries:
        raise ConfigError(f"{root} is empty; an ImageFolder holds one subfolder of images per class")
    if not any(e.is_dir() for e in entries):
        raise ConfigError(
            f"{root} is not an ImageFolder: it has no class subfolders (expected {root}/<class>/<image>.png)"
        )
    try:
        return _image_tree()(str(root), transform=ToTensor())
    except (FileNotFoundError, OSError) as e:  # "Found no valid file for the classes ..."
        raise ConfigError(f"{root} is not an ImageFolder: {e}") from None


def _image_tree() -> type:
    """torchvision's ImageFolder, walked with :class:`~introspect.load.files.FolderWalk` (symlink loops
    are not followed, each file is one sample) and read with :func:`~introspect.load.files.read_image`
    (an image too large to decode is an unreadable sample, not a crash)."""
    from torchvision.datasets import ImageFolder
    from torchvision.datasets.folder import IMG_EXTENSIONS

    class ImageTree(ImageFolder):
        def __init__(self, root: str, **kwargs: Any) -> None:
            self._walk = FolderWalk()
            self._walk.stand_above(root)  # a class folder that leads back up is a loop, not a class
            super().__init__(root, loader=read_image, **kwargs)

        def scan_sample(self, index: int) -> tuple[ImageFacts, int]:
            """Sample ``index`` as :func:`inspect_data` reads it: :class:`ImageFacts` (statistics of
            the 8-bit pixels, a downscaled preview) instead of a full-size float tensor."""
            path, label = self.samples[index]
            return image_facts(path), label

        def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
            classes = sorted(e.name for e in os.scandir(directory) if e.is_dir() and not self._walk.entered(e.path))
            if not classes:
                raise FileNotFoundError(f"Couldn't find any class folder in {directory}.")
            return classes, {name: i for i, name in enumerate(classes)}

        def make_dataset(
            self,
            directory: str,
            class_to_idx: dict[str, int],
            extensions: Any = None,
            is_valid_file: Any = None,
            allow_empty: bool = False,
        ) -> list[tuple[str, int]]:
            samples = [
                (str(file), index)
                for name, index in sorted(class_to_idx.items())
                for file in self._walk.files_under(Path(directory) / name, IMG_EXTENSIONS)
            ]
            present = {index for _, index in samples}
            empty = sorted(name for name, index in class_to_idx.items() if index not in present)
            if empty and not allow_empty:
                raise FileNotFoundError(f"Found no valid file for the classes {', '.join(empty)}")
            return samples

    return ImageTree


def _as_image(x: Any) -> torch.Tensor:
    """A sample as a (C, H, W) tensor: PIL images become 0-1 floats as ``ToTensor`` makes them."""
    if not isinstance(x, torch.Tensor):
        pil_image: Any = None
        try:
            from PIL import Image

            pil_image = Image.Image
        except ImportError:  # pragma: no cover - torchvision brings Pillow
            pass
        if pil_image is not None and isinstance(x, pil_image):
            from torchvision.transforms.functional import to_tensor

            return to_tensor(x)
        if type(x).__module__ == "numpy":
            x = torch.from_numpy(x)
            if x.dim() == 3 and x.shape[-1] in (1, 3, 4) and x.shape[0] not in (1, 3, 4):
                x = x.permute(2, 0, 1)  # HWC, as numpy images come
        else:
            raise ModelTypeError(
                f"inspect_data reads images as tensors, PIL images or numpy arrays; got a sample of "
                f"type {type(x).__name__}"
            )
    if x.dim() == 2:
        x = x.unsqueeze(0)
    if x.dim() != 3:
        raise ConfigError(
            f"inspect_data expects images of shape (C, H, W) or (H, W); got a sample of shape {tuple(x.shape)}"
        )
    return x.detach().cpu()


def _as_label(y: Any) -> int | None:
    """A class index, or None for labels that are not one (regression targets, one-hot vectors)."""
    if isinstance(y, torch.Tensor):
        if y.numel() != 1:
            return None
        y = y.item()
    if isinstance(y, bool) or y is None:
        return None
    if isinstance(y, float):
        return int(y) if y.is_integer() else None
    try:
        return int(y)  # int, numpy integers
    except (TypeError, ValueError):
        return None


def _image_batch(x: Any) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise ModelTypeError(f"expected a batch of images as a tensor, got {type(x).__name__}")
    if x.dim() == 3:
        x = x.unsqueeze(1)  # (N, H, W): grey images
    if x.dim() != 4:
        raise ConfigError(
            f"inspect_data expects an image batch of shape (N, C, H, W) or (N, H, W); got {tuple(x.shape)}"
        )
    return x.detach().cpu()


def _split_item(item: Any) -> tuple[Any, Any]:
    """``(image, label)`` from a dataset item or a loader batch: a pair (or longer), or the image alone."""
    if isinstance(item, (tuple, list)):
        if not item:
            raise ConfigError("inspect_data got an empty sample")
        return item[0], (item[1] if len(item) > 1 else None)
    if isinstance(item, Mapping):
        raise ModelTypeError(
            f"inspect_data reads (image, label) pairs or images; got a dict with keys {sorted(map(str, item))[:6]} "
            "- pass inspect_data((images, labels)) instead"
        )
    return item, None


Sample = tuple[int, "torch.Tensor | ImageFacts | None", "int | None", "str | None"]


def _batch_samples(images: torch.Tensor, labels: Any, start: int, limit: int) -> Iterator[Sample]:
    if labels is not None and not isinstance(labels, torch.Tensor):
        labels = list(labels)
    if labels is not None and len(labels) != len(images):
        raise ConfigError(f"got {len(images)} images but {len(labels)} labels")
    for i in range(min(len(images), limit)):
        yield start + i, images[i], (_as_label(labels[i]) if labels is not None else None), None


def _samples(data: Any, max_samples: int) -> tuple[Iterator[Sample], int | None, int]:
    """``(samples, size of the data set, how many will be scanned)``."""
    from torch.utils.data import DataLoader, Dataset, IterableDataset

    if isinstance(data, torch.Tensor):
        images = _image_batch(data)
        return _batch_samples(images, None, 0, max_samples), len(images), min(len(images), max_samples)
    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], torch.Tensor):
        images = _image_batch(data[0])
        return _batch_samples(images, data[1], 0, max_samples), len(images), min(len(images), max_samples)
    if isinstance(data, DataLoader):
        total = _length(data.dataset)

        def from_loader() -> Iterator[Sample]:
            seen = 0
            for batch in data:
                images, labels = _split_item(batch)
                images = _image_batch(images)
                yield from _batch_samples(images, labels, seen, max_samples - seen)
                seen += len(images)
                if seen >= max_samples:
                    return

        return from_loader(), total, min(total, max_samples) if total is not None else max_samples
    if isinstance(data, IterableDataset):

        def from_stream() -> Iterator[Sample]:
            for i, item in zip(range(max_samples), data):
                image, label = _split_item(item)
                yield i, _as_image(image), _as_label(label), None

        return from_stream(), None, max_samples
    if isinstance(data, Dataset) or (hasattr(data, "__getitem__") and hasattr(data, "__len__")):
        n = len(data)
        # Evenly spread over the whole set: a class-sorted ImageFolder shows every class.
        indices = range(n) if n <= max_samples else [i * n // max_samples for i in range(max_samples)]

        # An image_folder() hands over what the scan needs of each file, never a full-size float
        # tensor (see ImageFacts); any other dataset is read as it is.
        scan_sample = getattr(data, "scan_sample", None)

        def from_dataset() -> Iterator[Sample]:
            for i in indices:
                try:
                    if scan_sample is not None:
                        facts, label = scan_sample(i)
                        yield i, facts, label, None
                        continue
                    image, label = _split_item(data[i])
                except _unreadable() as e:  # a corrupt file is a finding, not a crash
                    yield i, None, None, f"{type(e).__name__}: {e}"
                    continue
                yield i, _as_image(image), _as_label(label), None

        return from_dataset(), n, len(indices)
    raise ModelTypeError(
        "inspect_data takes a Dataset, a DataLoader, an image batch tensor (N, C, H, W), an "
        f"(images, labels) pair or an ImageFolder path; got {type(data).__name__}"
    )


def _unreadable() -> tuple[type[BaseException], ...]:
    """What a dataset raises for a file it cannot read; Pillow's DecompressionBombError (an image
    whose header claims too many pixels) derives from none of the built-in errors."""
    try:
        from PIL.Image import DecompressionBombError
    except ImportError:  # pragma: no cover - torchvision brings Pillow
        return (OSError, ValueError, RuntimeError)
    return (OSError, ValueError, RuntimeError, DecompressionBombError)


def _sample_paths(data: Any) -> list[str] | None:
    """The file of each index of a data set that lists its files (torchvision's ImageFolder and
    DatasetFolder: ``samples = [(path, label), ...]``; a ``Subset`` of one maps through its
    indices); None for anything else, a DataLoader included (its positions are not indices when
    it shuffles)."""
    from torch.utils.data import DataLoader, Subset

    if isinstance(data, DataLoader):
        return None
    if isinstance(data, Subset):
        base = _sample_paths(data.dataset)
        try:
            return None if base is None else [base[int(i)] for i in data.indices]
        except (IndexError, TypeError, ValueError):
            return None
    samples = getattr(data, "samples", None)
    length = _length(data)
    if not isinstance(samples, Sequence) or length is None or len(samples) != length:
        return None
    paths = []
    for item in samples:
        path = item[0] if isinstance(item, (tuple, list)) and item else None
        if not isinstance(path, (str, os.PathLike)):
            return None
        paths.append(os.fspath(path))
    return paths


def _length(dataset: Any) -> int | None:
    try:
        return len(dataset)
    except TypeError:
        return None


def _base_datasets(data: Any) -> Iterator[Any]:
    """The data itself, the loader's dataset, and the datasets a Subset (or similar) wraps."""
    node = data
    for _ in range(6):
        if node is None:
            return
        yield node
        node = getattr(node, "dataset", None)


def _class_names(data: Any, classes: Any) -> list[str] | None:
    if classes is not None:
        if isinstance(classes, Mapping):  # class_to_idx
            return [str(name) for name, _ in sorted(classes.items(), key=lambda kv: kv[1])]
        if isinstance(classes, int) and not isinstance(classes, bool) and classes > 0:
            return [str(i) for i in range(classes)]
        if isinstance(classes, Sequence) and not isinstance(classes, str) and len(classes) > 0:
            return [str(c) for c in classes]
        raise ConfigError(
            f"classes= takes a list of class names, a class_to_idx dict or a number of classes; got {classes!r}"
        )
    for node in _base_datasets(data):
        names = getattr(node, "classes", None)
        if isinstance(names, Sequence) and not isinstance(names, str) and len(names) > 0:
            return [str(c) for c in names]
        mapping = getattr(node, "class_to_idx", None)
        if isinstance(mapping, Mapping) and mapping:
            return [str(name) for name, _ in sorted(mapping.items(), key=lambda kv: kv[1])]
    return None


def _all_targets(data: Any) -> list[int] | None:
    """Every label of a dataset that lists them (``ImageFolder.targets``, CIFAR, MNIST): the class
    balance of the whole set, without loading an image."""
    targets = getattr(data, "targets", None)
    if targets is None or _length(data) is None or isinstance(targets, (str, bytes)):
        return None
    try:
        labels = [_as_label(t) for t in targets]
    except TypeError:
        return None
    if len(labels) != len(data) or any(label is None for label in labels):
        return None
    return labels  # type: ignore[return-value]


# --------------------------------------------------------------------------- writing
def _titles(shown: Sequence[tuple[int, torch.Tensor, int | None]], names: Sequence[str] | None) -> list[str]:
    titles = []
    for index, _, label in shown:
        if label is None:
            titles.append(f"sample {index}")
        elif names and 0 <= label < len(names):
            titles.append(f"label = {label} ({names[label]})")
        else:
            titles.append(f"label = {label}")
    return titles


def _preview_batch(images: Sequence[torch.Tensor]) -> torch.Tensor:
    """Preview images as one RGB batch in [0, 1], resized to the first one's size where they differ."""
    import torch.nn.functional as F

    shown = [displayable(x.unsqueeze(0)) for x in images]
    size = shown[0].shape[-2:]
    shown = [x if x.shape[-2:] == size else F.interpolate(x, size=tuple(size), mode="bilinear") for x in shown]
    return torch.cat(shown)


def _channel_markdown(channels: Sequence[ChannelStats]) -> str:
    lines = ["| " + " | ".join(CHANNEL_COLUMNS) + " |", "|" + " --- |" * len(CHANNEL_COLUMNS)]
    lines += ["| " + " | ".join(number(v) for v in row) + " |" for row in _channel_rows(channels)]
    mean = ", ".join(f"{c.mean:.4f}" for c in channels)
    std = ", ".join(f"{c.std:.4f}" for c in channels)
    lines += ["", f"`transforms.Normalize(mean=[{mean}], std=[{std}])`"]
    return "\n".join(lines)


def _write(writer: Any, scan: _Scan, report: DataReport, names: Sequence[str] | None, step: int) -> None:
    if scan.preview:
        batch = _preview_batch([x for _, x, _ in scan.preview])
        writer.add_image(DATA_TAGS["batch"], image_grid(batch), step)
        writer.add_image(DATA_TAGS["first_image"], batch[0], step)
        n = len(scan.preview)
        picks = sorted({round(i * (n - 1) / 8) for i in range(9)}) if n > 9 else list(range(n))
        shown = [scan.preview[i] for i in picks]
        figure = labeled_samples_image(batch[picks], _titles(shown, names))
        writer.add_image(DATA_TAGS["samples"], figure, step, dataformats="HWC")
    if report.class_counts:
        chart = class_balance_image(report.class_names, report.class_counts)
        writer.add_image(DATA_TAGS["class_balance"], chart, step, dataformats="HWC")
    if report.channels:
        writer.add_text(DATA_TAGS["channel_stats"], _channel_markdown(report.channels), step)
    findings = alerts_markdown(report.alerts) if report.alerts else f"No problems found in {report.samples} images."
    writer.add_text(DATA_TAGS["findings"], findings, step)


# --------------------------------------------------------------------------- public
def inspect_data(
    data: Any,
    writer: Any = None,
    *,
    classes: Sequence[str] | Mapping[str, int] | int | None = None,
    max_samples: int = DEFAULT_MAX_SAMPLES,
    expected_range: tuple[float, float] | None = None,
    imbalance_ratio: float = DEFAULT_IMBALANCE,
    step: int = 0,
    show_progress: bool = True,
    verbose: bool = True,
) -> DataReport:
    """Look at a data set before training on it: pictures in TensorBoard, findings in words.

    >>> report = inspect_data(ImageFolder("data/train", transform=ToTensor()), "runs/data")  # doctest: +SKIP

    Writes ``data/batch`` (a ``make_grid`` of up to 64 images), ``data/first_image``,
    ``data/samples`` (a 3x3 matplotlib grid titled ``label = N (class)``), ``data/class_balance``
    (a bar chart), ``data/channel_stats`` (per-channel mean/std/min/max, with the matching
    ``Normalize``) and ``data/findings``; prints the report and returns it.

    Args:
        data: a Dataset (read at ``max_samples`` indices spread evenly over it), a DataLoader
            (its first batches), an image batch (N, C, H, W), an ``(images, labels)`` pair, or the
            path of an ImageFolder tree.
        writer: a SummaryWriter (flushed, not closed), a log directory, or None for ``runs/<time>``.
        classes: class names (or a ``class_to_idx`` dict, or their number); by default the
            dataset's ``classes`` / ``class_to_idx``. Without them labels cannot be out of range.
        max_samples: images scanned at most (a progress bar shows the scan).
        expected_range: ``(low, high)`` the values should lie in; by default float images are
            only flagged when they look like 0-255 values (none below 0, some above 2), so
            normalised data (negative values) is fine.
        imbalance_ratio: report when the largest class has this many times the samples of the smallest.
        step: the global step the pictures are written at.
        show_progress / verbose: show a progress bar (on a terminal, for scans over half a
            second) / print the report.
    """
    from torch.utils.data import DataLoader

    if isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples < 1:
        raise ConfigError(f"max_samples must be an integer >= 1, got {max_samples!r}")
    if expected_range is not None:
        try:
            low, high = (float(v) for v in expected_range)
        except (TypeError, ValueError):
            raise ConfigError(f"expected_range must be (low, high), got {expected_range!r}") from None
        if not low < high:
            raise ConfigError(f"expected_range must have low < high, got {expected_range!r}")
        expected_range = (low, high)
    if not imbalance_ratio > 1:
        raise ConfigError(f"imbalance_ratio must be > 1, got {imbalance_ratio!r}")
    if isinstance(data, (str, os.PathLike)):
        data = image_folder(data)
    names = _class_names(data, classes)
    samples, total, planned = _samples(data, max_samples)

    scan = _Scan(expected_range, planned, paths=_sample_paths(data))
    for index, image, label, error in progress(samples, show_progress, total=planned, desc="inspect_data", unit="img"):
        if error is not None:
            scan.unreadable.append((index, error))
        elif image is not None:
            scan.add(index, image, label)
    if scan.count == 0:
        if scan.unreadable:
            raise ConfigError(f"inspect_data could not load any sample: {scan.unreadable[0][1]}")
        raise ConfigError("inspect_data got no images: the data set is empty")

    targets = _all_targets(getattr(data, "dataset", None) if isinstance(data, DataLoader) else data)
    counts = Counter(targets if targets is not None else scan.labels.values())
    alerts = scan.alerts(step) + _label_alerts(counts, names, imbalance_ratio, step)
    per_class = _class_counts(counts, names) if counts else []
    report = DataReport(
        alerts=alerts,
        samples=scan.count,
        total=total,
        image_shape=scan.shape,
        dtype=scan.dtype,
        channels=scan.channels(),
        class_names=[name for name, _ in per_class],
        class_counts=[c for _, c in per_class],
    )
    sink, owned = open_writer(writer)
    try:
        _write(sink, scan, report, names, step)
    finally:
        sink.close() if owned else sink.flush()
    if verbose:
        print(report)
    return report


def check_images(images: torch.Tensor, step: int = 0, prefix: str = "") -> list[Alert]:
    """The image checks of :func:`inspect_data` (NaN/Inf, constant, range, duplicates) on one batch."""
    scan = _Scan(None)
    for index, image, _, _ in _batch_samples(_image_batch(images), None, 0, len(images)):
        if image is not None:
            scan.add(index, image, None)
    return scan.alerts(step, prefix)


def is_image_batch(x: torch.Tensor) -> bool:
    """(N, C, H, W) with 1, 3 or 4 channels and at least 8x8 pixels: worth drawing as images."""
    return x.dim() == 4 and x.shape[0] > 0 and x.shape[1] in (1, 3, 4) and min(x.shape[-2:]) >= 8


def log_input_batch(x: torch.Tensor, writer: Any, tag: str, step: int) -> list[Alert]:
    """``watch(log_inputs=True)``: an image-like batch as a grid under ``tag``, and its findings."""
    if not is_image_batch(x):
        return []
    images = x.detach()[:PREVIEW].cpu()
    writer.add_image(tag, image_grid(images), step)
    return check_images(x.detach().cpu(), step, prefix="input ")
