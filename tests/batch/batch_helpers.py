"""Objects the batch tests send to worker processes; they must be importable there, so they live in a module."""
import os

import numpy as np
import torch
from PIL import Image
from torch import nn

TINY = dict(network="small", iterations=4)
SIZES = [(24, 20), (20, 28), (32, 32), (28, 24), (24, 24)]


class CrashOnce:
    """A fit callback that kills its worker process at iteration 2 of the first fit to get there."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __call__(self, step):
        if step.iteration != 2:
            return False
        try:
            os.close(os.open(self.marker, os.O_CREAT | os.O_EXCL))  # only one process wins
        except FileExistsError:
            return False
        os._exit(3)


class NaNNet(nn.Module):
    """A network whose output is NaN from the first step: every fit with it diverges, whatever its seed."""

    def __init__(self, channels=3):
        super().__init__()
        self.conv = nn.Conv2d(8, channels, 1)

    def forward(self, z):
        return torch.sigmoid(self.conv(z)) * float("nan")


def write_images(folder, make_image, sizes=SIZES, prefix="img"):
    """Save one PNG per (H, W) in ``sizes`` into ``folder``; returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (h, w) in enumerate(sizes):
        path = folder / f"{prefix}{i}.png"
        Image.fromarray((make_image((h, w)) * 255).astype(np.uint8)).save(path)
        paths.append(path)
    return paths
