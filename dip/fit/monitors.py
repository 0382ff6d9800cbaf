"""The fit's optional features, each a :class:`Monitor` with its own state.

The loop in :mod:`dip.fit.loop` takes a step and hands the
:class:`~dip.fit.loop.Step` to every monitor in turn; a monitor may end the fit
by returning a :class:`StopReason`. Each monitor keeps its own state, and a
checkpoint is the union of the monitors' ``state_dict()``. Monitors read the
device only on iterations that are multiples of ``FitSettings.check_every``,
so a fit synchronises the host with the device only that often.

This module holds the small monitors; the variance stopper lives in
:mod:`dip.fit.stopping` and the divergence guard in :mod:`dip.fit.guard`.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Optional, Union

import torch

from dip.errors import DipError
from dip.fit.settings import StopReason
from dip.metrics import psnr_torch

if TYPE_CHECKING:  # pragma: no cover
    from dip.fit.loop import FitLoop, Step

log = logging.getLogger("dip")


class Monitor:
    """Base of the fit's hooks; every method is optional (the defaults do nothing).

    ``name`` keys the monitor's state in a checkpoint. ``rolls_back`` says
    whether the divergence guard restores this monitor's state with the
    weights (true for anything computed from the outputs).
    """

    name: str = "monitor"
    rolls_back: bool = True

    def on_start(self, loop: FitLoop) -> None:
        """Called once before the first step, after a resumed state is loaded."""

    def on_step(self, step: Step) -> Optional[StopReason]:
        """Look at the finished step; return a :class:`StopReason` to end the fit."""
        return None

    def on_end(self, loop: FitLoop, reason: StopReason) -> None:
        """Called once when the fit ends, for whatever reason."""

    def state_dict(self) -> dict:
        """Tensors and plain values that restore this monitor exactly."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned."""


class LearningRate(Monitor):
    """The one owner of the learning rate: a ``LambdaLR`` schedule with an optional linear warm-up.

    A warm-started fit ramps the rate from ``lr / warmup`` to ``lr`` over
    ``warmup`` steps, so that Adam's first steps (which move every weight by
    about the learning rate) do not throw the previous fit away. The divergence
    guard lowers the rate through :meth:`scale_by`, which multiplies the whole
    schedule, so a later warm-up step cannot undo it.
    """

    name = "lr"
    rolls_back = False  # the guard's reductions must outlive its rollbacks

    def __init__(self, warmup: int = 0):
        self.warmup = int(warmup)
        self.scale = 1.0
        self._loop: Optional[FitLoop] = None
        self.scheduler: Optional[torch.optim.lr_scheduler.LambdaLR] = None

    def factor(self, done: int) -> float:
        """The multiplier of the base rate for the step after ``done`` finished steps."""
        ramp = 1.0 if self.warmup <= 0 else min(1.0, (done + 1) / self.warmup)
        return ramp * self.scale

    def on_start(self, loop: FitLoop) -> None:
        self._loop = loop
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(loop.optimizer, lambda _epoch: self.factor(loop.done))

    def on_step(self, step: Step) -> None:
        self.scheduler.step()

    def scale_by(self, factor: float) -> None:
        """Multiply the learning rate from now on by ``factor`` (the divergence guard's lever)."""
        self.scale *= factor
        for group, base in zip(self._loop.optimizer.param_groups, self.scheduler.base_lrs):
            group["lr"] = base * self.factor(self._loop.done)

    def state_dict(self) -> dict:
        return {"scale": self.scale, "warmup": self.warmup}

    def load_state_dict(self, state: dict) -> None:
        self.scale, self.warmup = float(state["scale"]), int(state["warmup"])


class DiscrepancyStop(Monitor):
    """Stops once the data misfit falls to the noise level (``loss ≤ noise_sigma²``, the discrepancy principle).

    ``observed_fraction`` (:meth:`dip.physics.Operator.observed_fraction`) scales that level where only part of
    the misfit's entries carry noise: the known pixels of an inpainting mask.
    """

    name = "discrepancy"

    def __init__(self, noise_sigma: float, check_every: int, observed_fraction: float = 1.0):
        self.threshold = float(noise_sigma) ** 2 * float(observed_fraction)
        self.check_every = check_every
        self._checked = 0

    def on_step(self, step: Step) -> Optional[StopReason]:
        if step.iteration % self.check_every:
            return None
        losses = step.loop.series["loss"][self._checked:step.iteration]
        self._checked = step.iteration
        return StopReason.NOISE_LEVEL if bool(losses.min() <= self.threshold) else None

    def state_dict(self) -> dict:
        return {"checked": self._checked}

    def load_state_dict(self, state: dict) -> None:
        self._checked = int(state["checked"])


