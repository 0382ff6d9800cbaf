"""Image I/O: what goes in comes back as rich as it was; masks; atomic writes; packaging metadata."""
from __future__ import annotations

import logging
import os
import struct
import time
import zlib

import numpy as np
import pytest
import torch
from PIL import Image, ImageCms, ImageOps

import dip
import dip.io as dio
from dip.errors import DipError
from dip.io import ImageMeta, check_output_format, load_image, save_image
from dip.masks import load_mask, mask_from_alpha, mask_from_color, resolve_mask


def _ramp(h, w, c, dtype=np.uint16, seed=0):
    rng = np.random.default_rng(seed)
    top = np.iinfo(dtype).max
    return rng.integers(0, top + 1, size=(h, w, c), dtype=np.int64).astype(dtype)


def _png16(path, arr):
    """A 16-bit PNG written independently of dip, cycling through all five row filters (so the reader must undo each)."""
    h, w, c = arr.shape
    rows = arr.astype(">u2").reshape(h, w * c).view(np.uint8).astype(np.int64)
    bpp = 2 * c
    out = []
    for y in range(h):
        kind = y % 5
        x = rows[y]
        up = rows[y - 1] if y else np.zeros_like(x)
        left = np.concatenate([np.zeros(bpp, np.int64), x[:-bpp]])
        upleft = np.concatenate([np.zeros(bpp, np.int64), up[:-bpp]])
        if kind == 0:
            pred = 0
        elif kind == 1:
            pred = left
        elif kind == 2:
            pred = up
        elif kind == 3:
            pred = (left + up) // 2
        else:
            p = left + up - upleft
            pa, pb, pc = abs(p - left), abs(p - up), abs(p - upleft)
            pred = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, up, upleft))
        out.append(bytes([kind]) + ((x - pred) % 256).astype(np.uint8).tobytes())

    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)

    ctype = {1: 0, 2: 4, 3: 2, 4: 6}[c]
    data = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, ctype, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"".join(out))) + chunk(b"IEND", b""))
    path.write_bytes(data)
    return path


def _png_bit_depth(path):
    return path.read_bytes()[24]  # IHDR: 8 signature + 8 chunk header + width 4 + height 4 → bit depth


def _hwc(loaded):
    image = loaded.tensor.permute(1, 2, 0).numpy()
    if loaded.alpha is not None:
        image = np.concatenate([image, loaded.alpha[:, :, None]], axis=2)
    return image


# --------------------------------------------------------------------------------------------- bit depth


@pytest.mark.parametrize("channels", [3, 4])
def test_16bit_colour_png_round_trip_is_exact(tmp_path, channels):
    src = _ramp(19, 23, channels)
    loaded = load_image(_png16(tmp_path / "in.png", src))
    assert loaded.meta.dtype == "uint16" and loaded.meta.alpha == (channels == 4)
    assert np.array_equal(np.rint(_hwc(loaded) * 65535).astype(np.uint16), src)
    out = save_image(_hwc(loaded), tmp_path / "out.png", meta=loaded.meta)
    assert _png_bit_depth(out) == 16
    again = load_image(out)
    assert again.meta.dtype == "uint16"
    assert np.array_equal(np.rint(_hwc(again) * 65535).astype(np.uint16), src)


@pytest.mark.parametrize("channels", [3, 4])
def test_16bit_colour_pil_image_from_a_file_keeps_16_bits(tmp_path, channels):
    # Regression: Image.open of a 16-bit RGB(A) PNG gives Pillow's 8-bit samples, which were used silently;
    # an unchanged image opened from a path is now read from its file (before or after Pillow decoded it).
    src = _ramp(9, 11, channels)
    path = _png16(tmp_path / "in.png", src)
    with Image.open(path) as img:
        loaded = load_image(img)
    assert loaded.meta.dtype == "uint16" and loaded.meta.notes == ()
    assert np.array_equal(np.rint(_hwc(loaded) * 65535).astype(np.uint16), src)
    with Image.open(path) as img:
        img.load()
        assert load_image(img).meta.dtype == "uint16"
    tifffile = pytest.importorskip("tifffile")
    tifffile.imwrite(tmp_path / "in.tif", src[:, :, :3], photometric="rgb")
    with Image.open(tmp_path / "in.tif") as img:
        assert load_image(img).meta.dtype == "uint16"


