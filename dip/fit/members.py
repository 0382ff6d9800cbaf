"""The automatic stop for a seed ensemble: every member keeps its own variance minimum.

A grouped network (``Hourglass(..., members=K)``) returns K×C×H×W: one image
per member. :class:`MemberVarianceStopper` computes the moving variance of
each member's outputs separately and keeps, per member, the iterate where it
is smallest (its raw output, its moving average, its slice of the weights and
its moving variance, whose square root is the single-fit uncertainty; with
``select="weight_ema"`` its slice of the weight average instead of its weights,
so the grouped network's one forward pass at the end gives every member's
``weight_ema`` image). The fit stops once no member has reached a new minimum
for ``patience`` iterations.
With K = 1 it does exactly what :class:`~dip.fit.stopping.VarianceStopper`
does, and keeps the moving variance at the returned iterate besides.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from dip.fit.stopping import VarianceStopper, _per_image


def _per_member(mask: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``mask`` (K booleans) shaped to select along the first dimension of ``value`` (K·m along dim 0)."""
    return mask.view(-1, *([1] * (value.dim() - 1))) if value.shape[0] == mask.numel() else \
        mask.repeat_interleave(value.shape[0] // mask.numel()).view(-1, *([1] * (value.dim() - 1)))


class MemberVarianceStopper(VarianceStopper):
    """:class:`VarianceStopper` with one score, one minimum and one returned iterate per ensemble member."""

    name = "stopper"

    def __init__(self, config, check_every: int = 10):
        super().__init__(config, check_every)
        self.best_variance: Optional[torch.Tensor] = None  # K×C×H×W moving variance at each member's minimum

    def _score(self, out: torch.Tensor, iteration: int) -> torch.Tensor:
        self._current_variance = self._variance(out, iteration)
        return self._current_variance.mean(dim=(1, 2, 3))

    def update(self, output: torch.Tensor, ema: torch.Tensor, iteration: int) -> torch.Tensor:
        """Add iteration ``iteration``'s outputs (K×C×H×W); returns the mean of the members' scores (0-d)."""
        out = output.detach()
        score = self._score(out, iteration)
        self._average_weights(iteration)
        if iteration <= self.config.window:
            self._keep_previous_weights()
            return torch.full((), math.inf, device=out.device)
        if self.best_score is None:
            self.best_score = score.clone()
            self.best_iteration = torch.full(score.shape, iteration, dtype=torch.long, device=out.device)
            self.best_output, self.best_ema = out.clone(), ema.detach().clone()
            self.best_variance = self._current_variance.clone()
            self._first_best_weights()
            self._keep_previous_weights()
            self._centre(ema, iteration)
            return score.mean()
        if self.best_variance is None:  # resumed from a single-fit stopper's checkpoint
            self.best_variance = self._current_variance.clone()
        better = score < self.best_score
        torch.where(better, score, self.best_score, out=self.best_score)
        torch.where(better, torch.full_like(self.best_iteration, iteration), self.best_iteration,
                    out=self.best_iteration)
        pick = _per_image(better, out)
        torch.where(pick, out, self.best_output, out=self.best_output)
        torch.where(pick, ema.detach(), self.best_ema, out=self.best_ema)
        torch.where(pick, self._current_variance, self.best_variance, out=self.best_variance)
        self._pick_weights(better)
        self._keep_previous_weights()
        self._centre(ema, iteration)
        return score.mean()

    def _pick(self, better: torch.Tensor, new: dict, kept: dict) -> None:
        for key, value in new.items():  # each member's slice of every parameter
            if value.dim():
                torch.where(_per_member(better, value), value, kept[key], out=kept[key])

    def best(self) -> int:
        """The latest of the members' minima (0 while the window fills): the fit stops ``patience`` after it."""
        return 0 if self.best_iteration is None else int(self.best_iteration.max())

    def member_iterations(self) -> list:
        """Each member's returned iteration."""
        return [] if self.best_iteration is None else [int(i) for i in self.best_iteration.tolist()]

    _STATE = VarianceStopper._STATE + ("best_variance",)
