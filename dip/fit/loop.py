"""The Deep Image Prior fitting loop.

Minimises ``‖A(crop(f_θ(z + η))) − y‖²`` over the network weights θ with
Adam, where ``z`` is a fixed noise input, ``η`` a fresh perturbation each
step (``reg_noise_std``), ``A`` the degradation and ``y`` the observation. The
loop itself only takes steps and keeps the moving average of the outputs;
everything optional — the automatic stop, the divergence guard, the
discrepancy stop, PSNR records, checkpoints, the learning-rate schedule,
callbacks — is a :class:`~dip.fit.monitors.Monitor` it consults after each
step. The returned image is the moving average of the outputs, or with the
automatic stop the iterate it picked, and the network weights of that iterate
come back with it.
"""
from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn
from torch.func import functional_call
from tqdm.auto import tqdm

from dip.errors import DipError
from dip.fit.guard import DivergenceGuard, GuardVerdict, copy_state
from dip.fit.monitors import Callbacks, Checkpointer, DiscrepancyStop, LearningRate, Monitor, PsnrRecorder
from dip.fit.settings import FitSettings, GuardSettings, Objective, Precision, StopReason
from dip.fit.stopping import VarianceStopper
from dip.fit.sure import PROBE_STEP, pad_to_input, sure_objective
from dip.memory import estimate_fit_bytes, kept_heap
from dip.nn.hourglass import Hourglass

log = logging.getLogger("dip")


@dataclass
class Step:
    """What callbacks and monitors see after each step (tensors stay on the fit's device).

    ``output`` and ``ema`` are K×C×H×W: K = 1, or one image per member of an ensemble
    (``restore(ensemble=K)``), whose returned image is their mean, ``output.mean(0, keepdim=True)``.
    """

    iteration: int  # 1-based count of finished iterations
    loss: torch.Tensor  # 0-d, detached (an ensemble's: the mean over its members)
    output: torch.Tensor  # cropped network output, K×C×H×W (K = 1 but for ensembles), detached
    ema: torch.Tensor  # running average of outputs, K×C×H×W
    network: nn.Module
    optimizer: torch.optim.Optimizer
    loop: FitLoop = field(repr=False, default=None)


#: A callback returns True to stop the fit after this step.
Callback = Callable[[Step], Optional[bool]]


@dataclass
class History:
    """Per-iteration records of a fit (lists of floats, index i = iteration i + 1)."""

    loss: list = field(default_factory=list)
    psnr: list = field(default_factory=list)  # of the raw output (an ensemble's: its members' mean) vs the reference
    psnr_ema: list = field(default_factory=list)  # of the averaged output (an ensemble's: the mean) vs the reference
    variance: list = field(default_factory=list)  # the stopping signal (inf while its window fills)
    rollbacks: list = field(default_factory=list)  # iterations whose loss the divergence guard rejected

    def as_dict(self) -> dict:
        return {"loss": list(self.loss), "psnr": list(self.psnr), "psnr_ema": list(self.psnr_ema),
                "variance": list(self.variance), "rollbacks": list(self.rollbacks)}


class Series:
    """Per-iteration scalars kept on the device, grown in chunks (no host sync, no huge preallocation)."""

    CHUNK = 1024

    def __init__(self, device):
        self.device = device
        self._data: dict[str, torch.Tensor] = {}

    def put(self, name: str, iteration: int, value: torch.Tensor) -> None:
        """Record ``value`` (a 0-d tensor) for 1-based ``iteration``."""
        data = self._data.get(name)
        if data is None or data.numel() < iteration:
            size = max(self.CHUNK, 2 * (0 if data is None else data.numel()), iteration)
            grown = torch.full((size,), float("nan"), device=self.device)
            if data is not None:
                grown[: data.numel()] = data
            self._data[name] = data = grown
        data[iteration - 1] = value.detach()

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._data[name]

    def names(self) -> list:
        return list(self._data)

    def state_dict(self, done: int) -> dict:
        return {name: data[:done] for name, data in self._data.items()}

    def load_state_dict(self, state: dict) -> None:
        self._data = {}
        for name, values in state.items():
            done = values.numel()
            if done:
                self.put(name, done, values[-1].to(self.device))
                self._data[name][:done] = values.to(self.device)

    def to_lists(self, done: int) -> dict:
        return {name: data[:done].tolist() for name, data in self._data.items()}