def test_16bit_pil_image_that_cannot_be_read_exactly_says_so(tmp_path, caplog):
    # A changed image, or one opened from a file object, is used as Pillow decoded it, with a warning and a note.
    import io

    path = _png16(tmp_path / "in.png", _ramp(9, 11, 3))
    with Image.open(path) as img:
        img.load()
        img.putpixel((0, 0), (1, 2, 3))
        with caplog.at_level(logging.WARNING, logger="dip"):
            loaded = load_image(img)
    assert loaded.meta.dtype == "uint8" and "no longer matches" in loaded.meta.notes[0]
    assert "pass the file path" in caplog.text
    with Image.open(io.BytesIO(path.read_bytes())) as img:
        result = dip.restore(img, iterations=2, network="small", device="cpu", progress=False)
    assert "at 8 bits" in result.meta.notes[0] and "pass the file path" in result.meta.notes[0]


def test_16bit_grey_png_round_trip_is_exact(tmp_path):
    src = _ramp(17, 21, 1)[:, :, 0]
    Image.fromarray(src).save(tmp_path / "in.png")
    loaded = load_image(tmp_path / "in.png")
    assert loaded.meta.dtype == "uint16" and loaded.meta.channels == 1
    out = save_image(_hwc(loaded), tmp_path / "out.png", meta=loaded.meta)
    with Image.open(out) as img:
        assert img.mode.startswith("I")
        assert np.array_equal(np.asarray(img).astype(np.uint16), src)


def test_8bit_png_stays_8bit(tmp_path):
    src = _ramp(9, 11, 3, np.uint8)
    Image.fromarray(src).save(tmp_path / "in.png")
    loaded = load_image(tmp_path / "in.png")
    out = save_image(_hwc(loaded), tmp_path / "out.png", meta=loaded.meta)
    assert _png_bit_depth(out) == 8
    assert np.array_equal(np.asarray(Image.open(out)), src)


@pytest.mark.parametrize("channels", [1, 3])
def test_float_tiff_round_trip(tmp_path, channels):
    tifffile = pytest.importorskip("tifffile")
    src = np.random.default_rng(2).random((13, 15, channels)).astype(np.float32)
    tifffile.imwrite(tmp_path / "in.tif", src[:, :, 0] if channels == 1 else src,
                     photometric="minisblack" if channels == 1 else "rgb")
    loaded = load_image(tmp_path / "in.tif")
    assert loaded.meta.dtype == "float32" and loaded.meta.value_range is None
    out = save_image(_hwc(loaded), tmp_path / "out.tif", meta=loaded.meta)
    back = tifffile.imread(out)
    assert back.dtype == np.float32
    assert np.array_equal(back.reshape(src.shape), src)


def test_float_grey_tiff_without_tifffile_uses_pillow(tmp_path, monkeypatch):
    monkeypatch.setattr(dio, "_tifffile", lambda: None)
    src = np.random.default_rng(3).random((12, 10)).astype(np.float32)
    Image.fromarray(src).save(tmp_path / "in.tif")
    loaded = load_image(tmp_path / "in.tif")
    assert loaded.meta.dtype == "float32"
    out = save_image(_hwc(loaded), tmp_path / "out.tif", meta=loaded.meta)
    assert np.array_equal(np.asarray(Image.open(out)), src)
    with pytest.raises(DipError, match="needs tifffile"):
        check_output_format(tmp_path / "x.tif", ImageMeta(dtype="uint16", channels=3))


