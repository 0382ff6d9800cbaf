"""Reading and writing images without losing what they hold.

Images come in as a path, a PIL image, a numpy array or a tensor and leave as
a float32 C×H×W tensor in [0, 1] (the alpha channel, if any, kept aside) plus
an :class:`ImageMeta` that remembers what the source was: its sample type
(8/16-bit, float), the value range when float data lay outside [0, 1], its
ICC profile and resolution, and whether an EXIF orientation was applied.
:func:`save_image` uses that record to write the result back as rich as it
came: a 16-bit PNG stays 16-bit, a float TIFF stays float, values are mapped
back to their range, the colour profile and DPI are kept where the format can
hold them. What a format cannot hold (16 bits in a JPEG, alpha in a JPEG,
five channels in a PNG) is refused by :func:`check_output_format`, which can
be called before a fit.

Formats: everything Pillow reads; 16-bit PNG (grey, RGB, RGBA); TIFF through
``tifffile`` when it is installed (16-bit and float colour, stacks of any
number of channels; without it Pillow's TIFF support: 8-bit, 16-bit and float
grey); ``.npy`` arrays (H×W or H×W×C). A PIL image that Pillow decoded at 8 bits from a 16-bit
colour file is read from its file when it still matches it, else the loss is noted in ``meta.notes``. Arrays follow one convention: 2 or 4
channels mean the last one is alpha; any other count is all data.

Files are untrusted: their pixel count is checked from the header before any
decoding, so a decompression bomb is refused without being expanded (a TIFF
stack's sample count too: at most four channels' worth of ``max_pixels``). ``max_pixels`` is the limit
that applies: Pillow's own decompression-bomb check is set to it for each read (:func:`pillow_limit`).
Writes are atomic: a temporary file in the same folder is renamed over the
target, so a crash never leaves a truncated image; temporaries left by a
writer that was killed are removed on the next write to the same target.
"""
from __future__ import annotations

import contextlib
import dataclasses
import glob
import logging
import numbers
import os
import struct
import tempfile
import threading
import time
import zlib
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
#: Default JPEG quality of :func:`save_image` (Pillow's own default is 75).
JPEG_QUALITY = 95
#: A temporary file of :func:`atomic_write` older than this is stale even if its writer's process id is alive.
STALE_AFTER_S = 3600.0

ImageLike = Union[str, os.PathLike, Image.Image, np.ndarray, torch.Tensor]

log = logging.getLogger("dip.io")
_PILLOW_LIMIT_LOCK = threading.RLock()  # Image.MAX_IMAGE_PIXELS is one global: one read at a time changes it

# What each output format can hold. Pillow formats not listed hold 8-bit grey or RGB without alpha.
_DEPTHS = {"PNG": ("uint8", "uint16"), "JPEG": ("uint8",), "TIFF": None, "NPY": None}  # None: any dtype
_ALPHA = {"PNG", "TIFF", "NPY", "WEBP"}
_ANY_CHANNELS = {"TIFF", "NPY"}
_DPI = {"PNG", "JPEG", "TIFF"}
_ICC = {"PNG", "JPEG", "TIFF", "WEBP"}
_TIFF_SUFFIXES = (".tif", ".tiff")
#: Pillow's raw modes of the 16-bit PNGs it decodes at 8 bits: RGB and RGBA (which dip reads exactly), grey+alpha.
_PNG16_COLOUR = ("RGB;16B", "RGBA;16B", "LA;16B")


@dataclass(frozen=True)
class ImageMeta:
    """What an input image was, so that the result can be written back the same way.

    ``dtype`` is the source's sample type (``"uint8"``, ``"uint16"``,
    ``"float32"``, ``"bool"``, ...). ``value_range`` is ``(lo, hi)`` when the
    source's values were mapped to [0, 1] by their own range (float data
    outside [0, 1], signed or wide integers): a value ``x`` in [0, 1] stands for
    ``lo + x * (hi - lo)``. ``channels`` counts the data channels, without the
    alpha channel (``alpha``). ``alpha_range`` is ``(lo, hi)`` when the alpha
    channel's type has no natural range (float alpha outside [0, 1], signed or
    wide integers): it is read as a fraction of ``hi`` (``lo`` is 0, or its
    minimum when negative), so 0 stays transparent and a constant opaque plane
    opaque, and it is written back in its own units.
    """

    dtype: str = "uint8"
    channels: int = 3
    alpha: bool = False
    value_range: Optional[tuple[float, float]] = None
    icc_profile: Optional[bytes] = None
    dpi: Optional[tuple[float, float]] = None
    exif_transposed: bool = False  # an EXIF/TIFF orientation other than "upright" was applied on read
    format: Optional[str] = None  # the source file's format ("PNG", "TIFF", "NPY", ...); None for arrays
    frames: int = 1  # frames or pages in the source; only the first is used
    notes: tuple[str, ...] = ()  # what was done to the data on the way in, in words
    alpha_range: Optional[tuple[float, float]] = None  # the alpha channel's own scale (see above)

    @property
    def bit_depth(self) -> int:
        """Bits per sample of the source (1 for bool)."""
        return 1 if self.dtype == "bool" else np.dtype(self.dtype).itemsize * 8

    def resized(self, factor: float) -> ImageMeta:
        """The record for the image scaled by ``factor`` (super-resolution): same physical size, so DPI × factor."""
        dpi = None if self.dpi is None else (self.dpi[0] * factor, self.dpi[1] * factor)
        return dataclasses.replace(self, dpi=dpi)

    def to_dict(self) -> dict:
        """JSON-friendly form (the ICC profile as its length) for results and manifests."""
        d = dataclasses.asdict(self)
        d["icc_profile"] = None if self.icc_profile is None else f"{len(self.icc_profile)} bytes"
        d["value_range"] = None if self.value_range is None else list(self.value_range)
        d["alpha_range"] = None if self.alpha_range is None else list(self.alpha_range)
        d["dpi"] = None if self.dpi is None else list(self.dpi)
        d["notes"] = list(self.notes)
        return d


