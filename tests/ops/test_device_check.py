"""The one-time device check of fused kernels (dip.ops.device_check).

The logic is tested on the CPU by declaring CPU kernels "checked" and standing
in for the device kernel with functions that return wrong values, raise, or
compute the right thing; the real check runs on a GPU in the ``cuda`` tests.
"""
from __future__ import annotations

import warnings

import pytest
import torch

from dip import _extension
from dip.ops import device_check
from dip.ops.conv_block import conv_block, conv_block_reference
from dip.ops.lanczos import lanczos_downsample, lanczos_downsample_reference


@pytest.fixture(autouse=True)
def fresh_verdicts(monkeypatch):
    monkeypatch.setattr(device_check, "_VERDICTS", {})


@pytest.fixture
def cpu_checked(monkeypatch):
    """Treat CPU kernels like device kernels: checked before first use."""
    monkeypatch.setattr(device_check, "CHECKED_DEVICE_TYPES", ("cpu",))


def _right_conv_block(x, w, b, gamma, beta, rm, rv, training, stride, padding, reflect, eps, slope):
    return conv_block_reference(x, w, b, gamma, beta, rm, rv, None, training, None, eps, stride, padding, reflect,
                                slope)


def _wrong_conv_block(*args):
    return _right_conv_block(*args) * 1.5 + 0.25


def _wrong_backward_conv_block(*args):
    out = _right_conv_block(*args)
    return out.detach() + (out - out.detach()) * 2.0  # right values, gradients twice too large


def _wrong_grouped_conv_block(*args):
    out = _right_conv_block(*args)
    grouped = args[0].shape[1] != args[1].shape[1]
    return out + 0.5 if grouped else out  # right on single convolutions, wrong on grouped ones


def _raising_kernel(*args):
    raise RuntimeError("CUDA error: no kernel image is available for execution on the device")


def _block_args(dtype=torch.float64):
    g = torch.Generator().manual_seed(3)
    return (torch.randn(1, 3, 8, 6, generator=g, dtype=dtype), torch.randn(4, 3, 3, 3, generator=g, dtype=dtype),
            None, torch.ones(4, dtype=dtype), torch.zeros(4, dtype=dtype), None, None, None, True, 0.1, 1e-5, 1, 1,
            True, 0.2)


def _mismatch_warnings(record):
    return [w for w in record if issubclass(w.category, device_check.FusedKernelMismatch)]


def test_cpu_kernels_are_not_checked_by_default(monkeypatch):
    monkeypatch.setitem(device_check._CHECKS, "conv_block", lambda *a: pytest.fail("the CPU kernel was checked"))
    assert device_check.fused_ok("conv_block", torch.zeros(1, 3, 4, 4))
    assert device_check.verdicts() == {}


@pytest.mark.parametrize("kernel, what", [(_wrong_conv_block, "output differs"),
                                          (_wrong_backward_conv_block, "grad input differs"),
                                          (_wrong_grouped_conv_block, "k3 groups 2 output differs"),
                                          (_raising_kernel, "raised RuntimeError: CUDA error")])