def test_16bit_tiff_round_trip(tmp_path):
    tifffile = pytest.importorskip("tifffile")
    src = _ramp(11, 14, 3)
    tifffile.imwrite(tmp_path / "in.tif", src, photometric="rgb")
    loaded = load_image(tmp_path / "in.tif")
    assert loaded.meta.dtype == "uint16"
    out = save_image(_hwc(loaded), tmp_path / "out.tif", meta=loaded.meta)
    assert np.array_equal(tifffile.imread(out), src)


def test_npy_keeps_float(tmp_path):
    src = np.random.default_rng(4).random((10, 12, 3)).astype(np.float32)
    np.save(tmp_path / "in.npy", src)
    loaded = load_image(tmp_path / "in.npy")
    assert loaded.meta.dtype == "float32" and loaded.meta.format == "NPY"
    out = save_image(_hwc(loaded), tmp_path / "out.npy", meta=loaded.meta)
    assert np.array_equal(np.load(out), src)


# --------------------------------------------------------------------------------------------- refusals


def test_16bit_into_jpeg_is_refused_before_any_work(tmp_path):
    meta = ImageMeta(dtype="uint16", channels=3)
    with pytest.raises(DipError, match=r"16-bit .* JPEG .* \.png or \.tif"):
        check_output_format(tmp_path / "out.jpg", meta)
    assert check_output_format(tmp_path / "out.png", meta) == "PNG"


def test_alpha_into_jpeg_is_refused(tmp_path):
    with pytest.raises(DipError, match="alpha channel; save as .png"):
        check_output_format(tmp_path / "out.jpg", ImageMeta(channels=3, alpha=True))
    with pytest.raises(DipError, match="alpha"):
        save_image(np.zeros((8, 8, 4), np.float32), tmp_path / "out.jpg")
    assert not (tmp_path / "out.jpg").exists()


def test_output_path_errors(tmp_path):
    with pytest.raises(DipError, match="cannot tell the image format"):
        dio.check_output_path(tmp_path / "out.xyz")
    (tmp_path / "dir.png").mkdir()
    with pytest.raises(DipError, match="is a folder"):
        dio.check_output_path(tmp_path / "dir.png")


def test_jpeg_quality_is_a_choice_and_defaults_to_95(tmp_path):
    img = np.random.default_rng(5).random((32, 32, 3)).astype(np.float32)
    low = save_image(img, tmp_path / "q50.jpg", jpeg_quality=50)
    default = save_image(img, tmp_path / "default.jpg")
    q95 = save_image(img, tmp_path / "q95.jpg", jpeg_quality=95)
    assert default.read_bytes() == q95.read_bytes()
    assert low.stat().st_size < default.stat().st_size
    for bad in (0, 101, 9.5, True):
        with pytest.raises(DipError, match="JPEG quality"):
            save_image(img, tmp_path / "bad.jpg", jpeg_quality=bad)


# --------------------------------------------------------------------------------------------- orientation, ICC, DPI


