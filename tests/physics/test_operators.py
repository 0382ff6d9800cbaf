import math

import pytest
import torch

from dip.errors import DipError
from dip.ops.lanczos import lanczos_downsample_reference, lanczos_taps, padding
from dip.physics import Custom, Denoise, Downsample, Inpaint


def _closed_form(factor, support):
    k = 2 * support * factor
    vals = []
    for i in range(k):
        d = abs(i + 0.5 - support * factor) / factor
        # a·sin(πd)·sin(πd/a) / (π²d²), the original work's expression
        vals.append(support * math.sin(math.pi * d) * math.sin(math.pi * d / support) / (math.pi**2 * d * d))
    t = torch.tensor(vals, dtype=torch.float64)
    return t / t.sum()


@pytest.mark.parametrize("factor", [2, 3, 4, 8, 32])
@pytest.mark.parametrize("support", [2, 3])
def test_lanczos_taps_closed_form_and_unit_sum(factor, support):
    taps = lanczos_taps(factor, support)
    assert taps.numel() == 2 * support * factor
    torch.testing.assert_close(taps, _closed_form(factor, support), rtol=0, atol=1e-14)
    assert abs(taps.sum().item() - 1) < 1e-12
    torch.testing.assert_close(taps, taps.flip(0))  # symmetric about the centre


def test_padding_is_asymmetric_for_odd_factors():
    assert padding(4, 2) == (6, 6)
    assert padding(3, 2) == (4, 5)
    assert sum(padding(5, 3)) == 2 * 3 * 5 - 5


@pytest.mark.parametrize("factor", [2, 3, 4, 8])
@pytest.mark.parametrize("size", [(37, 53), (64, 64), (17, 9)])
def test_downsampler_output_size(factor, size):
    h, w = size
    if min(h, w) < factor:
        pytest.skip("smaller than the factor")
    y = Downsample(factor)(torch.rand(2, 3, h, w))
    assert y.shape == (2, 3, h // factor, w // factor)


def test_downsampler_keeps_constants():
    y = lanczos_downsample_reference(torch.full((1, 2, 30, 21), 0.7, dtype=torch.float64), 3)
    torch.testing.assert_close(y, torch.full_like(y, 0.7))


def _adjoint_gap(op, shape):
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=torch.float64)
    y = torch.randn_like(op(x))
    lhs = (op(x) * y).sum()
    rhs = (x * op.adjoint(y, shape)).sum()
    return abs(lhs - rhs).item() / abs(lhs).item()


@pytest.mark.parametrize(
    "op,shape",
    [
        (Denoise(), (1, 3, 13, 11)),
        (Downsample(2), (1, 3, 37, 53)),
        (Downsample(3, support=3), (2, 1, 31, 20)),
        (Inpaint((torch.rand(13, 11) > 0.5).double()), (1, 3, 13, 11)),
        (Custom(lambda x: x[..., ::2, 1::2] * 3.0, linear=True), (1, 3, 13, 11)),
    ],
)
def test_linear_operators_are_adjoint(op, shape):
    assert _adjoint_gap(op, shape) < 1e-12


def test_nonlinear_custom_has_no_adjoint():
    op = Custom(torch.tanh)
    with pytest.raises(DipError, match="not linear"):
        op.adjoint(torch.zeros(1, 1, 4, 4), (1, 1, 4, 4))


@pytest.mark.parametrize("factor", [1, 0, 33, 2.5])
def test_bad_factor(factor):
    with pytest.raises(DipError, match="factor"):
        Downsample(factor)


def test_downsample_input_smaller_than_factor():
    with pytest.raises(DipError, match="smaller than the downsampling factor"):
        Downsample(8)(torch.rand(1, 1, 5, 40))
