"""Degradation operators: ``A(x)`` maps a restored image to the observed one.

Each operator is a small ``nn.Module`` whose ``forward`` is ``A``. Linear
operators also have ``adjoint`` (``Aᵀ``), computed here by autograd as the
vector-Jacobian product of ``A``, which is exact for a linear map.
"""
from __future__ import annotations

import numbers
from collections.abc import Callable

import torch
from torch import nn

from dip.errors import DipError
from dip.ops.lanczos import check_factor_support, lanczos_downsample


class Operator(nn.Module):
    """Base class: ``forward`` is ``A``; ``linear`` says whether ``adjoint`` exists."""

    linear: bool = True
    #: restored image size = observed size × scale (super-resolution has scale > 1)
    scale: int = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def target(self, observation: torch.Tensor) -> torch.Tensor:
        """What ``A(x)`` is compared with, given the observed image (the observation itself by default)."""
        return observation

    def describe(self) -> str:
        """A short text identifying the operator's parameters (part of a checkpoint's fingerprint)."""
        return f"{type(self).__name__}(scale={self.scale})"

    def observed_fraction(self) -> float:
        """The share of the misfit's entries that noise reaches: the fit's mean misfit is σ² times this at the
        noise level (1 here; the known pixels for inpainting, whose missing ones add zeros to the mean)."""
        return 1.0

    def fingerprint(self, observation: torch.Tensor) -> str:
        """A digest of the observation and the operator: what a checkpoint must have been written for."""
        from dip.checkpoint import fingerprint

        parts = [observation.detach().flatten().float().cpu()]
        parts += [t.detach().flatten().float().cpu() for t in self.buffers()]
        digest = fingerprint(torch.cat(parts))
        return f"{self.describe()}:{digest}"

    def adjoint(self, y: torch.Tensor, input_shape) -> torch.Tensor:
        """``Aᵀ y`` for an input of ``input_shape`` (only for linear operators)."""
        if not self.linear:
            raise DipError(f"{type(self).__name__} is not linear: it has no adjoint")
        x = torch.zeros(input_shape, dtype=y.dtype, device=y.device, requires_grad=True)
        with torch.enable_grad():
            out = self.forward(x)
            (grad,) = torch.autograd.grad(out, x, grad_outputs=y)
        return grad


class Denoise(Operator):
    """The identity: the observation is the image plus noise."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class Downsample(Operator):
    """Lanczos downsampling by an integer ``factor`` (super-resolution)."""

    def __init__(self, factor: int, support: int = 2):
        super().__init__()
        if isinstance(factor, numbers.Integral) and not isinstance(factor, bool):
            factor = int(factor)  # numpy integers are integers too
        check_factor_support(factor, support)
        self.factor = factor
        self.support = support
        self.scale = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return lanczos_downsample(x, self.factor, self.support)

    def describe(self) -> str:
        return f"Downsample(factor={self.factor}, support={self.support})"


class Inpaint(Operator):
    """Pixel masking: ``A(x) = m ⊙ x`` with ``m`` 1 where the pixel is known, 0 where missing."""

    def __init__(self, mask: torch.Tensor):
        super().__init__()
        if mask.dim() == 2:
            mask = mask[None, None]
        elif mask.dim() == 3:
            mask = mask[None]
        if mask.dim() != 4:
            raise DipError(f"mask must be H×W, C×H×W or 1×C×H×W, got shape {tuple(mask.shape)}")
        self.register_buffer("mask", mask.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.mask.to(x.dtype)

    def target(self, observation: torch.Tensor) -> torch.Tensor:
        """The known pixels only: the missing ones carry no information."""
        return self.forward(observation)

    def observed_fraction(self) -> float:
        """The mean of the squared mask: the misfit's missing pixels are zeros, and only the known ones hold noise."""
        return float(self.mask.float().square().mean())


class Custom(Operator):
    """A user-supplied differentiable callable ``A``.

    ``linear=True`` promises that ``fn`` is linear, which enables ``adjoint``;
    ``scale`` is how much larger the restored image is than the observation.
    """

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], *, linear: bool = False, scale: int = 1):
        super().__init__()
        if not callable(fn):
            raise DipError(f"operator must be callable (a function or nn.Module), got {type(fn).__name__}")
        self.fn = fn
        self.linear = linear
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)
