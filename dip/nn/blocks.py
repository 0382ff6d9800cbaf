"""Building blocks of the skip-hourglass network (pure PyTorch).

``ConvBlock`` is the unit the network repeats: padding → convolution →
(optional downsampler) → BatchNorm → activation. Its parameter names
(``conv.weight``, ``conv.bias``, ``bn.*``) are the same whichever path
(pure or fused) runs it, so a fitted state loads into either.
"""
from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

from dip.errors import DipError

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
    """Lanczos downsampling by ``factor`` as a module (used as a stride-2 replacement)."""

    def __init__(self, factor: int, support: int):
        super().__init__()
        self.factor = factor
        self.support = support

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from dip.ops.lanczos import lanczos_downsample

        return lanczos_downsample(x, self.factor, self.support)


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
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, conv_stride, padding=zero_pad, bias=bias)
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
