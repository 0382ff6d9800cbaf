"""Lanczos downsampling: the taps, the pure-PyTorch reference, and the fused operator.

Tests of the reference run everywhere; tests of the fused operator skip (with
the reason) when dip._C is not built, and CUDA tests skip where no GPU is present.
"""
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import dip.ops.lanczos as lanczos_module
from dip import _extension
from dip.errors import DipError
from dip.ops.lanczos import (
    lanczos_downsample,
    lanczos_downsample_adjoint,
    lanczos_downsample_reference,
    lanczos_taps,
    padding,
)

FACTORS = [2, 3, 4, 8, 16, 32]
SUPPORTS = [2, 3]
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}

HAS_OP = _extension.has_op("lanczos_downsample")
needs_op = pytest.mark.skipif(not HAS_OP, reason=f"dip._C is not built or disabled: {_extension.build_info()}")
HAS_CUDA_OP = HAS_OP and torch.cuda.is_available() and _extension.build_info().get("with_cuda", False)
needs_cuda = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
]


def assert_rel_close(actual, expected, tol):
    """max |actual − expected| ≤ tol · max(|expected|, 1e-30)."""
    assert actual.shape == expected.shape
    err = (actual.double() - expected.double()).abs().max().item()
    scale = max(expected.double().abs().max().item(), 1e-30)
    assert err <= tol * scale, f"max error {err:.3e} > {tol:.0e} × {scale:.3e}"


def sample_shapes(factor):
    """Batch > 1, C in 1, 3, 7, odd sizes, and an image smaller than the filter (2·support·factor)."""
    return [
        (2, 3, 5 * factor + 3, 3 * factor + 1),
        (3, 1, 2 * factor + 1, 4 * factor - 1),
        (1, 7, factor + 1, factor),
    ]


def dense_original(x, factor, support):
    """The original DIP formulation: replicate-pad copy, then a dense C→C conv with the 2-D taps on the diagonal."""
    c = x.shape[1]
    t = lanczos_taps(factor, support, dtype=x.dtype, device=x.device)
    weight = torch.zeros(c, c, t.numel(), t.numel(), dtype=x.dtype, device=x.device)
    for i in range(c):
        weight[i, i] = torch.outer(t, t)
    before, after = padding(factor, support)
    return F.conv2d(F.pad(x, (before, after, before, after), mode="replicate"), weight, stride=factor)


# --- taps and reference (no extension needed) -------------------------------------------------


@pytest.mark.parametrize("support", SUPPORTS)
@pytest.mark.parametrize("factor", FACTORS)
def test_taps_closed_form(factor, support):
    k = torch.arange(2 * support * factor, dtype=torch.float64)
    d = (k + 0.5 - support * factor).abs() / factor
    closed = torch.sinc(d) * torch.sinc(d / support)  # torch.sinc is the normalised sin(πx)/(πx)
    taps = lanczos_taps(factor, support)
    assert taps.shape == (2 * support * factor,)
    torch.testing.assert_close(taps, closed / closed.sum(), rtol=0, atol=1e-15)
    assert abs(taps.sum().item() - 1.0) < 1e-14
    torch.testing.assert_close(taps, taps.flip(0), rtol=0, atol=1e-15)


def test_padding_gives_floor_size():
    for factor in FACTORS:
        for support in SUPPORTS:
            before, after = padding(factor, support)
            assert before + after == 2 * support * factor - factor
            assert after - before == factor % 2


@pytest.mark.parametrize("factor", [2, 3, 4, 8])
def test_reference_matches_dense_original(factor):
    x = torch.randn(2, 3, 4 * factor + 3, 3 * factor + 1, dtype=torch.float64)
    for support in SUPPORTS:
        assert_rel_close(lanczos_downsample_reference(x, factor, support), dense_original(x, factor, support), 1e-12)


def test_reference_preserves_constants():
    x = torch.full((1, 2, 37, 31), 0.75, dtype=torch.float64)
    y = lanczos_downsample_reference(x, 4, 3)
    assert y.shape == (1, 2, 9, 7)
    torch.testing.assert_close(y, torch.full_like(y, 0.75), rtol=0, atol=1e-12)


