"""The fused conv block: pad → k×k convolution → BatchNorm → LeakyReLU.

``conv_block`` runs the compiled ``torch.ops.dip.conv_block`` operator when it
is built for the input's device, else ``conv_block_reference`` (plain
PyTorch, the same arithmetic as ``dip.nn.ConvBlock``). Both update the
BatchNorm running statistics exactly like ``nn.BatchNorm2d``: in training
mode the batch mean and biased variance normalise, the unbiased variance
enters ``running_var``; ``num_batches_tracked`` is incremented and used as
the averaging factor when ``momentum`` is None.

The operator's outputs are channels_last tensors. Its backward is the
separate operator ``torch.ops.dip.conv_block_backward``, wired in with
``torch.library.register_autograd``; ``register_fake`` lets
``torch.compile`` trace both.

Grouped convolutions (the members of a seed ensemble side by side) need no
argument: as in ``F.conv2d`` the weight is Cout × (Cin / groups) × k × k, and
the groups follow from the shapes. BatchNorm and the activation act per
channel either way.

bfloat16: the operator convolves in its weight's dtype. On the CPU it also
takes a bfloat16 weight (and bias) with a float32 input: the convolution then
runs in bf16 (about twice the float32 speed on AVX512-BF16 and AMX), its
output ``y`` is bf16, and the BatchNorm statistics, normalisation, activation
and the block's output stay float32. ``conv_block`` passes it such a weight
under CPU bf16 autocast (:func:`conv_dtype`); the cast is an ordinary autograd
op, so the weight's gradient comes back in float32.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from dip._extension import has_op
from dip.ops import device_check


def conv_block_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    bn_weight: torch.Tensor,
    bn_bias: torch.Tensor,
    running_mean: Optional[torch.Tensor],
    running_var: Optional[torch.Tensor],
    num_batches_tracked: Optional[torch.Tensor],
    training: bool,
    momentum: Optional[float],
    eps: float,
    stride: int,
    padding: int,
    reflect: bool,
    slope: float,
) -> torch.Tensor:
    """Pure-PyTorch conv block (the reference of the fused operator); updates running stats like BatchNorm2d."""
    if reflect and padding > 0:
        x = F.pad(x, (padding, padding, padding, padding), mode="reflect")
    groups = x.shape[1] // weight.shape[1]  # implied by the shapes, as in the fused operator
    y = F.conv2d(x, weight, bias, stride, 0 if reflect else padding, 1, groups)
    factor = _averaging_factor(training, momentum, running_mean, num_batches_tracked)
    use_batch_stats = training or running_mean is None
    y = F.batch_norm(y, running_mean, running_var, bn_weight, bn_bias, use_batch_stats, factor, eps)
    return F.leaky_relu(y, slope)


def _averaging_factor(
    training: bool,
    momentum: Optional[float],
    running_mean: Optional[torch.Tensor],
    num_batches_tracked: Optional[torch.Tensor],
) -> float:
    """Increment ``num_batches_tracked`` (training only) and return BatchNorm2d's running-average factor."""
    if not training or running_mean is None:
        return 0.0
    if num_batches_tracked is not None:
        num_batches_tracked.add_(1)
    if momentum is None:
        if num_batches_tracked is None:
            return 0.0
        return 1.0 / float(num_batches_tracked.item())
    return momentum


def _update_running_stats(
    out: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    running_mean: Optional[torch.Tensor],
    running_var: Optional[torch.Tensor],
    num_batches_tracked: Optional[torch.Tensor],
    training: bool,
    momentum: Optional[float],
) -> None:
    """Fold a fused operator's batch ``mean`` and biased ``var`` (of ``out``) into the running stats, as BatchNorm2d."""
    if training and running_mean is not None and running_var is not None:
        factor = _averaging_factor(training, momentum, running_mean, num_batches_tracked)
        count = out.numel() // out.size(1)
        unbiased = var.detach() * (count / max(count - 1, 1))
        running_mean.mul_(1.0 - factor).add_(mean.detach(), alpha=factor)
        running_var.mul_(1.0 - factor).add_(unbiased, alpha=factor)


def fused_available(x: torch.Tensor) -> bool:
    """True when the compiled conv block runs on ``x``'s device and dtype (and ``x`` is not empty)."""
    # An empty input goes to the reference, as in the other operators: the compiled kernel's
    # training-mode statistics of no pixels crash the process.
    if not has_op("conv_block") or x.dtype not in (torch.float32, torch.float64) or x.numel() == 0:
        return False
    if x.device.type == "cpu":
        return True
    return x.device.type == "cuda" and torch._C._dispatch_has_kernel_for_dispatch_key("dip::conv_block", "CUDA")


