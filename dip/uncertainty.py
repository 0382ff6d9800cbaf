"""Writing an uncertainty map (``Restoration.uncertainty``) as a colour image with its scale.

The map is a relative indicator of where a restoration is unsure (the spread
of ensemble members, or of one fit's recent outputs), not a calibrated error,
so the colours run from 0 to the map's own maximum and the scale under the
image says what that maximum is (in the image's 0–255 units).
"""
from __future__ import annotations

import os
from typing import Union

import numpy as np
from PIL import Image, ImageDraw

from dip.errors import DipError
from dip.io import save_image

# A perceptually ordered dark-blue → teal → yellow colour ramp (anchors, linearly interpolated).
_RAMP = np.array([[0.05, 0.03, 0.25], [0.15, 0.35, 0.55], [0.15, 0.65, 0.50], [0.60, 0.85, 0.25],
                  [0.99, 0.91, 0.15]])


def colorize(values: np.ndarray, top: float) -> np.ndarray:
    """``values`` (any shape) mapped through the ramp, 0 → dark blue and ``top`` → yellow; shape + (3,)."""
    t = np.clip(np.asarray(values, dtype=np.float64) / top if top > 0 else np.zeros(np.shape(values)), 0, 1)
    position = t * (len(_RAMP) - 1)
    low = np.floor(position).astype(int).clip(0, len(_RAMP) - 2)
    frac = (position - low)[..., None]
    return (_RAMP[low] * (1 - frac) + _RAMP[low + 1] * frac).astype(np.float32)


def uncertainty_image(values: np.ndarray) -> np.ndarray:
    """The map in colour above a horizontal scale bar labelled 0 and its maximum (H'×W'×3 float in [0, 1])."""
    values = np.asarray(values, dtype=np.float32)
    if values.ndim != 2 or values.size == 0:
        raise DipError(f"an uncertainty map is H×W, got shape {values.shape}")
    if not np.all(np.isfinite(values)):
        raise DipError("the uncertainty map has non-finite values")
    top = float(values.max())
    zoom = max(1, int(np.ceil(160 / values.shape[1])))  # room for the scale's labels under small maps
    body = colorize(np.kron(values, np.ones((zoom, zoom), dtype=np.float32)), top)
    width = body.shape[1]
    bar = np.repeat(colorize(np.linspace(0, top, width), top)[None], 10, axis=0)
    label = Image.new("RGB", (width, 14), "white")
    draw = ImageDraw.Draw(label)
    draw.text((2, 1), "0", fill="black")
    text = f"{top * 255:.3g} /255 (relative)"
    draw.text((max(12, width - 6 * len(text) - 2), 1), text, fill="black")
    caption = np.asarray(label, dtype=np.float32) / 255.0
    return np.concatenate([body, np.ones((3, width, 3), np.float32), bar, caption], axis=0)


def save_uncertainty(values: np.ndarray, path: Union[str, os.PathLike]):
    """Write :func:`uncertainty_image` of ``values`` to ``path`` (format from the extension, atomically)."""
    return save_image(uncertainty_image(values), path)