@pytest.mark.parametrize("fn", [lanczos_downsample, lanczos_downsample_reference], ids=["public", "reference"])
@pytest.mark.parametrize(
    "args, match",
    [
        ((torch.zeros(1, 1, 16, 16), 1, 2), "factor"),
        ((torch.zeros(1, 1, 64, 64), 33, 2), "factor"),
        ((torch.zeros(1, 1, 16, 16), 2.0, 2), "integer"),
        ((torch.zeros(1, 1, 16, 16), 2, 4), "support"),
        ((torch.zeros(1, 16, 16), 2, 2), "N×C×H×W"),
        ((torch.zeros(1, 1, 1, 16, 16), 2, 2), "N×C×H×W"),
        ((torch.zeros(1, 1, 16, 16, dtype=torch.int64), 2, 2), "floating-point"),
        ((torch.zeros(1, 1, 16, 16, dtype=torch.uint8), 2, 2), "floating-point"),
        ((torch.zeros(1, 1, 3, 16), 4, 2), "smaller than"),
        ((torch.zeros(1, 1, 16, 7), 8, 3), "smaller than"),
    ],
)
def test_exception(fn, args, match):
    with pytest.raises(DipError, match=match):
        fn(*args)


def test_adjoint_helper_without_op_path():
    x = torch.randn(2, 3, 29, 23, dtype=torch.float64)
    y = torch.randn(2, 3, 7, 5, dtype=torch.float64)
    lhs = (lanczos_downsample_reference(x, 4, 2) * y).sum()
    rhs = (x * lanczos_downsample_adjoint(y, 4, 2, (29, 23))).sum()
    assert abs(lhs.item() - rhs.item()) <= 1e-12 * abs(lhs.item()) + 1e-12


def test_disable_extension_uses_reference():
    code = (
        "import torch\n"
        "from dip import _extension\n"
        "from dip.ops.lanczos import lanczos_downsample, lanczos_downsample_reference\n"
        "assert not _extension.has_ops(), _extension.build_info()\n"
        "assert not hasattr(torch.ops.dip, 'lanczos_downsample')\n"
        "x = torch.randn(2, 3, 37, 31, dtype=torch.float64)\n"
        "assert torch.equal(lanczos_downsample(x, 4), lanczos_downsample_reference(x, 4))\n"
        "print('reference path ok')\n"
    )
    env = dict(os.environ, DIP_DISABLE_EXTENSION="1")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "reference path ok" in out.stdout


# --- the fused operator on CPU ----------------------------------------------------------------


