"""Quality features: blind noise level, seed ensembles, uncertainty map, SSIM, deepinv physics (tiny CPU fits)."""
import numpy as np
import pytest
import torch

import dip
from dip.errors import DipError
from dip.fit import EarlyStopping
from dip.fit.members import MemberVarianceStopper
from dip.nn import active_path
from dip.nn.hourglass import Hourglass, build_network, preset
from dip.noise import estimate_sigma

TINY = dict(network="small", progress=False)


def _crop(name, size):
    from skimage import data

    a = getattr(data, name)().astype(np.float32) / 255.0
    h, w = a.shape[:2]
    return a[(h - size) // 2 : (h - size) // 2 + size, (w - size) // 2 : (w - size) // 2 + size]


# ---- blind noise level -----------------------------------------------------------------------


def _noisy_crop(name, size, sigma):
    clean = _crop(name, size)
    return np.clip(clean + np.random.default_rng(sigma).normal(0, sigma / 255, clean.shape), 0, 1)


@pytest.mark.parametrize("method", ["auto", "pca", "haar"])
@pytest.mark.parametrize("name", ["coffee", "immunohistochemistry"])
@pytest.mark.parametrize("sigma", [10, 25, 50])
def test_sigma_estimate_within_20_percent(name, sigma, method):
    assert estimate_sigma(_noisy_crop(name, 64, sigma), method) == pytest.approx(sigma / 255, rel=0.2)


def test_default_sigma_estimate_is_the_smaller_and_reads_less_texture_as_noise():
    # astronaut's fine texture passes for noise in the Haar detail (+27 % at σ = 10), not in the
    # patches' smallest principal directions; the default was the Haar estimate before
    noisy = _noisy_crop("astronaut", 64, 10)
    assert estimate_sigma(noisy) == min(estimate_sigma(noisy, "pca"), estimate_sigma(noisy, "haar"))
    assert estimate_sigma(noisy) == pytest.approx(10 / 255, rel=0.15)
    assert estimate_sigma(noisy, "haar") > 1.2 * 10 / 255


def test_pca_sigma_edge_cases():
    from dip.noise import haar_mad_sigma, pca_sigma

    assert pca_sigma(np.full((40, 40), 0.5)) == 0.0  # no noise: no eigenvalue left
    tiny = np.random.default_rng(0).normal(0.5, 0.1, (12, 12))
    assert pca_sigma(tiny) == haar_mad_sigma(tiny)  # too few patches: the Haar estimate
    noisy = _noisy_crop("coffee", 128, 25)  # on a stride, from 1/8 of the patches, still close
    assert pca_sigma(noisy, max_patches=(122 * 122) // 8) == pytest.approx(25 / 255, rel=0.1)


def test_sigma_estimate_takes_tensors_and_gray_images():
    clean = _crop("coffee", 32)[:, :, 0]
    noisy = np.clip(clean + np.random.default_rng(0).normal(0, 0.1, clean.shape), 0, 1).astype(np.float32)
    assert estimate_sigma(torch.from_numpy(noisy)[None, None]) == pytest.approx(estimate_sigma(noisy))
    with pytest.raises(DipError):
        estimate_sigma(noisy, method="guess")


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16], ids=["8-bit", "16-bit"])
@pytest.mark.parametrize("method", ["auto", "pca", "haar"])
def test_sigma_estimate_of_integer_pixels_is_in_unit_range(method, dtype):
    # Integer pixels are x / max, as restore() and dip.io read them. Bugs: the uint8 check came after a cast
    # to float32 and never held (σ in 0–255 units); then only uint8 was scaled (16-bit: 0–65535 units).
    top = float(np.iinfo(dtype).max)
    pixels = np.round(_noisy_crop("coffee", 64, 25) * top).astype(dtype)
    assert estimate_sigma(pixels, method) == pytest.approx(estimate_sigma(pixels / top, method))
    assert estimate_sigma(pixels, method) == pytest.approx(25 / 255, rel=0.2)


def test_auto_noise_sigma_drives_the_discrepancy_stop(clean64, noisy):
    obs = noisy(clean64[:32, :32], sigma=25 / 255)
    r = dip.restore(obs, iterations=20, noise_sigma="auto", **TINY)
    assert r.settings["noise_sigma"] == pytest.approx(r.noise_sigma_estimate)
    assert 0.5 * 25 / 255 < r.noise_sigma_estimate < 1.5 * 25 / 255
    given = dip.restore(obs, iterations=5, noise_sigma=0.05, **TINY)
    assert given.settings["noise_sigma"] == 0.05 and given.noise_sigma_estimate == pytest.approx(r.noise_sigma_estimate)
    with pytest.raises(DipError, match="auto"):
        dip.restore(obs, iterations=5, noise_sigma="blind", **TINY)


# ---- seed ensembles --------------------------------------------------------------------------


