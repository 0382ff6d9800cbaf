"""The decoder's merge: BatchNorm of ``cat([skip, upsampled], dim=1)`` in one operator.

``merge_bn`` runs the compiled ``torch.ops.dip.merge_bn`` on CPU when the
extension is loaded, else ``merge_bn_reference`` (``torch.cat`` then
``F.batch_norm``). The compiled operator writes the normalised concatenation
as one channels_last tensor and its backward
(``torch.ops.dip.merge_bn_backward``) writes the gradients of both inputs
directly, so no concatenated copy is made and no sliced gradient is copied.
Running statistics are updated exactly like ``nn.BatchNorm2d``'s.

``groups=K`` merges the K members of a seed ensemble side by side
(``dip.nn.Hourglass(..., members=K)``): ``a`` and ``b`` each hold K blocks of
channels, concatenated member by member as ``[a₁, b₁, a₂, b₂, …]``
(:func:`concat_members`), so that the next grouped convolution sees each
member's channels together.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from dip._extension import has_op
from dip.ops.conv_block import _averaging_factor, _update_running_stats, check_batch_stats


def concat_members(a: torch.Tensor, b: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """``cat([a, b], dim=1)`` member by member: ``[a₁, b₁, …, a_K, b_K]`` for ``groups`` = K blocks of each."""
    if groups == 1:
        return torch.cat([a, b], dim=1)
    n, h, w = a.shape[0], a.shape[2], a.shape[3]
    return torch.cat([a.reshape(n, groups, -1, h, w), b.reshape(n, groups, -1, h, w)], dim=2).reshape(n, -1, h, w)


def merge_bn_reference(
    a: torch.Tensor,
    b: torch.Tensor,
    bn_weight: torch.Tensor,
    bn_bias: torch.Tensor,
    running_mean: Optional[torch.Tensor],
    running_var: Optional[torch.Tensor],
    num_batches_tracked: Optional[torch.Tensor],
    training: bool,
    momentum: Optional[float],
    eps: float,
    groups: int = 1,
) -> torch.Tensor:
    """Pure-PyTorch merge (the reference of the fused operator): cat along channels, then BatchNorm2d."""
    y = concat_members(a, b, groups)
    factor = _averaging_factor(training, momentum, running_mean, num_batches_tracked)
    use_batch_stats = training or running_mean is None
    return F.batch_norm(y, running_mean, running_var, bn_weight, bn_bias, use_batch_stats, factor, eps)


def _fused_available(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        has_op("merge_bn")
        and a.device.type == "cpu"
        and b.device.type == "cpu"
        and a.dtype in (torch.float32, torch.float64)
        and b.dtype == a.dtype
        and a.numel() > 0
        and b.numel() > 0
    )


def merge_bn(
    a: torch.Tensor,
    b: torch.Tensor,
    bn_weight: torch.Tensor,
    bn_bias: torch.Tensor,
    running_mean: Optional[torch.Tensor],
    running_var: Optional[torch.Tensor],
    num_batches_tracked: Optional[torch.Tensor],
    training: bool,
    momentum: Optional[float],
    eps: float,
    groups: int = 1,
) -> torch.Tensor:
    """``BatchNorm2d(concat_members(a, b, groups))`` with the fused operator when available; updates running stats."""
    if not torch.jit.is_scripting():
        if not _fused_available(a, b):
            return merge_bn_reference(a, b, bn_weight, bn_bias, running_mean, running_var, num_batches_tracked,
                                      training, momentum, eps, groups)
    use_batch_stats = training or running_mean is None
    out, mean, var = torch.ops.dip.merge_bn(a, b, bn_weight, bn_bias, running_mean, running_var, use_batch_stats, eps,
                                            groups)
    _update_running_stats(out, mean, var, running_mean, running_var, num_batches_tracked, training, momentum)
    return out


# Argument checks of the fake (meta) kernels: the Python owner of the rules of
# csrc/include/dip/merge_bn.h, in the same words, so that torch.compile and
# torch.export reject bad arguments while tracing, as the compiled kernels do.

def _check_parts(op: str, a: torch.Tensor, b: torch.Tensor, groups: int) -> None:
    torch._check(a.dim() == 4 and b.dim() == 4, lambda: f"{op}: inputs must be N x C x H x W, got {list(a.shape)} "
                 f"and {list(b.shape)}")
    torch._check(a.shape[0] == b.shape[0] and a.shape[2:] == b.shape[2:], lambda: f"{op}: inputs must agree in "
                 f"batch and spatial size, got {list(a.shape)} and {list(b.shape)}")
    torch._check(a.dtype in (torch.float32, torch.float64), lambda: f"{op}: only float32 and float64 are "
                 f"supported, got {a.dtype}")
    torch._check(b.dtype == a.dtype, lambda: f"{op}: both inputs must have one dtype, got {a.dtype} and {b.dtype}")
    torch._check(b.device == a.device, lambda: f"{op}: both inputs must be on one device, got {a.device} and "
                 f"{b.device}")
    ca, cb = a.shape[1], b.shape[1]
    torch._check(groups >= 1 and ca % groups == 0 and cb % groups == 0, lambda: f"{op}: groups ({groups}) must be "
                 f"positive and divide both inputs' channels, {ca} and {cb}")


def _check_vector(op: str, what: str, t: torch.Tensor, c: int, a: torch.Tensor, same_dtype: bool = True) -> None:
    torch._check(t.dim() == 1 and t.shape[0] == c, lambda: f"{op}: {what} must be a 1-D tensor of {c} elements "
                 f"(one per output channel), got shape {list(t.shape)}")
    torch._check(not same_dtype or t.dtype == a.dtype, lambda: f"{op}: {what} must have the inputs' dtype "
                 f"{a.dtype}, got {t.dtype}")
    torch._check(same_dtype or t.dtype.is_floating_point, lambda: f"{op}: {what} must be floating point, got "
                 f"{t.dtype}")
    torch._check(t.device == a.device, lambda: f"{op}: {what} is on {t.device} but the inputs are on {a.device}")


def _check_forward(a, b, gamma, beta, running_mean, running_var, training, groups) -> None:
    op = "merge_bn"
    _check_parts(op, a, b, groups)
    n, _, h, w = a.shape
    c = a.shape[1] + b.shape[1]
    _check_vector(op, "the BatchNorm weight", gamma, c, a)
    _check_vector(op, "the BatchNorm bias", beta, c, a)
    if training:
        check_batch_stats(op, n * h * w, (n, c, h, w))
        return
    torch._check(running_mean is not None and running_var is not None,
                 lambda: f"{op}: eval mode needs running_mean and running_var of {c} elements")
    _check_vector(op, "running_mean", running_mean, c, a, same_dtype=False)
    _check_vector(op, "running_var", running_var, c, a, same_dtype=False)


def _check_backward(grad_out, a, b, mean, var, gamma, training, groups) -> None:
    op = "merge_bn_backward"
    _check_parts(op, a, b, groups)
    n, _, h, w = a.shape
    c = a.shape[1] + b.shape[1]
    if training:
        check_batch_stats(op, n * h * w, (n, c, h, w))
    torch._check(grad_out.dim() == 4 and tuple(grad_out.shape) == (n, c, h, w), lambda: f"{op}: grad_out must be "
                 f"N x {c} x H x W like the output, got {list(grad_out.shape)}")
    torch._check(grad_out.dtype == a.dtype and grad_out.device == a.device, lambda: f"{op}: grad_out must have the "
                 f"inputs' dtype {a.dtype} and device {a.device}, got {grad_out.dtype} on {grad_out.device}")
    _check_vector(op, "mean", mean, c, a)
    _check_vector(op, "var", var, c, a)
    _check_vector(op, "the BatchNorm weight", gamma, c, a)


def _register() -> None:
    """Fake (meta) kernels and autograd of the compiled operators."""

    @torch.library.register_fake("dip::merge_bn")
    def _(a, b, bn_weight, bn_bias, running_mean, running_var, training, eps, groups=1):
        _check_forward(a, b, bn_weight, bn_bias, running_mean, running_var, training, groups)
        n, ca, h, w = a.shape
        c = ca + b.shape[1]
        out = a.new_empty((n, c, h, w)).contiguous(memory_format=torch.channels_last)
        return out, a.new_empty(c), a.new_empty(c)

    @torch.library.register_fake("dip::merge_bn_backward")
    def _(grad_out, a, b, mean, var, bn_weight, training, eps, groups=1):
        _check_backward(grad_out, a, b, mean, var, bn_weight, training, groups)
        c = mean.shape[0]
        return (a.new_empty(a.shape).contiguous(memory_format=torch.channels_last),
                b.new_empty(b.shape).contiguous(memory_format=torch.channels_last),
                a.new_empty(c), a.new_empty(c))

    def setup_context(ctx, inputs, output):
        a, b, bn_weight, _, _, _, training, eps, groups = inputs
        _, mean, var = output
        ctx.save_for_backward(a, b, mean, var, bn_weight)
        ctx.opts = (training, eps, groups)
        ctx.set_materialize_grads(False)

    def backward(ctx, grad_out, _grad_mean, _grad_var):
        if grad_out is None:
            return (None,) * 9
        a, b, mean, var, bn_weight = ctx.saved_tensors
        training, eps, groups = ctx.opts
        ga, gb, gw, gbias = torch.ops.dip.merge_bn_backward(grad_out, a, b, mean, var, bn_weight, training, eps,
                                                            groups)
        return ga, gb, gw, gbias, None, None, None, None, None

    torch.library.register_autograd("dip::merge_bn", backward, setup_context=setup_context)


if has_op("merge_bn"):
    _register()