@needs_op
def test_public_function_uses_fused_op(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the reference was called although the fused op is available")

    monkeypatch.setattr(lanczos_module, "lanczos_downsample_reference", fail)
    x = torch.randn(1, 3, 37, 31)
    assert lanczos_downsample(x, 4).shape == (1, 3, 9, 7)


@needs_op
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("support", SUPPORTS)
@pytest.mark.parametrize("factor", FACTORS)
def test_forward_and_gradient_match_reference(factor, support, dtype):
    gen = torch.Generator().manual_seed(factor * 10 + support)
    for shape in sample_shapes(factor):
        x = torch.randn(shape, dtype=dtype, generator=gen)
        x_fused = x.clone().requires_grad_()
        x_ref = x.clone().requires_grad_()
        y = torch.ops.dip.lanczos_downsample(x_fused, factor, support)
        y_ref = lanczos_downsample_reference(x_ref, factor, support)
        assert y.shape == (shape[0], shape[1], shape[2] // factor, shape[3] // factor)
        assert y.dtype == dtype
        assert_rel_close(y, y_ref, TOL[dtype])
        g = torch.randn(y.shape, dtype=dtype, generator=gen)
        (gx,) = torch.autograd.grad(y, x_fused, g)
        (gx_ref,) = torch.autograd.grad(y_ref, x_ref, g)
        assert_rel_close(gx, gx_ref, TOL[dtype])


@needs_op
@pytest.mark.parametrize("layout", ["channels_last", "strided", "transposed"])
def test_memory_layouts(layout):
    base = torch.randn(2, 3, 45, 38, dtype=torch.float64)
    if layout == "channels_last":
        x = base.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":
        x = torch.randn(2, 6, 90, 38, dtype=torch.float64)[:, ::2, ::2]
        base = x.contiguous()
    else:
        x = base.transpose(2, 3).contiguous().transpose(2, 3)
    assert not x.is_contiguous()
    x = x.requires_grad_()
    y = lanczos_downsample(x, 4, 3)
    assert_rel_close(y, lanczos_downsample_reference(base, 4, 3), 1e-10)
    g = torch.randn_like(y).contiguous(memory_format=torch.channels_last)
    (gx,) = torch.autograd.grad(y, x, g)
    base_ref = base.clone().requires_grad_()
    (gx_ref,) = torch.autograd.grad(lanczos_downsample_reference(base_ref, 4, 3), base_ref, g)
    assert_rel_close(gx, gx_ref, 1e-10)


@needs_op
@pytest.mark.parametrize("factor, support", [(2, 2), (3, 3), (4, 2)])
def test_gradcheck(factor, support):
    x = torch.randn(2, 2, 3 * factor + 1, 2 * factor + 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: lanczos_downsample(t, factor, support), (x,))
    assert torch.autograd.gradgradcheck(lambda t: lanczos_downsample(t, factor, support), (x,))


@needs_op
@pytest.mark.parametrize("factor", [3, 4, 32])
@pytest.mark.parametrize("support", SUPPORTS)
def test_adjointness(factor, support):
    """⟨d x, y⟩ = ⟨x, dᵀ y⟩ with dᵀ the backward operator."""
    gen = torch.Generator().manual_seed(7)
    h, w = 3 * factor + 5, 2 * factor + 1
    x = torch.randn(2, 3, h, w, dtype=torch.float64, generator=gen)
    y = torch.randn(2, 3, h // factor, w // factor, dtype=torch.float64, generator=gen)
    lhs = (torch.ops.dip.lanczos_downsample(x, factor, support) * y).sum().item()
    rhs = (x * torch.ops.dip._lanczos_downsample_backward(y, factor, support, h, w)).sum().item()
    assert math.isclose(lhs, rhs, rel_tol=1e-12, abs_tol=1e-12)


@needs_op
def test_opcheck():
    x = torch.randn(2, 3, 37, 31, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 3, 9, 7, dtype=torch.float64, requires_grad=True)
    for op, args in [
        (torch.ops.dip.lanczos_downsample.default, (x, 4, 2)),
        (torch.ops.dip.lanczos_downsample.default, (x.detach(), 3, 3)),
        (torch.ops.dip._lanczos_downsample_backward.default, (g, 4, 2, 37, 31)),
    ]:
        torch.library.opcheck(op, args)


@needs_op
def test_op_errors_when_called_directly():
    op = torch.ops.dip.lanczos_downsample
    with pytest.raises(RuntimeError, match="factor must be an integer from 2 to 32"):
        op(torch.zeros(1, 1, 16, 16), 1)
    with pytest.raises(RuntimeError, match="support must be 2"):
        op(torch.zeros(1, 1, 16, 16), 2, 5)
    with pytest.raises(RuntimeError, match="N×C×H×W"):
        op(torch.zeros(16, 16), 2)
    with pytest.raises(RuntimeError, match="floating-point"):
        op(torch.zeros(1, 1, 16, 16, dtype=torch.int32), 2)
    with pytest.raises(RuntimeError, match="smaller than the factor"):
        op(torch.zeros(1, 1, 16, 3), 4)
    with pytest.raises(RuntimeError, match="does not match"):
        torch.ops.dip._lanczos_downsample_backward(torch.zeros(1, 1, 4, 4), 4, 2, 20, 16)


@needs_op
def test_dynamo_fullgraph():
    graphs = []

    def recording_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def fn(x):
        return lanczos_downsample(x * 2.0, 4, 2).square().sum()

    x = torch.randn(1, 3, 37, 31, dtype=torch.float64, requires_grad=True)
    expected = fn(x)
    (expected_grad,) = torch.autograd.grad(expected, x)

    torch._dynamo.reset()
    torch.compile(fn, backend=recording_backend, fullgraph=True)(x)
    targets = [node.target for g in graphs for node in g.graph.nodes if node.op == "call_function"]
    assert torch.ops.dip.lanczos_downsample.default in targets or torch.ops.dip.lanczos_downsample in targets

    # aot_eager traces forward and backward through the fake implementations.
    torch._dynamo.reset()
    out = torch.compile(fn, backend="aot_eager", fullgraph=True)(x)
    (grad,) = torch.autograd.grad(out, x)
    assert_rel_close(out, expected, 1e-12)
    assert_rel_close(grad, expected_grad, 1e-12)


@needs_op
def test_jit_script():
    class Down(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return lanczos_downsample(x, 3, 3)

    scripted = torch.jit.script(Down())
    graph = str(scripted.inlined_graph)
    assert "dip::lanczos_downsample" in graph
    assert "conv2d" not in graph  # the reference branch is not compiled in
    x = torch.randn(2, 3, 31, 26, dtype=torch.float64, requires_grad=True)
    assert_rel_close(scripted(x), lanczos_downsample_reference(x, 3, 3), 1e-10)
    assert torch.autograd.gradcheck(scripted, (x[:1, :1, :13, :11].detach().requires_grad_(),))


@needs_op
def test_parallel_matches_single_thread():
    x = torch.randn(2, 3, 203, 157)
    g = torch.randn(2, 3, 50, 39)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        y1 = torch.ops.dip.lanczos_downsample(x, 4, 2)
        b1 = torch.ops.dip._lanczos_downsample_backward(g, 4, 2, 203, 157)
        torch.set_num_threads(max(2, threads))
        y2 = torch.ops.dip.lanczos_downsample(x, 4, 2)
        b2 = torch.ops.dip._lanczos_downsample_backward(g, 4, 2, 203, 157)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(y1, y2)
    assert torch.equal(b1, b2)


# --- CUDA ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dtype, tol",
    [(torch.float64, 1e-10), (torch.float32, 1e-5), (torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)],
    ids=["f64", "f32", "f16", "bf16"],
)
@pytest.mark.parametrize("factor", [2, 3, 4, 8, 32])
@pytest.mark.parametrize("support", SUPPORTS)
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_reference(factor, support, dtype, tol):
    assert HAS_CUDA_OP, f"a GPU is present but dip._C has no CUDA kernels: {_extension.build_info()}"
    gen = torch.Generator().manual_seed(factor)
    for shape in sample_shapes(factor):
        x = torch.randn(shape, dtype=torch.float64, generator=gen)
        x_dev = x.to("cuda", dtype).requires_grad_()
        x_ref = x.clone().requires_grad_()
        y = torch.ops.dip.lanczos_downsample(x_dev, factor, support)
        y_ref = lanczos_downsample_reference(x_ref, factor, support)
        assert y.dtype == dtype and y.is_cuda
        assert_rel_close(y.cpu(), y_ref, tol)
        g = torch.randn(y.shape, dtype=torch.float64, generator=gen)
        (gx,) = torch.autograd.grad(y, x_dev, g.to("cuda", dtype))
        (gx_ref,) = torch.autograd.grad(y_ref, x_ref, g)
        assert_rel_close(gx.cpu(), gx_ref, tol)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_opcheck_and_gradcheck():
    assert HAS_CUDA_OP, f"a GPU is present but dip._C has no CUDA kernels: {_extension.build_info()}"
    x = torch.randn(2, 3, 37, 31, dtype=torch.float64, device="cuda", requires_grad=True)
    torch.library.opcheck(torch.ops.dip.lanczos_downsample.default, (x, 4, 2))
    g = torch.randn(2, 3, 9, 7, dtype=torch.float64, device="cuda")
    torch.library.opcheck(torch.ops.dip._lanczos_downsample_backward.default, (g, 4, 2, 37, 31))
    small = x[:1, :2, :13, :11].detach().requires_grad_()
    assert torch.autograd.gradcheck(lambda t: lanczos_downsample(t, 3, 3), (small,))
