"""The skip-hourglass generator of Deep Image Prior and its presets.

At each scale ``i`` the input goes down a branch (stride-2 block, block),
through the deeper scales, and is upsampled ×2; a skip branch (a 1×1 block
by default) of the same input is concatenated in front of it; the result
passes a BatchNorm, a block and (optionally) a 1×1 block. A 1×1 convolution
maps the top scale to the output channels, followed by a sigmoid.

``members=K`` builds K independent hourglasses as one: every channel count is
multiplied by K and every convolution grouped K ways (BatchNorm, activations,
padding and resampling act per channel already), so one forward pass is one
set of larger kernels instead of K networks in a Python loop. Its input is the
K members' inputs concatenated on channels; its output is K×C×H×W, member by
member. The fused operators run it too: the conv block's convolutions are
grouped, and the decoder's merge concatenates member by member.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from numbers import Integral
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from dip.errors import DipError
from dip.nn.blocks import ACTIVATIONS, DOWNSAMPLERS, PADDINGS, UPSAMPLERS, fused_default, make_conv_block
from dip.ops.merge_bn import concat_members, merge_bn
from dip.ops.upsample import UpsampleBilinear2x


@dataclass
class HourglassConfig:
    """Every knob of the skip-hourglass; lists hold one value per scale."""

    in_channels: int = 32
    out_channels: int = 3
    channels_down: Sequence[int] = (128, 128, 128, 128, 128)
    channels_up: Sequence[int] = (128, 128, 128, 128, 128)
    channels_skip: Sequence[int] = (4, 4, 4, 4, 4)
    filter_size_down: int = 3
    filter_size_up: int = 3
    filter_size_skip: int = 1
    downsample: str = "stride"
    upsample: str = "bilinear"
    pad: str = "reflection"
    act: str = "LeakyReLU"
    bias: bool = True
    batch_norm: bool = True
    sigmoid: bool = True
    up_1x1: bool = True

    @property
    def scales(self) -> int:
        return len(self.channels_down)

    def to_dict(self) -> dict:
        d = asdict(self)
        for key in ("channels_down", "channels_up", "channels_skip"):
            d[key] = list(d[key])
        return d

    def validate(self) -> None:
        n = len(self.channels_down)
        if n < 1 or len(self.channels_up) != n or len(self.channels_skip) != n:
            raise DipError(
                "channels_down, channels_up and channels_skip need one entry per scale and the same length, got "
                f"{len(self.channels_down)}, {len(self.channels_up)}, {len(self.channels_skip)}"
            )
        if self.pad not in PADDINGS:
            raise DipError(f"unknown padding {self.pad!r}; choose one of {', '.join(PADDINGS)}")
        if self.upsample not in UPSAMPLERS:
            raise DipError(f"unknown upsampling {self.upsample!r}; choose one of {', '.join(UPSAMPLERS)}")
        if self.downsample not in DOWNSAMPLERS:
            raise DipError(f"unknown downsampling {self.downsample!r}; choose one of {', '.join(DOWNSAMPLERS)}")
        if self.act not in ACTIVATIONS:
            raise DipError(f"unknown activation {self.act!r}; choose one of {', '.join(ACTIVATIONS)}")
        self._validate_sizes()

    def _validate_sizes(self) -> None:
        """Channel counts positive integers (skip channels may be 0: no skip), filter sizes positive odd integers."""
        counts = [("in_channels", self.in_channels, 1), ("out_channels", self.out_channels, 1)]
        counts += [(f"{key}[{i}]", v, 0 if key == "channels_skip" else 1)
                   for key in ("channels_down", "channels_up", "channels_skip") for i, v in enumerate(getattr(self, key))]
        for name, value, least in counts:
            if isinstance(value, bool) or not isinstance(value, Integral) or value < least:
                what = "a non-negative integer (0: no skip connection)" if least == 0 else "a positive integer"
                raise DipError(f"{name} must be {what}, got {value!r}")
        for name in ("filter_size_down", "filter_size_up", "filter_size_skip"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, Integral) or value < 1 or value % 2 != 1:
                raise DipError(f"{name} must be a positive odd integer, got {value!r}")

    def min_size(self) -> int:
        """Smallest input side the network takes, a multiple of :meth:`multiple`.

        The deepest scale's maps are ``min_size() / multiple()`` pixels wide: at
        least 2 (BatchNorm needs more than one value per channel) and, with
        reflection padding, wider than the down filters' padding; the maps one
        scale up (twice as wide) must be wider than the up and skip filters' padding.
        """
        deepest = 2
        if self.pad == "reflection":
            deepest = max(deepest, self.filter_size_down // 2 + 1,
                          max(self.filter_size_up, self.filter_size_skip) // 2 // 2 + 1)
        return self.multiple() * deepest

    def multiple(self) -> int:
        """Input sides are padded to a multiple of this, so every scale halves exactly."""
        return 2 ** self.scales


PRESETS = {
    # The original work's denoising / JPEG / SR net: 5 scales, 128 down, 128 up, 4 skip.
    "denoise": dict(),
    "sr": dict(),
    # Inpainting in the original uses nearest upsampling and no skip connections.
    "inpaint": dict(channels_skip=(0, 0, 0, 0, 0), upsample="nearest"),
    # A small net for tests, demos on CPU and quick experiments.
    "small": dict(
        in_channels=8, channels_down=(16, 32, 64), channels_up=(16, 32, 64), channels_skip=(4, 4, 4)
    ),
}


def preset(name: str, **overrides) -> HourglassConfig:
    """The configuration of a named preset (``denoise``, ``sr``, ``inpaint``, ``small``), with overrides."""
    if name not in PRESETS:
        raise DipError(f"unknown network preset {name!r}; choose one of {', '.join(PRESETS)}")
    cfg = HourglassConfig(**{**PRESETS[name], **overrides})
    cfg.validate()
    return cfg


class _Scale(nn.Module):
    """One scale of the hourglass, holding the deeper scales inside it."""

    # A constant for TorchScript, which then compiles only the branch taken.
    __constants__ = ["fused_merge"]

    def __init__(self, cfg: HourglassConfig, i: int, in_channels: int, deeper: Optional[nn.Module],
                 fused: Optional[bool] = None, members: int = 1):
        super().__init__()
        k = self.members = members
        down, up, skip = k * cfg.channels_down[i], k * cfg.channels_up[i], k * cfg.channels_skip[i]
        in_channels *= k
        opts = dict(bias=cfg.bias, pad=cfg.pad, batch_norm=cfg.batch_norm, act=cfg.act, fused=fused, groups=k)
        self.has_skip = skip > 0
        self.skip = make_conv_block(in_channels, skip, cfg.filter_size_skip, **opts) if skip > 0 else nn.Identity()
        self.down = nn.Sequential(
            make_conv_block(in_channels, down, cfg.filter_size_down, 2, downsample=cfg.downsample, **opts),
            make_conv_block(down, down, cfg.filter_size_down, **opts),
        )
        self.deeper = deeper if deeper is not None else nn.Identity()
        deep_out = k * cfg.channels_up[i + 1] if i + 1 < cfg.scales else down
        align = None if cfg.upsample == "nearest" else False
        use_fused = fused_default() if fused is None else fused
        # No parameters either way, so the state_dict does not depend on the choice.
        self.upsample: nn.Module = (
            UpsampleBilinear2x() if use_fused and cfg.upsample == "bilinear"
            else nn.Upsample(scale_factor=2, mode=cfg.upsample, align_corners=align)
        )
        merged = skip + deep_out
        self.merge_bn = nn.BatchNorm2d(merged) if cfg.batch_norm else nn.Identity()
        # cat + merge_bn as one operator (dip.ops.merge_bn), same parameters and buffers.
        self.fused_merge = use_fused and cfg.batch_norm and self.has_skip
        self.up = make_conv_block(merged, up, cfg.filter_size_up, **opts)
        self.up_1x1 = make_conv_block(up, up, 1, **opts) if cfg.up_1x1 else nn.Identity()

    def unfused(self) -> _Scale:
        """This scale with concat + merge BatchNorm as standard operators (in place; for exports)."""
        self.fused_merge = False
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.upsample(self.deeper(self.down(x)))
        # Odd sizes: stride-2 rounds up, so the upsampled map can be one pixel larger.
        # Crop only when needed: a no-op slice still costs a zero-fill and a copy in backward.
        if y.shape[2] != x.shape[2] or y.shape[3] != x.shape[3]:
            y = y[:, :, : x.shape[2], : x.shape[3]]
        if self.fused_merge:
            bn = self.merge_bn
            y = merge_bn(self.skip(x), y, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.num_batches_tracked,
                         self.training, bn.momentum, bn.eps, self.members)
            return self.up_1x1(self.up(y))
        if self.has_skip:
            y = concat_members(self.skip(x), y, self.members)
        return self.up_1x1(self.up(self.merge_bn(y)))


class Hourglass(nn.Module):
    """The skip-hourglass generator ``x = f_θ(z)``.

    ``fused`` selects the conv-block implementation: None (default) uses the
    fused operator when it is loaded, False forces the pure-PyTorch blocks.
    Both build the same parameters in the same order. ``members=K`` > 1 fits
    K networks of configuration ``cfg`` side by side (see the module's text):
    input N×(K·in)×H×W, output (N·K)×C×H×W; every parameter and buffer holds
    the members' values one after the other along its first dimension.
    """

    def __init__(self, cfg: HourglassConfig, fused: Optional[bool] = None, members: int = 1):
        super().__init__()
        cfg.validate()
        if isinstance(members, bool) or not isinstance(members, int) or members < 1:
            raise DipError(f"members must be a positive integer, got {members!r}")
        self.config = cfg
        self.members = members
        self.out_channels = cfg.out_channels
        body: Optional[nn.Module] = None
        for i in reversed(range(cfg.scales)):
            in_ch = cfg.in_channels if i == 0 else cfg.channels_down[i - 1]
            body = _Scale(cfg, i, in_ch, body, fused, members)
        self.body = body
        self.head = nn.Conv2d(members * cfg.channels_up[0], members * cfg.out_channels, 1, bias=cfg.bias,
                              groups=members)
        self.sigmoid = nn.Sigmoid() if cfg.sigmoid else nn.Identity()
        # The fused blocks hand the head a channels_last map, on which a 1×1
        # convolution to 3 channels falls to a slow generic kernel; as a GEMM on
        # the pixels × channels view it runs at matrix speed, forward and backward.
        self.head_as_gemm = (fused_default() if fused is None else bool(fused)) and members == 1

    def unfused(self) -> Hourglass:
        """This network with its head as a plain convolution (in place; the blocks are swapped by dip.export)."""
        self.head_as_gemm = False
        return self

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        y = self.body(z)
        if self.head_as_gemm:
            w = self.head.weight
            out = self.sigmoid(F.linear(y.permute(0, 2, 3, 1), w.reshape(w.shape[0], w.shape[1]),
                                        self.head.bias).permute(0, 3, 1, 2))
        else:
            out = self.sigmoid(self.head(y))
        if self.members > 1:
            out = out.reshape(-1, self.out_channels, out.shape[2], out.shape[3])
        return out

    @classmethod
    def stack(cls, nets: Sequence[Hourglass], fused: Optional[bool] = None) -> Hourglass:
        """One grouped network holding copies of ``nets`` (same configuration) as its members.

        ``fused`` selects its blocks as in :class:`Hourglass` (default: fused when the operator is loaded).
        """
        cfg = nets[0].config
        if any(n.config.to_dict() != cfg.to_dict() for n in nets):
            raise DipError("the networks of an ensemble must share one configuration")
        grouped = cls(cfg, fused=fused, members=len(nets))
        states = [n.state_dict() for n in nets]
        with torch.no_grad():
            for key, value in grouped.state_dict().items():
                if value.dim() == 0:  # num_batches_tracked: the same count in every member
                    value.copy_(states[0][key])
                else:
                    value.copy_(torch.cat([s[key].to(value.dtype) for s in states]).view_as(value))
        return grouped

    def member(self, index: int, fused: Optional[bool] = None) -> Hourglass:
        """Member ``index`` of a grouped network as a standalone :class:`Hourglass` (a copy)."""
        if not 0 <= index < self.members:
            raise DipError(f"member index {index} out of range for an ensemble of {self.members}")
        net = Hourglass(self.config, fused=fused)
        state = {}
        for key, value in self.state_dict().items():
            state[key] = value.clone() if value.dim() == 0 else value.unflatten(0, (self.members, -1))[index].clone()
        net.load_state_dict(state)
        return net.to(next(self.parameters()).device)


def build_network(cfg: HourglassConfig | str = "denoise", *, fused: Optional[bool] = None, members: int = 1,
                  **overrides) -> Hourglass:
    """Build the hourglass from a config or a preset name (with keyword overrides).

    ``fused=False`` forces the pure-PyTorch blocks; the default uses the fused
    operator whenever it is loaded (see ``dip.nn.active_path``).
    """
    if isinstance(cfg, str):
        cfg = preset(cfg, **overrides)
    elif overrides:
        cfg = HourglassConfig(**{**cfg.to_dict(), **overrides})
    return Hourglass(cfg, fused, members)
