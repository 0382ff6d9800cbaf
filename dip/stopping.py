"""Automatic stopping without ground truth: the moving variance of the outputs.

Deep Image Prior fits the image before the noise; while it fits structure the
outputs keep changing, once the image is fitted they settle, and when the net
starts to reproduce the noise they drift again. The variance of the recent
outputs therefore falls to a minimum close to the PSNR peak (Wang et al.,
"Early Stopping for Deep Image Prior", TMLR 2023: ES-WMV). This module keeps
that variance on the fit's device, step by step, without host copies:

- ``mode="ema"`` (default) is the exponentially weighted moving variance
  (their ES-EMV variant), two images of memory;
- ``mode="window"`` is the plain windowed variance over the last ``window``
  outputs, a ring buffer of ``window`` images.

The fit stops once the variance has not reached a new minimum for
``patience`` iterations and returns the image chosen by ``select``.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional

import torch

from dip.errors import DipError

#: The images :class:`VarianceStopper` can hand back (``EarlyStopping.select``).
SELECTIONS = ("best_ema", "best_output", "blend", "ema")


@dataclass(frozen=True)
class EarlyStopping:
    """Settings of the no-reference stopping rule.

    ``window``: outputs the variance is taken over (the effective window of the
    exponential average in ``mode="ema"``). ``patience``: iterations without a
    new variance minimum before the fit stops. ``select``: the returned image —
    ``"best_ema"`` the moving average of outputs at the variance minimum,
    ``"best_output"`` the raw output there, ``"blend"`` the mean of those two,
    ``"ema"`` the moving average when the fit stops. ``check_every``: how
    often the host reads the stopping state (the only device sync it adds).
    """

    window: int = 100
    patience: int = 500
    mode: str = "ema"
    select: str = "best_ema"
    check_every: int = 10

    def __post_init__(self):
        for name in ("window", "patience", "check_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise DipError(f"early stopping {name} must be a positive integer, got {value!r}")
        if self.mode not in ("ema", "window"):
            raise DipError(f"early stopping mode must be 'ema' or 'window', got {self.mode!r}")
        if self.select not in SELECTIONS:
            raise DipError(f"early stopping select must be one of {', '.join(SELECTIONS)}, got {self.select!r}")

    def to_dict(self) -> dict:
        return asdict(self)


class VarianceStopper:
    """Tracks the moving variance of the outputs and the iterate where it is smallest.

    Call :meth:`update` once per accepted iteration with the raw output and the
    fit's moving average; everything stays on the outputs' device. The score is
    the per-pixel variance averaged over pixels; it is ``inf`` for the first
    ``window`` iterations, while the estimate is still filling.
    """

    def __init__(self, config: EarlyStopping):
        self.config = config
        self._alpha = 2.0 / (config.window + 1)  # the EMA whose centre of mass is a window's
        self._mean: Optional[torch.Tensor] = None
        self._var: Optional[torch.Tensor] = None
        self._ring: Optional[torch.Tensor] = None
        self.best_score: Optional[torch.Tensor] = None
        self.best_iteration: Optional[torch.Tensor] = None
        self.best_output: Optional[torch.Tensor] = None
        self.best_ema: Optional[torch.Tensor] = None

    def update(self, output: torch.Tensor, ema: torch.Tensor, iteration: int) -> torch.Tensor:
        """Add iteration ``iteration``'s output (1-based); returns the score as a 0-d device tensor."""
        out = output.detach()
        if self.config.mode == "ema":
            if self._mean is None:
                self._mean, self._var = out.clone(), torch.zeros_like(out)
            else:
                a = self._alpha
                diff = out - self._mean
                self._mean.add_(diff, alpha=a)
                # West's update of the exponentially weighted variance: stable in float32.
                self._var.mul_(1 - a).addcmul_(diff, diff, value=a * (1 - a))
            score = self._var.mean()
        else:
            if self._ring is None:
                self._ring = out.new_zeros((self.config.window,) + tuple(out.shape[1:]))
            self._ring[(iteration - 1) % self.config.window].copy_(out[0])
            score = self._ring.var(dim=0, unbiased=False).mean()
        if iteration <= self.config.window:
            return torch.full((), math.inf, device=out.device)
        if self.best_score is None:
            self.best_score = score.clone()
            self.best_iteration = torch.full((), iteration, dtype=torch.long, device=out.device)
            self.best_output, self.best_ema = out.clone(), ema.detach().clone()
            return score
        better = score < self.best_score
        torch.where(better, score, self.best_score, out=self.best_score)
        torch.where(better, torch.full_like(self.best_iteration, iteration), self.best_iteration,
                    out=self.best_iteration)
        torch.where(better, out, self.best_output, out=self.best_output)
        torch.where(better, ema.detach(), self.best_ema, out=self.best_ema)
        return score

    def best(self) -> int:
        """The iteration of the smallest variance so far (0 while the window is filling); syncs."""
        return 0 if self.best_iteration is None else int(self.best_iteration)

    def should_stop(self, iteration: int) -> bool:
        """True when the variance has not improved for ``patience`` iterations (checked every ``check_every``)."""
        if self.best_iteration is None or iteration % self.config.check_every:
            return False
        return iteration - self.best() >= self.config.patience

    def image(self, ema: torch.Tensor, select: Optional[str] = None) -> torch.Tensor:
        """The image chosen by ``select`` (default: the configured one); ``ema`` is the current average."""
        select = select or self.config.select
        if self.best_output is None or select == "ema":
            return ema
        if select == "best_output":
            return self.best_output
        if select == "best_ema":
            return self.best_ema
        return 0.5 * (self.best_output + self.best_ema)

    def candidates(self, ema: torch.Tensor) -> dict:
        """Every selectable image, by name (for comparing them against a reference)."""
        return {name: self.image(ema, name) for name in SELECTIONS}

    def state_dict(self) -> dict:
        """The tensors that resume the stopper exactly (for checkpoints)."""
        names = ("_mean", "_var", "_ring", "best_score", "best_iteration", "best_output", "best_ema")
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}

    def load_state_dict(self, state: dict, device=None) -> None:
        for name, value in state.items():
            setattr(self, name, value.to(device) if device is not None else value)
