"""Building blocks of the skip-hourglass network.

``ConvBlock`` is the unit the network repeats: padding → convolution →
(optional downsampler) → BatchNorm → activation, in plain PyTorch.
``FusedConvBlock`` is the same module run by the fused operator
(``dip.ops.conv_block``); ``make_conv_block`` picks it whenever the compiled
operator is loaded and the options are ones it covers. Parameter and buffer
names (``conv.weight``, ``conv.bias``, ``bn.*``) are the same on both, so a
fitted state loads into either.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dip._extension import build_info, has_op
from dip.errors import DipError
from dip.ops.conv_block import conv_block
from dip.ops.lanczos import check_input as check_lanczos_input
from dip.ops.lanczos import lanczos_downsample, lanczos_filter, lanczos_taps
from dip.ops.lanczos import padding as lanczos_padding

ACTIVATIONS = ("LeakyReLU", "ReLU", "Swish", "ELU", "none")
PADDINGS = ("reflection", "zero")
DOWNSAMPLERS = ("stride", "avg", "max", "lanczos2", "lanczos3")
UPSAMPLERS = ("nearest", "bilinear")


def make_activation(name: str) -> nn.Module:
    """The activation called ``name`` (LeakyReLU uses slope 0.2, as in the original work)."""
    if name == "LeakyReLU":
        return nn.LeakyReLU(0.2)
    if name == "ReLU":
        return nn.ReLU()
    if name == "Swish":
        return nn.SiLU()
    if name == "ELU":
        return nn.ELU()
    if name == "none":
        return nn.Identity()
    raise DipError(f"unknown activation {name!r}; choose one of {', '.join(ACTIVATIONS)}")


class LanczosDownsample(nn.Module):
    """Lanczos downsampling by ``factor`` as a module (used as a stride-2 replacement).

    ``use_op`` (default: whether the compiled operator is loaded) picks what
    the module runs, eagerly and when scripted: :func:`dip.ops.lanczos_downsample`
    (``torch.ops.dip.lanczos_downsample`` once scripted), or the pure-PyTorch
    filter with the module's taps, which needs no dip to run. The taps are a
    non-persistent buffer, so the state dict is the same either way.
    """

    __constants__ = ["use_op"]  # a constant, so scripting compiles only the branch it takes

    def __init__(self, factor: int, support: int, *, use_op: bool | None = None):
        super().__init__()
        self.factor = factor
        self.support = support
        self.before, self.after = lanczos_padding(factor, support)
        self.use_op = has_op("lanczos_downsample") if use_op is None else use_op
        self.register_buffer("taps", lanczos_taps(factor, support), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_op:
            return lanczos_downsample(x, self.factor, self.support)
        if not torch.jit.is_scripting():
            check_lanczos_input(x, self.factor, self.support)
        return lanczos_filter(x, self.taps.to(x.dtype), self.factor, self.before, self.after)

    def unfused(self) -> LanczosDownsample:
        """This downsampler in pure PyTorch (what export and scripting without dip need)."""
        return LanczosDownsample(self.factor, self.support, use_op=False).to(self.taps.device)


class ConvBlock(nn.Module):
    """Padding → k×k convolution → (downsampler) → BatchNorm → activation.

    ``stride`` 2 with ``downsample`` other than ``"stride"`` convolves at full
    resolution and then halves the size with average/max pooling or Lanczos.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        *,
        bias: bool = True,
        pad: str = "reflection",
        downsample: str = "stride",
        batch_norm: bool = True,
        act: str = "LeakyReLU",
        groups: int = 1,
    ):
        super().__init__()
        if pad not in PADDINGS:
            raise DipError(f"unknown padding {pad!r}; choose one of {', '.join(PADDINGS)}")
        if downsample not in DOWNSAMPLERS:
            raise DipError(f"unknown downsampling {downsample!r}; choose one of {', '.join(DOWNSAMPLERS)}")
        if kernel_size % 2 != 1:
            raise DipError(f"kernel size must be odd, got {kernel_size}")
        self.pad_mode = pad
        self.padding = (kernel_size - 1) // 2
        self.stride = stride
        conv_stride = stride if downsample == "stride" else 1
        zero_pad = self.padding if pad == "zero" else 0
        # groups > 1: independent networks side by side (seed ensembles, see dip.nn.hourglass)
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, conv_stride, padding=zero_pad, bias=bias,
                              groups=groups)
        self.downsampler: nn.Module = nn.Identity()
        if stride != 1 and downsample != "stride":
            if downsample == "avg":
                self.downsampler = nn.AvgPool2d(stride, stride)
            elif downsample == "max":
                self.downsampler = nn.MaxPool2d(stride, stride)
            else:
                self.downsampler = LanczosDownsample(stride, int(downsample[-1]))
        self.bn: nn.Module = nn.BatchNorm2d(out_channels) if batch_norm else nn.Identity()
        self.act = make_activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pad_mode == "reflection" and self.padding > 0:
            x = F.pad(x, (self.padding,) * 4, mode="reflect")
        return self.act(self.bn(self.downsampler(self.conv(x))))


