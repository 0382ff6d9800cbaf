"""The Deep Image Prior fitting loop.

Minimises ``‖A(crop(f_θ(z + η))) − y‖²`` over the network weights θ with
Adam, where ``z`` is a fixed noise input, ``η`` a fresh perturbation each
step (``reg_noise_std``), ``A`` the degradation and ``y`` the observation.
The returned image is an exponential moving average of the outputs, which
smooths the iterate-to-iterate jitter as in the original work.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from dip.metrics import psnr_torch


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

    def as_dict(self) -> dict:
        return {"loss": list(self.loss), "psnr": list(self.psnr), "psnr_ema": list(self.psnr_ema)}


@dataclass
class FitResult:
    """The outcome of :func:`fit`."""

    ema: torch.Tensor  # 1×C×H×W averaged output (the restored image)
    output: torch.Tensor  # 1×C×H×W last network output
    history: History
    iterations: int  # iterations completed
    stop_reason: str  # "completed", "callback", "noise level reached", "interrupted", "non-finite loss"
    seconds: float


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
) -> FitResult:
    """Fit ``net`` so that ``operator(crop(net(z)))`` matches ``target``.

    ``crop`` = (top, left, height, width) selects the image inside the padded
    network output. ``reference`` (same size as the crop) records PSNR per
    step. ``noise_sigma`` (noise std in [0, 1] units) stops the fit once the
    data misfit falls to the noise level (the discrepancy principle).
    A KeyboardInterrupt ends the fit early and still returns the result.
    """
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    callbacks = list(callbacks)
    history = History()
    losses = torch.empty(iterations, device=z.device)
    psnrs = torch.empty((iterations, 2), device=z.device) if reference is not None else None
    ema: Optional[torch.Tensor] = None
    output: Optional[torch.Tensor] = None
    stop_reason = "completed"
    threshold = None if noise_sigma is None else float(noise_sigma) ** 2
    net.train()
    done = 0
    start = time.perf_counter()
    bar = tqdm(total=iterations, desc=description, disable=not progress, leave=False, dynamic_ncols=True)
    try:
        for i in range(iterations):
            net_in = z
            if reg_noise_std > 0:
                net_in = z + reg_noise_std * torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)
            optimizer.zero_grad(set_to_none=True)
            out = net(net_in)
            if crop is not None:
                top, left, h, w = crop
                out = out[:, :, top : top + h, left : left + w]
            loss = torch.mean((operator(out) - target) ** 2)
            if not bool(torch.isfinite(loss)):
                stop_reason = "non-finite loss"
                break
            loss.backward()
            optimizer.step()
            out = out.detach()
            output = out
            ema = out.clone() if ema is None else ema.mul_(ema_weight).add_(out, alpha=1 - ema_weight)
            losses[i] = loss.detach()
            if psnrs is not None:
                psnrs[i, 0] = psnr_torch(out, reference)
                psnrs[i, 1] = psnr_torch(ema, reference)
            done = i + 1
            bar.update(1)
            if progress and (done % 25 == 0 or done == iterations):
                _postfix(bar, losses, psnrs, done)
            step = Step(done, losses[i], out, ema, net, optimizer)
            if any([bool(cb(step)) for cb in callbacks]):
                stop_reason = "callback"
                break
            if threshold is not None and float(losses[i]) <= threshold:
                stop_reason = "noise level reached"
                break
    except KeyboardInterrupt:
        stop_reason = "interrupted"
    finally:
        bar.close()
    seconds = time.perf_counter() - start
    history.loss = losses[:done].tolist()
    if psnrs is not None:
        history.psnr = psnrs[:done, 0].tolist()
        history.psnr_ema = psnrs[:done, 1].tolist()
    if ema is None:  # nothing finished: hand back the current network output
        with torch.no_grad():
            out = net(z)
            if crop is not None:
                top, left, h, w = crop
                out = out[:, :, top : top + h, left : left + w]
        ema = output = out.detach()
    return FitResult(ema=ema, output=output, history=history, iterations=done,
                     stop_reason=stop_reason, seconds=seconds)


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
