"""ImageFolders of small random PNGs written into a test's tmp_path (inspect_data and ``introspect data``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ("0_airplane", "1_automobile")
SIZE = 16


def random_image(rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, 256, size=(SIZE, SIZE, 3), dtype=np.uint8)


def write_folder(root: Path, counts=(6, 6), seed: int = 0) -> Path:
    """An ImageFolder of small random PNGs: ``counts[i]`` images in ``root/CLASSES[i]``."""
    rng = np.random.default_rng(seed)
    for name, count in zip(CLASSES, counts):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            Image.fromarray(random_image(rng)).save(root / name / f"{i:03d}.png")
    return root