def _exif(orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orient_matches_pillow_exif_transpose(orientation):
    arr = np.arange(5 * 7 * 3, dtype=np.uint8).reshape(5, 7, 3)
    img = Image.fromarray(arr)
    img.info["exif"] = _exif(orientation).tobytes()
    img.getexif()[0x0112] = orientation
    expected = np.asarray(ImageOps.exif_transpose(img))
    assert np.array_equal(dio.orient(arr, orientation), expected)


def test_exif_rotated_jpeg_comes_upright(tmp_path):
    upright = np.zeros((40, 24, 3), np.uint8)  # tall; the top quarter is bright
    upright[:10] = 255
    stored = np.rot90(upright, 1)  # a camera held sideways stores it rotated and says "rotate 90° CW" (6)
    Image.fromarray(np.ascontiguousarray(stored)).save(tmp_path / "phone.jpg", exif=_exif(6), quality=95)
    loaded = load_image(tmp_path / "phone.jpg")
    assert loaded.size == (40, 24)
    assert loaded.meta.exif_transposed
    top, bottom = loaded.tensor[:, :8].mean(), loaded.tensor[:, -8:].mean()
    assert top > 0.9 and bottom < 0.1


def test_exif_orientation_of_a_pil_image_is_applied(tmp_path):
    stored = np.zeros((6, 10, 3), np.uint8)
    Image.fromarray(stored).save(tmp_path / "side.jpg", exif=_exif(8))
    with Image.open(tmp_path / "side.jpg") as img:
        assert load_image(img).size == (10, 6)


def test_icc_profile_and_dpi_are_kept(tmp_path):
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    src = _ramp(12, 16, 3, np.uint8)
    Image.fromarray(src).save(tmp_path / "in.png", icc_profile=icc, dpi=(300, 300))
    loaded = load_image(tmp_path / "in.png")
    assert loaded.meta.icc_profile == icc and loaded.meta.dpi == pytest.approx((300, 300), abs=0.1)
    for name in ("out.png", "out.jpg", "out.tif"):
        out = save_image(_hwc(loaded), tmp_path / name, meta=loaded.meta)
        again = load_image(out).meta
        assert again.icc_profile == icc, name
        assert again.dpi == pytest.approx((300, 300), abs=0.1), name


def test_cmyk_profile_is_not_attached_to_the_rgb_result(tmp_path, caplog):
    # A CMYK JPEG is decoded to RGB; its CMYK profile, written into the RGB output, made its colours wrong.
    header = bytearray(128)
    header[0:4], header[12:16], header[16:20] = struct.pack(">I", 132), b"prtr", b"CMYK"
    header[20:24], header[36:40] = b"Lab ", b"acsp"
    cmyk_profile = bytes(header) + bytes(4)
    Image.fromarray(_ramp(8, 10, 4, np.uint8), "CMYK").save(tmp_path / "in.jpg", icc_profile=cmyk_profile)
    with caplog.at_level(logging.WARNING, logger="dip"):
        loaded = load_image(tmp_path / "in.jpg")
    assert loaded.meta.channels == 3 and loaded.meta.icc_profile is None
    assert "CMYK" in caplog.text and any("ICC" in note for note in loaded.meta.notes)
    for name in ("out.png", "out.jpg", "out.tif"):
        with Image.open(save_image(_hwc(loaded), tmp_path / name, meta=loaded.meta)) as out:
            assert out.mode == "RGB" and "icc_profile" not in out.info, name
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    Image.fromarray(_ramp(8, 10, 1, np.uint8)[:, :, 0]).save(tmp_path / "g.png", icc_profile=srgb)
    assert load_image(tmp_path / "g.png").meta.icc_profile is None  # an RGB profile on grey data
    Image.fromarray(_ramp(8, 10, 3, np.uint8)).save(tmp_path / "c.png", icc_profile=srgb)
    assert load_image(tmp_path / "c.png").meta.icc_profile == srgb


def test_icc_and_dpi_kept_in_16bit_png(tmp_path):
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    meta = ImageMeta(dtype="uint16", channels=3, icc_profile=icc, dpi=(150.0, 150.0))
    out = save_image(np.random.default_rng(6).random((8, 9, 3)), tmp_path / "o.png", meta=meta)
    again = load_image(out).meta
    assert again.icc_profile == icc and again.dpi == pytest.approx((150, 150), abs=0.1)


def test_resized_meta_scales_dpi():
    assert ImageMeta(dpi=(72.0, 96.0)).resized(4).dpi == (288.0, 384.0)


# --------------------------------------------------------------------------------------------- scientific data


def test_more_than_four_channels_from_npy_and_tiff(tmp_path):
    src = np.random.default_rng(7).random((9, 11, 6)).astype(np.float32)
    np.save(tmp_path / "stack.npy", src)
    loaded = load_image(tmp_path / "stack.npy")
    assert loaded.tensor.shape == (6, 9, 11) and loaded.alpha is None and loaded.meta.channels == 6
    assert np.array_equal(np.load(save_image(_hwc(loaded), tmp_path / "o.npy", meta=loaded.meta)), src)
    with pytest.raises(DipError, match="6 channels; save as .tif or .npy"):
        check_output_format(tmp_path / "o.png", loaded.meta)
    tifffile = pytest.importorskip("tifffile")
    out = save_image(_hwc(loaded), tmp_path / "o.tif", meta=loaded.meta)
    assert np.array_equal(tifffile.imread(out), src)
    assert load_image(out).tensor.shape == (6, 9, 11)


def test_restore_fits_a_five_channel_stack():
    stack = np.random.default_rng(8).random((24, 20, 5)).astype(np.float32)
    result = dip.restore(stack, "denoise", network="small", iterations=2, progress=False)
    assert result.image.shape == (24, 20, 5)


def test_float_outside_unit_range_is_mapped_and_mapped_back(tmp_path, caplog):
    src = (np.random.default_rng(9).random((10, 12, 1)) * 503 - 3).astype(np.float32)
    np.save(tmp_path / "in.npy", src)
    with caplog.at_level(logging.WARNING, logger="dip"):
        loaded = load_image(tmp_path / "in.npy")
    lo, hi = loaded.meta.value_range
    assert lo == pytest.approx(src.min()) and hi == pytest.approx(src.max())
    assert float(loaded.tensor.min()) == 0.0 and float(loaded.tensor.max()) == pytest.approx(1.0)
    assert "mapped to [0, 1]" in caplog.text and loaded.meta.notes
    back = np.load(save_image(_hwc(loaded), tmp_path / "out.npy", meta=loaded.meta))
    assert back.dtype == np.float32
    np.testing.assert_allclose(back, src[:, :, 0], rtol=0, atol=1e-4)
    with pytest.raises(DipError, match=r"values span .* save as .tif or .npy"):
        check_output_format(tmp_path / "out.png", loaded.meta)


def test_signed_integer_data_maps_back_to_its_type(tmp_path):
    src = np.random.default_rng(10).integers(-500, 3000, size=(8, 9)).astype(np.int16)
    np.save(tmp_path / "in.npy", src)
    loaded = load_image(tmp_path / "in.npy")
    back = np.load(save_image(_hwc(loaded), tmp_path / "out.npy", meta=loaded.meta))
    assert back.dtype == np.int16 and np.array_equal(back, src)


@pytest.mark.parametrize("dtype", [np.int64, np.float64])
def test_alpha_of_a_0_255_array_keeps_its_meaning_and_its_units(tmp_path, dtype):
    # np.asarray(rgba_image).astype(int or float): an opaque plane was stretched by its own (empty) range to 0
    # (fully transparent), and the alpha was written back as a fraction (floats) or the type's maximum (ints).
    opaque = np.random.default_rng(11).integers(0, 256, size=(8, 9, 4)).astype(dtype)
    opaque[..., 3] = 255
    loaded = load_image(opaque)
    assert loaded.alpha.min() == 1.0
    holes = opaque.copy()
    holes[0, :3, 3], holes[1, 0, 3] = 0, 128
    loaded = load_image(holes)
    assert loaded.alpha[1, 0] == pytest.approx(128 / 255) and loaded.alpha[0, :3].max() == 0.0
    assert int((mask_from_alpha(holes) == 0).sum()) == 3
    back = np.load(save_image(_hwc(loaded), tmp_path / "out.npy", meta=loaded.meta))
    assert back.dtype == dtype
    np.testing.assert_allclose(back, holes, rtol=0, atol=1e-3)


# --------------------------------------------------------------------------------------------- bad input (moved from test_restore)


def test_not_an_image_file(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_text("this is not a png")
    with pytest.raises(DipError, match="not an image file"):
        dip.restore(bad, progress=False)


@pytest.mark.parametrize("arr,msg", [
    (np.zeros((0, 5, 3), np.float32), "empty"),
    (np.zeros((1, 1), np.float32), "at least"),
    (np.zeros((3, 40), np.float32), "at least"),
    (np.zeros((8, 8), np.complex64), "dtype"),
    (np.zeros((2, 8, 8, 3), np.float32), "H×W or H×W×C"),
])
def test_bad_arrays(arr, msg):
    with pytest.raises(DipError, match=msg):
        dip.restore(arr, progress=False)


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_non_finite_values(value):
    img = np.random.default_rng(0).random((16, 16, 3)).astype(np.float32)
    img[3, 4, 1] = value
    with pytest.raises(DipError, match="NaN or infinite"):
        load_image(img)


def test_bad_tensor_shapes():
    with pytest.raises(DipError, match="one image"):
        load_image(torch.rand(2, 3, 16, 16))
    with pytest.raises(DipError, match="looks like H×W×C"):
        load_image(torch.rand(16, 16, 3))


def test_truncated_pil_image_is_a_dip_error(tmp_path):
    # Regression: Pillow decodes lazily, so a truncated file passed as Image.open(...) escaped as a bare OSError.
    Image.fromarray(_ramp(16, 16, 3, np.uint8)).save(tmp_path / "in.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "in.png").read_bytes()[:300])
    with Image.open(tmp_path / "cut.png") as img, pytest.raises(DipError, match="cannot be decoded .*truncated"):
        load_image(img)


def test_decompression_bomb_is_refused_before_decoding(tmp_path):
    path = tmp_path / "big.png"
    Image.new("L", (3000, 3000)).save(path)
    with pytest.raises(DipError, match="more than the limit"):
        dip.load_image(path, max_pixels=1_000_000)


def _png_header_only(path, width, height):
    """A PNG whose IHDR claims ``width``×``height`` pixels but holds next to no data: cheap to refuse, never decoded."""
    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))
    return path


def test_dips_pixel_limit_applies_not_pillows(tmp_path, monkeypatch):
    # Regression: Pillow's own decompression-bomb check in Image.open (an error above 2 × Image.MAX_IMAGE_PIXELS,
    # a warning above it) ran before dip's, so max_pixels above Pillow's limit could not be honoured, and a bomb
    # was refused in Pillow's words. Pillow's limit is made small here rather than the image large.
    import warnings

    path = tmp_path / "in.png"
    Image.fromarray(_ramp(30, 30, 3, np.uint8)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 400)  # Pillow: warns above 400 px, refuses above 800
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nor Pillow's DecompressionBombWarning
        assert load_image(path, max_pixels=1000).size == (30, 30)
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # the user opened it under their own limit
        with Image.open(_png16(tmp_path / "in16.png", _ramp(30, 30, 3))) as img:
            monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 400)
            assert load_image(img, max_pixels=1000).meta.dtype == "uint16"  # the exact re-read of its file too
    assert Image.MAX_IMAGE_PIXELS == 400  # left as it was, for other code
    with pytest.raises(DipError, match="more than the limit of 100; crop or downscale"):
        load_image(path, max_pixels=100)
    monkeypatch.undo()
    bomb = _png_header_only(tmp_path / "bomb.png", 100_000, 100_000)
    with pytest.raises(DipError, match=r"100000×100000 = 10,000,000,000 pixels, more than the limit of 64,000,000"):
        load_image(bomb)


