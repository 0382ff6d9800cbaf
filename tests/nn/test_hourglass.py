import pytest
import torch

from dip.errors import DipError
from dip.nn import ConvBlock, HourglassConfig, build_network, preset


def test_denoise_preset_matches_the_original_architecture():
    cfg = preset("denoise")
    assert cfg.in_channels == 32 and cfg.scales == 5
    assert list(cfg.channels_down) == [128] * 5 and list(cfg.channels_up) == [128] * 5
    assert list(cfg.channels_skip) == [4] * 5
    assert cfg.upsample == "bilinear" and cfg.pad == "reflection" and cfg.act == "LeakyReLU"
    net = build_network("denoise")
    # the skip net of the original code (128/128/4, 5 scales, 32→3), built layer for layer, has 2,217,831 parameters
    assert sum(p.numel() for p in net.parameters()) == 2_217_831


def test_sr_preset_is_the_same_net():
    assert preset("sr") == preset("denoise")


@pytest.mark.parametrize("size", [(64, 64), (37, 53), (40, 33)])
def test_output_shape_and_range(size):
    torch.manual_seed(0)
    net = build_network("small", out_channels=1)
    z = torch.rand(1, 8, *size) * 0.1
    out = net(z)
    assert out.shape == (1, 1, *size)
    assert out.min() >= 0 and out.max() <= 1


@pytest.mark.parametrize("pad", ["reflection", "zero"])
@pytest.mark.parametrize("up", ["nearest", "bilinear"])
@pytest.mark.parametrize("down", ["stride", "avg", "max", "lanczos2", "lanczos3"])
@pytest.mark.parametrize("act", ["LeakyReLU", "ReLU", "Swish", "ELU"])
def test_every_option_builds_and_runs(pad, up, down, act):
    net = build_network("small", pad=pad, upsample=up, downsample=down, act=act, channels_skip=(0, 2, 4))
    out = net(torch.rand(1, 8, 32, 32) * 0.1)
    assert out.shape == (1, 3, 32, 32)
    out.mean().backward()
    assert all(p.grad is not None for p in net.parameters())


def test_no_batchnorm_no_sigmoid():
    net = build_network("small", batch_norm=False, sigmoid=False)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())
    assert net(torch.rand(1, 8, 16, 16)).shape == (1, 3, 16, 16)


def test_bad_configs_are_refused():
    with pytest.raises(DipError, match="same length"):
        build_network(HourglassConfig(channels_down=(8, 8), channels_up=(8,), channels_skip=(4, 4)))
    with pytest.raises(DipError, match="unknown activation"):
        preset("denoise", act="Tanhh")
    with pytest.raises(DipError, match="unknown network preset"):
        preset("huge")
    with pytest.raises(DipError, match="odd"):
        ConvBlock(3, 3, 4)


def test_min_size_and_multiple():
    cfg = preset("denoise")
    assert cfg.multiple() == 32 and cfg.min_size() == 64


@pytest.mark.parametrize("options", [dict(filter_size_down=5), dict(filter_size_down=7, downsample="max"),
                                     dict(filter_size_up=9), dict(filter_size_skip=9), dict(pad="zero")],
                         ids=["down5", "down7-max", "up9", "skip9", "zero"])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "pure"])
def test_min_size_counts_the_filter_sizes(options, fused):
    """Bug: min_size ignored the filter sizes, so restore() padded a 10×10 image to 16×16 for a 5×5 down filter
    and the deepest scale (2×2) could not be reflection-padded by 2: a C++ error instead of a fit."""
    net = build_network("small", fused=fused, **options).train()
    side = net.config.min_size()
    assert side % net.config.multiple() == 0
    assert net(torch.rand(1, 8, side, side)).shape == (1, 3, side, side)


@pytest.mark.parametrize("options, match", [
    (dict(channels_down=(0, 32, 64)), r"channels_down\[0\] must be a positive integer"),
    (dict(channels_up=(16, 0, 64)), r"channels_up\[1\] must be a positive integer"),
    (dict(channels_skip=(-1, 4, 4)), r"channels_skip\[0\] must be a non-negative integer"),
    (dict(in_channels=0), "in_channels must be a positive integer"),
    (dict(out_channels=0), "out_channels must be a positive integer"),
    (dict(channels_down=(16.0, 32, 64)), r"channels_down\[0\] must be a positive integer"),
    (dict(filter_size_up=0), "filter_size_up must be a positive odd integer"),
], ids=["zero-down", "zero-up", "negative-skip", "zero-in", "zero-out", "float", "zero-filter"])
def test_zero_or_negative_channels_are_refused(options, match):
    """Bug: zero or negative channel counts built a network (out_channels=0 even ran, giving 0 channels)."""
    with pytest.raises(DipError, match=match):
        preset("small", **options)
    assert preset("small", channels_skip=(0, 0, 0)).channels_skip == (0, 0, 0)  # 0 skip channels: no skip


def test_compiles_without_graph_breaks():
    net = build_network("small", channels_down=(8, 8), channels_up=(8, 8), channels_skip=(2, 2))
    z = torch.rand(1, 8, 16, 16) * 0.1
    eager = net(z)
    compiled = torch.compile(net, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(z), eager, rtol=1e-5, atol=1e-6)
