"""Hostile image folders: symlink loops end, each file counts once, a decompression bomb is a finding."""

from __future__ import annotations

import os
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from introspect.analysis.data import image_folder, inspect_data
from introspect.errors import LoadError
from introspect.load.files import MAX_IMAGE_PIXELS, read_image, walk_files
from introspect.load.model_inputs import IMAGE_SUFFIXES, image_batches, image_files
from tests.support.saved_models import run_limited


def images(folder: Path, n: int, seed: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        paths.append(folder / f"{i}.png")
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(paths[-1])
    return paths


def looped_folder(root: Path) -> Path:
    """cat/ and dog/ with 3 images each, and the links that made the scan run away: ``self -> .``
    and ``up -> ..`` at the top, a class folder linked into itself, and one class linked into
    another (no loop, but every cat reachable twice)."""
    images(root / "cat", 3, seed=0)
    images(root / "dog", 3, seed=1)
    (root / "self").symlink_to(".")
    (root / "up").symlink_to("..")
    (root / "cat" / "again").symlink_to("../cat")
    (root / "dog" / "cats").symlink_to("../cat")
    return root


def bomb_png(path: Path, width: int = 20000, height: int = 20000) -> Path:
    """A few hundred bytes of PNG whose header claims ``width`` x ``height`` pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(bytes(1000))) + chunk(b"IEND", b"")
    )
    return path


# --------------------------------------------------------------------------- walking
def test_walk_follows_no_loop_and_lists_each_file_once(tmp_path):
    root = looped_folder(tmp_path / "data")
    found = walk_files(root, IMAGE_SUFFIXES)
    assert len(found) == 6
    assert len({p.resolve() for p in found}) == 6
    assert all(".." not in p.parts and "self" not in p.parts for p in found)


def test_walk_follows_a_symlink_that_does_not_loop(tmp_path):
    images(tmp_path / "elsewhere", 2, seed=3)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "linked").symlink_to(tmp_path / "elsewhere")
    assert [p.name for p in walk_files(tmp_path / "data", IMAGE_SUFFIXES)] == ["0.png", "1.png"]


@pytest.mark.slow
def test_scanning_a_looped_folder_ends_in_seconds_under_a_memory_limit(tmp_path):
    """``introspect data`` on the folder that grew to 22 GB in 600 s: here under a 6 GB address
    space cap (torch's import alone maps 3.5 GB) and a 60 s timeout."""
    root = looped_folder(tmp_path / "data")
    code = (
        "import sys, time\n"
        "from introspect.cli import main\n"
        "start = time.monotonic()\n"
        f"try:\n    main(['data', {str(root)!r}, '--logdir', {str(tmp_path / 'run')!r}])\n"
        "except SystemExit as e:\n    print('exit', e.code, 'after', round(time.monotonic() - start, 1), 's')\n"
    )
    result = run_limited(code, address_space=6 * 2**30, timeout=60)
    assert result["returncode"] == 0, (result["stdout"], result["stderr"][-2000:])
    assert "exit 0" in result["stdout"], result["stdout"]
    assert "no problems found in 6 images" in result["stdout"]  # no false duplicate or imbalance
    assert "classes: cat 3, dog 3" in result["stdout"]
    seconds = float(result["stdout"].split("after ")[1].split(" s")[0])
    assert seconds < 30


def test_image_folder_counts_each_file_once(tmp_path):
    data = image_folder(looped_folder(tmp_path / "data"))
    assert data.classes == ["cat", "dog"]  # "self" and "up" lead back up: loops, not classes
    assert [label for _, label in data.samples] == [0, 0, 0, 1, 1, 1]
    report = inspect_data(data, tmp_path / "run", show_progress=False, verbose=False)
    assert report.samples == 6 and not report.alerts


def test_activation_images_follow_no_loop(tmp_path):
    root = looped_folder(tmp_path / "data")
    files = image_files(root)
    assert len(files) == 6
    batches = list(image_batches(files, batch_size=4))
    assert [b.shape[0] for b in batches] == [4, 2]


# --------------------------------------------------------------------------- bombs
def test_a_decompression_bomb_is_refused_from_its_header(tmp_path):
    bomb = bomb_png(tmp_path / "bomb.png")
    assert bomb.stat().st_size < 2000
    start = time.monotonic()
    with pytest.raises(ValueError, match="400000000 pixels.*decompression bomb"):
        read_image(bomb)
    assert time.monotonic() - start < 1
    side = int(MAX_IMAGE_PIXELS**0.5)
    with pytest.raises(ValueError, match=f"{side + 1}x{side} pixels.*a decompression bomb"):
        read_image(bomb_png(tmp_path / "just_over.png", side + 1, side))  # below Pillow's limit, above ours


def test_a_bomb_in_the_folder_is_a_finding_and_the_scan_goes_on(tmp_path):
    root = tmp_path / "data"
    images(root / "cat", 3, seed=0)
    images(root / "dog", 3, seed=1)
    bomb_png(root / "dog" / "huge.png")
    (root / "dog" / "garbage.png").write_bytes(b"not an image")
    report = inspect_data(image_folder(root), tmp_path / "run", show_progress=False, verbose=False)
    unreadable = [a for a in report.alerts if a.kind == "data_unreadable"]
    assert len(unreadable) == 1 and "2 of 8 samples" in unreadable[0].message
    assert report.samples == 6


def test_pillows_own_bomb_error_is_a_finding_too(tmp_path):
    """A user's own torchvision ImageFolder (Pillow's loader) raises DecompressionBombError, which
    is no OSError/ValueError: it is still one unreadable sample."""
    from torchvision.datasets import ImageFolder
    from torchvision.transforms import ToTensor

    root = tmp_path / "data"
    images(root / "cat", 2, seed=0)
    bomb_png(root / "cat" / "huge.png", 20000, 20000)  # > 2x Pillow's limit: an error, not a warning
    report = inspect_data(
        ImageFolder(str(root), transform=ToTensor()), tmp_path / "run", show_progress=False, verbose=False
    )
    assert [a.kind for a in report.alerts] == ["data_unreadable"]
    assert "DecompressionBombError" in report.alerts[0].message


def test_activation_images_refuse_a_bomb_with_one_line(tmp_path):
    bomb = bomb_png(tmp_path / "huge.png")
    with pytest.raises(LoadError, match="cannot read image .*pixels.*decompression bomb"):
        list(image_batches([bomb], batch_size=1))


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_an_unreadable_file_is_listed_and_reported(tmp_path):
    root = tmp_path / "data"
    images(root / "cat", 2, seed=0)
    secret = images(root / "dog", 2, seed=1)[0]
    secret.chmod(0)
    report = inspect_data(image_folder(root), tmp_path / "run", show_progress=False, verbose=False)
    assert [a.kind for a in report.alerts] == ["data_unreadable"]