@dataclass
class LoadedImage:
    """An image as the fit sees it: data channels in [0, 1], the alpha channel set aside, and its :class:`ImageMeta`."""

    tensor: torch.Tensor  # C×H×W float32 in [0, 1]
    alpha: Optional[np.ndarray]  # H×W float32 in [0, 1], or None
    source: str  # a short description for messages
    meta: ImageMeta = dataclasses.field(default_factory=ImageMeta)

    @property
    def size(self) -> tuple[int, int]:
        return tuple(self.tensor.shape[-2:])


@dataclass
class _Decoded:
    array: np.ndarray  # H×W×C in the source's own dtype
    alpha: bool  # the last channel is alpha
    source: str
    format: Optional[str] = None
    icc: Optional[bytes] = None
    dpi: Optional[tuple[float, float]] = None
    orientation: int = 1
    frames: int = 1
    notes: tuple[str, ...] = ()  # what was lost or changed while decoding, in words


# ----------------------------------------------------------------------------------------------- reading


def check_max_pixels(max_pixels) -> int:
    """The one check of ``max_pixels=`` (restore(), restore_many(), load_image(), decode()): a positive integer."""
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, numbers.Integral) or max_pixels < 1:
        raise DipError(f"max_pixels must be a positive integer (a pixel count), got {max_pixels!r}")
    return int(max_pixels)  # numpy integers are integers too


def load_image(image: Union[ImageLike, LoadedImage], *, name: str = "image", max_pixels: int = MAX_PIXELS) -> LoadedImage:
    """Read ``image`` (path, PIL image, numpy array or tensor) into a :class:`LoadedImage`.

    16-bit and float sources keep their precision (as float32); float data
    outside [0, 1] is mapped to [0, 1] by its own range, which is recorded in
    ``meta.value_range`` (and logged) so that :func:`save_image` maps it back.
    A :class:`LoadedImage` is returned as it is (after the size check), so an
    image read once is not decoded again.
    """
    if isinstance(image, LoadedImage):
        h, w = image.size
        _check_pixels((w, h), name, max_pixels)
        return image
    decoded = decode(image, name=name, max_pixels=max_pixels)
    return _to_loaded(decoded, name, max_pixels)


def decode(image: ImageLike, *, name: str = "image", max_pixels: int = MAX_PIXELS) -> _Decoded:
    """The image's samples as stored (H×W×C, the source's dtype, upright), before any scaling."""
    max_pixels = check_max_pixels(max_pixels)
    if isinstance(image, (str, os.PathLike)):
        decoded = _read_file(Path(image), name, max_pixels)
    elif isinstance(image, Image.Image):
        decoded = _decode_pil(image, name, max_pixels)
    elif isinstance(image, np.ndarray):
        array = _as_hwc(image, name)
        decoded = _Decoded(array, array.shape[2] in (2, 4), f"{name} (numpy array)")
    elif isinstance(image, torch.Tensor):
        array = _tensor_to_hwc(image, name)
        decoded = _Decoded(array, array.shape[2] in (2, 4), f"{name} (tensor)")
    else:
        raise DipError(
            f"{name} must be a file path, PIL image, numpy array or tensor, got {type(image).__name__}"
        )
    if decoded.orientation not in (1, None):
        decoded.array = orient(decoded.array, decoded.orientation)
    return decoded


def _decode_pil(image: Image.Image, name: str, max_pixels: int) -> _Decoded:
    """A PIL image's samples; one that Pillow decodes at 8 bits from a wider file is read from that file.

    Pillow has no mode for 16-bit colour, so ``Image.open`` of a 16-bit RGB(A) PNG or TIFF gives 8-bit
    samples. When the image still matches its file (``image.filename``: its 8 bits are the file's high
    bytes), the file's exact samples are used; otherwise the loss is logged and noted in the meta.
    """
    _check_pixels(image.size, name, max_pixels)
    wide = _pil_wider_than_decoded(image)  # before decoding: Image.load() clears the tile that tells
    with pillow_limit(max_pixels):
        try:  # an image from Image.open is decoded only now
            array, alpha = _pil_to_array(image)
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            raise DipError(f"cannot read {name} (PIL image): its data cannot be decoded ({exc})") from None
    path = getattr(image, "filename", None)
    path = Path(path) if isinstance(path, (str, os.PathLike)) and str(path) and os.path.isfile(path) else None
    if wide is None and path is not None:
        wide = _file_wider_than_decoded(path, image.size)
    if wide and path is not None:
        try:
            exact = _read_file(path, name, max_pixels)
        except DipError:  # the file changed since it was opened
            exact = None
        high = None if exact is None else exact.array >> 8 if exact.array.dtype == np.uint16 else exact.array
        if high is not None and high.shape == array.shape and np.array_equal(high, array):  # its file's, unchanged
            exact.source = f"{name} (PIL image of {path})"
            return exact
    notes = ()
    if wide:
        where = f"its file {path} no longer matches it" if path is not None else "it was not opened from a path"
        notes = (f"the PIL image was decoded by Pillow at 8 bits per channel from a 16-bit source ({where}); "
                 "pass the file path instead of a PIL image to keep 16 bits",)
        log.warning("%s (PIL image): %s", name, notes[0])
    return _Decoded(array, alpha, f"{name} (PIL image)", icc=image.info.get("icc_profile"), dpi=_dpi_of(image),
                    orientation=int(image.getexif().get(0x0112, 1) or 1), notes=notes)