def test_tiff_stack_is_refused_before_its_pages_are_decoded(tmp_path, monkeypatch):
    # Regression: only Y × X was checked, so a compressed stack of many pages (each under the pixel limit)
    # was decoded whole, as one channel per page, and a 4-D TIFF was decoded before being refused.
    tifffile = pytest.importorskip("tifffile")
    tifffile.imwrite(tmp_path / "pages.tif", np.zeros((50, 8, 8), np.uint8), compression="zlib")
    tifffile.imwrite(tmp_path / "4d.tif", np.zeros((2, 3, 5, 8, 8), np.uint8))
    tifffile.imwrite(tmp_path / "rgba.tif", np.zeros((8, 8, 4), np.uint8), photometric="rgb",
                     extrasamples=["unassalpha"])

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded before the checks")

    monkeypatch.setattr(tifffile.TiffPageSeries, "asarray", no_decoding)
    with pytest.raises(DipError, match=r"holds 3,200 samples .* more than 64 pixels of four channels"):
        load_image(tmp_path / "pages.tif", max_pixels=64)
    with pytest.raises(DipError, match="5-D TIFF"):
        load_image(tmp_path / "4d.tif")
    monkeypatch.undo()
    assert load_image(tmp_path / "rgba.tif", max_pixels=64).meta.alpha  # four channels at the limit still read
    assert load_image(tmp_path / "pages.tif", max_pixels=800).tensor.shape == (50, 8, 8)