def conv_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the fused operator convolves ``x`` in: bfloat16 for float32 CPU input under CPU bf16 autocast."""
    if (x.device.type == "cpu" and x.dtype == torch.float32 and torch.is_autocast_enabled("cpu")
            and torch.get_autocast_dtype("cpu") == torch.bfloat16):
        return torch.bfloat16
    return x.dtype


def conv_block(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    bn_weight: torch.Tensor,
    bn_bias: torch.Tensor,
    running_mean: Optional[torch.Tensor],
    running_var: Optional[torch.Tensor],
    num_batches_tracked: Optional[torch.Tensor],
    training: bool,
    momentum: Optional[float],
    eps: float,
    stride: int,
    padding: int,
    reflect: bool,
    slope: float,
) -> torch.Tensor:
    """LeakyReLU(BatchNorm(conv(pad(x)))) with the fused operator when available.

    ``reflect`` selects reflection padding (done by the block) over zero
    padding (done by the convolution); ``slope`` is the LeakyReLU negative
    slope (0 gives ReLU, 1 no activation). Running statistics, when given,
    are updated in place in training mode. Under CPU bf16 autocast the
    convolution runs in bf16 and the rest in float32 (the output is float32).
    """
    if not torch.jit.is_scripting():
        if not (fused_available(x) and device_check.fused_ok("conv_block", x)):
            return conv_block_reference(
                x, weight, bias, bn_weight, bn_bias, running_mean, running_var, num_batches_tracked,
                training, momentum, eps, stride, padding, reflect, slope,
            )
        dtype = conv_dtype(x)
        if weight.dtype != dtype:
            weight = weight.to(dtype)
        if bias is not None and bias.dtype != dtype:
            bias = bias.to(dtype)
    use_batch_stats = training or running_mean is None
    out, _, mean, var = torch.ops.dip.conv_block(
        x, weight, bias, bn_weight, bn_bias, running_mean, running_var, use_batch_stats,
        stride, padding, reflect, eps, slope,
    )
    _update_running_stats(out, mean, var, running_mean, running_var, num_batches_tracked, training, momentum)
    return out


def _register() -> None:
    """Fake (meta) kernels and autograd of the compiled operators."""

    @torch.library.register_fake("dip::conv_block")
    def _(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, training, stride, padding, reflect,
          eps, slope):
        n, _, h, w = x.shape
        k = weight.shape[2]
        ho = (h + 2 * padding - k) // stride + 1
        wo = (w + 2 * padding - k) // stride + 1
        shape = (n, weight.shape[0], ho, wo)
        out = x.new_empty(shape).contiguous(memory_format=torch.channels_last)
        y = weight.new_empty(shape).contiguous(memory_format=torch.channels_last)  # the convolution's dtype
        c = weight.shape[0]
        return out, y, x.new_empty(c), x.new_empty(c)

    @torch.library.register_fake("dip::conv_block_backward")
    def _(grad_out, x, weight, y, mean, var, bn_weight, bn_bias, training, stride, padding, reflect, eps, slope,
          need_grad_input):
        c = weight.shape[0]
        if need_grad_input:
            grad_x = x.new_empty(x.shape).contiguous(memory_format=torch.channels_last)
        else:
            grad_x = x.new_empty(0)
        grad_w = weight.new_empty_strided(weight.shape, weight.stride())
        return grad_x, grad_w, weight.new_empty(c), x.new_empty(c), x.new_empty(c)

    def setup_context(ctx, inputs, output):
        x, weight, bias, bn_weight, bn_bias, _, _, training, stride, padding, reflect, eps, slope = inputs
        _, y, mean, var = output
        ctx.save_for_backward(x, weight, y, mean, var, bn_weight, bn_bias)
        # Only ``out`` carries a gradient; without this, autograd would zero-fill
        # a full-size gradient for ``y`` on every backward.
        ctx.set_materialize_grads(False)
        ctx.opts = (training, stride, padding, reflect, eps, slope)
        ctx.has_bias = bias is not None

    def backward(ctx, grad_out, _grad_y, _grad_mean, _grad_var):
        x, weight, y, mean, var, bn_weight, bn_bias = ctx.saved_tensors
        if grad_out is None:  # only y, mean or var was used, and they are not differentiable here
            return (None,) * 13
        training, stride, padding, reflect, eps, slope = ctx.opts
        need_x = ctx.needs_input_grad[0]
        gx, gw, gb, gg, gbeta = torch.ops.dip.conv_block_backward(
            grad_out, x, weight, y, mean, var, bn_weight, bn_bias, training, stride, padding, reflect, eps, slope,
            need_x,
        )
        return (gx if need_x else None, gw, gb if ctx.has_bias else None, gg, gbeta,
                None, None, None, None, None, None, None, None)

    torch.library.register_autograd("dip::conv_block", backward, setup_context=setup_context)


if has_op("conv_block"):
    _register()
