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


def test_compiles_without_graph_breaks():
    net = build_network("small", channels_down=(8, 8), channels_up=(8, 8), channels_skip=(2, 2))
    z = torch.rand(1, 8, 16, 16) * 0.1
    eager = net(z)
    compiled = torch.compile(net, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(z), eager, rtol=1e-5, atol=1e-6)
