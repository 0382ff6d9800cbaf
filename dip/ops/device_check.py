"""A one-time check of each fused device kernel against its pure-PyTorch reference.

A compiled kernel that has never run on the device in hand (a new GPU
generation, a driver, a toolkit) is compared with the reference on a tiny
input the first time it would be used in a process: forward and gradients,
a few milliseconds. When they disagree, or the kernel raises, the operator
falls back to the reference for that device and dtype, with one warning.

``torch.use_deterministic_algorithms(True)`` routes the CUDA conv block to
the reference without a check: its BatchNorm statistics are sums made with
atomic additions, whose order (and so the last bits) changes from run to run.

CPU kernels are covered by the test suite on the machine that builds them and
are not checked here (``CHECKED_DEVICE_TYPES``). The operator modules call
:func:`fused_ok` at their dispatch point, after their own "is there a kernel
for this device and dtype" test.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable

import torch

#: Device types whose kernels are checked before first use.
CHECKED_DEVICE_TYPES = ("cuda",)

#: Operators whose device kernels are not deterministic (reduction by atomics).
NONDETERMINISTIC = ("conv_block",)

# (operator, device type, device index, dtype) -> the verdict of the check.
_VERDICTS: dict = {}


class FusedKernelMismatch(RuntimeWarning):
    """A fused kernel disagreed with the reference on this device; the reference is used instead."""


def fused_ok(op: str, x: torch.Tensor) -> bool:
    """Whether operator ``op`` may run its fused kernel on ``x``'s device and dtype.

    Runs the device check the first time a (op, device, dtype) is seen,
    unless the call is being traced by ``torch.compile`` or captured into a
    CUDA graph (no synchronising work is allowed there): then the kernel is
    trusted until an eager call has checked it.
    """
    device = x.device
    if device.type not in CHECKED_DEVICE_TYPES:
        return True
    if op in NONDETERMINISTIC and torch.are_deterministic_algorithms_enabled():
        return False
    key = (op, device.type, device.index, x.dtype)
    if torch.compiler.is_compiling():
        return _VERDICTS.get(key, True)
    verdict = _VERDICTS.get(key)
    if verdict is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return True
        verdict = _VERDICTS[key] = _check(op, device, x.dtype)
    return verdict


def verdicts() -> dict:
    """The checks made so far in this process: ``{"op device dtype": passed}``."""
    return {f"{op} {kind}:{index} {str(dtype).replace('torch.', '')}": ok
            for (op, kind, index, dtype), ok in _VERDICTS.items()}


def reset() -> None:
    """Forget every verdict (the next use of each kernel is checked again)."""
    _VERDICTS.clear()


def _check(op: str, device: torch.device, dtype: torch.dtype) -> bool:
    """Run the check of ``op`` on ``device`` in ``dtype``; warn once and return False on a mismatch."""
    try:
        with torch.inference_mode(False), torch.enable_grad(), _no_autocast(device):
            error = _CHECKS[op](device, dtype)
    except Exception as exc:  # a kernel that cannot run is treated as a wrong one
        error = f"it raised {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    if error is None:
        return True
    warnings.warn(
        f"dip: the fused {op} kernel disagrees with its reference on {device} ({dtype}): {error}; "
        f"using the pure-PyTorch reference for it in this process",
        FusedKernelMismatch,
        stacklevel=4,
    )
    return False


def _no_autocast(device: torch.device):
    return torch.autocast(device_type=device.type, enabled=False)


def _compare(name: str, actual: torch.Tensor, expected: torch.Tensor, tol: float) -> str | None:
    """None when ``actual`` is within ``tol`` of ``expected`` relative to max(|expected|, 1), else what differs."""
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    if actual.shape != expected.shape:
        return f"{name} has shape {tuple(actual.shape)}, expected {tuple(expected.shape)}"
    if not torch.isfinite(actual).all():
        return f"{name} is not finite"
    err = (actual - expected).abs().max().item() if actual.numel() else 0.0
    scale = max(expected.abs().max().item() if expected.numel() else 0.0, 1.0)
    if err > tol * scale:
        return f"{name} differs by {err:.3g} (tolerance {tol:.1g} × {scale:.3g})"
    return None


def _first_error(checks) -> str | None:
    return next((e for e in checks if e is not None), None)


def _random(gen: torch.Generator, device, dtype, *shape) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)


# Tolerances relative to max(|reference|, 1). float32 convolutions on GPUs may
# run in TF32 (10-bit mantissa) in both the kernel and the reference; a wrong
# index or a missing synchronisation gives errors of order one.
_CONV_TOL = {torch.float64: 1e-8, torch.float32: 2e-2}
_LANCZOS_TOL = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}


def _fused_conv_block(*args) -> torch.Tensor:
    return torch.ops.dip.conv_block(*args)[0]


def _check_conv_block(device: torch.device, dtype: torch.dtype) -> str | None:
    """Fused vs reference conv block, forward and gradients: 3×3 stride 2 reflect, 1×1, and 3×3 in 2 groups."""
    from dip.ops.conv_block import conv_block_reference

    gen = torch.Generator().manual_seed(0)
    errors = []
    for k, stride, reflect, groups in ((3, 2, True, 1), (1, 1, False, 1), (3, 1, True, 2)):
        cout = 5 * groups
        x = _random(gen, device, dtype, 2, 3 * groups, 9, 7)
        params = [_random(gen, device, dtype, cout, 3, k, k), _random(gen, device, dtype, cout),
                  _random(gen, device, dtype, cout).abs() + 0.5, _random(gen, device, dtype, cout)]
        opts = (stride, (k - 1) // 2, reflect, 1e-5, 0.2)
        ins_f = [t.clone().requires_grad_() for t in (x, *params)]
        ins_r = [t.clone().requires_grad_() for t in (x, *params)]
        out_f = _fused_conv_block(*ins_f, None, None, True, *opts)
        out_r = conv_block_reference(*ins_r, None, None, None, True, None, opts[3], opts[0], opts[1], opts[2],
                                     opts[4])
        tol = _CONV_TOL.get(dtype, 5e-2)
        case = f"k{k}" + (f" groups {groups}" if groups > 1 else "")
        errors.append(_compare(f"{case} output", out_f, out_r, tol))
        if errors[-1] is None:
            grad = _random(gen, device, dtype, *out_r.shape)
            grads_f = torch.autograd.grad(out_f, ins_f, grad)
            grads_r = torch.autograd.grad(out_r, ins_r, grad)
            names = ("input", "weight", "bias", "bn weight", "bn bias")
            errors += [_compare(f"{case} grad {n}", a, b, tol) for n, a, b in zip(names, grads_f, grads_r)]
        if _first_error(errors):
            break
    return _first_error(errors)


def _fused_lanczos(x: torch.Tensor, factor: int, support: int) -> torch.Tensor:
    return torch.ops.dip.lanczos_downsample(x, factor, support)


def _check_lanczos(device: torch.device, dtype: torch.dtype) -> str | None:
    """Fused vs reference Lanczos downsampling, forward and gradient, factors 2 and 3."""
    from dip.ops.lanczos import lanczos_downsample_reference

    gen = torch.Generator().manual_seed(0)
    errors = []
    for factor, support in ((2, 2), (3, 3)):
        x = _random(gen, device, dtype, 2, 3, 5 * factor + 1, 4 * factor + 2)
        x_f, x_r = x.clone().requires_grad_(), x.clone().requires_grad_()
        y_f, y_r = _fused_lanczos(x_f, factor, support), lanczos_downsample_reference(x_r, factor, support)
        tol = _LANCZOS_TOL.get(dtype, 5e-2)
        errors.append(_compare(f"factor {factor} output", y_f, y_r, tol))
        if errors[-1] is None:
            grad = _random(gen, device, dtype, *y_r.shape)
            (g_f,) = torch.autograd.grad(y_f, x_f, grad)
            (g_r,) = torch.autograd.grad(y_r, x_r, grad)
            errors.append(_compare(f"factor {factor} gradient", g_f, g_r, tol))
        if _first_error(errors):
            break
    return _first_error(errors)


_CHECKS: dict[str, Callable[[torch.device, torch.dtype], str | None]] = {
    "conv_block": _check_conv_block,
    "lanczos_downsample": _check_lanczos,
}