def test_animated_gif_warns_that_the_first_frame_is_used(tmp_path, caplog):
    frames = [Image.new("RGB", (16, 12), c) for c in ("red", "blue", "green")]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=50)
    with caplog.at_level(logging.WARNING, logger="dip"):
        loaded = load_image(tmp_path / "anim.gif")
    assert "only the first frame is used" in caplog.text
    assert loaded.meta.frames == 3
    assert loaded.tensor[0].mean() > 0.9 and loaded.tensor[2].mean() < 0.1  # red


def test_still_gif_does_not_warn(tmp_path, caplog):
    Image.new("RGB", (16, 12), "red").save(tmp_path / "still.gif")
    with caplog.at_level(logging.WARNING, logger="dip"):
        load_image(tmp_path / "still.gif")
    assert "first frame" not in caplog.text


# --------------------------------------------------------------------------------------------- masks


KNOWN = np.zeros((8, 10), bool)
KNOWN[:, 3:] = True


@pytest.mark.parametrize("mask", [
    KNOWN, KNOWN.astype(np.uint8), KNOWN.astype(np.uint8) * 255, KNOWN.astype(np.float32),
    KNOWN.astype(np.float32) * 0.3, KNOWN.astype(np.uint16) * 65535, KNOWN.astype(np.int64),
    torch.from_numpy(KNOWN), torch.from_numpy(KNOWN).float(), Image.fromarray(KNOWN),
    Image.fromarray(KNOWN.astype(np.uint8)), Image.fromarray(KNOWN.astype(np.uint8) * 255),
], ids=["bool", "0/1 uint8", "0/255", "0/1 float", "0/0.3 float", "16-bit", "0/1 int64", "bool tensor",
        "float tensor", "PIL 1", "PIL L 0/1", "PIL L 0/255"])
