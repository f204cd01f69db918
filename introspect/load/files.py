"""Folders and images from strangers: a walk that ends, and an image read of bounded size.

>>> walk_files(Path("data/train"), (".png", ".jpg"))   # doctest: +SKIP
[PosixPath('data/train/cat/0.png'), ...]

``os.walk(followlinks=True)`` (what torchvision's ImageFolder uses) never ends on a folder with a
symlink to itself or to a parent: it grows memory without bound, and one loop already counts
every image many times (false duplicates, false imbalance). :func:`walk_files` follows directory
symlinks, but never into a directory it has been in or one above where it started, and lists
each file once, however many paths lead to it.

Pillow decodes an image fully before it can be checked; a PNG header may claim 20000x20000
pixels in a few hundred bytes. :func:`read_image` refuses images above ``MAX_IMAGE_PIXELS`` from
the header alone, so a scan records them as unreadable and goes on.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

__all__ = ["MAX_IMAGE_PIXELS", "walk_files", "read_image", "FolderWalk"]

MAX_IMAGE_PIXELS = 4096 * 4096
"""The largest image read (16.8 megapixels): as float32 RGB, 200 MB. Larger ones are reported
unreadable rather than decoded (Pillow's own bomb limit, 89 megapixels, would take 1 GB)."""


class FolderWalk:
    """One walk's memory of where it has been: the directories entered and the files listed, by
    (device, inode), so that several roots walked with one ``FolderWalk`` share it."""

    def __init__(self) -> None:
        self.dirs: set[tuple[int, int]] = set()
        self.files: set[tuple[int, int] | str] = set()

    def files_under(self, top: str | os.PathLike, suffixes: Iterable[str]) -> list[Path]:
        """Files under ``top`` ending in one of ``suffixes`` (any case), in sorted order, each once."""
        ends = tuple(s.lower() for s in suffixes)
        top = Path(top)
        self.stand_above(top.resolve().parent)  # a symlink up to a parent of top loops
        found: list[Path] = []
        pending = [top]
        while pending:  # a stack, not recursion: a deep tree would exceed Python's limit
            folder = pending.pop()
            try:
                key = _identity(folder)
                if key in self.dirs:
                    continue
                self.dirs.add(key)
                entries = sorted(os.scandir(folder), key=lambda e: e.name)
            except OSError:  # vanished, or not readable: nothing to list
                continue
            subfolders = []
            for entry in entries:
                try:
                    if entry.is_dir():
                        subfolders.append(Path(entry.path))
                    elif entry.name.lower().endswith(ends):
                        if entry.is_file():
                            file_key: tuple[int, int] | str = _identity(Path(entry.path))
                        elif entry.is_symlink():  # broken: listed, so that reading it reports it
                            file_key = entry.path
                        else:
                            continue
                        if file_key not in self.files:
                            self.files.add(file_key)
                            found.append(Path(entry.path))
                except OSError:
                    continue
            pending.extend(reversed(subfolders))  # visited in sorted order
        return found

    def stand_above(self, folder: str | os.PathLike) -> None:
        """Count ``folder`` and every directory above it as entered: a symlink to any of them
        leads back to where the walk is."""
        for p in (Path(folder).resolve(), *Path(folder).resolve().parents):
            try:
                self.dirs.add(_identity(p))
            except OSError:
                pass

    def entered(self, folder: str | os.PathLike) -> bool:
        """Whether ``folder`` (after symlinks) is a directory this walk has entered or stands above."""
        try:
            return _identity(Path(folder)) in self.dirs
        except OSError:
            return False


def walk_files(top: str | os.PathLike, suffixes: Iterable[str]) -> list[Path]:
    """Files under ``top`` ending in one of ``suffixes``, following directory symlinks that do
    not loop, each file once (see :class:`FolderWalk`)."""
    return FolderWalk().files_under(top, suffixes)


def read_image(path: str | os.PathLike, mode: str = "RGB") -> Any:
    """The image at ``path`` as a PIL image in ``mode``, or ``ValueError`` for one larger than
    ``MAX_IMAGE_PIXELS`` (checked from its header, before decoding) and ``OSError`` for a file
    Pillow cannot read."""
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # refused below, by size
        try:
            with open(path, "rb") as f:
                image = Image.open(f)
                width, height = image.size
                if width * height > MAX_IMAGE_PIXELS:
                    raise ValueError(
                        f"{width}x{height} pixels, more than the {MAX_IMAGE_PIXELS / 1e6:.1f} megapixels "
                        "an image may have here (a decompression bomb?)"
                    )
                return image.convert(mode)
        except Image.DecompressionBombError as e:
            raise ValueError(str(e)) from None


def _identity(path: Path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino
