"""Blocks: scripting a live network (Lanczos included) and the pure twins of the fused modules.

Run with and without ``DIP_DISABLE_EXTENSION=1``: scripting binds to the
compiled operator in the first case and to the pure filter in the second.
"""
import copy
import warnings

import pytest
import torch

from dip._extension import has_op
from dip.nn import ConvBlock, FusedConvBlock, build_network
from dip.nn.blocks import LanczosDownsample
from dip.ops.lanczos import lanczos_downsample_reference


def _script(module):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=DeprecationWarning)
        return torch.jit.script(module)


@pytest.mark.parametrize("downsample", ["lanczos2", "lanczos3"])
def test_live_network_with_lanczos_scripts_and_matches_eager(downsample):
    # Regression: scripting failed on the import inside LanczosDownsample.forward.
    torch.manual_seed(0)
    net = build_network("small", downsample=downsample)
    scripted = _script(copy.deepcopy(net))
    z = torch.rand(1, 8, 32, 40) * 0.1
    for mode in (True, False):  # train mode (batch statistics, as the fit runs), then eval
        net.train(mode)
        scripted.train(mode)
        with torch.no_grad():
            torch.testing.assert_close(scripted(z), net(z), rtol=0, atol=1e-6)
    ops = {node.kind() for node in scripted.inlined_graph.nodes()}
    assert ("dip::lanczos_downsample" in ops) == has_op("lanczos_downsample")


@pytest.mark.parametrize("factor,support", [(2, 2), (2, 3), (3, 2)])
def test_pure_lanczos_module_is_the_reference(factor, support):
    x = torch.rand(2, 3, 31, 26, dtype=torch.float64)
    module = LanczosDownsample(factor, support).unfused().double()
    assert module.use_op is False and "taps" not in module.state_dict()
    expected = lanczos_downsample_reference(x, factor, support)
    torch.testing.assert_close(module(x), expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(_script(module)(x), expected, rtol=0, atol=1e-12)
    ops = {node.kind() for node in _script(module).inlined_graph.nodes()}
    assert not any(kind.startswith("dip::") for kind in ops)


@pytest.mark.skipif(not has_op("conv_block"), reason="the compiled conv block is not loaded")
@pytest.mark.parametrize("stride", [1, 2])
def test_fused_block_unfused_twin(stride):
    torch.manual_seed(0)
    block = FusedConvBlock(5, 7, 3, stride, pad="reflection", act="LeakyReLU")
    twin = copy.deepcopy(block).unfused()
    assert type(twin) is ConvBlock
    assert list(twin.state_dict()) == list(block.state_dict())
    x = torch.rand(1, 5, 17, 14)
    torch.testing.assert_close(twin(x), block(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(twin.bn.running_mean, block.bn.running_mean, rtol=1e-5, atol=1e-6)