def test_every_mask_convention_means_the_same(mask):
    m = load_mask(mask, (8, 10))
    assert m.shape == (1, 8, 10)
    assert torch.equal(m[0].bool(), torch.from_numpy(KNOWN))


def test_mask_files_of_each_convention(tmp_path):
    Image.fromarray(KNOWN.astype(np.uint8)).save(tmp_path / "m01.png")
    Image.fromarray(KNOWN.astype(np.uint8) * 255).save(tmp_path / "m255.png")
    np.save(tmp_path / "mbool.npy", KNOWN)
    for name in ("m01.png", "m255.png", "mbool.npy"):
        assert torch.equal(load_mask(tmp_path / name, (8, 10))[0].bool(), torch.from_numpy(KNOWN)), name


def test_all_zero_mask_is_refused_with_the_rule():
    with pytest.raises(DipError, match="above zero .* known"):
        load_mask(np.zeros((8, 10), np.uint8), (8, 10))


def test_mask_of_the_wrong_size():
    with pytest.raises(DipError, match="mask is 32×64 but the image is 64×64"):
        load_mask(np.ones((32, 64), np.float32), (64, 64))


@pytest.mark.parametrize("image_channels,mask_channels", [(1, 3), (3, 5)])
def test_mask_with_other_channels_than_the_image_is_refused(image_channels, mask_channels):
    # Regression: a colour mask on a grey image failed at the operator check ("set its scale attribute"),
    # a 5-channel mask on an RGB image with a RuntimeError from broadcasting.
    image = np.random.default_rng(12).random((8, 9, image_channels)).astype(np.float32)
    mask = np.ones((8, 9, mask_channels), np.uint8)
    mask[0, 0, 0] = 0  # the channels differ
    with pytest.raises(DipError, match=f"mask has {mask_channels} channels that differ, but the image has "
                                       f"{image_channels}; give a one-channel"):
        dip.restore(image, "inpaint", mask=mask, network="small", iterations=1, progress=False)
    mask[0, 0] = 0  # the same in every channel: one mask for all
    assert resolve_mask(mask, image).shape == (1, 8, 9)