def _pil_wider_than_decoded(img: Image.Image) -> Optional[bool]:
    """Whether Pillow decodes ``img`` at fewer bits than its file holds (16-bit colour PNG or TIFF);
    None when it cannot tell (the image is decoded already, or was made in memory)."""
    if img.format == "TIFF" and _tiff_wider_than_pillow(img):
        return True
    rawmode = _tile_rawmode(img)
    if rawmode is None:
        return None
    return img.format == "PNG" and rawmode in _PNG16_COLOUR


def _file_wider_than_decoded(path: Path, size: tuple[int, int]) -> bool:
    """Whether the file at ``path``, of ``size``, is one that Pillow decodes at fewer bits than it holds."""
    try:
        with pillow_limit(None), Image.open(path) as header:  # the header only
            return header.size == size and bool(_pil_wider_than_decoded(header))
    except (OSError, SyntaxError, ValueError):
        return False


@contextlib.contextmanager
def pillow_limit(max_pixels: Optional[int]):
    """Pillow's own decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``) set to ``max_pixels`` for one read.

    Pillow refuses an image above twice its limit, and warns above it, inside ``Image.open``: left at its
    default (about 89 Mpx) it would override a larger ``max_pixels`` and speak instead of dip. Set to
    ``max_pixels`` it never fires below dip's limit; ``None`` turns it off while a header is read for dip's
    own check. The previous value is restored on exit; reads under it are serialised (one global).
    """
    with _PILLOW_LIMIT_LOCK:
        before = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = max_pixels
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = before


def _open_checked(path: Path, name: str, max_pixels: int) -> Image.Image:
    """``Image.open(path)`` (the header only) with dip's size check first, in place of Pillow's."""
    with pillow_limit(None):
        img = Image.open(path)
    try:
        _check_pixels(img.size, name, max_pixels, path)
    except DipError:
        img.close()
        raise
    return img


def _read_file(path: Path, name: str, max_pixels: int) -> _Decoded:
    if not path.exists():
        raise DipError(f"{name} file not found: {path}")
    if path.is_dir():
        raise DipError(f"{name} path is a folder, not an image file: {path}")
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            return _read_npy(path, name, max_pixels)
        if suffix in _TIFF_SUFFIXES and _tifffile() is not None:
            return _read_tiff(path, name, max_pixels)
        return _read_pil(path, name, max_pixels)
    except DipError:
        raise
    except Image.DecompressionBombError as exc:
        raise DipError(f"{name} {path} is refused as a possible decompression bomb: {exc}") from None
    except (OSError, SyntaxError, ValueError, KeyError, IndexError, EOFError) as exc:
        raise DipError(f"cannot read {name} {path}: not an image file dip can decode ({exc})") from None


def _read_pil(path: Path, name: str, max_pixels: int) -> _Decoded:
    # Image.open reads only the header: dip checks the size before decoding; Pillow's checks while decoding
    # (frames, tiles) get the same limit.
    with pillow_limit(max_pixels), _open_checked(path, name, max_pixels) as img:
        frames = getattr(img, "n_frames", 1)
        if frames > 1:
            log.warning("%s %s is an animated or multi-page %s with %d frames; only the first frame is used",
                        name, path, img.format, frames)
        fmt = img.format
        if fmt == "TIFF" and _tiff_wider_than_pillow(img):
            raise DipError(f"{name} {path} is a TIFF with {img.tag_v2.get(258)} bits per sample; "
                           "reading it needs tifffile: pip install tifffile")
        rawmode = _tile_rawmode(img)  # before getexif(), which decodes a PNG to reach chunks after the pixels
        notes = ()
        if fmt == "PNG" and rawmode in _PNG16_COLOUR[:2]:
            array = _read_png16(path, img, rawmode)
            alpha = rawmode.startswith("RGBA")
        else:
            if fmt == "PNG" and rawmode == _PNG16_COLOUR[2]:
                notes = ("the 16-bit grey+alpha PNG was decoded at 8 bits (by Pillow); save it as 16-bit grey "
                         "or RGBA to keep the precision",)
                log.warning("%s %s: %s", name, path, notes[0])
            img.load()
            array, alpha = _pil_to_array(img)
        orientation = int(img.getexif().get(0x0112, 1) or 1)
        icc, dpi = img.info.get("icc_profile"), _dpi_of(img)
    return _Decoded(array, alpha, str(path), format=fmt, icc=icc, dpi=dpi, orientation=orientation, frames=frames,
                    notes=notes)


def _tile_rawmode(img: Image.Image) -> Optional[str]:
    tile = getattr(img, "tile", None)  # only images from Image.open have one
    if not tile:
        return None
    args = tile[0].args
    return args if isinstance(args, str) else (args[0] if args else None)


def _read_png16(path: Path, img: Image.Image, rawmode: str) -> np.ndarray:
    """Decode a 16-bit colour PNG, which Pillow has no mode for.

    Pillow's "…;16B" unpacker keeps the high byte of each big-endian sample and
    its "…;16L" unpacker, fed the same bytes, keeps the low one; both consume
    the full 16 bits per sample, so the PNG row filters are undone correctly.
    Decoding twice and joining the bytes gives the exact 16-bit values.
    """
    img.load()
    high = np.asarray(img, dtype=np.uint16)
    with Image.open(path) as again:
        tile = again.tile[0]
        args = tile.args
        low_raw = rawmode.replace(";16B", ";16L")
        new_args = low_raw if isinstance(args, str) else (low_raw, *args[1:])
        again.tile = [tile._replace(args=new_args)]
        again.load()
        low = np.asarray(again, dtype=np.uint16)
    return (high << 8) | low


