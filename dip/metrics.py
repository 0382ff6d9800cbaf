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
