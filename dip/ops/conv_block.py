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


# Argument checks of the fake (meta) kernels: the Python owner of the rules of
# csrc/include/dip/conv_block.h (and batch_stats.h), in the same words, so that
# torch.compile and torch.export reject bad arguments while tracing, as the
# compiled kernels do when they run. The wrapper ``conv_block`` checks nothing
# itself (it hands what the operator does not take to the reference).

_FLOAT_DTYPES = (torch.float32, torch.float64)


def check_batch_stats(op: str, values: int, shape) -> None:
    """Training-mode BatchNorm needs pixels, and more than one value per channel (``F.batch_norm``'s ValueError)."""
    torch._check(values > 0, lambda: f"{op}: training mode (batch statistics) needs at least one pixel, got "
                 f"{list(shape)}; an empty batch is only defined in eval mode (training=False with running stats)")
    torch._check_value(values != 1, lambda: f"{op}: Expected more than 1 value per channel when training, got "
                       f"input size {list(shape)}")


def _check_vector(op: str, what: str, t: torch.Tensor, c: int, x: torch.Tensor, dtype=None) -> None:
    """A per-channel vector: 1-D, ``c`` elements, on ``x``'s device (and of ``dtype`` when given)."""
    torch._check(t.dim() == 1 and t.shape[0] == c, lambda: f"{op}: {what} must be a 1-D tensor of {c} elements "
                 f"(one per output channel), got shape {list(t.shape)}")
    torch._check(t.device == x.device, lambda: f"{op}: {what} is on {t.device} but the input is on {x.device}")
    torch._check(dtype is None or t.dtype == dtype, lambda: f"{op}: {what} must have the input's dtype {dtype}, "
                 f"got {t.dtype}")