def _tiff_wider_than_pillow(img: Image.Image) -> bool:
    """True for colour TIFFs with more than 8 bits per sample, which Pillow would truncate."""
    bits = img.tag_v2.get(258) if hasattr(img, "tag_v2") else None
    if bits is None:
        return False
    bits = tuple(bits) if isinstance(bits, (tuple, list)) else (bits,)
    return len(bits) > 1 and max(bits) > 8


def _read_npy(path: Path, name: str, max_pixels: int) -> _Decoded:
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as exc:
        raise DipError(f"cannot read {name} {path}: not a plain numpy array file ({exc})") from None
    if arr.ndim in (2, 3):
        _check_pixels((arr.shape[1], arr.shape[0]), name, max_pixels, path)
    array = _as_hwc(np.array(arr), name)
    return _Decoded(array, array.shape[2] in (2, 4), str(path), format="NPY")


def _read_tiff(path: Path, name: str, max_pixels: int) -> _Decoded:
    tifffile = _tifffile()
    with tifffile.TiffFile(path) as tif:
        series = tif.series[0]
        axes, shape = series.axes, series.shape
        if "Y" not in axes or "X" not in axes:
            raise DipError(f"{name} {path} has axes {axes!r}; dip needs a 2-D image (Y and X axes)")
        _check_pixels((shape[axes.index("X")], shape[axes.index("Y")]), name, max_pixels, path)
        _check_tiff_shape(shape, axes, name, path, max_pixels)  # before decoding: a stack may be a bomb too
        page = tif.pages[0]
        array = series.asarray()
        tags = page.tags
        icc = tags["InterColorProfile"].value if "InterColorProfile" in tags else None
        orientation = int(tags["Orientation"].value) if "Orientation" in tags else 1
        dpi = _tiff_dpi(tags)
        alpha = "S" in axes and any(int(e) in (1, 2) for e in (page.extrasamples or ()))
        frames = len(tif.pages)
    array = _tiff_to_hwc(array, axes, name, path)
    if len(axes.replace("S", "").replace("Y", "").replace("X", "")) == 0 and frames > 1:
        log.warning("%s %s has %d pages; only the first image is used", name, path, frames)
    return _Decoded(array, alpha, str(path), format="TIFF", icc=icc, dpi=dpi, orientation=orientation, frames=frames)


def _tiff_axes(shape, axes: str, name: str, path: Path) -> tuple[list[int], str, list[str]]:
    """(axes kept, their letters, the channel axis if any): length-1 axes other than Y and X are dropped and
    what is left besides Y and X becomes the channel axis; more than one such axis is refused."""
    keep = [i for i, a in enumerate(axes) if a in "YX" or shape[i] > 1]
    axes = "".join(axes[i] for i in keep)
    others = [a for a in axes if a not in "YX"]
    if len(others) > 1:
        raise DipError(f"{name} {path} is a {len(axes)}-D TIFF (axes {axes!r}); dip restores one 2-D image "
                       "with channels: save one plane or stack the channels last")
    return keep, axes, others


def _check_tiff_shape(shape, axes: str, name: str, path: Path, max_pixels: int) -> None:
    """Refuse, from the header, a TIFF that is not one image with channels, or holds more samples than
    ``max_pixels`` pixels of four channels (RGBA) would: a compressed stack of pages expands like a bomb."""
    _tiff_axes(shape, axes, name, path)
    samples = int(np.prod([int(n) for n in shape], dtype=np.int64))
    if samples > 4 * max_pixels:
        raise DipError(f"{name} {path} holds {samples:,} samples (shape {tuple(shape)}, axes {axes!r}), more than "
                       f"{max_pixels:,} pixels of four channels; crop it or keep fewer channels, or raise max_pixels "
                       "if you trust the file")


def _tiff_to_hwc(array: np.ndarray, axes: str, name: str, path: Path) -> np.ndarray:
    keep, axes, others = _tiff_axes(array.shape, axes, name, path)
    array = array.reshape([array.shape[i] for i in keep])
    order = [axes.index("Y"), axes.index("X")] + [axes.index(a) for a in others]
    array = np.transpose(array, order)
    return array[:, :, None] if array.ndim == 2 else np.ascontiguousarray(array)


def _tiff_dpi(tags) -> Optional[tuple[float, float]]:
    if "XResolution" not in tags or "YResolution" not in tags:
        return None
    unit = int(tags["ResolutionUnit"].value) if "ResolutionUnit" in tags else 2

    def value(tag):
        v = tags[tag].value
        return v[0] / v[1] if isinstance(v, tuple) and v[1] else float(v if not isinstance(v, tuple) else v[0])

    x, y = value("XResolution"), value("YResolution")
    if unit == 3:  # per centimetre
        x, y = x * 2.54, y * 2.54
    elif unit != 2:
        return None
    return (x, y)


def _dpi_of(img: Image.Image) -> Optional[tuple[float, float]]:
    dpi = img.info.get("dpi")
    if not dpi:
        return None
    return (float(dpi[0]), float(dpi[1]))


def _tifffile():
    try:
        import tifffile
    except ImportError:
        return None
    return tifffile


