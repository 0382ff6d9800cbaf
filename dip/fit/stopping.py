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

The moving average of the outputs trails the network: at the variance minimum
it mostly holds earlier, worse outputs, and its own PSNR peaks later. The
default selection, ``centred_ema`` (:attr:`Selection.CENTRED_EMA`), therefore
keeps the average read a delay after the minimum: a fifth of the minimum's
iteration (a fit's pace scales with it), at most the average's own lag
(:attr:`~dip.fit.settings.FitSettings.average_lag`, the mean age of its terms:
99 iterations at the default decay). A fit that ends before then returns its
last average. Measured against reading at the minimum (``best_ema``) in
``benchmarks/RESULTS.md``.

With ``select="weight_ema"`` (:attr:`Selection.WEIGHT_EMA`) it keeps instead a
moving average of the weights (Polyak averaging of the parameters, with the
outputs' ``ema_weight`` and bias correction) and, at every new minimum, that
average; the returned image is the network's output on ``z`` with those
averaged weights, computed once when the fit ends.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Optional

import torch

from dip.errors import DipError
from dip.fit.monitors import Monitor
from dip.fit.settings import EarlyStopping, FitSettings, Selection, StopMode, StopReason

if TYPE_CHECKING:  # pragma: no cover
    from dip.fit.loop import FitLoop, Step

CENTRE_DIVISOR = 5  # centred_ema reads the average b // 5 iterations after the minimum b (RESULTS.md, issue 15)


def centred_read(minimum: torch.Tensor, lag: int) -> torch.Tensor:
    """The iteration :attr:`Selection.CENTRED_EMA` reads the average at, for a variance minimum at ``minimum``.

    ``minimum // CENTRE_DIVISOR`` iterations after it, at most ``lag`` (the average's, ``FitSettings.average_lag``);
    elementwise, on ``minimum``'s device.
    """
    return minimum + torch.clamp(minimum // CENTRE_DIVISOR, max=lag)


def _per_image(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``mask`` (one boolean, or one per ensemble member) shaped to select whole images of ``like`` (N×C×H×W)."""
    return mask.view(-1, *([1] * (like.dim() - 1)))


class VarianceStopper(Monitor):
    """Tracks the moving variance of the outputs and keeps the iterate where it is smallest.

    The score is the per-pixel variance averaged over pixels; it is ``inf``
    for the first ``window`` iterations, while the estimate is still filling.

    The weight average (``select="weight_ema"`` only; the other selections do
    not pay for it) is one fused ``lerp`` over the parameters per step, on the
    device. It averages the weights *after* each step — step k adds θ_k, the
    usual Polyak average — so at a minimum k it covers θ_1 … θ_k while the
    outputs' average covers the outputs of θ_0 … θ_(k−1): one step apart,
    which at a decay of 0.99 is immaterial, and it spares a copy of the
    weights before every step. Buffers (BatchNorm's running statistics) are not
    averaged: the fit's train-mode forward passes, :meth:`Restoration.render`
    and the exports all use the batch statistics of ``z`` instead, so the
    returned weights carry the live buffers of the end of the fit.
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
        self.weight_average: Optional[dict] = None  # parameter name → moving average (weight_ema only)
        self.best_weight_average: Optional[dict] = None  # that average at the variance minimum
        self.weight_ema_image: Optional[torch.Tensor] = None  # its output on z (see render_average)
        self._net = None
        self._parameters: Optional[dict] = None  # detached views of the live parameters (weight_ema only)
        self._keep = None  # FitSettings.average_keep of the fit
        self._lag = FitSettings().average_lag  # the fit's, from on_start
        self._iteration = 0  # the latest iteration seen (host side: no sync)
        self.centred_ema: Optional[torch.Tensor] = None  # the average read a delay after the minimum (_centred_at)

    def on_start(self, loop: FitLoop) -> None:
        self._net = loop.net
        self._iteration = loop.done  # a resumed fit's (one that ended takes no step to set it)
        self._lag = loop.settings.average_lag
        if self.config.select is Selection.WEIGHT_EMA:
            self._parameters = {name: p.detach() for name, p in loop.net.named_parameters()}
            self._keep = loop.settings.average_keep

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
        """Add iteration ``iteration``'s output (1-based); returns the score as a 0-d device tensor.

        With one score per ensemble member (:class:`~dip.fit.members.MemberVarianceStopper`) every member
        keeps its own minimum, and the returned score is their mean.
        """
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
            self._keep_best(None)
            self._first_best_weights()
        else:
            better = score < self.best_score
            torch.where(better, score, self.best_score, out=self.best_score)
            torch.where(better, torch.full_like(self.best_iteration, iteration), self.best_iteration,
                        out=self.best_iteration)
            pick = _per_image(better, out)
            torch.where(pick, out, self.best_output, out=self.best_output)
            torch.where(pick, ema.detach(), self.best_ema, out=self.best_ema)
            self._keep_best(pick)
            self._pick_weights(better)
        self._keep_previous_weights()
        self._centre(ema, iteration)
        return score.mean()

    def _keep_best(self, pick: Optional[torch.Tensor]) -> None:
        """Hook: keep more of the iterate where ``pick`` (per image) says it is a new minimum; None: the first."""

    def _centred_at(self) -> torch.Tensor:
        """When the average centred on the current minimum is read (per member): see the module docstring."""
        return centred_read(self.best_iteration, self._lag)

    def _centre(self, ema: torch.Tensor, iteration: int) -> None:
        """Keep the average of the iteration :meth:`_centred_at` gives (per member): a select on the device."""
        self._iteration = iteration
        if self.centred_ema is None:
            self.centred_ema = ema.detach().clone()
        due = self._centred_at() == iteration
        torch.where(_per_image(due, ema), ema.detach(), self.centred_ema, out=self.centred_ema)

    def _centred_image(self, ema: torch.Tensor) -> torch.Tensor:
        """:attr:`Selection.CENTRED_EMA`: the kept average where it is due, the latest ``ema`` where the fit ended first."""
        if self.centred_ema is None:  # resumed from a checkpoint that kept none
            return self.best_ema
        ready = self._centred_at() <= self._iteration
        return torch.where(_per_image(ready, ema), self.centred_ema, ema)

    def _average_weights(self, iteration: int) -> None:
        """Add the weights after step ``iteration`` to their moving average (weight_ema only): one fused op."""
        if self._parameters is None:
            return
        if self.weight_average is None:
            self.weight_average = {k: v.clone() for k, v in self._parameters.items()}
            return
        names = list(self.weight_average)
        torch._foreach_lerp_([self.weight_average[k] for k in names], [self._parameters[k] for k in names],
                             1.0 - self._keep(iteration))

    def _first_best_weights(self) -> None:
        """The weights kept at the first scored iteration (the minimum so far)."""
        self.best_weights = {k: v.clone() for k, v in (self._previous or {}).items()}
        if self.weight_average is not None:
            self.best_weight_average = {k: v.clone() for k, v in self.weight_average.items()}

    def _pick_weights(self, better: torch.Tensor) -> None:
        """Where ``better``, take the weights (and their average) of this iteration: a select on the device."""
        self._pick(better, self._previous or {}, self.best_weights)
        if self.weight_average is not None:
            if self.best_weight_average is None:  # resumed from a stopper that kept no average
                self.best_weight_average = {k: v.clone() for k, v in self.weight_average.items()}
            self._pick(better, self.weight_average, self.best_weight_average)

    def _pick(self, better: torch.Tensor, new: dict, kept: dict) -> None:
        for key, value in new.items():  # no host sync
            torch.where(better, value, kept[key], out=kept[key])

    def _keep_previous_weights(self) -> None:
        """Copy the current weights: the next step's output comes from them (its update follows)."""
        if self._net is None or self.config.select in (Selection.EMA, Selection.WEIGHT_EMA):
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

    def averaged_weights(self) -> Optional[dict]:
        """The network's state with the averaged parameters of the variance minimum (None unless weight_ema).

        Buffers are the live network's (copies): see the class docstring.
        """
        if self.best_weight_average is None or self._net is None:
            return None
        state = {k: v.detach().clone() for k, v in self._net.state_dict().items()}
        state.update({k: v.clone() for k, v in self.best_weight_average.items()})
        return state

    def returned_weights(self) -> Optional[dict]:
        """The weights of the returned iterate: the averaged ones for weight_ema, else those of the minimum."""
        if self.config.select is Selection.WEIGHT_EMA:
            return self.averaged_weights()
        return self.best_weights

    def render_average(self, loop: FitLoop) -> Optional[torch.Tensor]:
        """The ``weight_ema`` image: one forward pass with :meth:`averaged_weights` (:meth:`FitLoop.render`).

        The loop calls it once when the fit ends; None unless the average was kept.
        """
        weights = self.averaged_weights()
        if weights is not None:
            self.weight_ema_image = loop.render(weights)
        return self.weight_ema_image

    def image(self, ema: torch.Tensor, select: Optional[Selection] = None) -> torch.Tensor:
        """The image chosen by ``select`` (default: the configured one); ``ema`` is the current average.

        ``weight_ema`` needs :meth:`render_average` first (the loop calls it when the fit ends).
        """
        select = Selection(select or self.config.select)
        if self.best_output is None or select is Selection.EMA:
            return ema
        if select is Selection.BEST_OUTPUT:
            return self.best_output
        if select is Selection.BEST_EMA:
            return self.best_ema
        if select is Selection.CENTRED_EMA:
            return self._centred_image(ema)
        if select is Selection.WEIGHT_EMA:
            if self.weight_ema_image is None:
                raise DipError("the weight_ema image needs early_stopping select='weight_ema' and render_average()")
            return self.weight_ema_image
        return 0.5 * (self.best_output + self.best_ema)

    def candidates(self, ema: torch.Tensor) -> dict:
        """Every selectable image, by :class:`Selection` value (for comparing them against a reference).

        ``weight_ema`` is among them when the stopper tracked the weight average and rendered it.
        """
        return {s.value: self.image(ema, s) for s in Selection
                if s is not Selection.WEIGHT_EMA or self.weight_ema_image is not None}

    def selects_best(self) -> bool:
        """True when the returned image belongs to the variance minimum rather than the end of the fit."""
        return self.best_output is not None and self.config.select is not Selection.EMA

    _STATE = ("_mean", "_var", "_ring", "best_score", "best_iteration", "best_output", "best_ema", "best_weights",
              "_previous", "weight_average", "best_weight_average", "centred_ema")

    def state_dict(self) -> dict:
        """The tensors that resume the stopper exactly (for checkpoints and rollbacks)."""
        return {name: getattr(self, name) for name in self._STATE if getattr(self, name) is not None}

    def load_state_dict(self, state: dict) -> None:
        for name in self._STATE:
            setattr(self, name, state.get(name))
