"""Bilinear ×2 upsampling (``align_corners=False``) for the hourglass decoder.

``upsample_bilinear2x`` runs the compiled ``torch.ops.dip.upsample_bilinear2x``
when it is built for the input's device, else ``upsample_bilinear2x_reference``
(``F.interpolate``, the same arithmetic). The compiled operator works on
channels_last tensors and returns one; its backward
(``torch.ops.dip._upsample_bilinear2x_backward``) gathers the output pixels
that read each input pixel, where ``F.interpolate``'s backward converts the
gradient to NCHW, zero-fills and scatters.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dip._extension import has_op


def upsample_bilinear2x_reference(x: torch.Tensor) -> torch.Tensor:
    """Pure-PyTorch ×2 bilinear upsampling, ``align_corners=False`` (the reference of the fused operator)."""
    return F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)


def _fused_available(x: torch.Tensor) -> bool:
    # Inputs with no channels or no pixels go to the reference, which refuses them ("Non-empty 4D data tensor
    # expected"): the compiled operator returns the (well-defined) empty result of no channels, but a caller must
    # see the same behaviour whether the extension is loaded or not.
    return (
        has_op("upsample_bilinear2x")
        and x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.float64)
        and x.dim() == 4
        and x.shape[1] > 0
        and x.shape[2] > 0
        and x.shape[3] > 0
    )


def upsample_bilinear2x(x: torch.Tensor) -> torch.Tensor:
    """N×C×H×W → N×C×2H×2W bilinear upsampling, fused on CPU when the extension is loaded."""
    if not torch.jit.is_scripting():
        if not _fused_available(x):
            return upsample_bilinear2x_reference(x)
    return torch.ops.dip.upsample_bilinear2x(x)


class UpsampleBilinear2x(nn.Module):
    """``nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)`` run by the fused operator."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return upsample_bilinear2x(x)

    def unfused(self) -> nn.Module:
        """The standard-operator twin (exports hold standard operators only)."""
        return nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)


def _check_input(t: torch.Tensor, op: str) -> None:
    """The fake kernels' twin of the compiled kernels' ``check_input`` (csrc/cpu/upsample_kernel.cpp)."""
    torch._check(t.dim() == 4, lambda: f"{op}: input must be N x C x H x W, got {list(t.shape)}")
    torch._check(t.dtype in (torch.float32, torch.float64), lambda: f"{op}: only float32 and float64 are "
                 f"supported, got {t.dtype}")


def _register() -> None:
    """Fake (meta) kernels and autograd of the compiled operators."""

    @torch.library.register_fake("dip::upsample_bilinear2x")
    def _(x):
        _check_input(x, "upsample_bilinear2x")
        n, c, h, w = x.shape
        torch._check(h > 0 and w > 0, lambda: f"upsample_bilinear2x: empty spatial size {list(x.shape)}")
        return x.new_empty((n, c, 2 * h, 2 * w)).contiguous(memory_format=torch.channels_last)

    @torch.library.register_fake("dip::_upsample_bilinear2x_backward")
    def _(grad_output, height, width):
        _check_input(grad_output, "_upsample_bilinear2x_backward")
        torch._check(height > 0 and width > 0 and grad_output.shape[2] == 2 * height
                     and grad_output.shape[3] == 2 * width, lambda: f"_upsample_bilinear2x_backward: gradient "
                     f"{list(grad_output.shape)} does not match an input of {height} x {width}")
        n, c = grad_output.shape[:2]
        return grad_output.new_empty((n, c, height, width)).contiguous(memory_format=torch.channels_last)

    def setup_context(ctx, inputs, output):
        (x,) = inputs
        ctx.size = (x.shape[2], x.shape[3])

    def backward(ctx, grad):
        return torch.ops.dip._upsample_bilinear2x_backward(grad, ctx.size[0], ctx.size[1])

    torch.library.register_autograd("dip::upsample_bilinear2x", backward, setup_context=setup_context)

    def backward_of_backward(ctx, grad):
        return torch.ops.dip.upsample_bilinear2x(grad), None, None

    def setup_backward(ctx, inputs, output):
        pass

    # The adjoint's adjoint is the operator itself (linear), so double backward works.
    torch.library.register_autograd(
        "dip::_upsample_bilinear2x_backward", backward_of_backward, setup_context=setup_backward
    )


if has_op("upsample_bilinear2x"):
    _register()
