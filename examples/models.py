"""Models shared by the examples and the tests."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["SeedCNN", "SigmoidCNN"]


class SeedCNN(nn.Module):
    """The small CNN of the tutorial this project grew from: 3x32x32 images in, one logit out.

    54,273 parameters: conv1 896, conv2 51,264, linear1 2,080, linear2 33.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, kernel_size=3)  # -> 32x30x30
        self.pool1 = nn.MaxPool2d(2, 2)  # -> 32x15x15
        self.conv2 = nn.Conv2d(32, 64, kernel_size=5)  # -> 64x11x11
        self.pool2 = nn.MaxPool2d(2, 2)  # -> 64x5x5
        self.dropout = nn.Dropout2d(p=0.1)
        self.adaptive_pool = nn.AdaptiveMaxPool2d((1, 1))  # -> 64x1x1
        self.flatten = nn.Flatten()  # -> 64
        self.linear1 = nn.Linear(64, 32)
        self.relu = nn.ReLU()
        self.linear2 = nn.Linear(32, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        x = self.pool1(x)
        x = self.conv2(x)
        x = self.pool2(x)
        x = self.dropout(x)
        x = self.adaptive_pool(x)
        x = self.flatten(x)
        x = self.linear1(x)
        x = self.relu(x)
        return self.linear2(x)


class SigmoidCNN(nn.Module):
    """The CNN of the first tutorial (seed 000), drawn with ``add_graph`` on a 1x3x224x224 input.

    The same layers as ``SeedCNN`` (so the same 54,273 parameters) without the dropout, and with a
    sigmoid at the end: a probability out, not a logit. The adaptive pool makes any input size work.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels=3, out_channels=32, kernel_size=3)
        self.pool = nn.MaxPool2d(kernel_size=2, stride=2)  # used twice, as in the tutorial
        self.conv2 = nn.Conv2d(in_channels=32, out_channels=64, kernel_size=5)
        self.adaptive_pool = nn.AdaptiveMaxPool2d((1, 1))
        self.flatten = nn.Flatten()
        self.linear1 = nn.Linear(64, 32)
        self.relu = nn.ReLU()
        self.linear2 = nn.Linear(32, 1)
        self.sigmoid = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.conv1(x))
        x = self.pool(self.conv2(x))
        x = self.flatten(self.adaptive_pool(x))
        x = self.relu(self.linear1(x))
        return self.sigmoid(self.linear2(x))
