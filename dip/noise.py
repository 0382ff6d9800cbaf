"""Blind noise level: estimate the std of additive white Gaussian noise from the observation alone.

Two estimators, both in numpy, and both read some image structure as noise,
so both err high, each on other images:

- Haar MAD: the finest diagonal wavelet detail of a natural image is mostly
  noise, so the median absolute value of those coefficients, divided by 0.6745
  (the median of ``|N(0, 1)|``), estimates σ (Donoho & Johnstone). Fine
  texture passes for noise.
- patch PCA: natural image patches span few directions, so the smallest
  eigenvalues of the covariance of an image's patches are mostly the noise
  variance (Chen, Zhu & Heng, ICCV 2015). The weakest structure of a clean
  image passes for noise, which matters only when σ is small.

The default is the smaller of the two. scikit-image's ``estimate_sigma``
(Daubechies wavelets, needs PyWavelets) is available when asked. How close
each is, on which crops: ``benchmarks/RESULTS.md``.
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
        arr = np.asarray(image)
        if arr.dtype in (np.uint8, np.uint16):  # integer pixels, as dip.io reads them: full scale is 1
            arr = arr / float(np.iinfo(arr.dtype).max)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[0] < 2 or arr.shape[1] < 2:
        raise DipError(f"estimate_sigma needs an H×W or H×W×C image of at least 2×2 pixels, got {arr.shape}")
    return arr.astype(np.float64, copy=False)


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


def _lowest_rank_noise_variance(eigenvalues: np.ndarray) -> float:
    """The variance shared by the smallest eigenvalues: drop the largest until the rest look like pure noise.

    Eigenvalues of white noise cluster around σ², so their mean and median agree; image structure
    adds a few large ones that pull the mean above the median.
    """
    lam = np.sort(np.clip(eigenvalues, 0.0, None))[::-1]
    for first in range(lam.size - 1):
        tail = lam[first:]
        if tail.mean() <= np.median(tail):
            return float(tail.mean())
    return float(lam[-1])  # one eigenvalue left: its mean is its median


def pca_sigma(image, patch: int = 7, max_patches: int = 1 << 17) -> float:
    """σ from the smallest eigenvalues of the covariance of ``patch``×``patch`` patches, averaged over channels.

    Natural image patches span few directions, so most eigenvalues of their
    covariance are the noise variance alone (Chen, Zhu & Heng, ICCV 2015).
    Fine texture that the Haar detail reads as noise lives in the large
    eigenvalues here. Patches are taken on a stride so that at most
    ``max_patches`` are used per channel; an image with fewer than
    4 × ``patch``² patches gets :func:`haar_mad_sigma`.
    """
    arr = _as_hwc(image)
    count, fewest = (arr.shape[0] - patch + 1) * (arr.shape[1] - patch + 1), 4 * patch * patch
    if count < fewest:
        return haar_mad_sigma(arr)  # too few patches for their covariance's small eigenvalues to mean anything
    stride = max(1, int(np.ceil(np.sqrt(count / max_patches))))
    sigmas = []
    for ch in range(arr.shape[2]):
        windows = np.lib.stride_tricks.sliding_window_view(arr[:, :, ch], (patch, patch))[::stride, ::stride]
        patches = windows.reshape(-1, patch * patch)
        means = patches.mean(axis=1)
        chosen, sigma = patches, None
        for _ in range(3):
            if sigma is not None:
                # as in haar_mad_sigma: clipping shrinks the noise near black and white
                inside = (means > 2 * sigma) & (means < 1 - 2 * sigma)
                if inside.sum() < max(fewest, patches.shape[0] // 4):
                    break
                chosen = patches[inside]
            covariance = np.cov(chosen, rowvar=False)
            sigma = float(np.sqrt(_lowest_rank_noise_variance(np.linalg.eigvalsh(covariance))))
        sigmas.append(sigma)
    return float(np.mean(sigmas))


def estimate_sigma(image, method: str = "auto") -> float:
    """The noise std of ``image`` (values in [0, 1]; H×W, H×W×C, C×H×W or 1×C×H×W tensor), in [0, 1] units.

    ``method``: ``"auto"`` (the smaller of the patch-PCA and Haar estimates:
    both err high, on other images, and on the measured crops the smaller is
    closer than either; see ``benchmarks/RESULTS.md``), ``"pca"``
    (:func:`pca_sigma`), ``"haar"`` (:func:`haar_mad_sigma`) or ``"skimage"``
    (scikit-image's ``estimate_sigma``, averaged over channels). Every estimate
    assumes white Gaussian noise; noise clipped at black and white is
    estimated from the pixels away from them.
    """
    arr = _as_hwc(image)  # once: the estimators take it as it is
    if method == "auto":
        return min(pca_sigma(arr), haar_mad_sigma(arr))
    if method == "pca":
        return pca_sigma(arr)
    if method == "haar":
        return haar_mad_sigma(arr)
    if method == "skimage":
        try:
            from skimage.restoration import estimate_sigma as sk_estimate
        except ImportError:
            raise DipError("method='skimage' needs scikit-image (pip install scikit-image)") from None
        return float(np.mean(sk_estimate(arr, channel_axis=-1)))
    raise DipError(f"estimate_sigma method must be 'auto', 'haar', 'pca' or 'skimage', got {method!r}")