@dataclass
class FitResult:
    """The outcome of :func:`fit`."""

    image: torch.Tensor  # the restored image: the moving average, or the automatic stop's selection
    ema: torch.Tensor  # K×C×H×W moving average at the end of the fit (K = 1 but for ensembles, as in Step)
    output: torch.Tensor  # K×C×H×W last network output
    history: History
    iterations: int  # iterations completed
    stop_reason: StopReason
    seconds: float
    stopped_at: int = 0  # the iteration ``image`` (and ``weights``) belong to
    weights: Optional[dict] = None  # the network's state at ``stopped_at`` (averaged with weight_ema)
    candidates: dict = field(default_factory=dict)  # with the automatic stop: every selectable image


def autocast_dtype(precision: Precision, device: torch.device) -> Optional[torch.dtype]:
    """The compute dtype of the network for ``precision`` on ``device`` (None: plain float32)."""
    if precision is Precision.FLOAT32:
        return None
    if precision is Precision.BFLOAT16:
        return torch.bfloat16
    return torch.bfloat16 if bf16_is_fast(device) else None


def bf16_is_fast(device: torch.device) -> bool:
    """True where bfloat16 convolutions run on matrix units: Ampere+ GPUs, CPUs with AMX or AVX512-BF16."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device)[0] >= 8
    if device.type != "cpu":
        return False
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return False
    return any(flag in flags.split() for flag in ("amx_bf16", "avx512_bf16"))


#: Devices with a fused Adam kernel (one pass over each parameter instead of a dozen small operations).
FUSED_ADAM_DEVICES = ("cpu", "cuda")


def adam(parameters: Iterable[torch.Tensor], lr: float) -> torch.optim.Optimizer:
    """The fit's Adam: torch's fused kernel where every parameter is a float tensor on a device that has it."""
    params = list(parameters)
    fused = bool(params) and all(p.device.type in FUSED_ADAM_DEVICES and p.is_floating_point() for p in params)
    return torch.optim.Adam(params, lr=lr, fused=fused or None)


class FitLoop:
    """One fit: the network, its optimizer, the moving average, the history and the monitors."""

    def __init__(self, net: nn.Module, z: torch.Tensor, operator: Callable, target: torch.Tensor,
                 settings: FitSettings, monitors: Sequence[Monitor], *, crop: Optional[Sequence[int]] = None,
                 generator: Optional[torch.Generator] = None):
        self.net, self.z, self.operator, self.target = net, z, operator, target
        self.settings = settings
        self.budget = settings.budget
        self.crop = crop
        self.generator = generator
        self.optimizer = adam(net.parameters(), settings.lr)
        self.monitors = list(monitors)
        # The learning rate and the guard are always there: the guard restores what the others compute.
        self.learning_rate = next((m for m in self.monitors if isinstance(m, LearningRate)), None)
        if self.learning_rate is None:
            self.learning_rate = LearningRate()
            self.monitors.insert(0, self.learning_rate)
        self.guard = next((m for m in self.monitors if isinstance(m, DivergenceGuard)), None)
        if self.guard is None:
            self.guard = DivergenceGuard(GuardSettings.off(), settings.check_every)
            self.monitors.append(self.guard)
        names = [m.name for m in self.monitors]
        if len(set(names)) != len(names):
            raise DipError(f"two monitors share a name: {names}")
        self.series = Series(z.device)
        self.ema: Optional[torch.Tensor] = None
        self.output: Optional[torch.Tensor] = None
        self.done = 0
        self.finished: Optional[StopReason] = None  # a resumed checkpoint's final stop: no steps to take
        # True while an update of the state in place (an optimizer step, a monitor's update, a state load) runs:
        # an exception then may have cut it short, and only the guard's copy is known to be whole
        self.mid_update = False
        self._autocast = autocast_dtype(settings.precision, z.device)
        if settings.objective is Objective.SURE and settings.noise_sigma is None:
            raise DipError("objective='sure' needs the noise level: give noise_sigma= (restore() estimates it)")

    def step(self) -> tuple[torch.Tensor, torch.Tensor]:
        """One Adam step; returns the (detached) loss and cropped output of the weights before it."""
        s = self.settings
        net_in = self.z
        if s.reg_noise_std:
            noise = torch.randn(self.z.shape, generator=self.generator, device=self.z.device, dtype=self.z.dtype)
            net_in = self.z + s.reg_noise_std * noise
        if s.objective is Objective.SURE:
            return self._sure_step(net_in)
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(self.z.device.type, dtype=self._autocast or torch.bfloat16,
                            enabled=self._autocast is not None):
            out = _crop(self.net(net_in), self.crop)
        out = out.float()
        loss = torch.mean((self.operator(out) - self.target) ** 2)
        loss.backward()
        self.mid_update = True  # until _record has taken the step in
        self.optimizer.step()
        return loss.detach(), out.detach()

    def _sure_step(self, net_in: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One Adam step on the SURE objective (:mod:`dip.fit.sure`); returns the misfit and the output.

        The network's input is the padded observation and the degradation the
        identity (denoising: ``restore`` allows SURE for nothing else); a
        second pass on the input plus a small multiple of a random probe
        (padded like it) gives the divergence. Float32 throughout (the
        settings refuse bfloat16).
        """
        height, width = self.z.shape[-2:]
        crop = self.crop or (0, 0, height, width)
        probe = torch.randn((1, self.z.shape[1], crop[2], crop[3]), generator=self.generator,
                            device=self.z.device, dtype=self.z.dtype)
        self.optimizer.zero_grad(set_to_none=True)
        out = _crop(self.net(net_in), self.crop).float()
        probed = _crop(self.net(net_in + PROBE_STEP * pad_to_input(probe, height, width, crop)), self.crop).float()
        objective, misfit = sure_objective(out, probed, probe, self.target, self.settings.noise_sigma)
        objective.backward()
        self.mid_update = True  # until _record has taken the step in
        self.optimizer.step()
        return misfit, out.detach()

    def run(self, *, progress: Optional[bool] = None, description: str = "dip") -> FitResult:
        """Take steps until the budget is spent or a monitor stops the fit; Ctrl-C ends it early.

        Any other exception (a callback's, out of memory) ends the fit as Ctrl-C does — the guard's rollback,
        the checkpoint when one was asked for — and then propagates unchanged.
        """
        with kept_heap(self._cpu_need()):  # the tensors each iteration frees are the next one's: no page faults
            return self._run(progress, description)

    def _cpu_need(self) -> Optional[int]:
        """The bytes this fit needs on the CPU (estimated for hourglass networks); None if unknown or on a GPU."""
        if self.z.device.type != "cpu" or not isinstance(self.net, Hourglass):
            return None
        return self.net.members * estimate_fit_bytes(self.net.config, *self.z.shape[-2:],
                                                     self.settings.objective.forward_passes)

    def _run(self, progress: Optional[bool], description: str) -> FitResult:
        for m in self.monitors:
            m.on_start(self)
        reason = None
        start = time.perf_counter()
        # None: a bar only when stderr is a terminal. An automatic stop has no known end: no total, no ETA.
        bar = tqdm(total=None if self.settings.auto else self.budget, initial=self.done, desc=description,
                   disable=None if progress is None else not progress, leave=False,
                   dynamic_ncols=True)
        try:
            while self.finished is None and self.done < self.budget:
                loss, out = self.step()
                self._record(loss, out)
                bar.update(1)
                reason = self._after_step(Step(self.done, loss, out, self.ema, self.net, self.optimizer, self))
                if not bar.disable and self.done % self.settings.check_every == 0:
                    bar.set_postfix(self._postfix(), refresh=False)
                if reason is not None:
                    break
            reason = reason or self.finished or StopReason.COMPLETED
        except KeyboardInterrupt:
            reason = StopReason.INTERRUPTED
        except Exception as exc:
            bar.close()
            self._end_failed(exc)
            raise
        finally:
            bar.close()
        self._end(reason)
        return self._result(reason, time.perf_counter() - start)

    def _end(self, reason: StopReason) -> None:
        # The guard first: it undoes a bad step taken since its last check, so that the others (the Ctrl-C
        # checkpoint above all) see the sound state the result is made of, never the bad one.
        self.guard.on_end(self, reason)
        for m in self.monitors:
            if m is not self.guard:
                m.on_end(self, reason)

    def _end_failed(self, exc: Exception) -> None:
        """End the fit after ``exc`` escaped it, as Ctrl-C does, so that its state is kept; the caller re-raises.

        The exception gets a note saying where the state was saved and how to resume it.
        """
        try:
            self._end(StopReason.FAILED)
        except Exception as again:  # the device may be unusable (a CUDA error): keep the first error, say so
            log.warning("the fit failed with %s and could not be ended cleanly: %s", type(exc).__name__, again)
            return
        saved = next((m for m in self.monitors if isinstance(m, Checkpointer) and m.written_at == self.done), None)
        if saved is not None and self.done:
            note = (f"dip: the fit's state at iteration {self.done} was saved to {saved.path}; continue it "
                    f"with resume={os.fspath(saved.path)!r} (and the same settings)")
            if hasattr(exc, "add_note"):  # Python 3.11+
                exc.add_note(note)
            else:
                log.warning(note)

    def _record(self, loss: torch.Tensor, out: torch.Tensor) -> None:
        self.output = out
        # Bias-corrected: the first (grey) output keeps weight (1-w)·w^(k-1)/(1-w^k), not the w^(k-1)
        # of an average started at it.
        kept = self.settings.average_keep(self.done + 1)
        self.ema = out.clone() if self.ema is None else self.ema.mul_(kept).add_(out, alpha=1.0 - kept)
        self.done += 1
        self.series.put("loss", self.done, loss)
        self.mid_update = False

    def _after_step(self, step: Step) -> Optional[StopReason]:
        """The guard first (a rolled-back step is seen by no one), then every other monitor in turn."""
        verdict = self.guard.inspect(step)
        if verdict is GuardVerdict.GAVE_UP:
            return StopReason.DIVERGED
        if verdict is GuardVerdict.ROLLED_BACK:
            return None
        reasons = []
        for m in self.monitors:  # all see every step
            if m is not self.guard:
                self.mid_update = m.rolls_back  # its state is the fit's: an exception may cut its update short
                reasons.append(m.on_step(step))
        self.mid_update = False
        return next((r for r in reasons if r is not None), None)

    def _postfix(self) -> dict:
        info = {"loss": f"{float(self.series['loss'][self.done - 1]):.2e}"}
        if "psnr_ema" in self.series.names():
            info["psnr"] = f"{float(self.series['psnr_ema'][self.done - 1]):.2f}"
        return info

    def render(self, weights: Optional[dict] = None) -> torch.Tensor:
        """The network's cropped output on ``z`` with ``weights`` (a state dict; default: its own), 1×C×H×W float32.

        As :meth:`dip.result.Restoration.render` computes it: no perturbation of
        ``z``, BatchNorm on the batch statistics (train mode), float32, no
        gradients. ``weights`` are copied first (a train-mode pass updates
        BatchNorm's running buffers), so neither they nor the network change.
        """
        self.net.train()
        with torch.no_grad():
            if weights is None:
                out = self.net(self.z)
            else:
                out = functional_call(self.net, {k: v.clone() for k, v in weights.items()}, (self.z,))
        return _crop(out, self.crop).detach().float()

    def _result(self, reason: StopReason, seconds: float) -> FitResult:
        if self.ema is None:  # nothing finished: hand back the current network output
            self.ema = self.output = self.render()
        stopper = next((m for m in self.monitors if isinstance(m, VarianceStopper)), None)
        image, stopped_at, weights, candidates = self.ema, self.done, None, {}
        if stopper is not None and stopper.best_output is not None:
            stopper.render_average(self)  # the weight_ema image, when tracked: one forward pass
            image, candidates = stopper.image(self.ema), stopper.candidates(self.ema)
            if stopper.selects_best():
                stopped_at, weights = stopper.best(), stopper.returned_weights()
        lists = self.series.to_lists(self.done)
        history = History(loss=lists.get("loss", []), psnr=lists.get("psnr", []), psnr_ema=lists.get("psnr_ema", []),
                          variance=lists.get("variance", []), rollbacks=list(self.guard.rollbacks))
        if weights is None:
            weights = {k: v.detach().clone() for k, v in self.net.state_dict().items()}
        return FitResult(image=image, ema=self.ema, output=self.output, history=history, iterations=self.done,
                         stop_reason=reason, seconds=seconds, stopped_at=stopped_at, weights=weights,
                         candidates=candidates)

    def state_dict(self, *, only_rollback: bool = False) -> dict:
        """Everything that continues the fit exactly: the content of a checkpoint (and of a guard snapshot)."""
        monitors = {m.name: m.state_dict() for m in self.monitors if m.rolls_back or not only_rollback}
        return {
            "iteration": self.done,
            "net": self.net.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "z": self.z,
            "generator": self.generator.get_state() if self.generator is not None else None,
            "ema": self.ema,
            "output": self.output,
            "series": self.series.state_dict(self.done),
            "monitors": monitors,
        }

    def load_state_dict(self, state: dict, *, only_rollback: bool = False) -> None:
        """Continue from :meth:`state_dict` (a checkpoint, or the guard's snapshot)."""
        self.mid_update = True
        state = copy_state(None, state)  # never alias the caller's tensors: the fit updates in place
        device = self.z.device
        done = int(state["iteration"])
        if done > self.budget:
            raise DipError(f"the checkpoint is at iteration {done}, past the {self.budget} iterations asked for")
        self.done = done
        self.net.load_state_dict(state["net"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.generator is not None and state.get("generator") is not None:
            self.generator.set_state(state["generator"])
        self.ema = None if state.get("ema") is None else state["ema"].to(device)
        self.output = None if state.get("output") is None else state["output"].to(device)
        self.series.load_state_dict(state.get("series", {}))
        if not only_rollback:
            finished = state.get("stop_reason")
            self.finished = None if finished is None else StopReason(finished)
        saved = state.get("monitors", {})
        for m in self.monitors:
            if (m.rolls_back or not only_rollback) and m.name in saved:
                m.load_state_dict(_to_device(saved[m.name], device))
        self.mid_update = False


def default_monitors(settings: FitSettings, *, reference: Optional[torch.Tensor] = None,
                     callbacks: Iterable[Callback] = (), checkpoint=None, checkpoint_meta: Optional[dict] = None,
                     warmup: int = 0, observed_fraction: float = 1.0) -> list:
    """The monitors ``settings`` asks for, in the order they see each step.

    ``observed_fraction``: the operator's :meth:`~dip.physics.Operator.observed_fraction` (the discrepancy
    stop's noise level is σ² times it).
    """
    every = settings.check_every
    monitors: list = [LearningRate(warmup), DivergenceGuard(settings.guard or GuardSettings.off(), every)]
    if reference is not None:
        monitors.append(PsnrRecorder(reference))
    if settings.auto:
        monitors.append(VarianceStopper(settings.early_stopping, every))
    if settings.noise_sigma is not None and settings.objective is Objective.MSE:  # SURE's σ is the loss's own
        monitors.append(DiscrepancyStop(settings.noise_sigma, every, observed_fraction))
    callbacks = list(callbacks)
    if callbacks:
        monitors.append(Callbacks(callbacks))
    if checkpoint is not None:
        if not settings.checkpoint_every:
            raise DipError("a checkpoint path needs checkpoint_every (iterations between checkpoints)")
        monitors.append(Checkpointer(checkpoint, settings.checkpoint_every, checkpoint_meta))
    return monitors


def fit(net: nn.Module, z: torch.Tensor, operator: Callable, target: torch.Tensor,
        settings: Optional[FitSettings] = None, *, crop: Optional[Sequence[int]] = None,
        reference: Optional[torch.Tensor] = None, callbacks: Iterable[Callback] = (),
        monitors: Optional[Sequence[Monitor]] = None, checkpoint=None, checkpoint_meta: Optional[dict] = None,
        resume_state: Optional[dict] = None, warmup: int = 0, generator: Optional[torch.Generator] = None,
        progress: Optional[bool] = None, description: str = "dip") -> FitResult:
    """Fit ``net`` so that ``operator(crop(net(z)))`` matches ``target``.

    ``settings`` (a :class:`FitSettings` with its iteration count resolved,
    e.g. by ``FitSettings.for_task``) says how long and how; ``crop`` =
    (top, left, height, width) selects the image inside the padded network
    output; ``reference`` (same size as the crop) records PSNR per step;
    ``checkpoint`` writes the state every ``settings.checkpoint_every`` steps
    and on Ctrl-C, and ``resume_state`` (a loaded checkpoint) continues such
    a fit exactly. ``warmup`` ramps the learning rate up over that many steps
    (warm starts). ``monitors`` replaces the monitors ``settings`` implies.
    A KeyboardInterrupt ends the fit early and still returns the result. Any other exception escaping the fit
    (a callback's, out of memory) propagates unchanged, after the state the result would have been made of —
    rolled back by the guard as on Ctrl-C — is written to ``checkpoint`` (a note on the exception says so):
    fix the cause and pass that checkpoint as ``resume_state`` to continue.
    """
    settings = settings or FitSettings(iterations=3000)
    if monitors is None:
        monitors = default_monitors(settings, reference=reference, callbacks=callbacks, checkpoint=checkpoint,
                                    checkpoint_meta=checkpoint_meta, warmup=warmup)
    net.train()
    loop = FitLoop(net, z, operator, target, settings, monitors, crop=crop, generator=generator)
    if resume_state is not None:
        loop.load_state_dict(resume_state)
    return loop.run(progress=progress, description=description)


def _crop(out: torch.Tensor, crop: Optional[Sequence[int]]) -> torch.Tensor:
    if crop is None:
        return out
    top, left, h, w = crop
    return out[:, :, top : top + h, left : left + w]


def _to_device(value, device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    if isinstance(value, list):
        return [_to_device(v, device) for v in value]
    return value


def make_noise_input(channels: int, height: int, width: int, *, scale: float = 0.1,
                     generator: Optional[torch.Generator] = None, device=None) -> torch.Tensor:
    """The fixed network input ``z``: uniform noise in [0, scale), 1×channels×height×width."""
    z = torch.rand((1, channels, height, width), generator=generator, device=device)
    return z * scale
