"""Image quality measures."""
from __future__ import annotations

import math

import numpy as np
import torch


def psnr(a, b, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB between two images (arrays or tensors) in [0, data_range]."""
    if isinstance(a, torch.Tensor):
        a = a.detach().double().cpu().numpy()
    if isinstance(b, torch.Tensor):
        b = b.detach().double().cpu().numpy()
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"psnr needs images of the same shape, got {a.shape} and {b.shape}")
    mse = float(np.mean((a - b) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(data_range**2 / mse)


def psnr_torch(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """PSNR in dB as a 0-d tensor on the inputs' device (no host sync), images in [0, 1]."""
    mse = torch.mean((a.float() - b.float()) ** 2)
    return -10.0 * torch.log10(mse.clamp_min(1e-20))


def ssim(a, b, data_range: float = 1.0):
    """Structural similarity of two H×W×C (or H×W) images by scikit-image; None when it is not installed.

    The window is 7 pixels, or the largest odd size that fits a smaller image.
    """
    try:
        from skimage.metrics import structural_similarity
    except ImportError:
        return None
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"ssim needs images of the same shape, got {a.shape} and {b.shape}")
    side = min(a.shape[0], a.shape[1])
    win = min(7, side if side % 2 else side - 1)
    if win < 3:
        return None
    channel_axis = -1 if a.ndim == 3 else None
    return float(structural_similarity(a, b, data_range=data_range, channel_axis=channel_axis, win_size=win))
