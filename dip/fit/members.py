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

The members' moving averages are all read at one iteration, after the joint
minimum (the minimum of the members' mean variance): the first iteration where
that mean variance has risen to :data:`ENSEMBLE_READ_RISE` times its minimum.
The mean of K members averages their independent errors, so it peaks later
than any one member does; how much later depends on the fit's pace (250–500
iterations on 128² crops with the ``denoise`` net, 0–130 on 32² crops with the
``small`` one), and the variance's rise follows that pace where a fixed delay
cannot (``benchmarks/RESULTS.md``, issue 15). A fit that ends before the rise
returns its latest averages. Each member's raw output, weights and variance
stay those of its own minimum.
With K = 1 it does exactly what :class:`~dip.fit.stopping.VarianceStopper`
does, and keeps the moving variance at the returned iterate besides.
"""
from __future__ import annotations

from typing import Optional

import torch

from dip.fit.settings import Selection
from dip.fit.stopping import VarianceStopper

ENSEMBLE_READ_RISE = 1.1  # K > 1: the averages are read where the mean variance first regains 1.1 × its minimum


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
        self.joint_score: Optional[torch.Tensor] = None  # the smallest mean of the members' scores (K > 1)
        self.joint_iteration: Optional[torch.Tensor] = None  # where it was reached
        self.read_at: Optional[torch.Tensor] = None  # where the averages were read after it (0: not yet)

    def _score(self, out: torch.Tensor, iteration: int) -> torch.Tensor:
        self._current_variance = self._variance(out, iteration)
        self._current_score = self._current_variance.mean(dim=(1, 2, 3))
        return self._current_score

    def _centre(self, ema: torch.Tensor, iteration: int) -> None:
        """K > 1: take every member's average where the mean variance has risen enough after its minimum."""
        if self.best_iteration.numel() == 1:
            super()._centre(ema, iteration)
            return
        self._iteration = iteration
        score = self._current_score.mean()
        if self.joint_score is None:  # the first scored iteration, or resumed from a stopper that kept none
            self.joint_score = score.clone()
            self.joint_iteration = torch.full((), iteration, dtype=torch.long, device=score.device)
            self.read_at = torch.zeros((), dtype=torch.long, device=score.device)
            self.centred_ema = ema.detach().clone()
            return
        # Selects on the device, no host sync: a new minimum cancels the read, the rise after it takes one.
        better = score < self.joint_score
        torch.where(better, score, self.joint_score, out=self.joint_score)
        self.joint_iteration.masked_fill_(better, iteration)
        self.read_at.masked_fill_(better, 0)
        due = (self.read_at == 0) & (score >= ENSEMBLE_READ_RISE * self.joint_score)
        self.read_at.masked_fill_(due, iteration)
        torch.where(due, ema.detach(), self.centred_ema, out=self.centred_ema)

    def _centred_image(self, ema: torch.Tensor) -> torch.Tensor:
        """K > 1: the averages read after the joint minimum, or the latest ``ema`` where the fit ended first."""
        if self.best_iteration is None or self.best_iteration.numel() == 1:
            return super()._centred_image(ema)
        if self.read_at is None or self.centred_ema is None:  # resumed from a stopper that kept no read
            return ema
        return torch.where(self.read_at > 0, self.centred_ema, ema)

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
        """Each member's own variance minimum: the iterate of its weights, raw output and variance."""
        return [] if self.best_iteration is None else [int(i) for i in self.best_iteration.tolist()]

    def read_iteration(self) -> Optional[int]:
        """Where the members' averages were read (K > 1, ``centred_ema``; the latest iteration if the fit ended first).

        None for a single fit, another selection, or before the first score. Syncs.
        """
        if self.read_at is None or self.config.select is not Selection.CENTRED_EMA:
            return None
        return int(self.read_at) or self._iteration

    _STATE = VarianceStopper._STATE + ("best_variance", "joint_score", "joint_iteration", "read_at")
