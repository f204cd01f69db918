"""inspect_data: what it writes to TensorBoard, and what it finds, on image folders written here."""

from __future__ import annotations

import io
import shutil
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset
from torch.utils.tensorboard import SummaryWriter
from torchvision.datasets import ImageFolder
from torchvision.transforms import ToTensor

from introspect import (
    ConfigError,
    DataReport,
    IntrospectError,
    ModelTypeError,
    inspect_data,
)
from introspect.analysis.data import image_folder
from tests.support.events import read_events, text_of
from tests.support.image_folders import CLASSES, SIZE, write_folder

DATA_KINDS = {"data_nonfinite", "data_constant", "data_range", "data_imbalance", "data_duplicates", "data_labels"}


def inspect(data, writer, **options) -> DataReport:
    """inspect_data without the progress bar and the printout; ``writer`` a path or a SummaryWriter."""
    options.setdefault("show_progress", False)
    options.setdefault("verbose", False)
    return inspect_data(data, writer, **options)


def kinds(report: DataReport) -> set[str]:
    return {a.kind for a in report.alerts}


def png(event) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(event.encoded_image_string)).convert("RGB"))


# --------------------------------------------------------------------------- what is written
def test_image_folder_pictures_and_texts(tmp_path, capsys):
    folder = write_folder(tmp_path / "images", counts=(6, 6))
    report = inspect_data(str(folder), str(tmp_path / "run"), show_progress=False)
    out = capsys.readouterr().out
    assert "no problems found in 12 images (3x16x16, float32)" in out
    assert "0_airplane 6, 1_automobile 6" in out
    assert report.alerts == []

    acc = read_events(tmp_path / "run")
    images = set(acc.Tags()["images"])
    assert {"data/batch", "data/first_image", "data/samples", "data/class_balance"} <= images
    # make_grid of 12 16x16 images, 8 per row, 2 pixels of padding: 2 rows.
    batch = acc.Images("data/batch")[0]
    assert (batch.width, batch.height) == (8 * 18 + 2, 2 * 18 + 2)
    first = acc.Images("data/first_image")[0]
    assert (first.width, first.height) == (SIZE, SIZE)
    # The grid shows the images themselves: its first cell is the folder's first PNG.
    original = np.asarray(Image.open(folder / CLASSES[0] / "000.png").convert("RGB"))
    assert np.abs(png(batch)[2:18, 2:18].astype(int) - original).max() <= 1
    assert np.array_equal(png(first), original)
    # The 3x3 figure and the bar chart are real matplotlib renderings, not blank canvases.
    for tag in ("data/samples", "data/class_balance"):
        picture = png(acc.Images(tag)[0])
        assert picture.shape[0] > 300 and picture.shape[1] > 300, tag
        assert len(np.unique(picture.reshape(-1, 3), axis=0)) > 50, tag
    stats = text_of(acc, "data/channel_stats")[0]
    assert "| channel | mean | std | min | max |" in stats and "transforms.Normalize(mean=[" in stats
    assert "No problems found in 12 images" in text_of(acc, "data/findings")[0]


def test_channel_statistics_match_the_pixels(tmp_path):
    folder = write_folder(tmp_path / "images", counts=(5, 4))
    report = inspect(str(folder), tmp_path / "run")
    pixels = torch.stack([ToTensor()(Image.open(p).convert("RGB")) for p in sorted(folder.rglob("*.png"))])
    for c, stats in enumerate(report.channels):
        values = pixels[:, c].double()
        assert stats.mean == pytest.approx(values.mean().item(), abs=1e-6)
        assert stats.std == pytest.approx(values.std(unbiased=False).item(), abs=1e-6)
        assert (stats.min, stats.max) == (pytest.approx(values.min().item()), pytest.approx(values.max().item()))


