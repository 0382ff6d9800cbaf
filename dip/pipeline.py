"""``restore()``: problem → network and its input → settings → fit → :class:`Restoration`."""
from __future__ import annotations

import math
import numbers
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

from dip.checkpoint import architecture, check_compatible, load_checkpoint
from dip.errors import DipError
from dip.fit import (
    Callback,
    EarlyStopping,
    FitSettings,
    GuardSettings,
    Objective,
    Precision,
    default_monitors,
    fit,
    make_noise_input,
)
from dip.fit.loop import FitResult
from dip.fit.members import MemberVarianceStopper
from dip.fit.monitors import Checkpointer
from dip.fit.settings import is_auto
from dip.fit.stopping import VarianceStopper
from dip.fit.sure import pad_to_input
from dip.io import MAX_PIXELS, ImageLike, check_folder, check_max_pixels, load_image
from dip.memory import check_fits_in_memory
from dip.nn.blocks import network_path
from dip.nn.hourglass import Hourglass, HourglassConfig, build_network, preset
from dip.noise import estimate_sigma
from dip.physics import Operator
from dip.problem import OperatorLike, Problem
from dip.result import Restoration
from dip.tasks import Task
from dip.threads import kept_thread_count
from dip.warm_start import WARMUP_ITERATIONS, warm_start

#: Device types a fit can run on.
_DEVICE_TYPES = ("cpu", "cuda", "mps", "xpu")


def parse_device(device) -> torch.device:
    """``device=`` read (not looked for on this machine): refuses what is not a device, or not one dip fits on.

    :func:`dip.restore_many` checks a batch's device here before it starts: its Ray workers may have devices
    that the calling process does not.
    """
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise DipError(f"device='{device}' is not a device; use device='cpu' or device='cuda' (or 'cuda:N')") from None
    if dev.type not in _DEVICE_TYPES:
        raise DipError(f"device='{device}': dip fits on cpu or cuda, not on {dev.type}; use device='cpu'")
    return dev


