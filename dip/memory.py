"""Estimating the memory a fit needs, so an image too large is refused up front."""
from __future__ import annotations

import os
from typing import Optional

import torch

from dip.errors import ImageTooLargeError
from dip.nn.hourglass import Hourglass, HourglassConfig

# Activation elements counted below, times this factor, approximate the tensors
# kept for backward plus the gradients backward holds briefly. Set so the
# estimate for the denoise preset (about 0.65 GiB at 256², 2.4 GiB at 512²)
# tracks its measured growth in peak memory (0.62 GiB and 2.2 GiB on CPU).
_SAVED_TENSORS_PER_BLOCK = 2.6
_BYTES = 4


def estimate_fit_bytes(cfg: HourglassConfig, height: int, width: int, passes: int = 1) -> int:
    """Approximate peak bytes of one fitting iteration of ``cfg`` on a ``height``×``width`` input.

    ``passes``: forward passes kept for one backward (2 for ``Objective.SURE``'s probe).
    """
    elements = cfg.in_channels * height * width
    h, w = height, width
    for i in range(cfg.scales):
        down, up, skip = cfg.channels_down[i], cfg.channels_up[i], cfg.channels_skip[i]
        deep_out = cfg.channels_up[i + 1] if i + 1 < cfg.scales else down
        top = h * w
        h, w = (h + 1) // 2, (w + 1) // 2
        low = h * w
        # skip block, two down blocks, merge BN + up block + 1×1 block at this scale
        elements += skip * top + 2 * down * low + (skip + deep_out) * top * 2 + up * top * 2
    elements += cfg.channels_up[0] * height * width + cfg.out_channels * height * width
    params = _parameter_count(cfg)
    # weights, gradients and Adam's two moments
    return int(passes * elements * _SAVED_TENSORS_PER_BLOCK * _BYTES + params * 4 * _BYTES)


def _parameter_count(cfg: HourglassConfig) -> int:
    with torch.device("meta"):  # shapes only: nothing is allocated
        return sum(p.numel() for p in Hourglass(cfg).parameters())


def available_bytes(device: torch.device) -> Optional[int]:
    """Free memory on ``device`` (bytes), or None when it cannot be told."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        try:
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
    return None


def format_bytes(n: float) -> str:
    """``n`` bytes in the largest unit that keeps a leading digit (``512 bytes``, ``3.2 MiB``, ``1.5 GiB``)."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} bytes"


def check_fits_in_memory(cfg: HourglassConfig, height: int, width: int, device: torch.device,
                         limit: Optional[int] = None, *, image_size: Optional[tuple] = None,
                         passes: int = 1) -> int:
    """Raise :class:`ImageTooLargeError` when the fit's estimate exceeds the free (or given) memory.

    ``height``×``width`` is the network's (padded) input; ``image_size`` the
    user's image, which the message names.
    """
    need = estimate_fit_bytes(cfg, height, width, passes)
    have = limit if limit is not None else available_bytes(device)
    if have is not None and need > have:
        h, w = image_size or (height, width)
        raise ImageTooLargeError(
            f"restoring a {h}×{w} image needs about {format_bytes(need)} on {device}, "
            f"but only {format_bytes(have)} is available. Crop the image or restore it in tiles, "
            "use a smaller network (network='small' or fewer channels), or run on a device with more memory"
        )
    return need
