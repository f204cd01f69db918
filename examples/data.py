"""A synthetic two-class image set, made in memory so the examples never download anything.

Class 0, "airplane": a bright horizontal bar; class 1, "automobile": a bright vertical bar. Both on
a background anywhere between blue and red (airplanes lean blue, automobiles red, but the shades
overlap), so the colour alone does not tell them apart: the net has to find the bar's direction.
Bar position, thickness, brightness and pixel noise vary too.
"""

from __future__ import annotations

from pathlib import Path

import torch

__all__ = ["CLASSES", "synthetic_images", "write_image_folder"]

CLASSES = ("airplane", "automobile")
SIZE = 32


def synthetic_images(n_per_class: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images, labels)``: ``2 * n_per_class`` float images of shape 3x32x32 in [0, 1], and labels 0/1.

    The same ``seed`` gives the same images; the two classes are interleaved (0, 1, 0, 1, ...).
    """
    if n_per_class < 1:
        raise ValueError(f"n_per_class must be >= 1, got {n_per_class}")
    g = torch.Generator().manual_seed(seed)
    n = 2 * n_per_class
    labels = torch.arange(n) % 2

    # Background: a mix of blue and red (R, G, B), leaning by class but overlapping widely.
    blue = torch.tensor([0.15, 0.25, 0.60])
    red = torch.tensor([0.60, 0.20, 0.15])
    mix = (torch.rand(n, generator=g) * 0.8 + 0.2 * labels).clamp_(0, 1)[:, None]  # (n, 1)
    base = torch.lerp(blue, red, mix)  # (n, 3)
    base = base + 0.08 * torch.randn(n, 3, generator=g)
    images = base[:, :, None, None].expand(n, 3, SIZE, SIZE).clone()

    # A bright bar, 2-4 pixels thick, at a random position: a row band or a column band.
    start = torch.randint(4, SIZE - 8, (n,), generator=g)
    thickness = torch.randint(2, 5, (n,), generator=g)
    coords = torch.arange(SIZE)
    band = (coords[None, :] >= start[:, None]) & (coords[None, :] < (start + thickness)[:, None])  # (n, 32)
    rows = band[:, :, None].expand(n, SIZE, SIZE)  # horizontal bar
    cols = band[:, None, :].expand(n, SIZE, SIZE)  # vertical bar
    bar = torch.where(labels[:, None, None] == 0, rows, cols)  # (n, 32, 32)
    brightness = 0.85 + 0.15 * torch.rand(n, 1, 1, generator=g)
    images = torch.where(bar[:, None], brightness[:, None], images)

    images = images + 0.05 * torch.randn(images.shape, generator=g)
    return images.clamp_(0.0, 1.0), labels


def write_image_folder(root: str | Path, n_per_class: int, seed: int = 0) -> Path:
    """Write the same images as PNGs in an ImageFolder tree: ``root/0_airplane/*.png``, ``root/1_automobile/*.png``."""
    from torchvision.utils import save_image

    root = Path(root)
    images, labels = synthetic_images(n_per_class, seed)
    dirs = [root / f"{i}_{name}" for i, name in enumerate(CLASSES)]
    for d in dirs:
        d.mkdir(parents=True, exist_ok=True)
    for i, (image, label) in enumerate(zip(images, labels.tolist())):
        save_image(image, dirs[label] / f"{i:05d}.png")
    return root