def test_bad_conv_block_kernel_falls_back_with_one_warning(cpu_checked, monkeypatch, kernel, what):
    monkeypatch.setattr(device_check, "_fused_conv_block", kernel)
    x = torch.zeros(1, 3, 4, 4)
    with pytest.warns(device_check.FusedKernelMismatch, match=what):
        assert not device_check.fused_ok("conv_block", x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not device_check.fused_ok("conv_block", x)  # the verdict is kept: no second check or warning
    assert device_check.verdicts() == {"conv_block cpu:None float32": False}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_right_conv_block_kernel_passes(cpu_checked, monkeypatch, dtype):
    calls = []
    monkeypatch.setattr(device_check, "_fused_conv_block", lambda *a: calls.append(1) or _right_conv_block(*a))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert device_check.fused_ok("conv_block", torch.zeros(1, 3, 4, 4, dtype=dtype))
        assert device_check.fused_ok("conv_block", torch.zeros(1, 3, 4, 4, dtype=dtype))
    assert len(calls) == 3  # three configurations (one grouped), checked once


def test_verdicts_are_per_dtype(cpu_checked, monkeypatch):
    monkeypatch.setattr(device_check, "_fused_conv_block", _right_conv_block)
    assert device_check.fused_ok("conv_block", torch.zeros(1, dtype=torch.float64))
    monkeypatch.setattr(device_check, "_fused_conv_block", _wrong_conv_block)
    with pytest.warns(device_check.FusedKernelMismatch):
        assert not device_check.fused_ok("conv_block", torch.zeros(1, dtype=torch.float32))
    assert device_check.verdicts() == {"conv_block cpu:None float64": True, "conv_block cpu:None float32": False}


def test_lanczos_kernels(cpu_checked, monkeypatch):
    monkeypatch.setattr(device_check, "_fused_lanczos", lambda x, f, s: lanczos_downsample_reference(x, f, s) + 1e-3)
    with pytest.warns(device_check.FusedKernelMismatch, match="factor 2 output"):
        assert not device_check.fused_ok("lanczos_downsample", torch.zeros(1, 1, 4, 4, dtype=torch.float64))
    device_check.reset()
    monkeypatch.setattr(device_check, "_fused_lanczos", lanczos_downsample_reference)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert device_check.fused_ok("lanczos_downsample", torch.zeros(1, 1, 4, 4, dtype=torch.float64))


def test_deterministic_mode_routes_conv_block_to_reference(cpu_checked, monkeypatch):
    monkeypatch.setitem(device_check._CHECKS, "conv_block", lambda *a: pytest.fail("checked in deterministic mode"))
    monkeypatch.setattr(device_check, "_fused_lanczos", lanczos_downsample_reference)
    x = torch.zeros(1, 3, 4, 4, dtype=torch.float64)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert not device_check.fused_ok("conv_block", x)
        assert device_check.fused_ok("lanczos_downsample", x)  # no atomics: still fused
    finally:
        torch.use_deterministic_algorithms(previous)
    assert "conv_block cpu:None float64" not in device_check.verdicts()


def test_no_check_while_compiling(cpu_checked, monkeypatch):
    monkeypatch.setitem(device_check._CHECKS, "conv_block", lambda *a: pytest.fail("checked while tracing"))
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert device_check.fused_ok("conv_block", torch.zeros(1))
    assert device_check.verdicts() == {}


def test_check_is_unaffected_by_grad_mode_and_autocast(cpu_checked, monkeypatch):
    monkeypatch.setattr(device_check, "_fused_conv_block", _right_conv_block)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert device_check.fused_ok("conv_block", torch.zeros(1))


def test_check_leaves_the_global_generator_alone(cpu_checked, monkeypatch):
    monkeypatch.setattr(device_check, "_fused_conv_block", _right_conv_block)
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    device_check.fused_ok("conv_block", torch.zeros(1))
    assert torch.equal(torch.rand(3), expected)


# --- through the public functions (needs the compiled operators) ------------------------------

needs_ops = pytest.mark.skipif(not _extension.has_op("conv_block"), reason="dip._C is not built or disabled")


@needs_ops
def test_public_conv_block_uses_the_reference_after_a_mismatch(cpu_checked, monkeypatch):
    monkeypatch.setattr(device_check, "_fused_conv_block", _wrong_conv_block)
    args = _block_args()
    with pytest.warns(device_check.FusedKernelMismatch):
        out = conv_block(*args)
    assert torch.equal(out, conv_block_reference(*args))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(conv_block(*args), out)


@needs_ops
def test_public_conv_block_uses_the_fused_op_after_a_pass(cpu_checked, monkeypatch):
    import dip.ops.conv_block as module

    monkeypatch.setattr(device_check, "_fused_conv_block", _right_conv_block)
    args = _block_args()
    assert device_check.fused_ok("conv_block", args[0])  # the check itself runs the reference
    monkeypatch.setattr(module, "conv_block_reference", lambda *a: pytest.fail("the reference ran"))
    assert conv_block(*args).shape == (1, 4, 8, 6)


@needs_ops
def test_public_lanczos_uses_the_reference_after_a_mismatch(cpu_checked, monkeypatch):
    monkeypatch.setattr(device_check, "_fused_lanczos", _raising_kernel)
    x = torch.randn(1, 2, 13, 11, dtype=torch.float64)
    with pytest.warns(device_check.FusedKernelMismatch):
        y = lanczos_downsample(x, 2)
    assert torch.equal(y, lanczos_downsample_reference(x, 2))


@needs_ops
def test_real_cpu_kernels_pass_the_check(cpu_checked):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for dtype in (torch.float32, torch.float64):
            assert device_check.fused_ok("conv_block", torch.zeros(1, dtype=dtype))
            assert device_check.fused_ok("lanczos_downsample", torch.zeros(1, dtype=dtype))


# --- on a GPU -------------------------------------------------------------------------------


def _cuda_kernels() -> bool:
    return (torch.cuda.is_available() and _extension.has_op("conv_block")
            and torch._C._dispatch_has_kernel_for_dispatch_key("dip::conv_block", "CUDA"))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("op, dtype", [("conv_block", torch.float32), ("conv_block", torch.float64),
                                       ("lanczos_downsample", torch.float32), ("lanczos_downsample", torch.float64),
                                       ("lanczos_downsample", torch.float16),
                                       ("lanczos_downsample", torch.bfloat16)])
def test_cuda_kernels_pass_the_device_check(op, dtype):
    assert _cuda_kernels(), f"a GPU is present but dip._C has no CUDA kernels: {_extension.build_info()}"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert device_check.fused_ok(op, torch.zeros(1, device="cuda", dtype=dtype))
    assert list(device_check.verdicts().values()) == [True]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_deterministic_mode_runs_the_reference_block(monkeypatch):
    import dip.ops.conv_block as module

    calls = []
    real = module.conv_block_reference
    monkeypatch.setattr(module, "conv_block_reference", lambda *a: calls.append(1) or real(*a))
    args = [a.cuda() if isinstance(a, torch.Tensor) else a for a in _block_args(torch.float32)]
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        out = conv_block(*args)
    finally:
        torch.use_deterministic_algorithms(previous)
    assert calls and out.is_cuda
