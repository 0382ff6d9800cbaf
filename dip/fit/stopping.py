"""Automatic stopping without ground truth: the moving variance of the outputs.

Deep Image Prior fits the image before the noise; while it fits structure the
outputs keep changing, once the image is fitted they settle, and when the net
starts to reproduce the noise they drift again. The variance of the recent
outputs therefore falls to a minimum close to the PSNR peak (Wang et al.,
"Early Stopping for Deep Image Prior", TMLR 2023: ES-WMV). The
:class:`VarianceStopper` keeps that variance on the fit's device, step by step,
without host copies (``StopMode.EMA``: an exponentially weighted variance, two
images of memory; ``StopMode.WINDOW``: a ring buffer of ``window`` outputs).

At every new minimum it also keeps the returned iterate whole: the raw output,
the moving average, and the network's weights, so that the network a
:class:`~dip.result.Restoration` exports, renders and warm-starts from is the
one that produced the returned image. The fit stops once the variance has not
reached a new minimum for ``patience`` iterations.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Optional

import torch

from dip.fit.monitors import Monitor
from dip.fit.settings import EarlyStopping, Selection, StopMode, StopReason

if TYPE_CHECKING:  # pragma: no cover
    from dip.fit.loop import FitLoop, Step


class VarianceStopper(Monitor):
    """Tracks the moving variance of the outputs and keeps the iterate where it is smallest.

    The score is the per-pixel variance averaged over pixels; it is ``inf``
    for the first ``window`` iterations, while the estimate is still filling.
    """

    name = "stopper"

    def __init__(self, config: EarlyStopping, check_every: int = 10):
        self.config = config
        self.check_every = check_every
        self._alpha = 2.0 / (config.window + 1)  # the EMA whose centre of mass is a window's
        self._mean: Optional[torch.Tensor] = None
        self._var: Optional[torch.Tensor] = None
        self._ring: Optional[torch.Tensor] = None
        self.best_score: Optional[torch.Tensor] = None
        self.best_iteration: Optional[torch.Tensor] = None
        self.best_output: Optional[torch.Tensor] = None
        self.best_ema: Optional[torch.Tensor] = None
        self.best_weights: Optional[dict] = None
        self._previous: Optional[dict] = None  # the weights before the last update: those that made its output
        self._net = None

    def on_start(self, loop: FitLoop) -> None:
        self._net = loop.net

    def on_step(self, step: Step) -> Optional[StopReason]:
        score = self.update(step.output, step.ema, step.iteration)
        step.loop.series.put("variance", step.iteration, score)
        return StopReason.AUTO_STOP if self.should_stop(step.iteration) else None

    def should_stop(self, iteration: int) -> bool:
        """True when the variance has not improved for ``patience`` iterations (read every ``check_every``)."""
        if self.best_iteration is None or iteration % self.check_every:
            return False
        return iteration - self.best() >= self.config.patience

    def _variance(self, out: torch.Tensor, iteration: int) -> torch.Tensor:
        """The per-pixel moving variance of the outputs, shaped like ``out`` (updated with ``out``)."""
        if self.config.mode is StopMode.EMA:
            if self._mean is None:
                self._mean, self._var = out.clone(), torch.zeros_like(out)
            else:
                a = self._alpha
                diff = out - self._mean
                self._mean.add_(diff, alpha=a)
                # West's update of the exponentially weighted variance: stable in float32.
                self._var.mul_(1 - a).addcmul_(diff, diff, value=a * (1 - a))
            return self._var
        if self._ring is None:
            self._ring = out.new_zeros((self.config.window,) + tuple(out.shape))
        self._ring[(iteration - 1) % self.config.window].copy_(out)
        return self._ring.var(dim=0, unbiased=False)

    def _score(self, out: torch.Tensor, iteration: int) -> torch.Tensor:
        return self._variance(out, iteration).mean()

    def update(self, output: torch.Tensor, ema: torch.Tensor, iteration: int) -> torch.Tensor:
        """Add iteration ``iteration``'s output (1-based); returns the score as a 0-d device tensor."""
        out = output.detach()
        score = self._score(out, iteration)
        if iteration <= self.config.window:
            self._keep_previous_weights()
            return torch.full((), math.inf, device=out.device)
        if self.best_score is None:
            self.best_score = score.clone()
            self.best_iteration = torch.full((), iteration, dtype=torch.long, device=out.device)
            self.best_output, self.best_ema = out.clone(), ema.detach().clone()
            self.best_weights = {k: v.clone() for k, v in (self._previous or {}).items()}
            self._keep_previous_weights()
            return score
        better = score < self.best_score
        torch.where(better, score, self.best_score, out=self.best_score)
        torch.where(better, torch.full_like(self.best_iteration, iteration), self.best_iteration,
                    out=self.best_iteration)
        torch.where(better, out, self.best_output, out=self.best_output)
        torch.where(better, ema.detach(), self.best_ema, out=self.best_ema)
        for key, value in (self._previous or {}).items():  # no host sync: a select on the device
            torch.where(better, value, self.best_weights[key], out=self.best_weights[key])
        self._keep_previous_weights()
        return score

    def _keep_previous_weights(self) -> None:
        """Copy the current weights: the next step's output comes from them (its update follows)."""
        if self._net is None or self.config.select is Selection.EMA:
            return
        state = self._net.state_dict()
        if self._previous is None:
            self._previous = {k: v.detach().clone() for k, v in state.items()}
            return
        # One fused copy instead of a launch per tensor: this runs every step.
        torch._foreach_copy_(list(self._previous.values()), [state[k] for k in self._previous])

    def best(self) -> int:
        """The iteration of the smallest variance so far (0 while the window is filling); syncs."""
        return 0 if self.best_iteration is None else int(self.best_iteration)

    def image(self, ema: torch.Tensor, select: Optional[Selection] = None) -> torch.Tensor:
        """The image chosen by ``select`` (default: the configured one); ``ema`` is the current average."""
        select = Selection(select or self.config.select)
        if self.best_output is None or select is Selection.EMA:
            return ema
        if select is Selection.BEST_OUTPUT:
            return self.best_output
        if select is Selection.BEST_EMA:
            return self.best_ema
        return 0.5 * (self.best_output + self.best_ema)

    def candidates(self, ema: torch.Tensor) -> dict:
        """Every selectable image, by :class:`Selection` value (for comparing them against a reference)."""
        return {s.value: self.image(ema, s) for s in Selection}

    def selects_best(self) -> bool:
        """True when the returned image belongs to the variance minimum rather than the end of the fit."""
        return self.best_output is not None and self.config.select is not Selection.EMA

    _STATE = ("_mean", "_var", "_ring", "best_score", "best_iteration", "best_output", "best_ema", "best_weights",
              "_previous")

    def state_dict(self) -> dict:
        """The tensors that resume the stopper exactly (for checkpoints and rollbacks)."""
        return {name: getattr(self, name) for name in self._STATE if getattr(self, name) is not None}

    def load_state_dict(self, state: dict) -> None:
        for name in self._STATE:
            setattr(self, name, state.get(name))