def test_samples_figure_titles_every_class_of_a_sorted_folder(tmp_path):
    """A class-sorted ImageFolder's first images are all one class; the preview spreads over the set."""
    folder = write_folder(tmp_path / "images", counts=(80, 80))
    report = inspect(ImageFolder(str(folder), transform=ToTensor()), tmp_path / "run", max_samples=100)
    assert report.samples == 100 and report.total == 160
    assert report.class_counts == [80, 80]  # from .targets: the whole set, not only the scan
    from introspect.analysis.data import _Scan

    scan = _Scan(None, 100)
    assert len(scan._preview_at) == 64 and max(scan._preview_at) > 90


class SlowImages(Dataset):
    """Random images that take a while to load, so the progress bar (shown after 0.5 s) appears."""

    def __len__(self):
        return 40

    def __getitem__(self, i):
        time.sleep(0.08)
        return torch.rand(3, SIZE, SIZE), i % 2


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_is_bounded_by_max_samples(tmp_path, monkeypatch):
    stderr = Terminal()
    monkeypatch.setattr(sys, "stderr", stderr)
    report = inspect(SlowImages(), tmp_path / "run", show_progress=True, max_samples=10)
    assert "inspect_data" in stderr.getvalue() and "/10 " in stderr.getvalue()
    assert "/40" not in stderr.getvalue()
    assert report.samples == 10 and report.total == 40


# --------------------------------------------------------------------------- findings
def test_a_clean_set_gets_no_finding(tmp_path):
    folder = write_folder(tmp_path / "images", counts=(10, 10))
    assert inspect(str(folder), tmp_path / "run").alerts == []
    images = torch.rand(20, 3, SIZE, SIZE)
    assert inspect((images, torch.arange(20) % 4), tmp_path / "run2", classes=4).alerts == []


def test_nan_image(tmp_path):
    images = torch.rand(10, 3, SIZE, SIZE)
    images[4, 1, 3, 3] = float("nan")
    images[7, 0, 0, 0] = float("inf")
    report = inspect(TensorDataset(images, torch.arange(10) % 2), tmp_path / "run")
    assert kinds(report) == {"data_nonfinite"}
    assert report.alerts[0].where == "samples 4, 7"
    assert report.alerts[0].numbers["samples"] == 2


def test_constant_and_all_black_images(tmp_path):
    folder = write_folder(tmp_path / "images", counts=(6, 6))
    Image.new("RGB", (SIZE, SIZE)).save(folder / CLASSES[1] / "zz_black.png")
    report = inspect(str(folder), tmp_path / "run")
    assert kinds(report) == {"data_constant"}
    alert = report.alerts[0]
    assert alert.where == str(folder / CLASSES[1] / "zz_black.png") and alert.numbers["black"] == 1
    assert "all black" in alert.message


def test_0_255_values_where_0_1_is_expected(tmp_path):
    folder = write_folder(tmp_path / "images", counts=(6, 6))
    as_255 = ImageFolder(str(folder), transform=lambda img: ToTensor()(img) * 255)
    report = inspect(as_255, tmp_path / "run")
    assert kinds(report) == {"data_range"}
    assert "0-255" in report.alerts[0].message and report.alerts[0].numbers["samples"] == 12
    # Normalised data (negative values) is not mistaken for it...
    normalised = torch.randn(12, 3, SIZE, SIZE) * 1.5
    assert inspect(normalised, tmp_path / "run2").alerts == []
    # ...and an explicit range is checked as given.
    report = inspect(normalised, tmp_path / "run3", expected_range=(-1, 1))
    assert kinds(report) == {"data_range"} and "[-1, 1]" in report.alerts[0].message


def test_9_to_1_class_imbalance(tmp_path):
    folder = write_folder(tmp_path / "images", counts=(18, 2))
    report = inspect(str(folder), tmp_path / "run")
    assert kinds(report) == {"data_imbalance"}
    alert = report.alerts[0]
    assert alert.where == "class 1_automobile" and alert.numbers["ratio"] == 9
    assert report.class_counts == [18, 2]
    # 2:1 is not heavy.
    assert inspect(str(write_folder(tmp_path / "mild", counts=(12, 6))), tmp_path / "run2").alerts == []


