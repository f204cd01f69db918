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
the header alone, so a scan records them as unreadable and goes on. It reads only the raster
formats of ``RASTER_FORMATS``: whatever its name, a file Pillow would read as EPS, PostScript or
PDF would start Ghostscript, an interpreter of the file's own program.

A name in a folder may be a FIFO (reading it waits for a writer that never comes), a device or a
symlink to one. :func:`open_regular` opens only regular files (after symlinks), without blocking;
every file read from a walked folder or a log directory goes through it. :func:`scan_logdir`
lists a log directory once, without following links, and names the links that leave it.
"""

from __future__ import annotations

import os
import stat
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

__all__ = [
    "MAX_IMAGE_PIXELS",
    "RASTER_FORMATS",
    "walk_files",
    "read_image",
    "open_regular",
    "NotRegularFileError",
    "FolderWalk",
    "LogdirScan",
    "scan_logdir",
]

MAX_IMAGE_PIXELS = 4096 * 4096
"""The largest image read (16.8 megapixels): as float32 RGB, 200 MB. Larger ones are reported
unreadable rather than decoded (Pillow's own bomb limit, 89 megapixels, would take 1 GB)."""

RASTER_FORMATS = ("PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP", "PPM")
"""The Pillow formats an image file is read as: those of the suffixes read here (torchvision's
``IMG_EXTENSIONS`` and ``.gif``; JPEG includes a camera's multi-picture JPEG, PPM covers .pgm).
Never EPS, PS or PDF, which Pillow renders by running Ghostscript on the file, nor any of
Pillow's other thirty-odd readers."""


class NotRegularFileError(OSError):
    """A path that is not a regular file once symlinks are followed (a FIFO, a device, a socket, a
    directory): it is not opened, or not read, so nothing blocks on it."""


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISDIR, "a directory"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def open_regular(path: str | os.PathLike) -> BinaryIO:
    """``path`` opened for reading in binary, if it is a regular file after symlinks, else
    ``NotRegularFileError`` (and ``OSError`` for a missing or unreadable one).

    The type is checked before the open (opening a device can act: a tape rewinds) and again on
    the open descriptor (the path may have been swapped in between). The open never blocks: a
    FIFO opened with ``O_NONBLOCK`` returns at once, where a plain open waits for a writer.
    """
    before = os.stat(path)
    if not stat.S_ISREG(before.st_mode):
        raise NotRegularFileError(f"{os.fspath(path)} is {_kind(before.st_mode)}, not a regular file")
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(path, flags | getattr(os, "O_BINARY", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise NotRegularFileError(f"{os.fspath(path)} is {_kind(mode)}, not a regular file")
        return os.fdopen(fd, "rb")  # O_NONBLOCK changes nothing for a regular file's reads
    except BaseException:
        os.close(fd)
        raise


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
                        # A FIFO, a device or a link to one is listed too, and a broken link: the
                        # reader (open_regular) refuses them, so the scan reports them unreadable.
                        try:
                            file_key: tuple[int, int] | str = _identity(Path(entry.path))
                        except OSError:
                            file_key = entry.path
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
    that is not a regular one (:func:`open_regular`) or not an image of ``RASTER_FORMATS``."""
    from PIL import Image, UnidentifiedImageError

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # refused below, by size
        try:
            with open_regular(path) as f:
                try:
                    image = Image.open(f, formats=RASTER_FORMATS)
                except UnidentifiedImageError:
                    raise UnidentifiedImageError(
                        f"cannot identify image file {os.fspath(path)!r} as one of {', '.join(RASTER_FORMATS)}"
                    ) from None
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


# --------------------------------------------------------------------------- log directories
@dataclass
class LogdirScan:
    """What :func:`scan_logdir` found: the event files of each directory, and what it refused."""

    root: Path
    runs: dict[Path, list[Path]] = field(default_factory=dict)
    """Each directory holding event files (regular files, or links to regular files inside
    ``root``), and those files in name order (TensorBoard's order: the name holds the time)."""
    refused: list[str] = field(default_factory=list)
    """One line per link that leaves ``root`` or leads back up into it, and per event file that is
    not a regular file: nothing under them is read."""


def scan_logdir(root: str | os.PathLike, prefix: str = "events.out.tfevents.") -> LogdirScan:
    """Every directory under ``root`` listed once, links not followed (a link to ``/`` would
    walk the whole filesystem, a link up would never end): TensorBoard's event files found, and
    links that leave ``root`` (or loop) and special files named like event files refused.
    A link whose target stays inside ``root`` is not followed either: the target is walked where
    it is."""
    top = Path(root)
    real_top = Path(os.path.realpath(top))
    scan = LogdirScan(top)
    pending = [top]
    while pending:  # a stack, not recursion: a deep tree would exceed Python's limit
        folder = pending.pop()
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError:  # vanished, or not readable: nothing to list
            continue
        events: list[Path] = []
        subfolders = []
        for entry in entries:
            path = Path(entry.path)
            try:
                if entry.is_symlink():
                    problem = _link_problem(path, real_top)
                    if problem:
                        scan.refused.append(f"{path} -> {os.readlink(path)}: {problem}")
                    elif entry.name.startswith(prefix) and not entry.is_dir():
                        if entry.is_file():
                            events.append(path)
                        else:
                            scan.refused.append(f"{path} -> {os.readlink(path)}: {_kind(os.stat(path).st_mode)}")
                elif entry.is_dir(follow_symlinks=False):
                    subfolders.append(path)
                elif entry.name.startswith(prefix):
                    if entry.is_file(follow_symlinks=False):
                        events.append(path)
                    else:
                        scan.refused.append(f"{path}: {_kind(entry.stat(follow_symlinks=False).st_mode)}")
            except OSError:  # vanished, or a broken link: nothing to read there
                continue
        if events:
            scan.runs[folder] = events
        pending.extend(reversed(subfolders))
    return scan


def _link_problem(link: Path, real_top: Path) -> str:
    """Why a symlink in a log directory must not be followed, or "" when it may."""
    target = Path(os.path.realpath(link))
    if target != real_top and real_top not in target.parents:
        return f"leads outside {real_top}"
    here = Path(os.path.realpath(link.parent))
    if target == here or target in here.parents:
        return "leads back up to a folder it is in (a loop)"
    return ""
