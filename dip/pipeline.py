"""``restore()``: image → degradation operator → network → fit → :class:`Restoration`."""
from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable
from typing import Optional, Union

import numpy as np
import torch
from PIL import Image
from torch import nn

from dip.checkpoint import architecture, check_compatible, fingerprint, load_checkpoint
from dip.errors import DipError
from dip.fit import Callback, fit, make_noise_input
from dip.guard import GuardSettings
from dip.io import MAX_PIXELS, ImageLike, load_image, load_mask
from dip.memory import check_fits_in_memory
from dip.metrics import psnr
from dip.nn.hourglass import Hourglass, HourglassConfig, build_network, preset
from dip.physics import Custom, Denoise, Downsample, Inpaint, Operator
from dip.result import Restoration
from dip.stopping import EarlyStopping
from dip.tasks import Task, task_defaults
from dip.warm_start import learning_rate_ramp, warm_start


def resolve_device(device) -> torch.device:
    """``None`` → CUDA when available, else CPU; refuses a CUDA device that is not there."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DipError("device 'cuda' was asked for but no CUDA GPU is available; use device='cpu'")
    return dev


def _padded(size: int, multiple: int, minimum: int) -> int:
    return max(minimum, int(math.ceil(size / multiple)) * multiple)


def restore(
    image: ImageLike,
    task: str = "denoise",
    *,
    factor: Optional[int] = None,
    mask: Optional[ImageLike] = None,
    operator: Optional[Union[Operator, Callable[[torch.Tensor], torch.Tensor]]] = None,
    iterations: Union[int, str, None] = "auto",
    reference: Optional[ImageLike] = None,
    device=None,
    seed: int = 0,
    progress: bool = True,
    network: Union[str, HourglassConfig, nn.Module, None] = None,
    lr: float = 0.01,
    reg_noise_std: Optional[float] = None,
    ema_weight: float = 0.99,
    input_scale: float = 0.1,
    noise_sigma: Optional[float] = None,
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
) -> Restoration:
    """Restore a degraded image with Deep Image Prior.

    Args:
        image: the degraded observation: a path, PIL image, numpy array (H×W or
            H×W×C; uint8, uint16 or float in [0, 1]) or tensor (C×H×W or 1×C×H×W
            in [0, 1]). Gray, RGB and RGBA (alpha is passed through) work.
        task: ``"denoise"``, ``"super_resolution"`` (needs ``factor``),
            ``"inpaint"`` (needs ``mask``), or ``"custom"`` (needs ``operator``).
        factor: super-resolution factor (integer 2–32); the result is
            ``factor`` times larger than ``image``.
        mask: for inpainting, an image of the same size, non-zero where the
            pixel is known.
        operator: a differentiable callable ``A`` (or a :class:`dip.physics.Operator`)
            mapping the restored image (1×C×H×W) to the observation; it replaces
            the task's own degradation.
        iterations: ``"auto"`` (the default, also ``None``): stop without
            ground truth when the moving variance of the outputs stops falling
            (see :mod:`dip.stopping`), after at most ``max_iterations``; or an
            integer N: exactly N Adam steps, no automatic stop.
        reference: the clean image, if known, to record PSNR at every step.
        device: ``"cpu"``, ``"cuda"``, … (default: CUDA when available).
        seed: seeds the network weights, the input ``z`` and the perturbations.
        progress: show a progress bar.
        network: a preset name (``denoise``, ``sr``, ``inpaint``, ``small``),
            a :class:`HourglassConfig`, or your own module mapping z to an image.
        lr: Adam learning rate.
        reg_noise_std: std of the per-step perturbation of ``z`` (default per task).
        ema_weight: weight of the moving average of outputs (0 disables averaging).
        input_scale: ``z`` is uniform noise in [0, input_scale).
        noise_sigma: the noise std (in [0, 1] units) if known: the fit stops when
            its data misfit reaches ``noise_sigma²`` (discrepancy principle).
        callbacks: functions called with a :class:`dip.fit.Step` after each
            iteration; returning True stops the fit.
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
            stop (a :class:`dip.stopping.EarlyStopping`; default settings if None).
        guard: roll back to the last good weights, with a lower learning rate,
            when the loss jumps or turns NaN (a :class:`dip.guard.GuardSettings`,
            True for the defaults, False to only stop on a non-finite loss).
        checkpoint: file to write the fit's state to every ``checkpoint_every``
            iterations (atomically).
        resume: a checkpoint to continue from; with the same settings the
            result equals the uninterrupted fit's (bit for bit on CPU).

    Returns:
        A :class:`Restoration`; ``.image`` is the restored H×W×C float32 array.
    """
    task = Task.parse(task)
    dev = resolve_device(device)
    observed = load_image(image, name="image", max_pixels=max_pixels)
    channels, (h, w) = observed.tensor.shape[0], observed.size
    op, out_h, out_w = _make_operator(task, observed, factor, mask, operator, max_pixels)
    defaults = task_defaults(task, factor)
    auto = iterations is None or iterations == "auto"
    if auto:
        iterations = defaults.iterations if max_iterations is None else max_iterations
        early_stopping = EarlyStopping() if early_stopping is None else early_stopping
    else:
        early_stopping = None
    if not isinstance(iterations, int) or isinstance(iterations, bool) or iterations < 1:
        what = "max_iterations" if auto else "iterations"
        raise DipError(f"{what} must be a positive integer (or iterations='auto'), got {iterations!r}")
    if checkpoint is not None and (not isinstance(checkpoint_every, int) or checkpoint_every < 1):
        raise DipError(f"checkpoint= needs checkpoint_every=N, a positive number of iterations, got {checkpoint_every!r}")
    guard = GuardSettings() if guard is True else (guard or None)
    if reg_noise_std is None:
        reg_noise_std = defaults.reg_noise_std
    if lr <= 0 or not math.isfinite(lr):
        raise DipError(f"learning rate must be a positive number, got {lr}")
    if not 0 <= ema_weight < 1:
        raise DipError(f"ema_weight must be in [0, 1), got {ema_weight}")

    ref = _load_reference(reference, channels, out_h, out_w, max_pixels)
    net, cfg = _make_network(network, defaults.network, channels, seed)
    multiple, minimum = (cfg.multiple(), cfg.min_size()) if cfg is not None else (1, 1)
    pad_h, pad_w = _padded(out_h, multiple, minimum), _padded(out_w, multiple, minimum)
    if cfg is not None:
        check_fits_in_memory(cfg, pad_h, pad_w, dev, max_memory)
    crop = ((pad_h - out_h) // 2, (pad_w - out_w) // 2, out_h, out_w)

    in_channels = cfg.in_channels if cfg is not None else _module_in_channels(net)
    gen = torch.Generator(device=dev).manual_seed(seed)
    z = make_noise_input(in_channels, pad_h, pad_w, scale=input_scale, generator=gen, device=dev)
    fit_lr = lr
    if init is not None:
        init_z = warm_start(net, init)
        if init_z is not None and init_z.shape == z.shape:
            z = init_z.detach().to(dev, z.dtype).clone()
        fit_lr, ramp = learning_rate_ramp(lr)
        callbacks = [ramp, *callbacks]
    net = net.to(dev)
    op = op.to(dev)
    target = op(observed.tensor[None].to(dev)) if task == "inpaint" else observed.tensor[None].to(dev)
    _check_operator_output(op, out_h, out_w, channels, target, dev)

    meta = dict(task=task.value, network=cfg.to_dict() if cfg is not None else None, architecture=architecture(net),
                image_size=[out_h, out_w], input_shape=list(z.shape), observation=_fingerprint(target, op),
                early_stopping=early_stopping.to_dict() if early_stopping is not None else None)
    state = None
    if resume is not None:
        state = load_checkpoint(resume, dev)
        check_compatible(state["meta"], meta, path=f"checkpoint {resume}")
        z = state["z"].to(dev)
    reference_t = None if ref is None else ref[None].to(dev)
    result = fit(
        net, z, op, target,
        iterations=iterations, crop=crop, lr=fit_lr, reg_noise_std=reg_noise_std, ema_weight=ema_weight,
        reference=reference_t, noise_sigma=noise_sigma,
        callbacks=callbacks, progress=progress, generator=gen, description=f"dip {task}",
        early_stopping=early_stopping, guard=guard, checkpoint=checkpoint, checkpoint_every=checkpoint_every,
        checkpoint_meta=meta, resume_state=state,
    )
    image_out = _to_numpy(result.image)
    quality = None if reference_t is None else psnr(image_out, _to_numpy(reference_t))
    if observed.alpha is not None:
        image_out = np.concatenate([image_out, _resize_alpha(observed.alpha, out_h, out_w)[:, :, None]], axis=2)
    settings = dict(task=task.value, factor=factor, iterations="auto" if auto else iterations, max_iterations=iterations,
                    early_stopping=meta["early_stopping"], lr=lr, reg_noise_std=reg_noise_std,
                    ema_weight=ema_weight, input_scale=input_scale, seed=seed, device=str(dev),
                    network=cfg.to_dict() if cfg is not None else type(net).__name__, noise_sigma=noise_sigma)
    return Restoration(
        image=image_out, history=result.history, network=net, net_input=z, iterations=result.iterations,
        task=task, crop=crop, output=_to_numpy(result.output), stop_reason=result.stop_reason,
        seconds=result.seconds, settings=settings, stopped_at=result.stopped_at, psnr=quality,
        candidates={name: _to_numpy(t) for name, t in result.candidates.items()},
    )


def _make_operator(task, observed, factor, mask, operator, max_pixels):
    h, w = observed.size
    if operator is not None:
        op = operator if isinstance(operator, Operator) else Custom(operator)
        scale = int(getattr(op, "scale", 1))
        if task == "super_resolution" and factor is not None and scale == 1:
            scale = factor
        return op, h * scale, w * scale
    if task == "custom":
        raise DipError("task 'custom' needs operator=, a differentiable function from the restored image to the observation")
    if task == "denoise":
        return Denoise(), h, w
    if task == "super_resolution":
        if factor is None:
            raise DipError("super-resolution needs factor= (an integer from 2 to 32)")
        op = Downsample(factor)
        if h * factor * w * factor > max_pixels:
            raise DipError(
                f"super-resolving {h}×{w} by {factor} gives {h * factor}×{w * factor} pixels, more than the limit "
                f"of {max_pixels:,}; use a smaller factor or crop the image"
            )
        return op, h * factor, w * factor
    if mask is None:
        raise DipError("inpainting needs mask= (same size as the image, non-zero where pixels are known)")
    return Inpaint(load_mask(mask, (h, w), max_pixels=max_pixels)), h, w


def _check_operator_output(op, out_h, out_w, channels, target, dev) -> None:
    probe = torch.zeros(1, channels, out_h, out_w, device=dev)
    try:
        with torch.no_grad():
            y = op(probe)
    except DipError:
        raise
    except Exception as exc:
        raise DipError(f"the operator failed on a 1×{channels}×{out_h}×{out_w} input: {exc}") from exc
    if not isinstance(y, torch.Tensor) or tuple(y.shape) != tuple(target.shape):
        got = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
        raise DipError(
            f"the operator maps a 1×{channels}×{out_h}×{out_w} image to {got}, but the observation is "
            f"{tuple(target.shape)}; for an operator that changes the size, set its scale attribute"
        )


def _load_reference(reference, channels, out_h, out_w, max_pixels):
    if reference is None:
        return None
    ref = load_image(reference, name="reference", max_pixels=max_pixels).tensor
    if tuple(ref.shape) != (channels, out_h, out_w):
        raise DipError(
            f"reference is {tuple(ref.shape)} (C×H×W) but the restored image will be {(channels, out_h, out_w)}"
        )
    return ref


def _make_network(network, default_preset: str, channels: int, seed: int):
    if isinstance(network, nn.Module):
        cfg = network.config if isinstance(network, Hourglass) else None
        return network, cfg
    if network is None:
        network = default_preset
    if isinstance(network, str):
        cfg = preset(network, out_channels=channels)
    elif isinstance(network, HourglassConfig):
        cfg = HourglassConfig(**{**network.to_dict(), "out_channels": channels})
    else:
        raise DipError(f"network must be a preset name, a HourglassConfig or an nn.Module, got {type(network).__name__}")
    with torch.random.fork_rng(devices=[]):  # seed the initial weights without touching the caller's RNG
        torch.manual_seed(seed)
        return build_network(cfg), cfg


def _fingerprint(target: torch.Tensor, op) -> str:
    parts = [target.flatten()]
    mask = getattr(op, "mask", None)
    if isinstance(mask, torch.Tensor):
        parts.append(mask.flatten().to(target.dtype))
    parts.append(torch.tensor([float(getattr(op, "scale", 1))], device=target.device))
    return fingerprint(torch.cat(parts))


def _module_in_channels(net: nn.Module) -> int:
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            return m.in_channels
    raise DipError("cannot tell how many input channels the custom network takes; give it a Conv2d first layer")


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach()[0].float().clamp(0, 1).permute(1, 2, 0).cpu().numpy().astype(np.float32)


def _resize_alpha(alpha: np.ndarray, h: int, w: int) -> np.ndarray:
    if alpha.shape == (h, w):
        return alpha
    img = Image.fromarray(alpha.astype(np.float32), mode="F").resize((w, h), Image.BICUBIC)
    return np.clip(np.asarray(img, dtype=np.float32), 0, 1)
