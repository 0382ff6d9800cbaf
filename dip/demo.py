"""The built-in example: denoise a natural image and write a before/after picture."""
from __future__ import annotations

import math
import sys
from typing import Optional

import numpy as np
from PIL import Image, ImageDraw

from dip.errors import DipError
from dip.io import MAX_PIXELS, MIN_SIDE, save_image, to_uint8
from dip.metrics import psnr

#: Noise level of the example (σ = 25 on the 0–255 scale, as in the original work).
SIGMA = 25.0 / 255.0
DEFAULT_SIZE = 128
DEFAULT_ITERATIONS = 1200


def example_image(size: int = DEFAULT_SIZE) -> np.ndarray:
    """scikit-image's astronaut photograph, the face cropped and resized to size×size, float32 in [0, 1]."""
    try:
        from skimage import data
    except ImportError:
        raise DipError("the demo image comes from scikit-image: pip install 'dip[demo]' (or scikit-image)") from None
    face = Image.fromarray(data.astronaut()[30:250, 120:340])
    return np.asarray(face.resize((size, size), Image.LANCZOS), dtype=np.float32) / 255.0


def noisy_example(size: int = DEFAULT_SIZE, seed: int = 0, sigma: float = SIGMA) -> tuple[np.ndarray, np.ndarray]:
    """(clean, noisy) example pair: Gaussian noise of std ``sigma`` (in [0, 1] units) with a fixed seed."""
    clean = example_image(size)
    noise = np.random.default_rng(seed).normal(0.0, sigma, clean.shape)
    return clean, np.clip(clean + noise, 0.0, 1.0).astype(np.float32)


def check_size(size, name: str = "size (the demo image's side)") -> None:
    """The demo image's side: a whole number of pixels from ``MIN_SIDE`` to what ``MAX_PIXELS`` allows."""
    if isinstance(size, bool) or not isinstance(size, int) or not MIN_SIDE <= size or size * size > MAX_PIXELS:
        raise DipError(f"{name} must be a whole number of pixels from {MIN_SIDE} to {math.isqrt(MAX_PIXELS)}, "
                       f"got {size!r}")


def run_demo(output: str = "dip-demo.png", size: Optional[int] = None, iterations: Optional[int] = None,
             device=None, progress: bool = True, sigma: float = 25.0, threads="auto") -> int:
    """Restore the noisy example, print PSNRs and write noisy | restored | clean side by side.

    ``sigma`` is the std of the added noise on the 0–255 scale (the command line's unit); ``threads`` is
    ``restore()``'s (default ``"auto"``, see :mod:`dip.threads`).
    """
    import dip

    size = DEFAULT_SIZE if size is None else size
    iterations = DEFAULT_ITERATIONS if iterations is None else iterations
    check_size(size)
    dip.io.check_output_path(output)
    clean, noisy = noisy_example(size, sigma=sigma / 255.0)
    print(f"dip demo: denoising a {size}×{size} photograph with noise σ={sigma:g} ({iterations} iterations)", flush=True)
    result = dip.restore(noisy, "denoise", iterations=iterations, reference=clean, device=device,
                         network="small", progress=progress, threads=threads)
    before, after = psnr(noisy, clean), psnr(result.image, clean)
    print(f"PSNR noisy {before:.2f} dB -> restored {after:.2f} dB  ({result.seconds:.0f} s)")
    panels = [("noisy", noisy), ("restored (DIP)", result.image), ("clean", clean)]
    # in the format the extension names (atomically), as every image dip writes
    save_image(np.asarray(_side_by_side(panels), dtype=np.float32) / 255.0, output)
    print(f"wrote {output}")
    if result.interrupted:
        print("dip demo: interrupted; the picture shows the image so far", file=sys.stderr)
        return 130
    return 0


def _side_by_side(panels) -> Image.Image:
    h, w = panels[0][1].shape[:2]
    label = 16
    canvas = Image.new("RGB", (w * len(panels), h + label), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (name, img) in enumerate(panels):
        canvas.paste(Image.fromarray(to_uint8(img)), (i * w, label))
        draw.text((i * w + 4, 2), name, fill="black")
    return canvas
