"""Reading and writing images safely.

Images come in as a path, a PIL image, a numpy array or a tensor and leave as
a float32 C×H×W tensor in [0, 1] plus the alpha channel, if any, kept aside.
Files are untrusted: their pixel count is checked from the header before any
decoding, so a decompression bomb is refused without being expanded.
Writes are atomic: a temporary file in the same folder is renamed over the
target, so a crash never leaves a truncated image.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
from PIL import Image

from dip.errors import DipError

#: Images with more pixels than this are refused before decoding (override per call).
MAX_PIXELS = 64_000_000
#: Smallest image side accepted.
MIN_SIDE = 4

ImageLike = Union[str, os.PathLike, Image.Image, np.ndarray, torch.Tensor]


@dataclass
class LoadedImage:
    """An image as the fit sees it: colour channels in [0, 1] and the alpha channel set aside."""

    tensor: torch.Tensor  # C×H×W float32, C = 1 or 3
    alpha: Optional[np.ndarray]  # H×W float32 in [0, 1], or None
    source: str  # a short description for messages

    @property
    def size(self) -> tuple[int, int]:
        return tuple(self.tensor.shape[-2:])


def load_image(image: ImageLike, *, name: str = "image", max_pixels: int = MAX_PIXELS) -> LoadedImage:
    """Read ``image`` (path, PIL image, numpy array or tensor) into a :class:`LoadedImage`."""
    if isinstance(image, (str, os.PathLike)):
        array, source = _read_file(Path(image), name, max_pixels), str(image)
    elif isinstance(image, Image.Image):
        _check_pixels(image.size, name, max_pixels)
        array, source = _pil_to_array(image), f"{name} (PIL image)"
    elif isinstance(image, np.ndarray):
        array, source = _numpy_to_float(image, name), f"{name} (numpy array)"
    elif isinstance(image, torch.Tensor):
        array, source = _tensor_to_array(image, name), f"{name} (tensor)"
    else:
        raise DipError(
            f"{name} must be a file path, PIL image, numpy array or tensor, got {type(image).__name__}"
        )
    return _split_alpha(array, name, source, max_pixels)


def _read_file(path: Path, name: str, max_pixels: int) -> np.ndarray:
    if not path.exists():
        raise DipError(f"{name} file not found: {path}")
    if path.is_dir():
        raise DipError(f"{name} path is a folder, not an image file: {path}")
    try:
        with Image.open(path) as img:
            # Image.open reads only the header: check the size before decoding.
            _check_pixels(img.size, name, max_pixels, path)
            img.load()
            return _pil_to_array(img)
    except DipError:
        raise
    except Image.DecompressionBombError as exc:
        raise DipError(f"{name} {path} is refused as a possible decompression bomb: {exc}") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise DipError(f"cannot read {name} {path}: not an image file PIL can decode ({exc})") from None


def _check_pixels(size, name: str, max_pixels: int, path=None) -> None:
    w, h = size
    if w * h > max_pixels:
        where = f" {path}" if path else ""
        raise DipError(
            f"{name}{where} has {w}×{h} = {w * h:,} pixels, more than the limit of {max_pixels:,}; "
            "crop or downscale it, or raise max_pixels if you trust the file"
        )


def _pil_to_array(img: Image.Image) -> np.ndarray:
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") or arr.max() > 255 else 255.0
        return (arr / top).astype(np.float32)
    if mode == "F":
        return _numpy_to_float(np.asarray(img), "image")
    if mode in ("1", "L"):
        return np.asarray(img.convert("L"), dtype=np.float32) / 255.0
    if mode in ("LA", "RGBA"):
        return np.asarray(img, dtype=np.float32) / 255.0
    if mode == "PA" or (mode == "P" and "transparency" in img.info):
        return np.asarray(img.convert("RGBA"), dtype=np.float32) / 255.0
    return np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0


def _numpy_to_float(arr: np.ndarray, name: str) -> np.ndarray:
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0
    if arr.dtype == np.uint16:
        return arr.astype(np.float32) / 65535.0
    if arr.dtype == np.bool_:
        return arr.astype(np.float32)
    if np.issubdtype(arr.dtype, np.floating):
        out = arr.astype(np.float32)
        _check_finite_range(out, name)
        return out
    raise DipError(
        f"{name} has dtype {arr.dtype}; use uint8, uint16 or floating point in [0, 1]"
    )


def _check_finite_range(arr: np.ndarray, name: str) -> None:
    if arr.size and not np.isfinite(arr).all():
        bad = int((~np.isfinite(arr)).sum())
        raise DipError(f"{name} has {bad} NaN or infinite values; replace them (or mask them out for inpainting)")
    if arr.size and (arr.min() < -1e-6 or arr.max() > 1 + 1e-6):
        raise DipError(
            f"{name} values span [{arr.min():.3g}, {arr.max():.3g}]; floating-point images must lie in [0, 1] "
            "(divide 8-bit data by 255)"
        )


def _tensor_to_array(t: torch.Tensor, name: str) -> np.ndarray:
    t = t.detach()
    if t.dim() == 4:
        if t.shape[0] != 1:
            raise DipError(f"{name} tensor must hold one image (1×C×H×W), got batch of {t.shape[0]}")
        t = t[0]
    if t.dim() == 2:
        t = t[None]
    if t.dim() != 3:
        raise DipError(f"{name} tensor must be C×H×W or 1×C×H×W, got shape {tuple(t.shape)}")
    if t.shape[0] not in (1, 2, 3, 4):
        raise DipError(f"{name} tensor must have 1–4 channels (C×H×W layout), got {t.shape[0]} in shape {tuple(t.shape)}")
    if t.dtype == torch.uint8:
        arr = t.float().div(255.0)
    elif t.is_floating_point():
        arr = t.float()
    else:
        raise DipError(f"{name} tensor has dtype {t.dtype}; use float in [0, 1] or uint8")
    arr = arr.cpu().permute(1, 2, 0).numpy()
    _check_finite_range(arr, name)
    return arr


def _split_alpha(arr: np.ndarray, name: str, source: str, max_pixels: int) -> LoadedImage:
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3:
        raise DipError(f"{name} must be H×W or H×W×C, got shape {arr.shape}")
    h, w, c = arr.shape
    if h * w == 0:
        raise DipError(f"{name} is empty (shape {arr.shape})")
    if c not in (1, 2, 3, 4):
        raise DipError(f"{name} must have 1 (gray), 2 (gray+alpha), 3 (RGB) or 4 (RGBA) channels, got {c} in shape {arr.shape}")
    if h * w > max_pixels:
        raise DipError(f"{name} has {h}×{w} = {h * w:,} pixels, more than the limit of {max_pixels:,}; crop or downscale it")
    if min(h, w) < MIN_SIDE:
        raise DipError(f"{name} is {h}×{w}; dip needs at least {MIN_SIDE}×{MIN_SIDE} pixels")
    alpha = None
    if c in (2, 4):
        alpha, arr = np.ascontiguousarray(arr[:, :, -1]), arr[:, :, :-1]
    tensor = torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1))).float().clamp_(0, 1)
    return LoadedImage(tensor=tensor, alpha=alpha, source=source)


def to_uint8(image: np.ndarray) -> np.ndarray:
    """Float image in [0, 1] → uint8 (rounded)."""
    return (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def to_pil(image: np.ndarray) -> Image.Image:
    """An H×W×C float image in [0, 1] (C = 1, 2, 3 or 4) as a PIL image."""
    arr = to_uint8(image)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    return Image.fromarray(arr)


def check_folder(path: Union[str, os.PathLike]) -> Path:
    """Raise a clear error unless the folder that would hold ``path`` exists; returns the folder."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise DipError(f"cannot write {path}: folder {folder} does not exist")
    return folder


