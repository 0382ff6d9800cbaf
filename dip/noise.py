"""Blind noise level: estimate the std of additive white Gaussian noise from the observation alone.

The finest diagonal wavelet detail of a natural image is mostly noise, so the
median absolute value of those coefficients, divided by 0.6745 (the median of
``|N(0, 1)|``), estimates σ robustly (Donoho & Johnstone's MAD estimator). The
estimate is computed here with an orthonormal Haar transform in numpy, or by
scikit-image's ``estimate_sigma`` (Daubechies wavelets, needs PyWavelets) when asked.
"""
from __future__ import annotations

import numpy as np
import torch

from dip.errors import DipError

#: median of |N(0, 1)|: turns a median absolute deviation into a standard deviation
_MAD_TO_STD = 0.6744897501960817


def _as_hwc(image) -> np.ndarray:
    if isinstance(image, torch.Tensor):
        t = image.detach().float().cpu()
        if t.dim() == 4:
            if t.shape[0] != 1:
                raise DipError(f"estimate_sigma takes one image, got a batch of {t.shape[0]}")
            t = t[0]
        if t.dim() == 3:
            t = t.permute(1, 2, 0)
        arr = t.numpy()
    else:
        arr = np.asarray(image, dtype=np.float32)
        if arr.dtype == np.uint8:
            arr = arr / 255.0
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[0] < 2 or arr.shape[1] < 2:
        raise DipError(f"estimate_sigma needs an H×W or H×W×C image of at least 2×2 pixels, got {arr.shape}")
    return arr.astype(np.float64)


def haar_mad_sigma(image) -> float:
    """σ from the median absolute diagonal Haar detail, averaged over channels (image in [0, 1])."""
    arr = _as_hwc(image)
    h, w = arr.shape[0] // 2 * 2, arr.shape[1] // 2 * 2
    a, b = arr[0:h:2, 0:w:2], arr[0:h:2, 1:w:2]
    c, d = arr[1:h:2, 0:w:2], arr[1:h:2, 1:w:2]
    diagonal = np.abs(a - b - c + d) / 2.0  # orthonormal: white noise of std σ stays std σ
    level = (a + b + c + d) / 4.0
    sigmas = []
    for ch in range(arr.shape[2]):
        coeffs, means = diagonal[:, :, ch], level[:, :, ch]
        sigma = np.median(coeffs) / _MAD_TO_STD
        # Noise was clipped to [0, 1], which shrinks it near black and white: re-estimate from the blocks
        # whose level lies two σ inside the range, while enough of them remain.
        for _ in range(2):
            inside = (means > 2 * sigma) & (means < 1 - 2 * sigma)
            if inside.sum() < max(16, coeffs.size // 4):
                break
            sigma = np.median(coeffs[inside]) / _MAD_TO_STD
        sigmas.append(sigma)
    return float(np.mean(sigmas))


def estimate_sigma(image, method: str = "auto") -> float:
    """The noise std of ``image`` (values in [0, 1]; H×W, H×W×C, C×H×W or 1×C×H×W tensor), in [0, 1] units.

    ``method``: ``"haar"`` (built in), ``"skimage"`` (scikit-image's
    ``estimate_sigma``, averaged over channels) or ``"auto"`` (the Haar
    estimate: on the measured crops it is as close as scikit-image's; see
    ``benchmarks/RESULTS.md``). The estimate assumes white Gaussian noise and
    reads fine texture as noise, so it errs high on very textured images.
    """
    if method in ("auto", "haar"):
        return haar_mad_sigma(image)
    if method == "skimage":
        try:
            from skimage.restoration import estimate_sigma as sk_estimate
        except ImportError:
            raise DipError("method='skimage' needs scikit-image (pip install scikit-image)") from None
        arr = _as_hwc(image)
        return float(np.mean(sk_estimate(arr, channel_axis=-1)))
    raise DipError(f"estimate_sigma method must be 'auto', 'haar' or 'skimage', got {method!r}")
