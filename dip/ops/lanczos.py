"""Lanczos downsampling: replicate padding, separable Lanczos filtering and striding.

The taps follow the original Deep Image Prior code (phase 0.5): for a factor
``f`` and support ``a`` there are ``K = 2·a·f`` taps per axis,

    t[i] = sinc(d) · sinc(d / a),   d = |i + 0.5 − a·f| / f,   i = 0 … K−1

(with ``sinc(x) = sin(πx)/(πx)``), normalised to sum to one. The image is
replicate-padded by ``K − f`` pixels per axis, ``(K − f) // 2`` before and the
rest after (the two differ by one when ``f`` is odd), so that the output of a
stride-``f`` filter is exactly ``⌊H/f⌋ × ⌊W/f⌋``.

``lanczos_downsample`` runs the fused operator ``torch.ops.dip.lanczos_downsample``
(csrc/cpu, csrc/cuda) when it is built for the input's device and dtype, and
the pure-PyTorch ``lanczos_downsample_reference`` otherwise. The operator's
fake (meta) implementation and autograd formula are registered here, so it
works under ``torch.compile``/``torch.export`` and ``torch.autograd``; its
backward is the operator ``torch.ops.dip._lanczos_downsample_backward``.
Its translation to standard ONNX (``onnx_translations``) lives here too.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from dip import _extension
from dip.errors import DipError
from dip.ops import device_check

MAX_FACTOR = 32


def lanczos_taps(factor: int, support: int = 2, dtype: torch.dtype = torch.float64, device=None) -> torch.Tensor:
    """The 1-D Lanczos taps (phase 0.5) for ``factor`` and ``support``, normalised to sum 1."""
    check_factor_support(factor, support)
    k = 2 * support * factor
    taps = []
    for i in range(k):
        d = abs(i + 0.5 - support * factor) / factor
        taps.append(_sinc(d) * _sinc(d / support))
    t = torch.tensor(taps, dtype=torch.float64)
    return (t / t.sum()).to(dtype=dtype, device=device)


def _sinc(x: float) -> float:
    return 1.0 if x == 0 else math.sin(math.pi * x) / (math.pi * x)


def padding(factor: int, support: int) -> tuple[int, int]:
    """Replicate padding (before, after) applied on each axis."""
    total = 2 * support * factor - factor
    return total // 2, total - total // 2


def check_factor_support(factor: int, support: int) -> None:
    """The one check of a Lanczos factor (integer 2–32) and support (2 or 3); a clear error otherwise."""
    if not isinstance(factor, int) or isinstance(factor, bool):
        raise DipError(f"factor must be an integer, got {factor!r}")
    if factor < 2 or factor > MAX_FACTOR:
        raise DipError(f"factor must be an integer from 2 to {MAX_FACTOR}, got {factor}")
    if support not in (2, 3):
        raise DipError(f"support must be 2 (Lanczos2) or 3 (Lanczos3), got {support}")


def check_input(x: torch.Tensor, factor: int, support: int) -> None:
    """Raise a clear error for inputs the downsampler cannot take."""
    check_factor_support(factor, support)
    if x.dim() != 4:
        raise DipError(f"lanczos_downsample expects an N×C×H×W tensor, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise DipError(f"lanczos_downsample expects a floating-point tensor, got {x.dtype}")
    h, w = x.shape[-2:]
    if h < factor or w < factor:
        raise DipError(
            f"image of {h}×{w} is smaller than the downsampling factor {factor}: "
            f"it would leave an empty output; use a smaller factor or a larger image"
        )


def lanczos_downsample_reference(x: torch.Tensor, factor: int, support: int = 2) -> torch.Tensor:
    """Pure-PyTorch Lanczos downsampling (the reference of the fused operator)."""
    check_input(x, factor, support)
    before, after = padding(factor, support)
    return lanczos_filter(x, lanczos_taps(factor, support, dtype=x.dtype, device=x.device), factor, before, after)


def lanczos_filter(x: torch.Tensor, taps: torch.Tensor, factor: int, before: int, after: int) -> torch.Tensor:
    """Replicate padding, separable filtering with ``taps`` and stride ``factor``: the reference's arithmetic.

    Unchecked and TorchScript-compatible: ``dip.nn.LanczosDownsample`` scripts
    to this (with its stored taps) when the compiled operator is not loaded.
    """
    n, c, h, w = x.shape
    y = x.reshape(n * c, 1, h, w)
    y = F.pad(y, [before, after, before, after], mode="replicate")
    y = F.conv2d(y, taps.view(1, 1, -1, 1), stride=(factor, 1))
    y = F.conv2d(y, taps.view(1, 1, 1, -1), stride=(1, factor))
    return y.reshape(n, c, h // factor, w // factor)


def _fused_available(x: torch.Tensor) -> bool:
    """True when the fused operator has a kernel for ``x``'s device and dtype."""
    if not _extension.has_op("lanczos_downsample"):
        return False
    if x.device.type == "cpu":
        return x.dtype in (torch.float32, torch.float64)
    if x.device.type == "cuda":
        return _CUDA_KERNELS and x.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    return False