def atomic_write(path: Union[str, os.PathLike], write) -> Path:
    """Call ``write(tmp_path)`` then rename the temporary file over ``path``."""
    path = Path(path)
    folder = check_folder(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + path.suffix, dir=folder)
    os.close(fd)
    try:
        write(tmp)
        # mkstemp makes the file private; give it the permissions a plain open() would.
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def check_output_path(path: Union[str, os.PathLike]) -> Path:
    """Check, before any work, that an image can be written to ``path``; returns it as a Path."""
    path = Path(path)
    if Image.registered_extensions().get(path.suffix.lower()) is None:
        raise DipError(f"cannot tell the image format of {path}: use an extension such as .png, .jpg or .tif")
    check_folder(path)
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_image(image: np.ndarray, path: Union[str, os.PathLike]) -> Path:
    """Write an H×W×C float image in [0, 1] to ``path`` atomically (format from the extension)."""
    path = check_output_path(path)
    fmt = Image.registered_extensions()[path.suffix.lower()]
    pil = to_pil(image)
    if fmt == "JPEG" and pil.mode in ("RGBA", "LA"):
        raise DipError(f"{path}: JPEG cannot store the alpha channel; save as .png instead")
    return atomic_write(path, lambda tmp: pil.save(tmp, format=fmt))


def load_mask(mask: ImageLike, size: tuple[int, int], *, max_pixels: int = MAX_PIXELS) -> torch.Tensor:
    """Read an inpainting mask (non-zero = known pixel) as a 1×H×W or C×H×W float tensor of 0/1."""
    if isinstance(mask, torch.Tensor) and mask.dtype == torch.bool:
        mask = mask.float()
    if isinstance(mask, np.ndarray) and mask.dtype == np.bool_:
        mask = mask.astype(np.float32)
    loaded = load_image(mask, name="mask", max_pixels=max_pixels)
    m = loaded.tensor
    if tuple(m.shape[-2:]) != tuple(size):
        raise DipError(
            f"mask is {m.shape[-2]}×{m.shape[-1]} but the image is {size[0]}×{size[1]}; they must match"
        )
    m = (m > 0.5).float()
    if m.shape[0] == 3 and torch.equal(m[0], m[1]) and torch.equal(m[1], m[2]):
        m = m[:1]
    if m.sum() == 0:
        raise DipError("mask marks no pixel as known (all zero); white (non-zero) must mark the known pixels")
    return m
