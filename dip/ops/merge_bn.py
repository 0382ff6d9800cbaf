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
from dip.ops.conv_block import _averaging_factor, _update_running_stats


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


def _register() -> None:
    """Fake (meta) kernels and autograd of the compiled operators."""

    @torch.library.register_fake("dip::merge_bn")
    def _(a, b, bn_weight, bn_bias, running_mean, running_var, training, eps, groups=1):
        n, ca, h, w = a.shape
        c = ca + b.shape[1]
        out = a.new_empty((n, c, h, w)).contiguous(memory_format=torch.channels_last)
        return out, a.new_empty(c), a.new_empty(c)

    @torch.library.register_fake("dip::merge_bn_backward")
    def _(grad_out, a, b, mean, var, bn_weight, training, eps, groups=1):
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