def _check_pixels(size, name: str, max_pixels: int, path=None) -> None:
    w, h = size
    if w * h > max_pixels:
        where = f" {path}" if path else ""
        raise DipError(
            f"{name}{where} has {w}×{h} = {w * h:,} pixels, more than the limit of {max_pixels:,}; "
            "crop or downscale it, or raise max_pixels if you trust the file"
        )


def _pil_to_array(img: Image.Image) -> tuple[np.ndarray, bool]:
    """The samples of a decoded PIL image, H×W×C in their own dtype, and whether the last channel is alpha."""
    mode = img.mode
    if mode == "1":
        arr = np.asarray(img, dtype=bool)
    elif mode.startswith("I;16"):
        arr = np.asarray(img).astype(np.uint16)
    elif mode == "I":
        arr = np.asarray(img, dtype=np.int32)
        if img.format == "PNG":  # older Pillow opens 16-bit grey PNG as "I"
            arr = arr.astype(np.uint16)
    elif mode in ("F", "L", "LA", "RGB", "RGBA"):
        arr = np.asarray(img)
    elif mode in ("PA", "La") or (mode == "P" and "transparency" in img.info):
        arr = np.asarray(img.convert("RGBA"))
    elif mode == "RGBa":
        arr = np.asarray(img.convert("RGBA"))
    else:  # P, CMYK, YCbCr, LAB, HSV, RGBX
        arr = np.asarray(img.convert("RGB"))
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return arr, arr.shape[2] in (2, 4)


def _as_hwc(arr: np.ndarray, name: str) -> np.ndarray:
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3:
        raise DipError(f"{name} must be H×W or H×W×C, got shape {arr.shape}")
    _check_dtype(arr.dtype, name)
    return arr


def _check_dtype(dtype, name: str) -> None:
    if dtype == np.bool_ or np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating):
        return
    raise DipError(f"{name} has dtype {dtype}; use unsigned 8/16-bit integers, bool or floating point")


def _tensor_to_hwc(t: torch.Tensor, name: str) -> np.ndarray:
    t = t.detach()
    if t.device.type == "meta":
        raise DipError(f"{name} tensor is on the meta device and holds no values")
    if t.dim() == 4:
        if t.shape[0] != 1:
            raise DipError(f"{name} tensor must hold one image (1×C×H×W), got batch of {t.shape[0]}")
        t = t[0]
    if t.dim() == 2:
        t = t[None]
    if t.dim() != 3:
        raise DipError(f"{name} tensor must be C×H×W or 1×C×H×W, got shape {tuple(t.shape)}")
    if t.shape[-1] in (1, 3, 4) and min(t.shape[1], t.shape[2]) < MIN_SIDE <= t.shape[0]:
        raise DipError(f"{name} tensor of shape {tuple(t.shape)} looks like H×W×C; tensors are C×H×W "
                       "(use .permute(2, 0, 1)), and a side needs at least 4 pixels")
    if t.dtype == torch.bfloat16 or t.dtype == torch.float16:
        t = t.float()
    if t.is_complex():
        raise DipError(f"{name} tensor has dtype {t.dtype}; use float or uint8")
    return t.cpu().permute(1, 2, 0).numpy()


def orient(array: np.ndarray, orientation: int) -> np.ndarray:
    """Apply an EXIF/TIFF orientation (1–8) to an H×W×C array: the upright image, as a viewer shows it."""
    ops = {
        2: lambda a: a[:, ::-1],
        3: lambda a: a[::-1, ::-1],
        4: lambda a: a[::-1],
        5: lambda a: a.transpose(1, 0, 2),
        6: lambda a: np.rot90(a, -1),
        7: lambda a: np.rot90(a, 2).transpose(1, 0, 2),
        8: lambda a: np.rot90(a, 1),
    }
    op = ops.get(int(orientation))
    return array if op is None else np.ascontiguousarray(op(array))


def _to_loaded(decoded: _Decoded, name: str, max_pixels: int) -> LoadedImage:
    arr = decoded.array
    h, w, c = arr.shape
    if h * w == 0:
        raise DipError(f"{name} is empty (shape {arr.shape})")
    if h * w > max_pixels:
        raise DipError(f"{name} has {h}×{w} = {h * w:,} pixels, more than the limit of {max_pixels:,}; crop or downscale it")
    if min(h, w) < MIN_SIDE:
        raise DipError(f"{name} is {h}×{w}; dip needs at least {MIN_SIDE}×{MIN_SIDE} pixels")
    data = arr[:, :, :-1] if decoded.alpha else arr
    values, value_range = to_unit_range(data, name)
    notes = list(decoded.notes)
    if value_range is not None:
        notes.append(f"values in [{value_range[0]:.6g}, {value_range[1]:.6g}] were mapped to [0, 1] for the fit "
                     "and are mapped back when saved")
        log.warning("%s: %s", decoded.source, notes[-1])
    if decoded.orientation not in (1, None):
        notes.append(f"EXIF orientation {decoded.orientation} applied: the image is upright")
    if decoded.frames > 1:
        notes.append(f"only the first of {decoded.frames} frames was used")
    icc = decoded.icc
    space = _icc_colour_space(icc)
    if space is not None and space != _ICC_SPACES.get(data.shape[2], space):
        # e.g. a CMYK JPEG, decoded to RGB: its CMYK profile would make the RGB output's colours wrong
        notes.append(f"the embedded ICC profile describes {space} data, not these {data.shape[2]} channel(s) "
                     "(the image was converted on reading), so it was dropped")
        log.warning("%s: %s", decoded.source, notes[-1])
        icc = None
    alpha, alpha_range = None, None
    if decoded.alpha:
        alpha, alpha_range = _alpha_to_unit_range(arr[:, :, -1], f"{name} alpha channel")
    tensor = torch.from_numpy(np.ascontiguousarray(values.transpose(2, 0, 1))).float().clamp_(0, 1)
    meta = ImageMeta(
        dtype=str(np.dtype(arr.dtype)), channels=data.shape[2], alpha=decoded.alpha, value_range=value_range,
        alpha_range=alpha_range,
        icc_profile=icc, dpi=decoded.dpi, exif_transposed=decoded.orientation not in (1, None),
        format=decoded.format, frames=decoded.frames, notes=tuple(notes),
    )
    return LoadedImage(tensor=tensor, alpha=alpha, source=decoded.source, meta=meta)


