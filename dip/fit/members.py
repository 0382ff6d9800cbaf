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

from typing import Optional

import torch

from dip.fit.stopping import VarianceStopper


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

    def _keep_best(self, pick: Optional[torch.Tensor]) -> None:
        """Each member's moving variance at its minimum (whole, at the first minimum or after a resume)."""
        if pick is None or self.best_variance is None:  # the first minimum, or resumed from a single fit's stopper
            self.best_variance = self._current_variance.clone()
        else:
            torch.where(pick, self._current_variance, self.best_variance, out=self.best_variance)

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