def lanczos_downsample(x: torch.Tensor, factor: int, support: int = 2) -> torch.Tensor:
    """Downsample ``x`` (N×C×H×W) by an integer ``factor`` with a Lanczos kernel.

    Output is ``⌊H/factor⌋ × ⌊W/factor⌋``. Uses the fused operator when it is
    built for the input's device and dtype, else the pure-PyTorch reference;
    both raise :class:`DipError` for inputs they cannot take. Scripted with
    TorchScript, it always calls the fused operator.
    """
    if not torch.jit.is_scripting():
        check_input(x, factor, support)
        if not (_fused_available(x) and device_check.fused_ok("lanczos_downsample", x)):
            return lanczos_downsample_reference(x, factor, support)
    return torch.ops.dip.lanczos_downsample(x, factor, support)


def lanczos_downsample_adjoint(y: torch.Tensor, factor: int, support: int, input_size: tuple[int, int]) -> torch.Tensor:
    """The adjoint (transpose) of :func:`lanczos_downsample` for an input of ``input_size`` = (H, W).

    Uses the fused backward operator when available, else autograd of the reference.
    """
    h, w = input_size
    if y.dim() != 4 or (y.shape[-2], y.shape[-1]) != (h // factor, w // factor):
        raise DipError(f"expected an N×C×{h // factor}×{w // factor} tensor for an input of {h}×{w}, "
                       f"got shape {tuple(y.shape)}")
    if _fused_available(y) and device_check.fused_ok("lanczos_downsample", y):
        return torch.ops.dip._lanczos_downsample_backward(y, factor, support, h, w)
    x = torch.zeros(*y.shape[:2], h, w, dtype=y.dtype, device=y.device, requires_grad=True)
    with torch.enable_grad():
        (grad,) = torch.autograd.grad(lanczos_downsample_reference(x, factor, support), x, y)
    return grad


def _register_op_python_parts() -> None:
    """Fake implementations and autograd formulas of the compiled operators."""

    @torch.library.register_fake("dip::lanczos_downsample")
    def _(x, factor, support=2):
        torch._check(x.dim() == 4, lambda: "lanczos_downsample: expected an N×C×H×W tensor")
        torch._check(x.is_floating_point(), lambda: "lanczos_downsample: expected a floating-point tensor")
        return x.new_empty((x.shape[0], x.shape[1], x.shape[2] // factor, x.shape[3] // factor))

    @torch.library.register_fake("dip::_lanczos_downsample_backward")
    def _(grad_output, factor, support, input_height, input_width):
        torch._check(grad_output.dim() == 4, lambda: "_lanczos_downsample_backward: expected an N×C×H×W gradient")
        return grad_output.new_empty((grad_output.shape[0], grad_output.shape[1], input_height, input_width))

    def setup_context(ctx, inputs, output):
        x, factor, support = inputs
        ctx.factor, ctx.support = factor, support
        ctx.input_size = (x.shape[2], x.shape[3])

    def backward(ctx, grad):
        gx = torch.ops.dip._lanczos_downsample_backward(grad, ctx.factor, ctx.support, *ctx.input_size)
        return gx, None, None

    torch.library.register_autograd("dip::lanczos_downsample", backward, setup_context=setup_context)

    # The backward is linear in grad_output with the forward as its adjoint,
    # which gives double backward (e.g. gradient penalties) for free.
    def setup_context_backward(ctx, inputs, output):
        _, factor, support, _, _ = inputs
        ctx.factor, ctx.support = factor, support

    def backward_backward(ctx, grad):
        return torch.ops.dip.lanczos_downsample(grad, ctx.factor, ctx.support), None, None, None, None

    torch.library.register_autograd(
        "dip::_lanczos_downsample_backward", backward_backward, setup_context=setup_context_backward
    )


def _lanczos_downsample_onnx(x, factor: int, support: int = 2):
    """ONNX translation of ``dip::lanczos_downsample``: edge ``Pad`` and two strided depthwise ``Conv``.

    The image is reshaped to (N·C)×1×H×W so one single-channel filter serves
    every channel, as in :func:`lanczos_filter`. Standard ONNX only, so the
    model runs in stock runtimes.
    """
    from onnxscript import ir
    from onnxscript import opset18 as op

    taps = lanczos_taps(factor, support, dtype=torch.float32).numpy()
    k = taps.size
    before, after = padding(factor, support)
    y = op.Reshape(x, op.Concat(op.Constant(value_ints=[-1, 1]), op.Shape(x, start=2), axis=0))
    y = op.Pad(y, op.Constant(value_ints=[0, 0, before, before, 0, 0, after, after]), mode="edge")
    y = op.Conv(y, op.Constant(value=ir.tensor(taps.reshape(1, 1, k, 1))), strides=[factor, 1])
    y = op.Conv(y, op.Constant(value=ir.tensor(taps.reshape(1, 1, 1, k))), strides=[1, factor])
    return op.Reshape(y, op.Concat(op.Shape(x, start=0, end=2), op.Shape(y, start=2), axis=0))


def onnx_translations() -> dict:
    """``torch.onnx.export(custom_translation_table=…)`` entries for this module's loaded operators."""
    if not _extension.has_op("lanczos_downsample"):
        return {}
    return {torch.ops.dip.lanczos_downsample.default: _lanczos_downsample_onnx}


_CUDA_KERNELS = bool(_extension.build_info().get("with_cuda", False))
if _extension.has_op("lanczos_downsample"):
    _register_op_python_parts()