def test_a_class_with_no_samples(tmp_path):
    images = torch.rand(8, 3, SIZE, SIZE)
    report = inspect((images, torch.zeros(8, dtype=torch.long)), tmp_path / "run", classes=["cat", "dog"])
    assert kinds(report) == {"data_imbalance"} and "dog has no samples" in report.alerts[0].message


def test_duplicate_images(tmp_path):
    folder = write_folder(tmp_path / "images", counts=(6, 6))
    shutil.copy(folder / CLASSES[0] / "002.png", folder / CLASSES[0] / "002_copy.png")
    shutil.copy(folder / CLASSES[0] / "002.png", folder / CLASSES[1] / "zz_copy.png")  # and mislabelled
    report = inspect(str(folder), tmp_path / "run")
    assert kinds(report) == {"data_duplicates"}
    alert = report.alerts[0]
    assert alert.numbers == {"samples": 2.0, "conflicting_labels": 1.0}
    first = folder / CLASSES[0]
    assert f"{first / '002_copy.png'} = {first / '002.png'}" in alert.message  # named by file, not index
    assert alert.where == f"{first / '002_copy.png'}, {folder / CLASSES[1] / 'zz_copy.png'}"


def test_labels_outside_the_class_range(tmp_path):
    images = torch.rand(10, 3, SIZE, SIZE)
    labels = torch.tensor([0, 1] * 5)
    labels[3], labels[6] = 2, -1
    report = inspect((images, labels), tmp_path / "run", classes=list(CLASSES))
    assert "data_labels" in kinds(report)
    alert = next(a for a in report.alerts if a.kind == "data_labels")
    assert alert.numbers["samples"] == 2 and "0..1" in alert.message and "-1, 2" in alert.message


def test_float_labels_as_in_the_seed(tmp_path):
    """The seed's target_transform makes labels float tensors of shape [1]."""
    folder = write_folder(tmp_path / "images", counts=(4, 4))
    dataset = ImageFolder(str(folder), transform=ToTensor(), target_transform=lambda y: torch.tensor([y]).float())
    report = inspect(DataLoader(dataset, batch_size=3, shuffle=False), tmp_path / "run")
    assert report.alerts == [] and report.class_names == list(CLASSES) and report.class_counts == [4, 4]


def test_unreadable_file(tmp_path):
    folder = write_folder(tmp_path / "images", counts=(4, 4))
    (folder / CLASSES[0] / "broken.png").write_bytes(b"not a png")
    report = inspect(str(folder), tmp_path / "run")
    assert kinds(report) == {"data_unreadable"}
    assert "UnidentifiedImageError" in report.alerts[0].message
    assert report.alerts[0].where == str(folder / CLASSES[0] / "broken.png")


def test_bad_images_are_named_by_path_in_the_findings_and_the_report(tmp_path):
    """A person opens a file, not "sample 7": an ImageFolder's findings name its files (and so
    do the printed report and data/findings); a Subset of one maps its positions to files."""
    folder = write_folder(tmp_path / "images", counts=(6, 6))
    black, also_black = folder / CLASSES[0] / "003_black.png", folder / CLASSES[1] / "zz_black.png"
    for path in (black, also_black):
        Image.new("RGB", (SIZE, SIZE), (9, 9, 9)).save(path)
    report = inspect(ImageFolder(str(folder), transform=ToTensor()), tmp_path / "run")
    (constant,) = [a for a in report.alerts if a.kind == "data_constant"]
    assert constant.where == f"{black}, {also_black}"
    assert str(black) in str(report) and "sample" not in constant.where
    assert str(black) in text_of(read_events(tmp_path / "run"), "data/findings")[0]
    subset = Subset(ImageFolder(str(folder), transform=ToTensor()), [13, 0, 1])  # 13: zz_black.png
    (constant,) = [a for a in inspect(subset, tmp_path / "run2").alerts if a.kind == "data_constant"]
    assert constant.where == str(also_black)


