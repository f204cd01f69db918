"""The README's command lines work as written, from a directory with the repository's examples/
in it (the repository root) and no PYTHONPATH; and scripts/demo prints a command that works from
wherever it was run."""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.support import REPO_ROOT
from tests.support.saved_models import console_script, seed_cnn

README = REPO_ROOT / "README.md"


def cli_block() -> list[str]:
    """The commands of the README's "The command line" block, comments dropped."""
    text = README.read_text()
    section = text[text.index("## The command line") :]
    block = section[section.index("```bash") + len("```bash") : section.index("```", section.index("```bash") + 7)]
    return [re.sub(r"\s+#.*$", "", line).strip() for line in block.strip().splitlines()]


def make_the_files(here: Path) -> None:
    """Every file the commands name, made as a user would have them."""
    import torchvision

    model = seed_cnn()
    torch.save(model.state_dict(), here / "weights.pt")
    torch.export.save(torch.export.export(model, (torch.randn(1, 3, 32, 32),)), str(here / "model.pt2"))
    torch.save(seed_cnn(0).state_dict(), here / "epoch1.pt")
    torch.save(seed_cnn(1).state_dict(), here / "epoch9.pt")
    torch.manual_seed(0)
    torch.save({"model": torchvision.models.resnet18().state_dict(), "epoch": 9}, here / "ckpt.pt")
    timm = pytest.importorskip("timm")
    from safetensors.torch import save_file

    save_file(timm.create_model("resnet18", pretrained=False).state_dict(), str(here / "r18.safetensors"))
    from tests.support.hf_models import tiny_gpt2

    tiny_gpt2().save_pretrained(here / "gpt2-tiny")
    from PIL import Image

    for split, classes in (("val", ["all"]), ("train", ["cat", "dog"])):
        for c in classes:
            folder = here / "data" / split / ("" if split == "val" else c)
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(3):
                pixels = torch.randint(
                    0, 256, (32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(i + 10 * len(c))
                )
                Image.fromarray(pixels.numpy()).save(folder / f"{c}{i}.png")
    (here / "examples").symlink_to(REPO_ROOT / "examples")  # what the repository root holds


@pytest.mark.slow
def test_every_readme_command_line_works_as_written(tmp_path):
    commands = cli_block()
    assert commands[0].startswith("introspect summary weights.pt --arch examples.models:SeedCNN")
    make_the_files(tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["MPLBACKEND"] = "Agg"
    script = console_script()
    ran = []
    for command in commands:
        args = shlex.split(command)
        assert args[0] == "introspect", command
        if args[1] == "board":  # serves until stopped: tests/cli/test_cli.py checks it prints its URL and serves
            continue
        result = subprocess.run(
            [script, *args[1:]],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            stdin=subprocess.DEVNULL,
        )
        assert result.returncode == 0, (command, result.stderr[-2000:])
        assert "error:" not in result.stderr, (command, result.stderr)
        ran.append(args[1])
    assert ran.count("summary") == 3 and {"graph", "weights", "activations", "data", "compare", "map"} <= set(ran)
    assert (tmp_path / "runs" / "graph").is_dir() and (tmp_path / "runs" / "acts").is_dir()


def setup_is_current() -> bool:
    """scripts/_setup.sh would not reinstall: its stamp matches pyproject.toml and this Python."""
    stamp = REPO_ROOT / ".venv" / ".introspect-installed"
    if Path(sys.executable).parent.parent.resolve() != (REPO_ROOT / ".venv").resolve() or not stamp.is_file():
        return False
    digest = hashlib.sha256((REPO_ROOT / "pyproject.toml").read_bytes())
    digest.update(sys.version.encode())
    return stamp.read_text().strip() == digest.hexdigest()


@pytest.mark.slow
def test_the_demo_prints_a_command_that_works_from_where_it_ran(tmp_path):
    if not setup_is_current():
        pytest.skip("scripts/demo would install the project first (run scripts/test or scripts/demo once)")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = subprocess.run(
        [str(REPO_ROOT / "scripts" / "demo"), "--quick", "--logdir", "mylogs"],
        cwd=elsewhere,
        capture_output=True,
        text=True,
        timeout=600,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    line = next(text for text in result.stdout.splitlines() if "/bin/tensorboard --logdir" in text)
    binary, _, logdir, *_ = shlex.split(line)
    assert Path(binary).is_absolute() and Path(binary).is_file()
    assert Path(logdir) == elsewhere / "mylogs"  # where the user ran it, not the repository
    assert any((elsewhere / "mylogs").rglob("events.out.tfevents.*"))