def to_unit_range(arr: np.ndarray, name: str = "image") -> tuple[np.ndarray, Optional[tuple[float, float]]]:
    """Samples → float32 in [0, 1] and the ``(lo, hi)`` mapping used, or None for the type's natural range.

    uint8 and uint16 are divided by 255 and 65535, bool becomes 0/1, float data
    inside [0, 1] is kept; any other data (float outside [0, 1], signed or wide
    integers) is mapped by its own minimum and maximum.
    """
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0, None
    if arr.dtype == np.uint16:
        return arr.astype(np.float32) / 65535.0, None
    if arr.dtype == np.bool_:
        return arr.astype(np.float32), None
    _check_dtype(arr.dtype, name)
    values = arr.astype(np.float64)
    if values.size and not np.isfinite(values).all():
        bad = int((~np.isfinite(values)).sum())
        raise DipError(f"{name} has {bad} NaN or infinite values; replace them (or mask them out for inpainting)")
    lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 1.0)
    if np.issubdtype(arr.dtype, np.floating) and lo >= -1e-6 and hi <= 1 + 1e-6:
        return np.clip(values, 0, 1).astype(np.float32), None
    span = hi - lo if hi > lo else 1.0
    return ((values - lo) / span).astype(np.float32), (lo, lo + span)


#: The ICC colour space (header bytes 16–20) that describes data of each channel count.
_ICC_SPACES = {1: "GRAY", 3: "RGB", 4: "CMYK"}


def _icc_colour_space(icc: Optional[bytes]) -> Optional[str]:
    """The data colour space an ICC profile's header names ("RGB", "GRAY", "CMYK" …), or None if unreadable."""
    if not icc or len(icc) < 20:
        return None
    try:
        return icc[16:20].decode("ascii").strip() or None
    except UnicodeDecodeError:
        return None


def _alpha_to_unit_range(alpha: np.ndarray, name: str) -> tuple[np.ndarray, Optional[tuple[float, float]]]:
    """An H×W alpha plane → float32 in [0, 1] and its ``(lo, hi)`` scale, or None for the type's natural range.

    Unlike data, alpha is not stretched by its own minimum: 0 must stay transparent and a constant
    opaque plane opaque, so a type without a natural range is read as a fraction of its maximum.
    """
    if alpha.dtype in (np.uint8, np.uint16, np.bool_):
        return np.ascontiguousarray(to_unit_range(alpha, name)[0]), None
    values, _ = to_unit_range(alpha[:, :, None], name)  # the type and finiteness checks
    a = alpha.astype(np.float64)
    lo, hi = min(0.0, float(a.min())), float(a.max())
    if np.issubdtype(alpha.dtype, np.floating) and lo >= -1e-6 and hi <= 1 + 1e-6:
        return np.ascontiguousarray(values[:, :, 0]), None
    hi = hi if hi > lo else lo + 1.0
    return np.ascontiguousarray(((a - lo) / (hi - lo)).astype(np.float32)), (lo, hi)


# ----------------------------------------------------------------------------------------------- writing