class PsnrRecorder(Monitor):
    """Records the PSNR of the raw and the averaged output against a known clean image (on the device).

    An ensemble's outputs (K×C×H×W) count as the image it returns: the members' mean.
    """

    name = "psnr"

    def __init__(self, reference: torch.Tensor):
        self.reference = reference

    def on_step(self, step: Step) -> None:
        step.loop.series.put("psnr", step.iteration, psnr_torch(members_mean(step.output), self.reference))
        step.loop.series.put("psnr_ema", step.iteration, psnr_torch(members_mean(step.ema), self.reference))


def members_mean(images: torch.Tensor) -> torch.Tensor:
    """The image of an ensemble's K×C×H×W outputs, their mean (1×C×H×W); a single fit's as it is."""
    return images if images.shape[0] == 1 else images.mean(dim=0, keepdim=True)


class Checkpointer(Monitor):
    """Writes the whole fit state about every ``every`` iterations and when the fit ends (atomically).

    The final checkpoint of a fit that ended by a :attr:`StopReason.final` stop records that reason, and a
    resume of it returns the result without taking steps. A write that fails (a full disk) leaves the previous
    checkpoint as it was and is logged as a warning on the ``dip`` logger; the fit goes on.

    Only states the divergence guard has vouched for are written: a periodic
    checkpoint waits for the guard's first check at or after each multiple of
    ``every`` (a state between checks may hold a bad step the guard has not
    seen yet, and a resume could not roll back past it), and the final one
    follows the guard's rollback at the end of the fit.
    """

    name = "checkpoint"
    rolls_back = False

    def __init__(self, path: Union[str, os.PathLike], every: int, meta: Optional[dict] = None):
        self.path, self.every, self.meta = path, int(every), dict(meta or {})
        self.written_at: Optional[int] = None
        self._due_after = 0  # a checkpoint is due once a multiple of ``every`` past this iteration is reached

    def on_start(self, loop: FitLoop) -> None:
        self._due_after = loop.done  # a resumed fit's own checkpoint holds the state it starts from

    def on_step(self, step: Step) -> None:
        due = step.iteration // self.every > self._due_after // self.every
        if due and step.loop.guard.checked == step.iteration and step.iteration < step.loop.budget:
            self.write(step.loop)

    def on_end(self, loop: FitLoop, reason: StopReason) -> None:
        """Write the final state: a resume continues it, or, after a :attr:`StopReason.final` stop, returns it."""
        if not loop.done:
            return
        if reason.final:  # the file must say so even where it holds this state already
            self.write(loop, finished=reason)
        elif self.written_at != loop.done:
            self.write(loop)

    def write(self, loop: FitLoop, finished: Optional[StopReason] = None) -> None:
        """Write the fit's state, unless a weight or the optimizer's state is not finite (then the previous
        checkpoint is kept, and a warning says so): the guard vets a state by the next loss, which a write does
        not wait for."""
        from dip.checkpoint import save_checkpoint

        state = loop.state_dict()
        bad = _non_finite({"weight": state["net"], "optimizer state": state["optimizer"].get("state", {})})
        if bad is not None:
            log.warning("did not write the checkpoint %s at iteration %d: %s is not finite (NaN or inf); %s is kept",
                        self.path, loop.done, bad, self._kept())
            return
        try:
            save_checkpoint(self.path, {**state, "meta": self.meta,
                                        "stop_reason": None if finished is None else finished.value})
        except (OSError, DipError) as exc:  # a full disk, a folder gone: the fit and its result matter more
            log.warning("could not write the checkpoint %s at iteration %d (%s); the fit goes on, %s is kept",
                        self.path, loop.done, exc, self._kept())
            return
        self.written_at = self._due_after = loop.done

    def _kept(self) -> str:
        return "no checkpoint yet" if self.written_at is None else f"the checkpoint of iteration {self.written_at}"


def _non_finite(groups: dict) -> Optional[str]:
    """The name of the first floating-point tensor in ``groups`` (nested dicts of tensors) that holds a NaN or an
    infinity, or None; one device synchronisation for all of them."""
    names, flags = [], []

    def visit(prefix: str, value) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                visit(f"{prefix}{'.' if prefix else ''}{key}", item)
        elif isinstance(value, torch.Tensor) and value.is_floating_point():
            names.append(prefix)
            flags.append(torch.isfinite(value).all())

    for what, group in groups.items():
        visit("", {what: group})
    if not flags:
        return None
    finite = torch.stack([f.to(flags[0].device) for f in flags])  # Adam's step counts stay on the CPU
    if bool(finite.all()):
        return None
    return names[int((~finite).nonzero()[0])]


class Callbacks(Monitor):
    """The user's callbacks: each is called with the :class:`~dip.fit.loop.Step`; True stops the fit."""

    name = "callbacks"
    rolls_back = False

    def __init__(self, callbacks):
        self.callbacks: list[Callable] = list(callbacks)

    def on_step(self, step: Step) -> Optional[StopReason]:
        stop = [bool(cb(step)) for cb in self.callbacks]  # every callback sees every step
        return StopReason.CALLBACK if any(stop) else None
