"""Lanczos downsampling: the taps, the pure-PyTorch reference, and the fused operator.

Tests of the reference run everywhere; tests of the fused operator skip (with
the reason) when dip._C is not built. The fused-vs-reference, layout,
gradcheck (eager and scripted), opcheck and compile checks come from
``tests/ops/base.py`` and run on every device (the CUDA ones carry the
``cuda`` marker and skip where no GPU is present).
"""
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from base import (
    DEVICES,
    LAYOUTS,
    OpSpec,
    Sample,
    assert_rel_close,
    check_against_reference,
    check_compile,
    check_gradcheck,
    check_opcheck,
    dtypes_for,
)

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

HAS_OP = _extension.has_op("lanczos_downsample")
needs_op = pytest.mark.skipif(not HAS_OP, reason=f"dip._C is not built or disabled: {_extension.build_info()}")


def sample_shapes(factor):
    """Batch > 1, C in 1, 3, 7, odd sizes, and an image smaller than the filter (2·support·factor)."""
    return [
        (2, 3, 5 * factor + 3, 3 * factor + 1),
        (3, 1, 2 * factor + 1, 4 * factor - 1),
        (1, 7, factor + 1, factor),
    ]


class _Scriptable(torch.nn.Module):
    def forward(self, x: torch.Tensor, factor: int, support: int) -> torch.Tensor:
        return lanczos_downsample(x, factor, support)


def _backward_args(args):
    x, factor, support = args
    h, w = x.shape[-2:]
    g = torch.randn(x.shape[0], x.shape[1], h // factor, w // factor, dtype=x.dtype, device=x.device)
    return (g.requires_grad_(x.requires_grad), factor, support, h, w)


def spec(factor: int = 4, support: int = 2) -> OpSpec:
    """The operator for the shared checks, on the sample shapes of one factor and support."""

    def samples(device, dtype, gen):
        for shape in sample_shapes(factor):
            x = torch.randn(shape, dtype=torch.float64, generator=gen)
            yield Sample((x, factor, support), 1, f"{tuple(shape)} x{factor} a{support}")

    return OpSpec(
        name="dip::lanczos_downsample",
        fused=lambda x, f, a: torch.ops.dip.lanczos_downsample(x, f, a),
        reference=lanczos_downsample_reference,
        public=lanczos_downsample,
        samples=samples,
        dtypes={"cpu": (torch.float64, torch.float32),
                "cuda": (torch.float64, torch.float32, torch.float16, torch.bfloat16)},
        scriptable=_Scriptable,
        opcheck_ops=((torch.ops.dip.lanczos_downsample.default, tuple),
                     (torch.ops.dip._lanczos_downsample_backward.default, _backward_args)) if HAS_OP else (),
    )


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


# --- the fused operator against the reference, on every device (tests/ops/base.py) ---------------


@pytest.mark.parametrize("device, dtype", dtypes_for(spec()))
@pytest.mark.parametrize("support", SUPPORTS)
@pytest.mark.parametrize("factor", FACTORS)
def test_forward_and_gradient_match_reference(factor, support, device, dtype):
    check_against_reference(spec(factor, support), device, dtype, seed=factor * 10 + support)


@pytest.mark.parametrize("device, dtype", [p for p in dtypes_for(spec()) if p.values[1] == torch.float64])
@pytest.mark.parametrize("factor, support", [(4, 3), (3, 2)])
def test_memory_layouts(factor, support, device, dtype):
    check_against_reference(spec(factor, support), device, dtype, layouts=LAYOUTS)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("factor, support", [(2, 2), (3, 3), (4, 2)])
def test_gradcheck(factor, support, device):
    """Eager op and the TorchScript-scripted public function, gradcheck and gradgradcheck."""
    check_gradcheck(spec(factor, support), device)


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


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("factor, support", [(4, 2), (3, 3)])
def test_opcheck(factor, support, device):
    check_opcheck(spec(factor, support), device)


@pytest.mark.parametrize("device", DEVICES)
def test_compile_fullgraph_matches_eager(device):
    check_compile(spec(4, 2), device)


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
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_cpu_op_says_which_dtypes_it_takes(dtype):
    """Bug: float16/bfloat16 passed the shared check (any floating type, for the CUDA kernels) and failed in the
    CPU kernel's dispatch as '"lanczos_downsample_cpu" not implemented for 'Half'', naming no supported dtype."""
    with pytest.raises(RuntimeError, match="CPU kernel takes float32 and float64 tensors"):
        torch.ops.dip.lanczos_downsample(torch.zeros(1, 1, 16, 16, dtype=dtype), 2)
    with pytest.raises(RuntimeError, match="CPU kernel takes float32 and float64 tensors"):
        torch.ops.dip._lanczos_downsample_backward(torch.zeros(1, 1, 8, 8, dtype=dtype), 2, 2, 16, 16)


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
