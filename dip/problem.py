"""A restoration problem: the observation, the degradation operator and what the fit must produce.

:meth:`Problem.create` turns what a user gives (a task, an image, a factor, a
mask or an operator) into one object that owns the observed image, the
operator ``A``, the size of the restored image, the target ``A(x)`` is
compared with, and a fingerprint that checkpoints are checked against. The
API, the CLI and batch all build problems here, so a rule about a task lives
in one place.
"""
from __future__ import annotations

import numbers
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Optional, Union

import numpy as np
import torch

from dip.errors import DipError
from dip.io import MAX_PIXELS, ImageLike, LoadedImage, load_image
from dip.masks import ALPHA, resolve_mask
from dip.ops.lanczos import check_factor_support
from dip.physics import Custom, Denoise, Downsample, Inpaint, Operator
from dip.tasks import Task, TaskDefaults, task_defaults

OperatorLike = Union[Operator, Callable[[torch.Tensor], torch.Tensor]]


@dataclass
class Problem:
    """What to restore and how it was degraded."""

    task: Task
    source: LoadedImage  # the observation as read (colour channels, alpha set aside, file metadata)
    operator: Operator
    output_size: tuple  # (H, W) of the restored image
    factor: Optional[int] = None

    @classmethod
    def create(cls, task: Union[str, Task], image: ImageLike, *, factor: Optional[int] = None,
               mask: Optional[ImageLike] = None, operator: Optional[OperatorLike] = None,
               max_pixels: int = MAX_PIXELS) -> Problem:
        """Validate and assemble a problem; every refusal is one clear :class:`DipError` line."""
        task = Task.parse(task)
        if mask is not None and task is not Task.INPAINT:
            raise DipError(f"mask= is only used for inpainting, not for task {task.value!r}; drop it or use task='inpaint'")
        check_factor(task, factor, operator)
        source = load_image(image, name="image", max_pixels=max_pixels)
        h, w = source.size
        op = _operator(task, source, factor, mask, operator, max_pixels)
        if isinstance(mask, str) and mask == ALPHA:  # the holes were the transparent pixels: they are filled now
            source = replace(source, alpha=None)
        out_h, out_w = h * op.scale, w * op.scale
        if out_h * out_w > max_pixels:
            raise DipError(
                f"restoring {h}×{w} by a factor of {op.scale} gives {out_h}×{out_w} pixels, more than the limit "
                f"of {max_pixels:,}; use a smaller factor or crop the image"
            )
        return cls(task=task, source=source, operator=op, output_size=(out_h, out_w),
                   factor=getattr(op, "factor", factor))

    @property
    def channels(self) -> int:
        return int(self.source.tensor.shape[0])

    @property
    def alpha(self) -> Optional[np.ndarray]:
        return self.source.alpha

    @property
    def defaults(self) -> TaskDefaults:
        """The original work's settings for this task (and factor)."""
        return task_defaults(self.task, self.factor)

    def observation(self, device=None) -> torch.Tensor:
        """The observed image as a 1×C×h×w tensor."""
        return self.source.tensor[None].to(device)

    def target(self, device=None) -> torch.Tensor:
        """What ``A(x)`` is fitted to (for inpainting, the known pixels only)."""
        return self.operator.to(device).target(self.observation(device))

    def fingerprint(self) -> str:
        """Identifies the observation and the operator (a checkpoint resumes only on the same problem)."""
        return self.operator.fingerprint(self.observation())

    def check_operator(self, device) -> None:
        """Run ``A`` once on a blank image of the output size and check it gives the observation's shape."""
        out_h, out_w = self.output_size
        probe = torch.zeros(1, self.channels, out_h, out_w, device=device)
        expected = tuple(self.observation().shape)
        try:
            with torch.no_grad():
                y = self.operator.to(device)(probe)
        except DipError:
            raise
        except Exception as exc:
            raise DipError(f"the operator failed on a 1×{self.channels}×{out_h}×{out_w} input: {exc}") from exc
        if not isinstance(y, torch.Tensor) or tuple(y.shape) != expected:
            got = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
            raise DipError(
                f"the operator maps a 1×{self.channels}×{out_h}×{out_w} image to {got}, but the observation is "
                f"{expected}; for an operator that changes the size, set its scale attribute"
            )


def _operator(task: Task, source: LoadedImage, factor, mask, operator, max_pixels) -> Operator:
    if operator is not None:
        op = operator if isinstance(operator, Operator) else _custom(operator)
        if factor is not None:  # super-resolution or custom: the operator's scale
            _operator_scale(op, factor)
        return op
    if task is Task.CUSTOM:
        raise DipError("task 'custom' needs operator=, a differentiable function from the restored image to the observation")
    if task is Task.DENOISE:
        return Denoise()
    if task is Task.SUPER_RESOLUTION:
        return Downsample(factor)
    if mask is None:
        raise DipError("inpainting needs mask= (same size as the image; white/non-zero marks the known pixels), "
                       "or mask='alpha' for an image whose transparent pixels are the missing ones")
    return Inpaint(resolve_mask(mask, source, max_pixels=max_pixels))


def check_factor(task: Task, factor, operator: Optional[OperatorLike] = None) -> None:
    """The ``factor=`` rule of ``task`` (with ``operator``), checked before any image is read.

    :meth:`Problem.create` applies it, and :func:`dip.restore_many` before its batch starts (so a bad factor is
    one error, not one per image). Super-resolution without an operator: the Lanczos factor, an integer from 2
    to 32; with an operator (or for a custom task): any positive integer, the operator's scale.
    """
    if factor is not None and task not in (Task.SUPER_RESOLUTION, Task.CUSTOM):
        raise DipError(f"factor= is only used for super-resolution, not for task {task.value!r}")
    if operator is None and task is Task.SUPER_RESOLUTION:
        if factor is None:
            raise DipError("super-resolution needs factor= (an integer from 2 to 32)")
        integral = isinstance(factor, numbers.Integral) and not isinstance(factor, bool)
        check_factor_support(int(factor) if integral else factor, 2)  # the downsampler's own rule
    elif factor is not None and (isinstance(factor, bool) or not isinstance(factor, numbers.Integral) or factor < 1):
        raise DipError(f"factor must be a positive integer (the restored image is factor times larger), got {factor!r}")


def _operator_scale(op: Operator, factor) -> None:
    """``factor=`` given with an operator: its scale (set where the operator has none; a different one is refused)."""
    if op.scale == 1:
        op.scale = int(factor)
    elif op.scale != factor:
        raise DipError(f"factor={factor} but the operator's scale is {op.scale}; give one of them (or the same)")


def _custom(operator) -> Custom:
    """A user's operator; a deepinv ``Physics`` (a callable ``A`` besides its call) is used through ``A``.

    ``A`` is deepinv's noiseless forward; calling the physics itself would add
    fresh noise at every step.
    """
    forward = getattr(operator, "A", None)
    if callable(forward):
        return Custom(forward, linear=callable(getattr(operator, "A_adjoint", None)))
    return Custom(operator)
