"""The fused bilinear ×2 upsampling against its reference (``F.interpolate``, ``align_corners=False``)."""
from __future__ import annotations

import pytest
import torch
from base import check_fake_rejects

from dip._extension import has_op
from dip.ops.upsample import UpsampleBilinear2x, upsample_bilinear2x, upsample_bilinear2x_reference

pytestmark = pytest.mark.skipif(
    not has_op("upsample_bilinear2x"),
    reason="compiled dip ops not loaded (run `python setup.py build_ext --inplace`; unset DIP_DISABLE_EXTENSION)",
)

TOL = {torch.float64: 1e-12, torch.float32: 1e-5}
# Odd sizes, 1-pixel sides (both taps clamp to the same pixel) and the hourglass's 128 channels.
SHAPES = [(1, 3, 1, 1), (2, 5, 1, 4), (1, 4, 7, 9), (2, 128, 6, 5), (1, 17, 3, 2)]


def _layouts(x: torch.Tensor):
    yield "nchw", x
    yield "channels_last", x.contiguous(memory_format=torch.channels_last)
    # A strided view: every other channel of a wider tensor.
    wide = torch.repeat_interleave(x, 2, dim=1)
    yield "sliced", wide[:, ::2]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_forward_and_gradient_match_reference(shape, dtype):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(shape, generator=g, dtype=dtype)
    grad = torch.randn(shape[0], shape[1], 2 * shape[2], 2 * shape[3], generator=g, dtype=dtype)
    for name, x in _layouts(base):
        x = x.detach().requires_grad_()
        out = upsample_bilinear2x(x)
        expected = upsample_bilinear2x_reference(x)
        assert out.shape == expected.shape
        torch.testing.assert_close(out, expected, rtol=0, atol=TOL[dtype], msg=name)
        (gx,) = torch.autograd.grad(out, x, grad)
        (gr,) = torch.autograd.grad(expected, x, grad)
        torch.testing.assert_close(gx, gr, rtol=0, atol=10 * TOL[dtype], msg=name)


def test_output_is_channels_last():
    out = upsample_bilinear2x(torch.randn(1, 8, 5, 6))
    assert out.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("shape", [(1, 2, 1, 3), (2, 3, 4, 5)], ids=str)
def test_gradcheck_and_gradgradcheck(shape):
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(torch.ops.dip.upsample_bilinear2x, (x,))
    assert torch.autograd.gradgradcheck(torch.ops.dip.upsample_bilinear2x, (x,))


def test_opcheck():
    x = torch.randn(2, 3, 5, 4)
    torch.library.opcheck(torch.ops.dip.upsample_bilinear2x.default, (x,))
    torch.library.opcheck(torch.ops.dip.upsample_bilinear2x.default, (x.requires_grad_(),))
    g = torch.randn(2, 3, 10, 8)
    torch.library.opcheck(torch.ops.dip._upsample_bilinear2x_backward.default, (g, 5, 4))


def test_torch_compile_fullgraph():
    x = torch.randn(1, 4, 7, 6, requires_grad=True)
    out = torch.compile(upsample_bilinear2x, fullgraph=True)(x)
    torch.testing.assert_close(out, upsample_bilinear2x_reference(x))
    (gx,) = torch.autograd.grad(out.square().sum(), x)
    (gr,) = torch.autograd.grad(upsample_bilinear2x_reference(x).square().sum(), x)
    torch.testing.assert_close(gx, gr)


def test_torchscript_module():
    scripted = torch.jit.script(UpsampleBilinear2x())
    x = torch.randn(1, 3, 5, 7, dtype=torch.float64)
    torch.testing.assert_close(scripted(x), upsample_bilinear2x_reference(x), rtol=0, atol=1e-12)


def test_bad_arguments():
    with pytest.raises(RuntimeError, match="N x C x H x W"):
        torch.ops.dip.upsample_bilinear2x(torch.randn(3, 4, 5))
    with pytest.raises(RuntimeError, match="does not match"):
        torch.ops.dip._upsample_bilinear2x_backward(torch.randn(1, 2, 6, 6), 4, 3)


def test_other_dtypes_fall_back_to_the_reference():
    x = torch.randn(1, 2, 3, 3, dtype=torch.bfloat16)
    torch.testing.assert_close(upsample_bilinear2x(x), upsample_bilinear2x_reference(x))


def test_channelless_input_raises_whether_the_extension_is_loaded_or_not():
    """Bug: with no channels the wrapper returned an empty result from the compiled op, while the reference path
    (extension off, or another dtype) raised F.interpolate's error. The op keeps the empty result (well defined);
    the wrapper now routes such inputs to the reference, so both paths raise the same error."""
    x = torch.randn(2, 0, 3, 3)
    assert torch.ops.dip.upsample_bilinear2x(x).shape == (2, 0, 6, 6)
    for fn in (upsample_bilinear2x_reference, upsample_bilinear2x, UpsampleBilinear2x()):
        with pytest.raises(RuntimeError, match="Non-empty 4D data tensor expected"):
            fn(x)


def test_fake_kernels_reject_what_the_kernels_reject():
    """Bug: the fake kernels checked nothing, so torch.compile and torch.export traced bad arguments (a 3-D input,
    an integer one, a gradient of the wrong size) and only the real kernel refused them."""
    x = torch.randn(2, 3, 4, 5)
    check_fake_rejects(torch.ops.dip.upsample_bilinear2x.default, [
        ((x[0],), RuntimeError, "upsample_bilinear2x: input must be N x C x H x W"),
        ((x.long(),), RuntimeError, "upsample_bilinear2x: only float32 and float64"),
        ((x[:, :, :0],), RuntimeError, "upsample_bilinear2x: empty spatial size"),
    ])
    g = torch.randn(2, 3, 8, 10)
    check_fake_rejects(torch.ops.dip._upsample_bilinear2x_backward.default, [
        ((g, 4, 4), RuntimeError, "does not match an input of 4 x 4"),
        ((g.half(), 4, 5), RuntimeError, "only float32 and float64"),
        ((g[0], 4, 5), RuntimeError, "input must be N x C x H x W"),
    ])
