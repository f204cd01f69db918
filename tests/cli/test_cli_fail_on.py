"""``--fail-on {finding,warning,never}``: ``data``, ``compare`` and ``activations`` exit 8 when they
found something and were told to fail on it, so CI can use them; the default keeps exit 0."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from introspect.cli.commands import EXIT_CODES, FOUND_EXIT, main
from tests.support.image_folders import CLASSES, SIZE, write_folder

SEED_ARCH = "examples.models:SeedCNN"


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_the_exit_code_is_free_and_documented():
    assert FOUND_EXIT == 8 and FOUND_EXIT not in {code for _, code in EXIT_CODES} | {1, 2, 130}


def test_data_fails_on_a_finding_only_when_asked(tmp_path):
    folder = write_folder(tmp_path / "images", counts=(6, 6))
    Image.new("RGB", (SIZE, SIZE)).save(folder / CLASSES[0] / "black.png")
    default = run("data", folder, "--logdir", tmp_path / "a")
    assert default.exit_code == 0 and "data_constant" in default.stdout  # today's behaviour, kept
    for fail_on in ("finding", "warning"):
        failed = run("data", folder, "--logdir", tmp_path / fail_on, "--fail-on", fail_on)
        assert failed.exit_code == FOUND_EXIT, failed.output
        assert failed.stdout == default.stdout  # the same report, then the exit code
        assert f"exit 8: 1 finding (--fail-on {fail_on})" in failed.stderr
    assert run("data", folder, "--logdir", tmp_path / "n", "--fail-on", "never").exit_code == 0


def test_clean_data_passes_with_fail_on(tmp_path):
    folder = write_folder(tmp_path / "images", counts=(6, 6))
    result = run("data", folder, "--logdir", tmp_path / "run", "--fail-on", "finding")
    assert result.exit_code == 0, result.output


@pytest.fixture
def two_models(tmp_path):
    from examples.models import SeedCNN

    torch.manual_seed(0)
    model = SeedCNN()
    torch.save(model.state_dict(), tmp_path / "a.pt")
    torch.save(model.state_dict(), tmp_path / "same.pt")
    with torch.no_grad():
        next(model.parameters()).add_(0.5)  # the first layer's weights change: it diverges
    torch.save(model.state_dict(), tmp_path / "b.pt")
    return tmp_path / "a.pt", tmp_path / "same.pt", tmp_path / "b.pt"


def test_compare_fails_on_a_divergence_only_when_asked(two_models, tmp_path):
    a, same, b = two_models
    common = ["--arch", SEED_ARCH, "--input-shape", "2,3,32,32"]
    assert run("compare", a, b, *common).exit_code == 0
    failed = run("compare", a, b, *common, "--fail-on", "finding")
    assert failed.exit_code == FOUND_EXIT, failed.output
    assert "first divergence at" in failed.stdout and "exit 8: 1 finding (--fail-on finding)" in failed.stderr
    assert run("compare", a, same, *common, "--fail-on", "finding").exit_code == 0


def test_fail_on_warning_counts_warning_lines(two_models, tmp_path):
    """``compare --images`` over a folder with an unreadable file warns; ``finding`` ignores the
    warning, ``warning`` fails on it."""
    a, same, _ = two_models
    images = tmp_path / "images"
    images.mkdir()
    for i in range(2):
        Image.new("RGB", (32, 32), (i * 40, 30, 60)).save(images / f"{i}.png")
    (images / "broken.png").write_bytes(b"junk")
    common = ["--arch", SEED_ARCH, "--images", images]
    finding = run("compare", a, same, *common, "--fail-on", "finding")
    assert finding.exit_code == 0, finding.output
    assert "warning: skipped 1 unreadable image file(s)" in finding.stderr
    warning = run("compare", a, same, *common, "--fail-on", "warning")
    assert warning.exit_code == FOUND_EXIT, warning.output
    assert "exit 8: 1 warning (--fail-on warning)" in warning.stderr


def test_activations_fails_on_its_findings(tmp_path):
    from examples.models import SeedCNN

    torch.manual_seed(0)
    torch.save(SeedCNN().state_dict(), tmp_path / "w.pt")
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (32, 32), (10, 20, 30)).save(images / "0.png")
    (images / "1.png").write_bytes(b"junk")  # a data_unreadable finding
    args = ["activations", tmp_path / "w.pt", "--arch", SEED_ARCH, "--images", images, "--logdir", tmp_path / "r"]
    assert run(*args).exit_code == 0
    failed = run(*args, "--fail-on", "finding")
    assert failed.exit_code == FOUND_EXIT and "data_unreadable" in failed.stdout, failed.output
