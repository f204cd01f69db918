"""``introspect activations --images``: an unreadable file is skipped with a finding, as ``introspect
data`` reports it, never an abort; a link to a FIFO is never opened (it would wait forever)."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from introspect.cli.commands import main
from introspect.errors import LoadError
from introspect.load.model_inputs import image_batches, image_files
from tests.support.events import read_events, text_of
from tests.support.saved_models import cli_env

SEED_ARCH = "examples.models:SeedCNN"


def images_with_bad_files(root, tmp_path):
    """Four good 32x32 PNGs, one corrupt file, and a link to a FIFO named like an image."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / f"{i}.png")
    (root / "1_corrupt.png").write_bytes(b"not a png at all")
    os.mkfifo(tmp_path / "pipe")
    (root / "2_fifo.png").symlink_to(tmp_path / "pipe")
    return root


def test_unreadable_images_are_skipped_with_a_finding(tmp_path):
    from examples.models import SeedCNN

    root = images_with_bad_files(tmp_path / "images", tmp_path)
    torch.manual_seed(0)
    torch.save(SeedCNN().state_dict(), tmp_path / "w.pt")
    args = ["-m", "introspect", "activations", str(tmp_path / "w.pt"), "--arch", SEED_ARCH]
    args += ["--images", str(root), "--batch-size", "2", "--logdir", str(tmp_path / "run")]
    # In a child with a timeout: a plain open of the FIFO would hang the suite, not fail it.
    result = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=cli_env(), timeout=300)
    assert result.returncode == 0, result.stderr
    assert "2 step(s)" in result.stdout  # the 4 readable images, 2 a batch
    finding = next(line for line in result.stdout.splitlines() if "data_unreadable" in line)
    assert str(root / "1_corrupt.png") in finding and str(root / "2_fifo.png") in finding
    assert "2 input files could not be read and were skipped" in finding
    assert "a FIFO" in result.stdout or "UnidentifiedImageError" in result.stdout
    assert "data_unreadable" in text_of(read_events(tmp_path / "run"), "diagnostics/alerts")[-1]


def test_the_reader_skips_and_names_them(tmp_path):
    root = images_with_bad_files(tmp_path / "images", tmp_path)
    skipped: list[tuple[str, str]] = []
    batches = list(image_batches(image_files(root), 3, skipped=skipped))
    assert [len(b) for b in batches] == [3, 1]
    assert dict(skipped).keys() == {str(root / "1_corrupt.png"), str(root / "2_fifo.png")}
    assert "a FIFO, not a regular file" in dict(skipped)[str(root / "2_fifo.png")]
    with pytest.raises(LoadError, match="cannot read image"):  # the library's default: an error
        list(image_batches(image_files(root), 3))


def test_a_folder_with_no_readable_image_is_still_an_error(tmp_path):
    from examples.models import SeedCNN

    root = tmp_path / "images"
    root.mkdir()
    (root / "a.png").write_bytes(b"junk")
    torch.save(SeedCNN().state_dict(), tmp_path / "w.pt")
    result = CliRunner().invoke(
        main,
        [
            "activations",
            str(tmp_path / "w.pt"),
            "--arch",
            SEED_ARCH,
            "--images",
            str(root),
            "--logdir",
            str(tmp_path / "r"),
        ],
    )
    assert result.exit_code == 3, result.output
    assert "none of the 1 images could be read" in result.stderr and str(root / "a.png") in result.stderr
