"""Raw images in TensorBoard: the seed tutorial's section on input images, in one line.

The tutorial loads an ImageFolder of two CIFAR classes ('0_airplane', '1_automobile') and then, by
hand, writes ``images[0]`` with ``add_image``, a ``make_grid`` of the batch with ``add_image``, the
batch with ``add_images``, and a 3x3 matplotlib figure of samples titled "label = N" with
``add_figure``. Here the same two-class ImageFolder is made on disk from synthetic images
(examples/data.py; nothing is downloaded), and one call does all of it:

    report = inspect_data(ImageFolder(root, transform=ToTensor()), writer)

* ``data/first_image``: the first image alone (the tutorial's ``images[0]``);
* ``data/batch``: a ``make_grid`` of 64 images spread over the set (the tutorial's ``image_grid``;
  its ``add_images`` call shows the very same grid, since TensorBoard draws a batch that way);
* ``data/samples``: the 3x3 figure, titled ``label = 1 (1_automobile)``;
* ``data/class_balance`` (a bar chart), ``data/channel_stats`` (mean/std/min/max per channel, and
  the ``transforms.Normalize`` they call for), ``data/findings``.

Then it inspects a careless copy of the same folder - two files copied twice, two all-black
images, most automobiles lost - and prints what the report finds there.

    python examples/raw_images.py                         # logs in runs/raw_images/{clean,flawed}
    python examples/raw_images.py --quick                 # fewer images, a few seconds
    tensorboard --logdir runs/raw_images --host 127.0.0.1 # IMAGES and TEXT
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

# Run as `python examples/raw_images.py` from anywhere: make `examples` importable.
REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from torch.utils.tensorboard import SummaryWriter  # noqa: E402
from torchvision.datasets import ImageFolder  # noqa: E402
from torchvision.transforms import ToTensor  # noqa: E402

from examples.cli import example_parser  # noqa: E402
from examples.data import write_image_folder  # noqa: E402
from introspect import DataReport, inspect_data


def make_flawed_copy(source: Path, target: Path) -> Path:
    """The same folder, copied carelessly: duplicates, black images, 9 airplanes per automobile."""
    from PIL import Image

    shutil.copytree(source, target)
    airplanes = sorted((target / "0_airplane").glob("*.png"))
    automobiles = sorted((target / "1_automobile").glob("*.png"))
    for path in automobiles[max(1, len(airplanes) // 9) :]:  # most automobiles lost on the way
        path.unlink()
    for i, path in enumerate(airplanes[:2]):  # copied twice under another name
        shutil.copy(path, path.with_name(f"copy_{i}.png"))
    for i in range(2):  # failed downloads saved as black images
        Image.new("RGB", (32, 32)).save(target / "0_airplane" / f"black_{i}.png")
    return target


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = example_parser(__doc__, "raw_images", quick="fewer images, for tests")
    parser.add_argument(
        "--data", default=None, help="where to write the image folders (default: a temporary directory)"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, DataReport]:
    """Inspect the clean and the flawed folder; returns each one's report by name."""
    args = parse_args(argv)
    logdir = Path(args.logdir)
    per_class = 27 if args.quick else 250
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(args.data) if args.data else Path(scratch)
        clean = write_image_folder(root / "clean", n_per_class=per_class, seed=args.seed)
        flawed = make_flawed_copy(clean, root / "flawed")
        reports = {}
        for name, folder in (("clean", clean), ("flawed", flawed)):
            print(f"\n== {name}: {folder}")
            dataset = ImageFolder(str(folder), transform=ToTensor())
            print(f"class_to_idx: {dataset.class_to_idx}")
            with SummaryWriter(str(logdir / name)) as writer:
                reports[name] = inspect_data(dataset, writer)  # the one line
    print(f"\nto see them: tensorboard --logdir {logdir} --host 127.0.0.1 (IMAGES and TEXT)")
    return reports


if __name__ == "__main__":
    main()
