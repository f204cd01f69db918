"""``introspect data DIR --logdir L``: an ImageFolder tree in TensorBoard, and clear errors."""

from __future__ import annotations

import subprocess
import sys

import pytest
from click.testing import CliRunner
from PIL import Image

from introspect.cli.commands import main
from tests.support.events import read_events
from tests.support.image_folders import write_folder


def run(*args: str):
    return CliRunner().invoke(main, list(args))


def test_data_command_writes_the_pictures(tmp_path):
    folder = write_folder(tmp_path / "images", counts=(6, 6))
    result = run("data", str(folder), "--logdir", str(tmp_path / "run"))
    assert result.exit_code == 0, result.output
    assert "no problems found in 12 images" in result.stdout
    assert result.stderr.startswith("pictures written to")
    images = set(read_events(tmp_path / "run").Tags()["images"])
    assert {"data/batch", "data/samples", "data/class_balance"} <= images


def test_limit_and_findings(tmp_path):
    folder = write_folder(tmp_path / "images", counts=(18, 2))
    result = run("data", str(folder), "--logdir", str(tmp_path / "run"), "--limit", "10")
    assert result.exit_code == 0, result.output
    assert "in 10 of 20 images" in result.output
    assert "data_imbalance" in result.output  # counted over the whole folder, not the 10 scanned


@pytest.mark.parametrize(
    "make, words",
    [
        (lambda p: None, "no such folder"),
        (lambda p: p.mkdir(), "is empty"),
        (lambda p: (p.mkdir(), Image.new("RGB", (8, 8)).save(p / "a.png")), "no class subfolders"),
        (lambda p: (p / "cats").mkdir(parents=True), "Found no valid file for the classes cats"),
    ],
    ids=["missing", "empty", "flat", "no-images"],
)
def test_bad_folders_get_one_line_and_exit_1(tmp_path, make, words):
    folder = tmp_path / "images"
    make(folder)
    result = run("data", str(folder), "--logdir", str(tmp_path / "run"))
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], result.stderr
    assert "Traceback" not in result.output and result.stdout == ""


def test_bad_limit(tmp_path):
    result = run("data", str(tmp_path), "--logdir", str(tmp_path / "run"), "--limit", "0")
    assert result.exit_code == 2 and "--limit" in result.output


@pytest.mark.slow
def test_data_command_in_a_subprocess(tmp_path):
    folder = write_folder(tmp_path / "images", counts=(4, 4))
    command = [sys.executable, "-m", "introspect", "data"]
    ok = subprocess.run(
        command + [str(folder), "--logdir", str(tmp_path / "run")],
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
    )
    assert ok.returncode == 0, ok.stderr
    assert "no problems found in 8 images" in ok.stdout
    assert ok.stderr.startswith("pictures written to") and "introspect board --logdir" in ok.stderr
    assert "data/batch" in read_events(tmp_path / "run").Tags()["images"]
    missing = subprocess.run(
        command + [str(tmp_path / "nope"), "--logdir", str(tmp_path / "run2")],
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
    )
    assert missing.returncode == 1
    assert missing.stderr.strip() == f"error: no such folder: {tmp_path / 'nope'}"
