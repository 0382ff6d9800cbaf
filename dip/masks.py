"""Inpainting masks: which pixels of the image are known.

One rule everywhere: **a pixel is known when its mask value is above the
mask's own zero** (white, 255, 1, True, 0.3 are known; black, 0, False are
missing). 0/1 and 0/255 integer masks, 16-bit masks, bool and float masks all
work. Make masks in a lossless format (PNG): JPEG noise turns "black" into
small non-zero values, which count as known.

Without an image editor: ``mask="alpha"`` takes the missing pixels from the
input's transparency (alpha = 0 is missing), and :func:`mask_from_color`
marks the pixels painted in one colour as missing.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Optional, Union

import numpy as np
import torch

from dip.errors import DipError
from dip.io import MAX_PIXELS, ImageLike, LoadedImage, decode, load_image

#: The ``mask`` value that takes the missing pixels from the input's alpha channel.
ALPHA = "alpha"

MaskLike = Union[ImageLike, str]


def load_mask(mask: ImageLike, size: tuple[int, int], *, max_pixels: int = MAX_PIXELS,
              channels: Optional[int] = None) -> torch.Tensor:
    """Read an inpainting mask as a 1×H×W (or C×H×W, one mask per channel) float tensor of 0/1.

    A value above zero (in the mask's own type) marks a known pixel; see the module docstring.
    ``channels``: the image's channel count, which a mask with channels that differ must match.
    """
    if isinstance(mask, str) and mask == ALPHA:
        raise DipError("mask='alpha' takes the missing pixels from the image's transparency: "
                       "use dip.masks.resolve_mask(mask, image)")
    decoded = decode(mask, name="mask", max_pixels=max_pixels)
    if decoded.format == "JPEG":
        logging.getLogger("dip.masks").warning(
            "mask %s is a JPEG: its compression noise makes near-black pixels non-zero, and so known; "
            "save masks as PNG", decoded.source)
    arr = decoded.array[:, :, :-1] if decoded.alpha else decoded.array
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise DipError("mask has NaN or infinite values; use 0 for missing and 1 (or any positive value) for known")
    known = torch.from_numpy(np.ascontiguousarray((arr > 0).transpose(2, 0, 1))).float()
    return _finish(known, size, channels)


def _finish(known: torch.Tensor, size: tuple[int, int], channels: Optional[int] = None) -> torch.Tensor:
    if tuple(known.shape[-2:]) != tuple(size):
        raise DipError(
            f"mask is {known.shape[-2]}×{known.shape[-1]} but the image is {size[0]}×{size[1]}; they must match"
        )
    if known.shape[0] > 1 and all(torch.equal(known[0], known[i]) for i in range(1, known.shape[0])):
        known = known[:1]
    if channels is not None and known.shape[0] not in (1, channels):
        raise DipError(f"mask has {known.shape[0]} channels that differ, but the image has {channels}; give a "
                       f"one-channel (grey) mask, or one mask channel per image channel")
    if known.sum() == 0:
        raise DipError("mask marks no pixel as known (all zero); pixels above zero (white, 1, True) are the known "
                       "ones and zero (black) the missing ones")
    return known


def mask_from_alpha(image: Union[LoadedImage, ImageLike], *, max_pixels: int = MAX_PIXELS) -> torch.Tensor:
    """The mask of an image with transparency: fully transparent pixels (alpha = 0) are the missing ones."""
    loaded = load_image(image, max_pixels=max_pixels)
    if loaded.alpha is None:
        raise DipError(f"mask 'alpha' needs an image with an alpha channel (RGBA or grey+alpha); {loaded.source} "
                       "has none: give a mask file or a mask colour")
    known = torch.from_numpy(np.ascontiguousarray(loaded.alpha > 0))[None].float()
    if bool(known.all()):
        raise DipError(f"mask 'alpha': {loaded.source} has no transparent pixel, so nothing is missing")
    return _finish(known, loaded.size)


def mask_from_color(image: Union[LoadedImage, ImageLike], color: Sequence[float], *, tolerance: float = 0,
                    max_pixels: int = MAX_PIXELS) -> torch.Tensor:
    """The mask of an image whose missing pixels were painted in one colour (a colour key).

    ``color`` is (r, g, b), or (v,) for grey, in 0–255 units whatever the
    image's depth; pixels within ``tolerance`` (same units, every channel) of
    it are missing. Use a colour the image does not otherwise contain (pure
    magenta ``(255, 0, 255)`` is the usual choice) and a lossless format.
    """
    loaded = load_image(image, max_pixels=max_pixels)
    channels = loaded.tensor.shape[0]
    try:
        key = [float(v) for v in color]
    except (TypeError, ValueError):
        raise DipError(f"mask colour must be numbers such as (255, 0, 255), got {color!r}") from None
    if len(key) == 1 and channels > 1:
        key = key * channels
    if len(key) != channels or not all(0 <= v <= 255 for v in key):
        raise DipError(f"mask colour must have {channels} value(s) from 0 to 255 for {loaded.source}, got {color!r}")
    if not tolerance >= 0:
        raise DipError(f"mask colour tolerance must be 0 or more (0–255 units), got {tolerance!r}")
    values = loaded.tensor * 255.0
    target = torch.tensor(key, dtype=values.dtype)[:, None, None]
    missing = ((values - target).abs() <= tolerance + 0.5).all(dim=0)
    if not bool(missing.any()):
        raise DipError(f"no pixel of {loaded.source} has the mask colour {tuple(color)} (tolerance {tolerance}); "
                       "nothing would be inpainted")
    return _finish((~missing)[None].float(), loaded.size)


def resolve_mask(mask: Optional[MaskLike], image: Union[LoadedImage, ImageLike], *,
                 mask_color: Optional[Sequence[float]] = None, tolerance: float = 0,
                 max_pixels: int = MAX_PIXELS) -> torch.Tensor:
    """The known-pixel mask for inpainting ``image``, from whichever form the user gave.

    ``mask``: a mask image/array/tensor/path (values above zero are known), or
    ``"alpha"`` for the image's transparent pixels; or None with ``mask_color``
    (r, g, b in 0–255) for a colour key. Returns a 1×H×W (or C×H×W) 0/1 float tensor.
    """
    if mask is not None and mask_color is not None:
        raise DipError("give either a mask or a mask colour, not both")
    if mask_color is not None:
        return mask_from_color(image, mask_color, tolerance=tolerance, max_pixels=max_pixels)
    if mask is None:
        raise DipError("inpainting needs a mask: a mask image (white = known), 'alpha' for an image with "
                       "transparent holes, or a mask colour")
    if isinstance(mask, str) and mask == ALPHA:  # the word itself; a file named so is given as ./alpha
        return mask_from_alpha(image, max_pixels=max_pixels)
    loaded = load_image(image, max_pixels=max_pixels)
    return load_mask(mask, loaded.size, max_pixels=max_pixels, channels=int(loaded.tensor.shape[0]))