def test_data_without_files_keeps_the_indices(tmp_path):
    images = torch.rand(9, 3, SIZE, SIZE)
    images[2], images[5] = 0.5, 0.25  # constant, and not copies of each other
    for data in (images, TensorDataset(images, torch.arange(9) % 3)):
        (constant,) = inspect(data, tmp_path / "run").alerts
        assert constant.where == "samples 2, 5"


def test_findings_are_written_and_printed(tmp_path, capsys):
    images = torch.rand(6, 3, SIZE, SIZE)
    images[2] = 0.0
    report = inspect_data(images, str(tmp_path / "run"), show_progress=False)
    out = capsys.readouterr().out
    assert out.startswith("introspect: 1 finding in 6 images")
    assert "data_constant" in out and "sample 2" in out
    assert "data_constant" in text_of(read_events(tmp_path / "run"), "data/findings")[0]
    assert str(report) in out


# --------------------------------------------------------------------------- inputs
def test_every_kind_of_input(tmp_path):
    images = torch.rand(12, 3, SIZE, SIZE)
    labels = torch.arange(12) % 3
    dataset = TensorDataset(images, labels)
    for i, data in enumerate([images, (images, labels), dataset, DataLoader(dataset, batch_size=5)]):
        report = inspect(data, tmp_path / f"run{i}")
        assert report.samples == 12 and report.image_shape == (3, SIZE, SIZE), type(data)
    grey = inspect(torch.rand(5, SIZE, SIZE), tmp_path / "grey")  # (N, H, W)
    assert grey.image_shape == (1, SIZE, SIZE) and len(grey.channels) == 1
    assert inspect((images, labels), tmp_path / "named", classes={"a": 0, "b": 1, "c": 2}).class_names == [
        "a",
        "b",
        "c",
    ]


def test_a_writer_is_flushed_not_closed(tmp_path):
    writer = SummaryWriter(str(tmp_path / "run"))
    inspect(torch.rand(4, 3, SIZE, SIZE), writer)
    writer.add_scalar("after", 1.0, 0)  # still open
    writer.close()
    acc = read_events(tmp_path / "run")
    assert "data/batch" in acc.Tags()["images"] and "after" in acc.Tags()["scalars"]


class DictDataset(Dataset):
    def __len__(self):
        return 3

    def __getitem__(self, i):
        return {"image": torch.rand(3, 8, 8), "label": 0}


@pytest.mark.parametrize(
    "data, error, words",
    [
        (42, ModelTypeError, "got int"),
        (torch.rand(4, 5), ConfigError, "(N, C, H, W)"),
        ((torch.rand(4, 3, 8, 8), torch.zeros(3)), ConfigError, "4 images but 3 labels"),
        (DictDataset(), ModelTypeError, "keys ['image', 'label']"),
        (TensorDataset(torch.rand(0, 3, 8, 8)), ConfigError, "empty"),
        ("/no/such/folder", ConfigError, "no such folder"),
    ],
)
def test_unsupported_inputs_get_a_precise_error(tmp_path, data, error, words):
    with pytest.raises(error) as info:
        inspect(data, tmp_path / "run")
    assert words in str(info.value)
    assert isinstance(info.value, IntrospectError)


@pytest.mark.parametrize(
    "options, words",
    [
        ({"max_samples": 0}, "max_samples"),
        ({"expected_range": (1, 0)}, "low < high"),
        ({"imbalance_ratio": 1}, "imbalance_ratio"),
        ({"classes": "cat"}, "classes="),
    ],
)
def test_bad_options(tmp_path, options, words):
    with pytest.raises(ConfigError, match=words.replace("(", r"\(")):
        inspect(torch.rand(2, 3, 8, 8), tmp_path / "run", **options)


def test_image_folder_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "flat").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "flat" / "a.png")
    (tmp_path / "no_images" / "cats").mkdir(parents=True)
    (tmp_path / "file.txt").write_text("x")
    for name, words in [
        ("missing", "no such folder"),
        ("empty", "is empty"),
        ("flat", "no class subfolders"),
        ("no_images", "Found no valid file"),
        ("file.txt", "not a folder"),
    ]:
        with pytest.raises(ConfigError, match=words):
            image_folder(tmp_path / name)