# LeakyReLU slope that reproduces each activation the fused block covers
# (LeakyReLU itself takes the slope of its module).
_FUSED_SLOPES = {"LeakyReLU": 0.2, "ReLU": 0.0, "none": 1.0}


def fusable(stride: int = 1, *, pad: str = "reflection", downsample: str = "stride", batch_norm: bool = True,
            act: str = "LeakyReLU", bias: bool = True, groups: int = 1) -> bool:
    """True when the fused operator covers these ConvBlock options (any padding, bias and groups)."""
    return batch_norm and act in _FUSED_SLOPES and (stride == 1 or downsample == "stride") and stride in (1, 2)


def fused_default() -> bool:
    """Whether networks are built with fused blocks by default (the compiled operator is loaded)."""
    return has_op("conv_block")


#: what :func:`active_path` and :func:`network_path` say of the pure-PyTorch blocks
PURE_PATH = "pure PyTorch"


def active_path() -> str:
    """Which implementation runs the conv blocks by default, e.g. ``"fused C++ (CPU)"`` or ``"pure PyTorch"``."""
    if not fused_default():
        return PURE_PATH
    return "fused C++/CUDA (CPU, CUDA)" if build_info().get("with_cuda") else "fused C++ (CPU)"


def network_path(net: nn.Module) -> str:
    """Which implementation runs ``net``'s conv blocks: :func:`active_path` if it holds fused blocks, else pure."""
    return active_path() if any(isinstance(m, FusedConvBlock) for m in net.modules()) else PURE_PATH


class FusedConvBlock(ConvBlock):
    """``ConvBlock`` computed by the fused pad → conv → BatchNorm → activation operator.

    Same constructor, parameters, buffers and results as ``ConvBlock``; only
    the options ``fusable`` accepts are allowed. Inputs on a device or dtype
    without a compiled kernel run the pure-PyTorch reference.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, *,
                 bias: bool = True, pad: str = "reflection", downsample: str = "stride", batch_norm: bool = True,
                 act: str = "LeakyReLU", groups: int = 1):
        if not fusable(stride, pad=pad, downsample=downsample, batch_norm=batch_norm, act=act):
            raise DipError(
                f"the fused conv block does not cover stride={stride}, downsample={downsample!r}, "
                f"batch_norm={batch_norm}, act={act!r}; use ConvBlock"
            )
        super().__init__(in_channels, out_channels, kernel_size, stride, bias=bias, pad=pad, downsample=downsample,
                         batch_norm=batch_norm, act=act, groups=groups)
        self.reflect = pad == "reflection"
        self.slope = self.act.negative_slope if isinstance(self.act, nn.LeakyReLU) else _FUSED_SLOPES[act]
        # The operator computes in channels_last; a weight stored that way is used
        # without a layout copy in every forward and backward (values and
        # state_dict are unchanged).
        self.conv.weight.data = self.conv.weight.data.contiguous(memory_format=torch.channels_last)

    def unfused(self) -> ConvBlock:
        """This block as a plain ``ConvBlock`` holding the same modules (same parameter and buffer names)."""
        with torch.device("meta"):  # its own new modules are replaced below: no memory, no random draws
            twin = ConvBlock(self.conv.in_channels, self.conv.out_channels, self.conv.kernel_size[0], self.stride,
                             bias=self.conv.bias is not None, pad=self.pad_mode, act="none", groups=self.conv.groups)
        twin.conv, twin.bn, twin.act = self.conv, self.bn, self.act
        return twin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bn = self.bn
        return conv_block(
            x, self.conv.weight, self.conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var,
            bn.num_batches_tracked, self.training, bn.momentum, bn.eps, self.stride, self.padding, self.reflect,
            self.slope,
        )


def make_conv_block(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, *,
                    fused: bool | None = None, **options) -> ConvBlock:
    """A ``FusedConvBlock`` when ``fused`` (default: the operator is loaded) and the options allow, else a ``ConvBlock``."""
    use_fused = fused_default() if fused is None else fused
    if use_fused and fusable(stride, **options):
        return FusedConvBlock(in_channels, out_channels, kernel_size, stride, **options)
    return ConvBlock(in_channels, out_channels, kernel_size, stride, **options)