def resolve_device(device) -> torch.device:
    """``None`` → CUDA when available, else CPU; refuses devices that are unknown or not there."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = parse_device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DipError(f"device='{device}' was asked for but no CUDA GPU is available; use device='cpu'")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise DipError(f"device='{device}': this machine has {torch.cuda.device_count()} CUDA device(s)")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise DipError(f"device='{device}' was asked for but is not available; use device='cpu'")
    return dev


def restore(
    image: ImageLike,
    task: Union[str, Task] = "denoise",
    *,
    factor: Optional[int] = None,
    mask: Optional[ImageLike] = None,
    operator: Optional[OperatorLike] = None,
    iterations: Union[int, str, None] = "auto",
    reference: Optional[ImageLike] = None,
    device=None,
    seed: int = 0,
    progress: Optional[bool] = None,
    network: Union[str, HourglassConfig, nn.Module, None] = None,
    lr: float = 0.01,
    reg_noise_std: Optional[float] = None,
    ema_weight: float = 0.99,
    input_scale: float = 0.1,
    noise_sigma: Union[float, str, None] = None,
    ensemble: int = 1,
    callbacks: Iterable[Callback] = (),
    max_pixels: int = MAX_PIXELS,
    max_memory: Optional[int] = None,
    init=None,
    max_iterations: Optional[int] = None,
    early_stopping: Optional[EarlyStopping] = None,
    guard: Union[GuardSettings, bool, None] = True,
    checkpoint: Union[str, os.PathLike, None] = None,
    checkpoint_every: Optional[int] = None,
    resume: Union[str, os.PathLike, None] = None,
    overwrite_checkpoint: bool = False,
    precision: Union[str, Precision] = Precision.FLOAT32,
    objective: Union[str, Objective] = Objective.MSE,
    threads: Union[int, str, None] = None,
    description: Optional[str] = None,
) -> Restoration:
    """Restore a degraded image with Deep Image Prior.

    Args:
        image: the degraded observation: a path, PIL image, numpy array (H×W or
            H×W×C; uint8, uint16 or float in [0, 1]) or tensor (C×H×W or 1×C×H×W
            in [0, 1]), or a :class:`dip.io.LoadedImage` already read by
            :func:`dip.io.load_image`. Gray, RGB and RGBA (alpha is passed through) work.
        task: ``"denoise"``, ``"super_resolution"`` (needs ``factor``),
            ``"inpaint"`` (needs ``mask``), or ``"custom"`` (needs ``operator``).
        factor: super-resolution factor (integer 2–32); the result is
            ``factor`` times larger than ``image``.
        mask: for inpainting, an image of the same size: white (any value
            above the mask's zero) marks a known pixel, black a missing one.
        operator: a differentiable callable ``A`` (or a :class:`dip.physics.Operator`)
            mapping the restored image (1×C×H×W) to the observation; it replaces
            the task's own degradation.
        iterations: ``"auto"`` (the default, also ``None``): stop without
            ground truth when the moving variance of the outputs stops falling
            (see :mod:`dip.fit.stopping`), after at most ``max_iterations``; or an
            integer N: exactly N Adam steps, no automatic stop.
        reference: the clean image, if known, to record PSNR at every step.
        device: ``"cpu"``, ``"cuda"``, … (default: CUDA when available).
        seed: seeds the network weights, the input ``z`` and the perturbations.
        progress: show a progress bar (default: only when stderr is a terminal).
        network: a preset name (``denoise``, ``sr``, ``inpaint``, ``small``),
            a :class:`HourglassConfig`, or your own module mapping z to an image.
        lr: Adam learning rate.
        reg_noise_std: std of the per-step perturbation of ``z`` (default per task).
        ema_weight: weight of the moving average of outputs (0 disables averaging).
        input_scale: ``z`` is uniform noise in [0, input_scale).
        noise_sigma: the noise std (in [0, 1] units) if known: the fit stops when
            its data misfit reaches ``noise_sigma²`` (discrepancy principle);
            ``"auto"`` estimates it from the observation (:func:`dip.noise.estimate_sigma`,
            reported as ``noise_sigma_estimate``). With ``iterations="auto"`` the
            fit stops at the first of the variance minimum's patience and the
            noise level, and returns the iterate of the variance minimum so far.
            With ``objective="sure"`` it is the σ of the estimate instead (no
            discrepancy stop), and left out it is the estimate; SURE loses far
            more to a σ too high than too low, so a guess should err low.
        ensemble: fit this many networks (seeds ``seed``, ``seed + 1``, …) together
            as one grouped network (on the fused operators when they are
            loaded). Each member keeps its own automatic stop; ``image`` is
            the mean of the members' returned images and ``uncertainty`` their
            per-pixel spread. ``network``/``render()`` are member 0's.
        callbacks: functions called with a :class:`dip.fit.Step` after each
            iteration; returning True stops the fit. An exception a callback
            raises (or any other escaping the fit, such as out of memory)
            propagates unchanged, and with ``checkpoint=`` the fit's state is
            saved there first, as on Ctrl-C: continue with ``resume=``.
        max_pixels: refuse larger images (protects against decompression bombs).
        max_memory: bytes the fit may use (default: the device's free memory).
        init: warm start from a previous fit: a :class:`Restoration`, a fitted
            network of the same architecture, or its ``state_dict()``. Its
            weights are copied before fitting, a Restoration's input ``z`` is
            reused when it has the same size, and the learning rate ramps up
            over the first iterations so that Adam's first steps do not undo
            the previous fit.
        max_iterations: the cap of an automatic stop (default: the original
            work's count for the task: denoise 3000, SR ×4 2000, ×8 4000,
            inpaint 5000).
        early_stopping: window, patience and returned image of the automatic
            stop (a :class:`dip.fit.EarlyStopping`; default settings if None).
        guard: roll back to the last good weights, with a lower learning rate,
            when the loss jumps or turns NaN (a :class:`dip.fit.GuardSettings`,
            True for the defaults, False to only stop on a non-finite loss).
        checkpoint: file to write the fit's state to about every
            ``checkpoint_every`` iterations (atomically; at the divergence
            guard's first check at or after each multiple, so that it never
            holds a step the guard has not vetted), and when the fit ends,
            whatever ended it (Ctrl-C, an exception, the automatic stop).
        resume: a checkpoint to continue from; with the same settings the
            result equals the uninterrupted fit's (bit for bit on CPU). The
            checkpoint of a fit that stopped by itself (automatic stop, noise
            level, divergence) gives back its result without taking a step.
        overwrite_checkpoint: allow ``checkpoint`` to replace an existing
            checkpoint of another fit (refused by default).
        precision: ``"float32"`` (default), ``"bfloat16"`` (bf16 compute,
            float32 weights, loss, average and output) or ``"auto"`` (bf16
            only where the hardware runs it fast: Ampere+ GPUs, CPUs with AMX
            or AVX512-BF16).
        objective: ``"mse"`` (default: the original work's random input and
            misfit, any task) or ``"sure"`` (denoising only: the network sees
            the noisy image and minimises Stein's unbiased estimate of its
            error to the clean image, with ``noise_sigma`` or, when it is left
            out, the estimated σ; two network passes per step, float32, no
            discrepancy stop; see :mod:`dip.fit.sure`).
        threads: CPU threads for this fit: a count, ``"auto"`` (the cores free
            now, dropping to one thread while another process competes for
            them; see :mod:`dip.threads`; the command line's default) or
            None (default: torch's current setting, unchanged).
        description: label of the progress bar (default ``dip <task>``).

    Returns:
        A :class:`Restoration`; ``.image`` is the restored H×W×C float32 array.
    """
    max_pixels = check_max_pixels(max_pixels)
    _check_combinations(iterations, max_iterations, checkpoint, checkpoint_every, overwrite_checkpoint)
    problem = Problem.create(task, image, factor=factor, mask=mask, operator=operator, max_pixels=max_pixels)
    members = ensemble_size(ensemble, network, init)
    sigma_estimate = estimate_sigma(problem.observation())
    objective = _objective(objective, problem)
    noise_sigma = _noise_sigma(noise_sigma, sigma_estimate, objective)
    settings = FitSettings(
        iterations=iterations, max_iterations=max_iterations, lr=lr, reg_noise_std=reg_noise_std,
        ema_weight=ema_weight, input_scale=input_scale, noise_sigma=noise_sigma,
        early_stopping=early_stopping, guard=guard,
        checkpoint_every=checkpoint_every, precision=precision, seed=seed, objective=objective,
    ).for_task(problem.defaults)
    dev = resolve_device(device)
    with kept_thread_count():  # threads= is this fit's: the caller's count comes back afterwards
        governor = _set_threads(threads, dev)
        ref = _load_reference(reference, problem, max_pixels, dev)
        net, cfg = make_network(network, problem, settings.seed, objective)
        gen = torch.Generator(device=dev).manual_seed(settings.seed)
        z, crop = make_input(net, cfg, problem, settings, dev, gen, max_memory)
        if members > 1:
            net, z = _stack_members(net, z, cfg, problem, settings, dev, max_memory, members)
        warmup = 0
        if init is not None:
            z, warmup = _warm_start(net, init, z, objective), WARMUP_ITERATIONS
        net = net.to(dev)
        problem.check_operator(dev)
        meta = _checkpoint_meta(problem, net, cfg, z, settings)
        state = _resume_state(resume, checkpoint, overwrite_checkpoint, meta, dev)
        if state is not None:
            z = state["z"].to(dev)
        monitors = _monitors(settings, ref, callbacks, checkpoint, meta, warmup, problem.operator.observed_fraction())
        monitors += [governor] if governor else []
        result = fit(
            net, z, problem.operator.to(dev), problem.target(dev), settings, crop=crop, reference=ref,
            monitors=monitors, resume_state=state, generator=gen, progress=progress,
            description=description or f"dip {problem.task.cli_name}",
        )
        net.load_state_dict(result.weights)  # the network of the returned iterate, not of the end of the fit
        record = {**settings.to_dict(), "task": problem.task.value, "factor": problem.factor, "device": str(dev),
                  "network": cfg.to_dict() if cfg is not None else type(net).__name__, "ensemble": members,
                  "blocks": network_path(net)}
        stopper = next((m for m in monitors if isinstance(m, MemberVarianceStopper)), None)
        result, quality = _combine_members(result, stopper, members)
        if members > 1:
            net, z = net.member(0), z[:, : z.shape[1] // members].contiguous()
            quality["member_iterations"] = stopper.member_iterations() if stopper is not None else None
        written = next((m.written_at for m in monitors if isinstance(m, Checkpointer)), None)
        return Restoration.from_fit(result, problem, net, z, crop, record, ref, noise_sigma_estimate=sigma_estimate,
                                    checkpoint_at=written, **quality)


def _check_combinations(iterations, max_iterations, checkpoint, checkpoint_every, overwrite_checkpoint) -> None:
    """Refuse options that would have no effect with the others given (the command line refuses the same)."""
    if max_iterations is not None and not (iterations is None or is_auto(iterations)):
        raise DipError(f"max_iterations caps the automatic stop; with iterations={iterations!r} the fit runs exactly "
                       "that many steps (drop max_iterations, or use iterations='auto')")
    if checkpoint is not None:
        check_folder(checkpoint)  # now, not at the first write, checkpoint_every steps into the fit
    if checkpoint is None:
        for name, given in (("checkpoint_every", checkpoint_every is not None),
                            ("overwrite_checkpoint", bool(overwrite_checkpoint))):
            if given:
                raise DipError(f"{name}= needs checkpoint= (the file to write the fit's state to)")


def ensemble_size(ensemble, network=None, init=None) -> int:
    """``restore()``'s ``ensemble`` checked (with the ``network`` and ``init`` it is combined with): the member count."""
    if isinstance(ensemble, bool) or not isinstance(ensemble, numbers.Integral) or ensemble < 1:
        raise DipError(f"ensemble={ensemble!r}: must be a positive integer (the networks fitted together)")
    if ensemble > 1 and isinstance(network, nn.Module):
        raise DipError("ensemble= needs a preset name or a HourglassConfig as network, not a module")
    if ensemble > 1 and init is not None:
        raise DipError("ensemble= and init= cannot be combined; warm-start a single fit")
    return int(ensemble)  # numpy integers are integers too (as for iterations and seed)


def _objective(objective, problem: Problem) -> Objective:
    objective = Objective.parse(objective)
    if objective is Objective.SURE and problem.task is not Task.DENOISE:
        raise DipError("objective='sure' is for denoising only (it estimates a denoiser's error to the clean "
                       "image); use objective='mse' for other tasks")
    return objective


def _noise_sigma(noise_sigma, estimate: float, objective: Objective) -> Optional[float]:
    """``noise_sigma=`` resolved: "auto" is the estimate, and so is None under SURE (its loss needs a σ)."""
    if noise_sigma is None and objective is Objective.SURE:
        if not estimate > 0:
            raise DipError("objective='sure' needs the noise level and the observation shows no noise (estimated "
                           "σ is 0); give noise_sigma=")
        return estimate
    if isinstance(noise_sigma, str):
        if not is_auto(noise_sigma):
            raise DipError(f"noise_sigma must be a number in [0, 1] units or 'auto', got {noise_sigma!r}")
        if not estimate > 0:
            raise DipError("the observation shows no noise (estimated σ is 0); give noise_sigma= or leave it out")
        return estimate
    return noise_sigma


def _stack_members(net, z, cfg, problem: Problem, settings: FitSettings, dev, max_memory, members: int):
    """The grouped network of ``members`` seeds (member k: the network and input of seed ``seed + k``)."""
    nets, inputs = [net], [z]
    for k in range(1, members):
        member, _ = make_network(cfg, problem, settings.seed + k, settings.objective)
        gen = torch.Generator(device=dev).manual_seed(settings.seed + k)
        inputs.append(make_input(member, cfg, problem, settings, dev, gen, max_memory)[0])
        nets.append(member)
    return lay_out_ensemble(Hourglass.stack(nets), torch.cat(inputs, dim=1), dev)


def lay_out_ensemble(net: nn.Module, z: torch.Tensor, device: torch.device) -> tuple[nn.Module, torch.Tensor]:
    """A grouped network and its input in the layout ``restore(ensemble=K)`` fits them in: channels_last on the
    CPU, where oneDNN's grouped convolutions run ≈ 1.3× faster (RESULTS.md, issue 15); as they are elsewhere."""
    if device.type == "cpu":
        return net.to(memory_format=torch.channels_last), z.contiguous(memory_format=torch.channels_last)
    return net, z


def _monitors(settings: FitSettings, ref, callbacks, checkpoint, meta, warmup, observed_fraction: float) -> list:
    """The default monitors, with the per-member stopper (it also keeps the variance at the returned iterate)."""
    monitors = default_monitors(settings, reference=ref, callbacks=callbacks, checkpoint=checkpoint,
                                checkpoint_meta=meta, warmup=warmup, observed_fraction=observed_fraction)
    return [MemberVarianceStopper(m.config, m.check_every) if type(m) is VarianceStopper else m for m in monitors]


def _combine_members(result: FitResult, stopper, members: int) -> tuple[FitResult, dict]:
    """One image from the members' returned iterates (their mean) and the uncertainty map."""
    uncertainty = None
    if members > 1:
        spread = result.image.std(dim=0, unbiased=False, keepdim=True)
        uncertainty = spread.mean(dim=1)[0]
        images = result.image
        result = FitResult(
            image=images.mean(0, keepdim=True), ema=result.ema.mean(0, keepdim=True),
            output=result.output.mean(0, keepdim=True), history=result.history, iterations=result.iterations,
            stop_reason=result.stop_reason, seconds=result.seconds, stopped_at=result.stopped_at,
            weights=result.weights, candidates={k: v.mean(0, keepdim=True) for k, v in result.candidates.items()})
        return result, {"uncertainty": uncertainty, "members": images, "ensemble": members}
    if stopper is not None and stopper.best_variance is not None:
        uncertainty = stopper.best_variance.sqrt().mean(dim=1)[0]
    return result, {"uncertainty": uncertainty}


def _set_threads(threads: Union[int, str, None], device: torch.device):
    """Apply ``threads=``; with ``"auto"`` on the CPU, also return the governor that adapts it during the fit."""
    from dip.threads import ThreadGovernor, configure_threads

    if threads is None:
        return None
    if is_auto(threads):
        count = configure_threads(None)
        return ThreadGovernor() if device.type == "cpu" and count > 1 else None
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise DipError(f"threads must be a positive integer or 'auto', got {threads!r}")
    configure_threads(threads)
    return None


def make_network(network: Union[str, HourglassConfig, nn.Module, None], problem: Problem, seed: int,
                 objective: Objective = Objective.MSE) -> tuple[nn.Module, Optional[HourglassConfig]]:
    """The network to fit (seeded) and its configuration (None for a user's own module).

    With ``Objective.SURE`` the network's input is the observation: a preset's
    or configuration's input channels become the image's.
    """
    if isinstance(network, nn.Module):
        return network, network.config if isinstance(network, Hourglass) else None
    if network is None:
        network = problem.defaults.network
    channels = {"out_channels": problem.channels}
    if objective is Objective.SURE:
        channels["in_channels"] = problem.channels
    if isinstance(network, str):
        cfg = preset(network, **channels)
    elif isinstance(network, HourglassConfig):
        cfg = HourglassConfig(**{**network.to_dict(), **channels})
    else:
        raise DipError(f"network must be a preset name, a HourglassConfig or an nn.Module, got {type(network).__name__}")
    with torch.random.fork_rng(devices=[]):  # seed the initial weights without touching the caller's RNG
        torch.manual_seed(seed)
        return build_network(cfg), cfg


def make_input(net: nn.Module, cfg: Optional[HourglassConfig], problem: Problem, settings: FitSettings,
               device: torch.device, generator: torch.Generator, max_memory: Optional[int] = None):
    """The fixed input ``z`` (padded to what the hourglass takes) and the crop of the image inside its output.

    ``z`` is random noise, or with ``Objective.SURE`` the observation itself, padded by reflection.
    """
    out_h, out_w = problem.output_size
    multiple, minimum = (cfg.multiple(), cfg.min_size()) if cfg is not None else (1, 1)
    pad_h, pad_w = _padded(out_h, multiple, minimum), _padded(out_w, multiple, minimum)
    if cfg is not None:
        check_fits_in_memory(cfg, pad_h, pad_w, device, max_memory, image_size=(out_h, out_w),
                             passes=settings.objective.forward_passes)
    crop = ((pad_h - out_h) // 2, (pad_w - out_w) // 2, out_h, out_w)
    channels = cfg.in_channels if cfg is not None else _module_in_channels(net)
    if settings.objective is Objective.SURE:
        if channels != problem.channels:
            raise DipError(f"objective='sure' feeds the network the {problem.channels}-channel image, but it takes "
                           f"{channels} input channels; give it {problem.channels} (or use a preset)")
        return pad_to_input(problem.observation(device), pad_h, pad_w, crop), crop
    z = make_noise_input(channels, pad_h, pad_w, scale=settings.input_scale, generator=generator, device=device)
    return z, crop


def _padded(size: int, multiple: int, minimum: int) -> int:
    return max(minimum, int(math.ceil(size / multiple)) * multiple)


def _warm_start(net: nn.Module, init, z: torch.Tensor, objective: Objective) -> torch.Tensor:
    init_z = warm_start(net, init)
    # SURE's input is this observation, never another fit's
    if init_z is not None and init_z.shape == z.shape and objective is Objective.MSE:
        return init_z.detach().to(z.device, z.dtype).clone()
    return z


def _checkpoint_meta(problem: Problem, net: nn.Module, cfg, z: torch.Tensor, settings: FitSettings) -> dict:
    return dict(task=problem.task.value, network=cfg.to_dict() if cfg is not None else None,
                architecture=architecture(net), image_size=list(problem.output_size), input_shape=list(z.shape),
                observation=problem.fingerprint(), objective=settings.objective.value,
                early_stopping=settings.early_stopping.to_dict() if settings.auto else None,
                settings={k: v for k, v in settings.to_dict().items() if k in _RESUMED_SETTINGS})


#: Settings a resumed fit must share with its checkpoint: the checkpoint's optimizer, input and generator state
#: would silently override some (lr, seed, input_scale), and the others would make it another fit.
_RESUMED_SETTINGS = ("lr", "reg_noise_std", "ema_weight", "input_scale", "noise_sigma", "precision", "seed")


def _resume_state(resume, checkpoint, overwrite: bool, meta: dict, device) -> Optional[dict]:
    """The checkpoint to continue from; refuses to overwrite another run's checkpoint unless asked."""
    if checkpoint is not None and Path(checkpoint).exists() and not overwrite:
        same = resume is not None and Path(resume).exists() and os.path.samefile(resume, checkpoint)
        if not same:
            raise DipError(
                f"{checkpoint} already holds a checkpoint; continue that fit with resume={os.fspath(checkpoint)!r} "
                "(--resume), or pass overwrite_checkpoint=True (--overwrite-checkpoint) to start over"
            )
    if resume is None:
        return None
    state = load_checkpoint(resume, device)
    check_compatible(state["meta"], meta, path=f"checkpoint {resume}")
    return state


def _load_reference(reference, problem: Problem, max_pixels: int, device) -> Optional[torch.Tensor]:
    if reference is None:
        return None
    ref = load_image(reference, name="reference", max_pixels=max_pixels).tensor
    expected = (problem.channels, *problem.output_size)
    if tuple(ref.shape) != expected:
        raise DipError(f"reference is {tuple(ref.shape)} (C×H×W) but the restored image will be {expected}")
    return ref[None].to(device)


def _module_in_channels(net: nn.Module) -> int:
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            return m.in_channels
    raise DipError("cannot tell how many input channels the custom network takes; give it a Conv2d first layer")


__all__ = ["Operator", "make_input", "make_network", "resolve_device", "restore"]