def test_grouped_network_is_its_members_side_by_side():
    cfg = preset("small", out_channels=3)
    torch.manual_seed(0)
    nets = [build_network(cfg, fused=False) for _ in range(3)]
    grouped = Hourglass.stack(nets)
    zs = [torch.rand(1, cfg.in_channels, 16, 16) for _ in range(3)]
    out = grouped(torch.cat(zs, dim=1))
    assert out.shape == (3, 3, 16, 16)
    for k in range(3):
        torch.testing.assert_close(out[k : k + 1], nets[k](zs[k]), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(grouped.member(k)(zs[k]), nets[k](zs[k]))


def test_member_stopper_keeps_each_members_minimum():
    """Member 0 is quietest near step 60, member 1 near step 140: each keeps its own iterate."""
    gen = torch.Generator().manual_seed(0)
    stopper = MemberVarianceStopper(EarlyStopping(window=10, patience=50), check_every=1)
    base = torch.rand(2, 1, 5, 5, generator=gen)
    for it in range(1, 260):
        amp = torch.tensor([0.01 + abs(it - 60) / 60, 0.01 + abs(it - 140) / 60]).view(2, 1, 1, 1)
        out = base + amp * torch.randn(base.shape, generator=gen)
        stopper.update(out, out, it)
        if stopper.should_stop(it):
            break
    first, second = stopper.member_iterations()
    assert 45 <= first <= 75 and 125 <= second <= 155, (first, second)
    assert it == second + 50


def test_member_stopper_reads_each_members_average_one_lag_after_its_minimum():
    """The average handed back per member (the default ``centred_ema``) is read a delay after its own minimum."""
    gen = torch.Generator().manual_seed(0)
    stopper = MemberVarianceStopper(EarlyStopping(window=10, patience=50), check_every=1)
    stopper._lag = 20
    base = torch.rand(2, 1, 5, 5, generator=gen)
    for it in range(1, 260):
        amp = torch.tensor([0.01 + abs(it - 60) / 60, 0.01 + abs(it - 140) / 60]).view(2, 1, 1, 1)
        stopper.update(base + amp * torch.randn(base.shape, generator=gen), torch.full((2, 1, 5, 5), float(it)), it)
        if stopper.should_stop(it):
            break
    first, second = stopper.member_iterations()
    image = stopper.image(torch.full((2, 1, 5, 5), float(it)))
    assert image[:, 0, 0, 0].tolist() == [first + min(first // 5, 20), second + 20]


def test_ensemble_beats_its_members(clean64, noisy):
    clean = clean64[:32, :32]
    r = dip.restore(noisy(clean), iterations=60, ensemble=2, reference=clean, **TINY)
    members = [dip.psnr(m, clean) for m in r.members]
    assert r.ensemble == 2 and len(members) == 2 and members[0] != members[1]
    assert r.psnr > np.mean(members) + 0.05
    np.testing.assert_allclose(r.image, np.clip(r.members.mean(axis=0), 0, 1), atol=1e-6)
    assert r.settings["ensemble"] == 2 and r.settings["blocks"] == active_path()  # fused when the extension is
    assert isinstance(r.network, Hourglass) and r.network.members == 1 and r.render().shape == (1, 3, 32, 32)


def test_ensemble_with_automatic_stop_returns_each_members_iterate(clean64, noisy):
    clean = clean64[:32, :32]
    r = dip.restore(noisy(clean), iterations="auto", max_iterations=80, ensemble=2, reference=clean,
                    early_stopping=EarlyStopping(window=10, patience=20), **TINY)
    assert len(r.member_iterations) == 2 and max(r.member_iterations) == r.stopped_at
    assert r.uncertainty.shape == (32, 32)


def test_cpu_ensemble_runs_channels_last_and_hands_back_a_plain_member(clean64, noisy):
    """oneDNN's grouped convolutions are faster channels_last; the returned member is laid out as a single fit's."""
    from dip.pipeline import _stack_members

    cfg = preset("small", out_channels=3)
    problem = dip.problem.Problem.create("denoise", clean64[:16, :16])
    net, z = _stack_members(build_network(cfg, fused=False), torch.rand(1, cfg.in_channels, 16, 16), cfg, problem,
                            dip.fit.FitSettings(seed=0), torch.device("cpu"), None, 2)
    assert z.is_contiguous(memory_format=torch.channels_last)
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in net.parameters() if p.dim() == 4)
    r = dip.restore(noisy(clean64[:32, :32]), iterations=3, ensemble=2, **TINY)
    assert r.net_input.is_contiguous() and r.net_input.shape[1] == cfg.in_channels
    fresh = build_network(cfg)  # the member is laid out as any network of the default path, whatever the grouped one
    assert [p.stride() for p in r.network.parameters()] == [p.stride() for p in fresh.parameters()]


def test_interrupted_ensemble_resumes_to_the_uninterrupted_image(clean64, noisy, tmp_path):
    """A checkpointed ensemble fit stopped halfway and resumed returns what one uninterrupted fit returns."""
    obs = noisy(clean64[:32, :32])
    opts = dict(iterations=30, ensemble=2, **TINY)
    whole = dip.restore(obs, **opts)
    halfway = dip.restore(obs, checkpoint=tmp_path / "fit.pt", checkpoint_every=5,
                          callbacks=[lambda step: step.iteration >= 15], **opts)
    assert halfway.stopped_at == 15
    resumed = dip.restore(obs, resume=tmp_path / "fit.pt", **opts)
    assert resumed.stopped_at == 30 and resumed.settings["blocks"] == whole.settings["blocks"]
    np.testing.assert_array_equal(resumed.image, whole.image)
    np.testing.assert_array_equal(resumed.members, whole.members)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_bad_ensemble(clean64, bad):
    with pytest.raises(DipError, match="ensemble"):
        dip.restore(clean64[:16, :16], iterations=1, ensemble=bad, **TINY)


def test_ensemble_takes_numpy_integers(clean64):
    # ensemble=np.int64(2) was refused as "not a positive integer" while iterations and seed take numpy integers
    r = dip.restore(clean64[:16, :16], iterations=1, ensemble=np.int64(2), **TINY)
    assert r.ensemble == 2 and type(r.settings["ensemble"]) is int and r.members.shape[0] == 2


# ---- uncertainty -----------------------------------------------------------------------------


def _half_noisy():
    """A flat grey image whose left half carries heavy noise."""
    img = np.full((32, 32, 3), 0.5, dtype=np.float32)
    img[:, :16] += np.random.default_rng(0).normal(0, 0.25, (32, 16, 3)).astype(np.float32)
    return np.clip(img, 0, 1)


def test_uncertainty_of_an_ensemble_is_higher_where_the_image_is_unpredictable():
    r = dip.restore(_half_noisy(), iterations=60, ensemble=2, **TINY)
    assert r.uncertainty.shape == (32, 32) and r.uncertainty.dtype == np.float32
    assert r.uncertainty[:, :16].mean() > 2 * r.uncertainty[:, 16:].mean()


def test_uncertainty_of_a_single_fit_is_its_moving_spread():
    r = dip.restore(_half_noisy(), iterations="auto", max_iterations=120,
                    early_stopping=EarlyStopping(window=10, patience=200), **TINY)
    assert r.uncertainty.shape == (32, 32)
    assert r.uncertainty[:, :16].mean() > 1.3 * r.uncertainty[:, 16:].mean()  # 1.6× here
    assert dip.restore(_half_noisy(), iterations=3, **TINY).uncertainty is None


# ---- SSIM ------------------------------------------------------------------------------------


def test_ssim_beside_psnr(clean64, noisy):
    from skimage.metrics import structural_similarity

    clean = clean64[:32, :32]
    r = dip.restore(noisy(clean), iterations=10, reference=clean, **TINY)
    expected = structural_similarity(r.image.astype(np.float64), clean.astype(np.float64), channel_axis=-1,
                                     data_range=1.0)
    assert r.ssim == pytest.approx(expected) and 0 < r.ssim < 1
    assert dip.restore(noisy(clean), iterations=2, **TINY).ssim is None


# ---- deepinv physics -------------------------------------------------------------------------


class _StandInPhysics(torch.nn.Module):
    """deepinv's Physics interface: ``A`` is the noiseless operator, calling it adds fresh noise."""

    def __init__(self, mask):
        super().__init__()
        self.mask = mask
        self.noisy_calls = 0

    def A(self, x):  # noqa: N802 - deepinv's name
        return x * self.mask

    def A_adjoint(self, y):  # noqa: N802
        return y * self.mask

    def forward(self, x):
        self.noisy_calls += 1
        return self.A(x) + 0.1 * torch.randn_like(x)


def test_deepinv_physics_is_used_through_its_noiseless_A(clean64):
    clean = clean64[:32, :32]
    mask = (torch.rand(1, 1, 32, 32, generator=torch.Generator().manual_seed(0)) > 0.3).float()
    physics = _StandInPhysics(mask)
    observed = (torch.from_numpy(clean).permute(2, 0, 1)[None] * mask)
    r = dip.restore(observed, "custom", operator=physics, iterations=30, **TINY)
    assert physics.noisy_calls == 0
    assert r.history.loss[-1] < r.history.loss[0]


def test_uncertainty_map_is_written_with_its_scale(tmp_path):
    from PIL import Image

    from dip.uncertainty import uncertainty_image

    values = np.zeros((20, 30), np.float32)
    values[:, 15:] = 0.1
    picture = uncertainty_image(values)
    assert picture.shape[1] >= 160 and picture.shape[2] == 3
    zoom = picture.shape[1] // 30
    assert not np.allclose(picture[0, 0], picture[0, -1])  # 0 and the maximum get different colours
    np.testing.assert_allclose(picture[0, 0], picture[20 * zoom - 1, 15 * zoom - 1])
    r = dip.restore(_half_noisy(), iterations=4, ensemble=2, **TINY)
    path = r.save_uncertainty(tmp_path / "map.png")
    assert Image.open(path).size == (160, 160 + 3 + 10 + 14)  # the 32² map at ×5, a gap, the bar, its labels
    with pytest.raises(DipError, match="uncertainty"):
        dip.restore(_half_noisy(), iterations=2, **TINY).save_uncertainty(tmp_path / "none.png")