def test_alpha_mask_from_rgba_input(tmp_path):
    rgba = np.full((12, 14, 4), 200, np.uint8)
    rgba[4:8, 5:9, 3] = 0  # a transparent hole
    Image.fromarray(rgba).save(tmp_path / "holes.png")
    m = resolve_mask("alpha", tmp_path / "holes.png")
    assert m.shape == (1, 12, 14)
    assert m[0, 4:8, 5:9].sum() == 0 and m.sum() == 12 * 14 - 16
    with pytest.raises(DipError, match="no alpha channel|has none"):
        mask_from_alpha(np.zeros((8, 8, 3), np.float32))
    with pytest.raises(DipError, match="resolve_mask"):
        load_mask("alpha", (12, 14))


def test_colour_key_mask(tmp_path):
    img = np.full((10, 12, 3), 100, np.uint8)
    img[2:5, 3:7] = (255, 0, 255)
    Image.fromarray(img).save(tmp_path / "keyed.png")
    m = resolve_mask(None, tmp_path / "keyed.png", mask_color=(255, 0, 255))
    assert m[0, 2:5, 3:7].sum() == 0 and m.sum() == 120 - 12
    assert torch.equal(mask_from_color(img, (255, 0, 255)), m)
    with pytest.raises(DipError, match="no pixel"):
        mask_from_color(img, (0, 255, 0))
    with pytest.raises(DipError, match="either a mask or a mask colour"):
        resolve_mask(KNOWN, img, mask_color=(1, 2, 3))


def test_jpeg_mask_warns(tmp_path, caplog):
    Image.fromarray(np.full((8, 8), 255, np.uint8)).save(tmp_path / "m.jpg")
    with caplog.at_level(logging.WARNING, logger="dip"):
        load_mask(tmp_path / "m.jpg", (8, 8))
    assert "save masks as PNG" in caplog.text


def test_inpaint_with_a_0_1_mask_runs():
    img = np.random.default_rng(11).random((16, 16, 3)).astype(np.float32)
    mask = (np.random.default_rng(12).random((16, 16)) > 0.5).astype(np.uint8)  # 0/1, refused as "all zero" before
    result = dip.restore(img, "inpaint", mask=mask, network="small", iterations=2, progress=False)
    assert result.image.shape == (16, 16, 3)


# --------------------------------------------------------------------------------------------- atomic writes


def test_stale_temporaries_of_the_same_target_are_removed(tmp_path):
    target = tmp_path / "out.png"
    dead = tmp_path / ".out.png.999999999.k3j2h1.tmp.png"  # its writer's process no longer exists
    old = tmp_path / ".out.png.a8d7f6e5.tmp.png"  # older naming, two hours old
    fresh = tmp_path / f".out.png.{os.getpid()}.zz.tmp.png"  # a write in progress in this process
    other = tmp_path / ".other.png.999999999.k3j2h1.tmp.png"  # another target's
    for f in (dead, old, fresh, other):
        f.write_bytes(b"x" * 100)
    two_hours_ago = time.time() - 7200
    os.utime(old, (two_hours_ago, two_hours_ago))
    save_image(np.zeros((8, 8, 3), np.float32), target)
    assert target.exists()
    assert not dead.exists() and not old.exists()
    assert fresh.exists() and other.exists()


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    def fail(tmp):
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        dio.atomic_write(tmp_path / "x.png", fail)
    assert list(tmp_path.iterdir()) == []