def to_uint8(image: np.ndarray) -> np.ndarray:
    """Float image in [0, 1] → uint8 (rounded)."""
    return (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def to_pil(image: np.ndarray) -> Image.Image:
    """An H×W×C float image in [0, 1] (C = 1, 2, 3 or 4) as a PIL image (8 bits per channel)."""
    arr = to_uint8(image)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    return Image.fromarray(arr)


def check_folder(path: Union[str, os.PathLike]) -> Path:
    """Raise a clear error unless the folder that would hold ``path`` exists and is writable; returns the folder."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise DipError(f"cannot write {path}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise DipError(f"cannot write {path}: folder {folder} is not writable")
    if path.is_dir():
        raise DipError(f"cannot write {path}: it is a folder; name a file")
    return folder


def output_format(path: Union[str, os.PathLike]) -> str:
    """The image format an output path's extension names (``"PNG"``, ``"TIFF"``, ``"NPY"``, ...)."""
    suffix = Path(path).suffix.lower()
    if suffix == ".npy":
        return "NPY"
    fmt = Image.registered_extensions().get(suffix)
    if fmt is None:
        raise DipError(f"cannot tell the image format of {path}: use an extension such as .png, .jpg, .tif or .npy")
    return fmt


def _target_dtype(fmt: str, meta: ImageMeta) -> str:
    """The sample type a file of format ``fmt`` gets for an image described by ``meta``."""
    if fmt in ("TIFF", "NPY"):
        return "uint8" if meta.dtype == "bool" else meta.dtype
    if fmt == "PNG" and (meta.dtype == "uint16" or np.issubdtype(np.dtype(meta.dtype), np.floating)):
        return "uint16"
    return "uint8"


def check_output_format(path: Union[str, os.PathLike], meta: Optional[ImageMeta] = None) -> str:
    """Refuse, with one line saying what to use instead, a result the format of ``path`` cannot hold.

    Call it before a fit with the input's :class:`ImageMeta`. Refused: 16-bit
    data in an 8-bit format (JPEG, BMP, ...), alpha in a format without it
    (JPEG, BMP, GIF), other than 1 or 3 data channels outside TIFF/.npy, and
    data mapped from a range other than [0, 1] in a format that holds only
    integers. Float data in [0, 1] is written at the format's depth (16-bit PNG).
    Returns the format name.
    """
    fmt = output_format(path)
    if meta is None:
        return fmt
    if meta.value_range is not None and fmt not in ("TIFF", "NPY"):
        lo, hi = meta.value_range
        raise DipError(f"cannot write {path}: the image's values span [{lo:.6g}, {hi:.6g}], which {fmt} cannot "
                       "hold; save as .tif or .npy to keep them")
    if fmt not in _ANY_CHANNELS and meta.channels not in (1, 3):
        raise DipError(f"cannot write {path}: {fmt} holds grey or RGB images, not {meta.channels} channels; "
                       "save as .tif or .npy")
    if meta.alpha and fmt not in _ALPHA:
        raise DipError(f"cannot write {path}: {fmt} cannot store the alpha channel; save as .png or .tif instead")
    target = _target_dtype(fmt, meta)
    if meta.dtype == "uint16" and target != "uint16":
        raise DipError(f"cannot write {path}: the input is 16-bit and {fmt} holds 8 bits per channel; "
                       "save as .png or .tif to keep 16 bits")
    if fmt == "TIFF" and _tifffile() is None and not _pillow_tiff_can_hold(target, meta.channels, meta.alpha):
        raise DipError(f"cannot write {path}: a {target} TIFF with {meta.channels} channel(s) needs tifffile "
                       "(pip install tifffile); or save as .npy")
    return fmt


def _pillow_tiff_can_hold(dtype: str, channels: int, alpha: bool) -> bool:
    if dtype == "uint8":
        return channels in (1, 3)
    return dtype in ("uint16", "float32") and channels == 1 and not alpha


def check_output_path(path: Union[str, os.PathLike], meta: Optional[ImageMeta] = None) -> Path:
    """Check, before any work, that an image can be written to ``path`` (folder, format, what the format
    can hold when ``meta`` is given); returns it as a Path."""
    path = Path(path)
    check_output_format(path, meta)
    check_folder(path)
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_image(image: np.ndarray, path: Union[str, os.PathLike], *, meta: Optional[ImageMeta] = None,
               jpeg_quality: int = JPEG_QUALITY) -> Path:
    """Write an H×W×C float image in [0, 1] to ``path`` atomically, in the format its extension names.

    With ``meta`` (the input's :class:`ImageMeta`, e.g. ``load_image(...).meta``)
    the file keeps the input's depth (16-bit, float), value range, ICC profile
    and DPI where the format can hold them; ``image`` then has
    ``meta.channels`` channels, plus the alpha channel last when ``meta.alpha``.
    Without it: 8-bit (float32 for .npy), and 2 or 4 channels mean alpha last.
    ``jpeg_quality``: 1–100 (default 95).
    """
    path = Path(path)
    if isinstance(jpeg_quality, bool) or not isinstance(jpeg_quality, (int, np.integer)) or not 1 <= jpeg_quality <= 100:
        raise DipError(f"JPEG quality must be an integer from 1 to 100, got {jpeg_quality!r}")
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3:
        raise DipError(f"save_image needs an H×W×C array, got shape {image.shape}")
    meta = _meta_for(image, meta, output_format(path))
    fmt = check_output_format(path, meta)
    check_folder(path)
    native = _from_unit_range(image, _target_dtype(fmt, meta), meta)
    icc = meta.icc_profile if fmt in _ICC else None
    dpi = meta.dpi if fmt in _DPI else None
    if fmt == "NPY":
        writer = lambda tmp: np.save(tmp, native[:, :, 0] if native.shape[2] == 1 else native)
    elif fmt == "TIFF" and _tifffile() is not None:
        writer = lambda tmp: _write_tiff(tmp, native, meta.alpha, icc, dpi)
    elif fmt == "PNG" and native.dtype == np.uint16 and native.shape[2] > 1:
        writer = lambda tmp: _write_png16(tmp, native, icc, dpi)
    else:
        pil = _native_to_pil(native)
        options = {"icc_profile": icc, "dpi": dpi}
        if fmt == "JPEG":
            options["quality"] = int(jpeg_quality)
        options = {k: v for k, v in options.items() if v is not None}
        writer = lambda tmp: pil.save(tmp, format=fmt, **options)
    return atomic_write(path, writer)


def _meta_for(image: np.ndarray, meta: Optional[ImageMeta], fmt: str) -> ImageMeta:
    """The record that describes ``image`` as it will be written (channels and alpha from its shape)."""
    c = image.shape[2]
    if meta is None:
        alpha = c in (2, 4)
        return ImageMeta(dtype="float32" if fmt == "NPY" else "uint8", channels=c - alpha, alpha=alpha)
    alpha = meta.alpha and c == meta.channels + 1
    return dataclasses.replace(meta, channels=c - alpha, alpha=alpha)


def _from_unit_range(image: np.ndarray, dtype: str, meta: ImageMeta) -> np.ndarray:
    x = np.clip(np.asarray(image, dtype=np.float64), 0.0, 1.0)
    dt = np.dtype(dtype)
    if not meta.alpha:
        return _samples(x, dt, meta.value_range)
    # The alpha channel has its own scale, restored only where the file keeps the source's type.
    alpha_range = meta.alpha_range if dt == np.dtype(meta.dtype) else None
    return np.concatenate([_samples(x[:, :, :-1], dt, meta.value_range), _samples(x[:, :, -1:], dt, alpha_range)],
                          axis=2)


def _samples(x: np.ndarray, dt: np.dtype, value_range: Optional[tuple[float, float]]) -> np.ndarray:
    """Values in [0, 1] as samples of type ``dt``: mapped to ``value_range``, else to the type's full range."""
    if value_range is not None:
        lo, hi = value_range
        data = x * (hi - lo) + lo
        if np.issubdtype(dt, np.integer):
            info = np.iinfo(dt)
            data = np.clip(np.rint(data), info.min, info.max)
        return data.astype(dt)
    if np.issubdtype(dt, np.floating):
        return x.astype(dt)
    return (x > 0.5) if dt == np.bool_ else np.rint(x * np.iinfo(dt).max).astype(dt)


def _native_to_pil(native: np.ndarray) -> Image.Image:
    # fromarray picks the mode from the dtype: uint8 → L/LA/RGB/RGBA, uint16 → I;16, float32 → F.
    if native.shape[2] == 1:
        plane = native[:, :, 0]
        return Image.fromarray(plane.astype(np.float32) if plane.dtype.kind == "f" else plane)
    return Image.fromarray(native.astype(np.uint8))


def _write_tiff(tmp: str, native: np.ndarray, alpha: bool, icc: Optional[bytes], dpi) -> None:
    tifffile = _tifffile()
    c = native.shape[2]
    data = native[:, :, 0] if c == 1 else native
    options = dict(photometric="rgb" if c - alpha == 3 else "minisblack")
    if c > 1:
        options["planarconfig"] = "contig"
    if alpha:
        options["extrasamples"] = ["unassalpha"]
    if icc:
        options["iccprofile"] = icc
    if dpi:
        options.update(resolution=(float(dpi[0]), float(dpi[1])), resolutionunit="INCH")
    tifffile.imwrite(tmp, data, **options)


def _write_png16(tmp: str, native: np.ndarray, icc: Optional[bytes], dpi) -> None:
    """A 16-bit grey+alpha, RGB or RGBA PNG (Pillow writes only 16-bit grey)."""
    h, w, c = native.shape
    colour_type = {2: 4, 3: 2, 4: 6}[c]
    rows = native.astype(">u2").reshape(h, w * c).view(np.uint8)
    filtered = np.empty((h, 1 + rows.shape[1]), np.uint8)
    filtered[:, 0] = 2  # PNG filter "Up": each row minus the row above
    filtered[0, 1:] = rows[0]
    filtered[1:, 1:] = rows[1:] - rows[:-1]  # uint8 arithmetic wraps modulo 256, as the filter wants

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    parts = [b"\x89PNG\r\n\x1a\n", chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, colour_type, 0, 0, 0))]
    if icc:
        parts.append(chunk(b"iCCP", b"ICC profile\x00\x00" + zlib.compress(icc)))
    if dpi:
        per_metre = [int(round(d / 0.0254)) for d in dpi]
        parts.append(chunk(b"pHYs", struct.pack(">IIB", per_metre[0], per_metre[1], 1)))
    parts += [chunk(b"IDAT", zlib.compress(filtered.tobytes(), 6)), chunk(b"IEND", b"")]
    with open(tmp, "wb") as f:
        f.write(b"".join(parts))