def _check_conv_args(op: str, x: torch.Tensor, weight: torch.Tensor, stride: int, padding: int,
                     reflect: bool) -> None:
    """``check_conv_args``: x, the weight and the options, as the forward and the backward share them."""
    torch._check(x.dim() == 4, lambda: f"{op}: input must be N x C x H x W, got {list(x.shape)}")
    torch._check(weight.dim() == 4, lambda: f"{op}: weight must be Cout x (Cin / groups) x k x k, got "
                 f"{list(weight.shape)}")
    torch._check(weight.device == x.device, lambda: f"{op}: the weight is on {weight.device} but the input is on "
                 f"{x.device}")
    cin, (cout, cin_g, k, k2) = x.shape[1], weight.shape
    torch._check(cin > 0, lambda: f"{op}: the input has no channels (shape {list(x.shape)})")
    torch._check(cout > 0, lambda: f"{op}: the weight has no output channels (shape {list(weight.shape)})")
    torch._check(cin_g > 0 and cin % cin_g == 0 and cout % (cin // cin_g) == 0 and k == k2,
                 lambda: f"{op}: weight must be Cout x (Cin / groups) x k x k with groups dividing Cin = {cin} "
                 f"and Cout, got {list(weight.shape)}")
    torch._check(k % 2 == 1, lambda: f"{op}: kernel size must be odd, got {k}")
    torch._check(stride in (1, 2), lambda: f"{op}: stride must be 1 or 2, got {stride}")
    torch._check(padding >= 0 and 2 * padding == k - 1, lambda: f"{op}: padding must be (k - 1) / 2 = "
                 f"{(k - 1) // 2}, got {padding}")
    torch._check(x.dtype in _FLOAT_DTYPES, lambda: f"{op}: only float32 and float64 inputs are supported, got "
                 f"{x.dtype}")
    torch._check(weight.dtype == x.dtype or (weight.dtype == torch.bfloat16 and x.dtype == torch.float32),
                 lambda: f"{op}: the weight must have the input's dtype {x.dtype} (or be bfloat16 with a float32 "
                 f"input, for a bf16 convolution), got {weight.dtype}")
    torch._check(x.device.type != "cuda" or weight.dtype == x.dtype, lambda: f"{op} (CUDA): the weight must have "
                 f"the input's dtype {x.dtype}, got {weight.dtype} (a bfloat16 weight with a float32 input, the "
                 "bf16 convolution, is CPU-only)")
    h, w = x.shape[2], x.shape[3]
    torch._check(h > 0 and w > 0, lambda: f"{op}: the input's spatial size must be positive, got {list(x.shape)}")
    torch._check(not reflect or (padding < h and padding < w), lambda: f"{op}: reflection padding {padding} must "
                 f"be smaller than the input's spatial size {h} x {w}")
    torch._check(h + 2 * padding >= k and w + 2 * padding >= k, lambda: f"{op}: input {list(x.shape)} is smaller "
                 "than the kernel")


def _output_size(x: torch.Tensor, weight: torch.Tensor, stride: int, padding: int) -> tuple:
    k = weight.shape[2]
    return (x.shape[0], weight.shape[0], (x.shape[2] + 2 * padding - k) // stride + 1,
            (x.shape[3] + 2 * padding - k) // stride + 1)


def _check_forward_args(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, training, stride, padding,
                        reflect) -> None:
    """``check_forward_args`` of the compiled forward."""
    op = "conv_block"
    _check_conv_args(op, x, weight, stride, padding, reflect)
    c = weight.shape[0]
    if bias is not None:
        _check_vector(op, "the conv bias", bias, c, x)
        torch._check(bias.dtype == weight.dtype, lambda: f"{op}: the conv bias must have the weight's dtype "
                     f"{weight.dtype}, got {bias.dtype}")
    _check_vector(op, "the BatchNorm weight", bn_weight, c, x)
    _check_vector(op, "the BatchNorm bias", bn_bias, c, x)
    torch._check(bn_weight.dtype == x.dtype and bn_bias.dtype == x.dtype, lambda: f"{op}: the BatchNorm weight and "
                 f"bias must have the input's dtype {x.dtype}, got {bn_weight.dtype} and {bn_bias.dtype}")
    if training:
        torch._check(x.shape[0] > 0, lambda: f"{op}: training mode (batch statistics) needs a non-empty batch, got "
                     f"input {list(x.shape)}; an empty batch is only defined in eval mode (training=False with "
                     "running stats)")
        n, _, ho, wo = size = _output_size(x, weight, stride, padding)
        check_batch_stats(op, n * ho * wo, size)
        return
    torch._check(running_mean is not None and running_var is not None,
                 lambda: f"{op}: eval mode needs running_mean and running_var")
    _check_vector(op, "running_mean", running_mean, c, x)
    _check_vector(op, "running_var", running_var, c, x)
    torch._check(running_mean.dtype.is_floating_point and running_var.dtype.is_floating_point,
                 lambda: f"{op}: the running stats must be floating point, got {running_mean.dtype} and "
                 f"{running_var.dtype}")


def _check_backward_args(grad_out, x, weight, y, mean, var, bn_weight, bn_bias, training, stride, padding,
                         reflect) -> None:
    """``check_backward_args`` of the compiled backward."""
    op = "conv_block_backward"
    _check_conv_args(op, x, weight, stride, padding, reflect)
    n, _, ho, wo = size = _output_size(x, weight, stride, padding)
    torch._check(tuple(y.shape) == size, lambda: f"{op}: y must have the block's output shape {list(size)} for "
                 f"input {list(x.shape)} and weight {list(weight.shape)}, got {list(y.shape)}")
    if training:
        check_batch_stats(op, n * ho * wo, size)
    torch._check(grad_out.shape == y.shape, lambda: f"{op}: grad_out must have the output's shape {list(y.shape)}, "
                 f"got {list(grad_out.shape)}")
    torch._check(y.dtype == weight.dtype, lambda: f"{op}: y must have the weight's dtype {weight.dtype}, got "
                 f"{y.dtype}")
    torch._check(grad_out.dtype.is_floating_point, lambda: f"{op}: grad_out must be floating point, got "
                 f"{grad_out.dtype}")
    torch._check(y.device == x.device and grad_out.device == x.device, lambda: f"{op}: y and grad_out must be on "
                 f"the input's device {x.device}")
    for name, t in (("mean", mean), ("var", var), ("the BatchNorm weight", bn_weight),
                    ("the BatchNorm bias", bn_bias)):
        _check_vector(op, name, t, weight.shape[0], x, x.dtype)


def _register() -> None:
    """Fake (meta) kernels and autograd of the compiled operators."""

    @torch.library.register_fake("dip::conv_block")
    def _(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, training, stride, padding, reflect,
          eps, slope):
        _check_forward_args(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, training, stride,
                            padding, reflect)
        shape = _output_size(x, weight, stride, padding)
        out = x.new_empty(shape).contiguous(memory_format=torch.channels_last)
        y = weight.new_empty(shape).contiguous(memory_format=torch.channels_last)  # the convolution's dtype
        c = weight.shape[0]
        return out, y, x.new_empty(c), x.new_empty(c)

    @torch.library.register_fake("dip::conv_block_backward")
    def _(grad_out, x, weight, y, mean, var, bn_weight, bn_bias, training, stride, padding, reflect, eps, slope,
          need_grad_input):
        _check_backward_args(grad_out, x, weight, y, mean, var, bn_weight, bn_bias, training, stride, padding,
                             reflect)
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
