"""End-to-end restoration on small images with a small network (CPU)."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

import dip
from dip.errors import DipError, ImageTooLargeError
from dip.ops.lanczos import lanczos_downsample_reference


def test_denoising_raises_psnr_clearly(clean64, noisy):
    observed = noisy(clean64)
    result = dip.restore(observed, "denoise", iterations=400, network="small", reference=clean64, progress=False)
    before, after = dip.psnr(observed, clean64), dip.psnr(result.image, clean64)
    assert result.image.shape == (64, 64, 3) and result.image.dtype == np.float32
    assert after > before + 2.0, (before, after)
    assert len(result.history.loss) == 400 and len(result.history.psnr_ema) == 400
    assert result.history.psnr_ema[-1] == pytest.approx(after, abs=0.05)
    assert result.iterations == 400 and result.stop_reason == "completed"


def _downsample(img, factor):
    t = torch.from_numpy(img).permute(2, 0, 1)[None].double()
    return lanczos_downsample_reference(t, factor)[0].permute(1, 2, 0).clamp(0, 1).float().numpy()


def test_super_resolution_beats_bicubic(make_image):
    hr = make_image(64)
    lr = _downsample(hr, 2)
    bicubic = np.asarray(Image.fromarray(dip.io.to_uint8(lr)).resize((64, 64), Image.BICUBIC), np.float32) / 255
    result = dip.restore(lr, "super_resolution", factor=2, iterations=800, network="small", progress=False)
    assert result.image.shape == (64, 64, 3)
    assert dip.psnr(result.image, hr) > dip.psnr(bicubic, hr)


def test_inpainting_beats_the_masked_image(clean64):
    mask = (np.random.default_rng(1).random((64, 64)) > 0.5).astype(np.float32)
    masked = clean64 * mask[:, :, None]
    result = dip.restore(masked, "inpaint", mask=mask, iterations=200, network="small", progress=False)
    assert result.image.shape == (64, 64, 3)
    missing = mask == 0
    err_restored = np.abs(result.image - clean64)[missing].mean()
    err_masked = np.abs(masked - clean64)[missing].mean()
    assert err_restored < 0.5 * err_masked
    assert dip.psnr(result.image, clean64) > dip.psnr(masked, clean64) + 6


@pytest.mark.parametrize("shape", [(37, 53), (37, 53, 3), (23, 61, 4)])
def test_odd_sizes_round_trip(make_image, shape):
    img = make_image(shape[:2])
    if len(shape) == 2:
        img = img.mean(axis=2)
    elif shape[2] == 4:
        alpha = np.linspace(0, 1, shape[0] * shape[1], dtype=np.float32).reshape(shape[:2])
        img = np.concatenate([img, alpha[:, :, None]], axis=2)
    result = dip.restore(img, iterations=3, network="small", progress=False)
    channels = 1 if len(shape) == 2 else shape[2]
    assert result.image.shape == (shape[0], shape[1], channels)
    if channels == 4:
        np.testing.assert_array_equal(result.image[:, :, 3], img[:, :, 3])  # alpha passes through


def test_super_resolution_of_odd_sizes_and_alpha():
    img = np.random.default_rng(0).random((13, 9, 4)).astype(np.float32)
    result = dip.restore(img, "sr", factor=3, iterations=2, network="small", progress=False)
    assert result.image.shape == (39, 27, 4)


def test_custom_operator_blur(make_image):
    clean = make_image(48)
    kernel = torch.ones(3, 1, 5, 5) / 25

    def blur(x):
        return torch.nn.functional.conv2d(torch.nn.functional.pad(x, (2,) * 4, mode="replicate"), kernel, groups=3)

    observed = blur(torch.from_numpy(clean).permute(2, 0, 1)[None])[0].permute(1, 2, 0).numpy()
    result = dip.restore(observed, "custom", operator=blur, iterations=150, network="small", progress=False)
    assert result.image.shape == (48, 48, 3)
    # the fit explains the observation through the operator
    assert result.history.loss[-1] < 0.1 * result.history.loss[0]


def test_custom_operator_with_scale(make_image):
    hr = make_image(32)

    def pool(x):
        return torch.nn.functional.avg_pool2d(x, 2)

    lr = pool(torch.from_numpy(hr).permute(2, 0, 1)[None])[0].permute(1, 2, 0).numpy()
    op = dip.physics.Custom(pool, linear=True, scale=2)
    result = dip.restore(lr, operator=op, task="custom", iterations=5, network="small", progress=False)
    assert result.image.shape == (32, 32, 3)


def test_custom_operator_takes_its_scale_from_factor(make_image):
    # factor= is accepted for task="custom" but was used only for super-resolution: the operator kept scale 1 and
    # the fit was refused with "set its scale attribute".
    lr = make_image(16)
    pool = dip.physics.Custom(lambda x: torch.nn.functional.avg_pool2d(x, 2))
    result = dip.restore(lr, "custom", operator=lambda x: torch.nn.functional.avg_pool2d(x, 2), factor=2,
                         iterations=2, network="small", progress=False)
    assert result.image.shape == (32, 32, 3) and result.settings["factor"] == 2
    with pytest.raises(DipError, match="factor=3 but the operator's scale is 2"):
        dip.restore(lr, "custom", operator=dip.physics.Custom(pool, scale=2), factor=3, iterations=2,
                    network="small", progress=False)
    with pytest.raises(DipError, match="factor must be a positive integer"):
        dip.restore(lr, "custom", operator=pool, factor=2.5, iterations=2, network="small", progress=False)


def test_operator_of_the_wrong_size_is_explained(clean64):
    with pytest.raises(DipError, match="operator maps"):
        dip.restore(clean64, "custom", operator=lambda x: x[..., ::2, ::2], iterations=1, network="small",
                    progress=False)


def test_seed_makes_runs_reproducible(clean64):
    a = dip.restore(clean64, iterations=5, network="small", seed=3, progress=False)
    b = dip.restore(clean64, iterations=5, network="small", seed=3, progress=False)
    c = dip.restore(clean64, iterations=5, network="small", seed=4, progress=False)
    np.testing.assert_array_equal(a.image, b.image)
    assert not np.array_equal(a.image, c.image)


def test_inputs_in_every_form_agree(clean64, tmp_path):
    u8 = dip.io.to_uint8(clean64)
    path = tmp_path / "img.png"
    Image.fromarray(u8).save(path)
    forms = [str(path), Image.fromarray(u8), u8, u8.astype(np.float32) / 255,
             torch.from_numpy(u8).permute(2, 0, 1).float() / 255,
             (torch.from_numpy(u8).permute(2, 0, 1).float() / 255)[None],
             (u8.astype(np.uint16) * 257)]
    images = [dip.restore(f, iterations=2, network="small", progress=False).image for f in forms]
    for img in images[1:]:
        np.testing.assert_allclose(img, images[0], atol=1e-5)


def test_result_save_and_pil(clean64, tmp_path):
    result = dip.restore(clean64, iterations=2, network="small", progress=False)
    out = result.save(tmp_path / "out.png")
    assert Image.open(out).size == (64, 64)
    assert result.to_pil().mode == "RGB"
    assert result.render().shape == (1, 3, 64, 64)
    assert result.net_input.shape[1] == 8
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary file left
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask  # as readable as any file the user writes


def test_noise_sigma_stops_at_the_noise_level(clean64, noisy):
    # the misfit starts near the image variance and falls to the noise level σ² long before the cap
    result = dip.restore(noisy(clean64), iterations=1500, network="small", noise_sigma=0.12, progress=False)
    assert result.stop_reason is dip.StopReason.NOISE_LEVEL
    assert result.iterations < 1500 and result.iterations % 10 == 0  # the losses are read every check_every steps
    # the misfit reached σ² within the last check's window (not necessarily at its last step), not before it
    assert min(result.history.loss[-10:]) <= 0.12**2 < min(result.history.loss[:-10])


def test_noise_level_of_an_inpainting_counts_only_the_known_pixels(clean64, noisy):
    # The misfit is a mean over every pixel, the missing ones adding zeros; the discrepancy stop compared it with
    # σ² as it was, so with half the pixels missing it stopped at a known-pixel misfit of 2σ² or more (iteration 50
    # of this fit instead of about 200).
    sigma = 0.1
    observed = noisy(clean64[:32, :32], sigma=sigma)
    mask = np.ones((32, 32), np.float32)
    mask[:, ::2] = 0
    assert dip.physics.Inpaint(torch.from_numpy(mask)).observed_fraction() == 0.5
    r = dip.restore(observed, "inpaint", mask=mask, noise_sigma=sigma, iterations=600, network="small",
                    progress=False)
    assert r.stop_reason is dip.StopReason.NOISE_LEVEL
    known = np.repeat(mask[:, :, None] > 0, 3, axis=2)
    assert min(r.history.loss) <= 0.5 * sigma ** 2  # the mean over all pixels: half of them are zeros
    assert ((r.output - observed)[known] ** 2).mean() < 1.5 * sigma ** 2


def test_callback_can_stop(clean64):
    seen = []
    result = dip.restore(clean64, iterations=50, network="small", progress=False,
                         callbacks=[lambda step: seen.append(step.iteration) or step.iteration >= 4])
    assert result.iterations == 4 and seen == [1, 2, 3, 4] and result.stop_reason == "callback"


def test_interrupt_hands_back_the_image_so_far(clean64):
    def interrupt(step):
        if step.iteration == 3:
            raise KeyboardInterrupt

    result = dip.restore(clean64, iterations=50, network="small", progress=False, callbacks=[interrupt])
    assert result.interrupted and result.iterations == 3  # the step that saw the interrupt had finished
    assert result.image.shape == (64, 64, 3) and np.isfinite(result.image).all()


# ---- bad input -------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(DipError, match="not found"):
        dip.restore(tmp_path / "nope.png", progress=False)


def test_missing_mask_and_factor(clean64):
    with pytest.raises(DipError, match="mask="):
        dip.restore(clean64, "inpaint", progress=False)
    with pytest.raises(DipError, match="factor="):
        dip.restore(clean64, "super_resolution", progress=False)


@pytest.mark.parametrize("factor", [1, 0, -2, 33, 2.0])
def test_bad_factor(clean64, factor):
    with pytest.raises(DipError, match="factor"):
        dip.restore(clean64, "super_resolution", factor=factor, progress=False)


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(iterations=5, max_iterations=2), "max_iterations caps the automatic stop; with iterations=5"),
    (dict(iterations=5, checkpoint_every=2), "checkpoint_every= needs checkpoint="),
    (dict(iterations=5, overwrite_checkpoint=True), "overwrite_checkpoint= needs checkpoint="),
])
def test_options_without_effect_are_refused(clean64, kwargs, fragment):
    # restore() ran these silently (max_iterations ignored by a fixed count, nothing written without a path)
    # while the command line refuses the same combinations.
    with pytest.raises(DipError, match=fragment):
        dip.restore(clean64[:16, :16], network="small", progress=False, **kwargs)


@pytest.mark.parametrize("bad", ["big", 0, -5, 2.5, True, None])
def test_bad_max_pixels_is_one_clear_error(clean64, bad):
    # restore(max_pixels="big") raised a raw TypeError from the size comparison, and 0, -5 or 2.5 refused every
    # image as too large (or let 2.5 through); the CLI checked --max-pixels, the library did not.
    with pytest.raises(DipError, match=r"^max_pixels must be a positive integer \(a pixel count\), got "):
        dip.restore(clean64, max_pixels=bad, progress=False)
    for read in (dip.load_image, dip.io.decode):
        with pytest.raises(DipError, match="^max_pixels must be a positive integer"):
            read(clean64, max_pixels=bad)


def test_unknown_task(clean64):
    with pytest.raises(DipError, match="unknown task"):
        dip.restore(clean64, "deblur", progress=False)


def test_bad_settings(clean64):
    with pytest.raises(DipError, match="iterations"):
        dip.restore(clean64, iterations=0, progress=False)
    with pytest.raises(DipError, match="learning rate"):
        dip.restore(clean64, lr=-1.0, progress=False)


def test_too_large_for_memory_is_refused_with_an_estimate(clean64):
    # the message names the user's size (not the padded one) in units that keep a digit
    with pytest.raises(ImageTooLargeError, match=r"a 64×64 image needs about .* MiB .* only 1.0 KiB is available"):
        dip.restore(clean64, max_memory=1024, progress=False)
    with pytest.raises(ImageTooLargeError, match=r"only 1 bytes is available"):
        dip.restore(clean64[:50, :50], max_memory=1, progress=False)


def test_estimate_scales_with_pixels():
    from dip.memory import estimate_fit_bytes

    cfg = dip.preset("denoise")
    small, large = estimate_fit_bytes(cfg, 256, 256), estimate_fit_bytes(cfg, 512, 512)
    assert 3.5 < large / small < 4.1


def test_cuda_asked_without_gpu(clean64):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(DipError, match="no CUDA GPU"):
        dip.restore(clean64, device="cuda", progress=False)