# ----------------------------------------------------------------------------------------------- atomic writes


def _temporary_pattern(path: Path) -> str:
    return f".{glob.escape(path.name)}.*.tmp{glob.escape(path.suffix)}"


def remove_stale_temporaries(path: Union[str, os.PathLike]) -> list[Path]:
    """Remove temporaries of :func:`atomic_write` for ``path`` left by a writer that was killed.

    A temporary is ``.<name>.<pid>.<random>.tmp<suffix>`` beside the target; it
    is stale when its process is gone (same machine) or it is older than
    :data:`STALE_AFTER_S`. Returns the files removed.
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    removed = []
    now = time.time()
    prefix_len = len(path.name) + 2
    for tmp in folder.glob(_temporary_pattern(path)):
        middle = tmp.name[prefix_len:].split(".", 1)[0]
        try:
            old = now - tmp.stat().st_mtime > STALE_AFTER_S
        except OSError:
            continue
        pid = int(middle) if middle.isdigit() else None
        if old or (pid is not None and pid != os.getpid() and not _process_alive(pid)):
            try:
                tmp.unlink()
                removed.append(tmp)
            except OSError:
                pass
    return removed


def _process_alive(pid: int) -> bool:
    if os.name == "nt":  # os.kill would terminate the process there; rely on the age alone
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def atomic_write(path: Union[str, os.PathLike], write) -> Path:
    """Call ``write(tmp_path)`` then rename the temporary file over ``path``.

    Stale temporaries of earlier, killed writes to the same ``path`` are removed first.
    """
    path = Path(path)
    folder = check_folder(path)
    remove_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp" + path.suffix, dir=folder)
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


def __getattr__(name: str):
    # The mask readers live in dip.masks (which imports this module); keep the old names importable from here.
    if name in ("load_mask", "resolve_mask", "mask_from_alpha", "mask_from_color"):
        from dip import masks

        return getattr(masks, name)
    raise AttributeError(f"module 'dip.io' has no attribute {name!r}")
