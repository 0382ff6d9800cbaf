"""The Deep Image Prior fitting loop.

Minimises ``‖A(crop(f_θ(z + η))) − y‖²`` over the network weights θ with
Adam, where ``z`` is a fixed noise input, ``η`` a fresh perturbation each
step (``reg_noise_std``), ``A`` the degradation and ``y`` the observation.
The returned image is an exponential moving average of the outputs, which
smooths the iterate-to-iterate jitter as in the original work; with early
stopping it is the one the stopping rule picks. A divergence guard rolls
back bad steps; checkpoints let an interrupted fit continue bit for bit.
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Optional, Union

import torch
from torch import nn
from tqdm.auto import tqdm

from dip.checkpoint import save_checkpoint
from dip.errors import DipError
from dip.fit.settings import StopReason
from dip.guard import DivergenceGuard, GuardSettings
from dip.metrics import psnr_torch
from dip.stopping import EarlyStopping, VarianceStopper


@dataclass
class Step:
    """What a callback sees after each iteration (tensors stay on the fit's device)."""

    iteration: int  # 1-based count of finished iterations
    loss: torch.Tensor  # 0-d, detached
    output: torch.Tensor  # cropped network output, 1×C×H×W, detached
    ema: torch.Tensor  # running average of outputs, 1×C×H×W
    network: nn.Module
    optimizer: torch.optim.Optimizer


#: A callback returns True to stop the fit after this step.
Callback = Callable[[Step], Optional[bool]]


@dataclass
class History:
    """Per-iteration records of a fit (lists of floats, index i = iteration i + 1)."""

    loss: list = field(default_factory=list)
    psnr: list = field(default_factory=list)  # of the raw output against the reference
    psnr_ema: list = field(default_factory=list)  # of the averaged output against the reference
    variance: list = field(default_factory=list)  # the stopping signal (inf while its window fills)
    rollbacks: list = field(default_factory=list)  # iterations whose loss the divergence guard rejected

    def as_dict(self) -> dict:
        return {"loss": list(self.loss), "psnr": list(self.psnr), "psnr_ema": list(self.psnr_ema),
                "variance": list(self.variance), "rollbacks": list(self.rollbacks)}


@dataclass
class FitResult:
    """The outcome of :func:`fit`."""

    ema: torch.Tensor  # 1×C×H×W averaged output at the end of the fit
    output: torch.Tensor  # 1×C×H×W last network output
    history: History
    iterations: int  # iterations completed
    stop_reason: StopReason  # "completed", "auto stop", "callback", "noise level reached", "interrupted", "diverged"
    seconds: float
    image: Optional[torch.Tensor] = None  # the restored image: ``ema``, or the early-stopping selection
    stopped_at: int = 0  # the iteration ``image`` belongs to
    candidates: dict = field(default_factory=dict)  # with early stopping: every selectable image, by name


def fit(
    net: nn.Module,
    z: torch.Tensor,
    operator: Callable[[torch.Tensor], torch.Tensor],
    target: torch.Tensor,
    *,
    iterations: int,
    crop: Optional[Sequence[int]] = None,
    lr: float = 0.01,
    reg_noise_std: float = 1.0 / 30.0,
    ema_weight: float = 0.99,
    reference: Optional[torch.Tensor] = None,
    noise_sigma: Optional[float] = None,
    callbacks: Iterable[Callback] = (),
    progress: bool = True,
    generator: Optional[torch.Generator] = None,
    description: str = "dip",
    early_stopping: Optional[EarlyStopping] = None,
    guard: Optional[GuardSettings] = GuardSettings(),
    checkpoint: Optional[Union[str, os.PathLike]] = None,
    checkpoint_every: Optional[int] = None,
    checkpoint_meta: Optional[dict] = None,
    resume_state: Optional[dict] = None,
) -> FitResult:
    """Fit ``net`` so that ``operator(crop(net(z)))`` matches ``target``.

    ``iterations`` is the number of steps, or with ``early_stopping`` the most
    it may take: the fit then stops when the moving variance of the outputs
    has not improved for ``early_stopping.patience`` iterations and returns
    the image ``early_stopping.select`` names (see :mod:`dip.stopping`).
    ``crop`` = (top, left, height, width) selects the image inside the padded
    network output. ``reference`` (same size as the crop) records PSNR per
    step. ``noise_sigma`` (noise std in [0, 1] units) stops the fit once the
    data misfit falls to the noise level (the discrepancy principle).
    ``guard`` rolls back a diverging fit (see :mod:`dip.guard`; None disables
    it: a non-finite loss then just stops the fit). ``checkpoint`` with
    ``checkpoint_every`` writes the whole state every that many iterations
    (``checkpoint_meta`` is stored beside it); ``resume_state``, a loaded
    checkpoint, continues such a fit exactly where it was.
    A KeyboardInterrupt ends the fit early and still returns the result.
    """
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    callbacks = list(callbacks)
    history = History()
    device = z.device
    losses = torch.empty(iterations, device=device)
    psnrs = torch.empty((iterations, 2), device=device) if reference is not None else None
    stopper = VarianceStopper(early_stopping) if early_stopping is not None else None
    variances = torch.empty(iterations, device=device) if stopper is not None else None
    watch = DivergenceGuard(guard, net, optimizer) if guard is not None else None
    ema: Optional[torch.Tensor] = None
    output: Optional[torch.Tensor] = None
    stop_reason = StopReason.COMPLETED
    threshold = None if noise_sigma is None else float(noise_sigma) ** 2
    done = 0
    if resume_state is not None:
        done, ema, output = _resume(resume_state, net, optimizer, generator, stopper, watch,
                                    losses, psnrs, variances, iterations)
    if checkpoint is not None and not checkpoint_every:
        raise DipError("a checkpoint path needs checkpoint_every (iterations between checkpoints)")
    net.train()
    start = time.perf_counter()
    bar = tqdm(total=iterations, initial=done, desc=description, disable=not progress, leave=False,
               dynamic_ncols=True)
    try:
        while done < iterations:
            net_in = z
            if reg_noise_std > 0:
                net_in = z + reg_noise_std * torch.randn(z.shape, generator=generator, device=device, dtype=z.dtype)
            optimizer.zero_grad(set_to_none=True)
            out = _crop(net(net_in), crop)
            loss = torch.mean((operator(out) - target) ** 2)
            if watch is not None:
                if watch.is_bad(loss):
                    if not watch.rollback(done + 1):
                        stop_reason = StopReason.DIVERGED
                        break
                    continue
                watch.accept(loss, done)
            elif not bool(torch.isfinite(loss)):
                stop_reason = StopReason.DIVERGED
                break
            loss.backward()
            optimizer.step()
            out = out.detach()
            output = out
            ema = out.clone() if ema is None else ema.mul_(ema_weight).add_(out, alpha=1 - ema_weight)
            losses[done] = loss.detach()
            if psnrs is not None:
                psnrs[done, 0] = psnr_torch(out, reference)
                psnrs[done, 1] = psnr_torch(ema, reference)
            if stopper is not None:
                variances[done] = stopper.update(out, ema, done + 1)
            done += 1
            bar.update(1)
            if progress and (done % 25 == 0 or done == iterations):
                _postfix(bar, losses, psnrs, done)
            step = Step(done, losses[done - 1], out, ema, net, optimizer)
            if any([bool(cb(step)) for cb in callbacks]):
                stop_reason = StopReason.CALLBACK
                break
            if threshold is not None and float(losses[done - 1]) <= threshold:
                stop_reason = StopReason.NOISE_LEVEL
                break
            if stopper is not None and stopper.should_stop(done):
                stop_reason = StopReason.AUTO_STOP
                break
            if checkpoint is not None and done % checkpoint_every == 0 and done < iterations:
                save_checkpoint(checkpoint, _state(done, net, optimizer, z, generator, ema, output, losses,
                                                   psnrs, variances, stopper, watch, checkpoint_meta))
    except KeyboardInterrupt:
        stop_reason = StopReason.INTERRUPTED
    finally:
        bar.close()
    seconds = time.perf_counter() - start
    history.loss = losses[:done].tolist()
    if psnrs is not None:
        history.psnr = psnrs[:done, 0].tolist()
        history.psnr_ema = psnrs[:done, 1].tolist()
    if variances is not None:
        history.variance = variances[:done].tolist()
    if watch is not None:
        history.rollbacks = list(watch.rollbacks)
    if ema is None:  # nothing finished: hand back the current network output
        with torch.no_grad():
            out = _crop(net(z), crop).detach()
        ema = output = out
    image, stopped_at, candidates = ema, done, {}
    if stopper is not None and stopper.best_iteration is not None:
        image, candidates = stopper.image(ema), stopper.candidates(ema)
        if early_stopping.select != "ema":
            stopped_at = stopper.best()
    return FitResult(ema=ema, output=output, history=history, iterations=done, stop_reason=stop_reason,
                     seconds=seconds, image=image, stopped_at=stopped_at, candidates=candidates)


def _crop(out: torch.Tensor, crop: Optional[Sequence[int]]) -> torch.Tensor:
    if crop is None:
        return out
    top, left, h, w = crop
    return out[:, :, top : top + h, left : left + w]


def _state(done, net, optimizer, z, generator, ema, output, losses, psnrs, variances, stopper, watch, meta) -> dict:
    """Everything that continues the fit exactly: the content of a checkpoint."""
    return {
        "iteration": done,
        "net": net.state_dict(),
        "optimizer": optimizer.state_dict(),
        "z": z,
        "generator": generator.get_state() if generator is not None else None,
        "ema": ema,
        "output": output,
        "loss": losses[:done],
        "psnr": psnrs[:done] if psnrs is not None else None,
        "variance": variances[:done] if variances is not None else None,
        "stopper": stopper.state_dict() if stopper is not None else None,
        "guard": watch.state_dict() if watch is not None else None,
        "meta": dict(meta or {}),
    }


def _resume(state, net, optimizer, generator, stopper, watch, losses, psnrs, variances, iterations):
    done = int(state["iteration"])
    if done > iterations:
        raise DipError(f"the checkpoint is at iteration {done}, past the {iterations} iterations asked for")
    device = losses.device
    net.load_state_dict(state["net"])
    optimizer.load_state_dict(state["optimizer"])
    if generator is not None and state.get("generator") is not None:
        generator.set_state(state["generator"])
    losses[:done] = state["loss"].to(device)
    if psnrs is not None and state.get("psnr") is not None:
        psnrs[:done] = state["psnr"].to(device)
    if variances is not None and state.get("variance") is not None:
        variances[:done] = state["variance"].to(device)
    if stopper is not None and state.get("stopper"):
        stopper.load_state_dict(state["stopper"], device)
    if watch is not None and state.get("guard"):
        watch.load_state_dict(state["guard"], device)
    ema, output = state.get("ema"), state.get("output")
    return done, None if ema is None else ema.to(device), None if output is None else output.to(device)


def _postfix(bar, losses: torch.Tensor, psnrs: Optional[torch.Tensor], done: int) -> None:
    info = {"loss": f"{float(losses[done - 1]):.2e}"}
    if psnrs is not None:
        info["psnr"] = f"{float(psnrs[done - 1, 1]):.2f}"
    bar.set_postfix(info, refresh=False)


def make_noise_input(channels: int, height: int, width: int, *, scale: float = 0.1,
                     generator: Optional[torch.Generator] = None, device=None) -> torch.Tensor:
    """The fixed network input ``z``: uniform noise in [0, scale), 1×channels×height×width."""
    z = torch.rand((1, channels, height, width), generator=generator, device=device)
    return z * scale
