"""Stein's unbiased risk estimate (SURE) as the objective of a denoising fit.

For an observation ``y = x + n`` with Gaussian noise of std σ and a denoiser
``f``, the mean of ``‖f(y) − y‖² − σ² + 2σ²·div f(y)`` over the pixels is an
unbiased estimate of the mean squared error ``‖f(y) − x‖²`` to the clean image
``x`` (Stein, 1981) — no ground truth needed. With ``Objective.SURE`` the
network is that denoiser: its input is the (padded) noisy image itself, not a
random code, and the divergence ``div f(y) = Σ ∂f_i/∂y_i`` is estimated each
step by one Monte-Carlo probe: ``b·(f(y + εb) − f(y)) / ε`` with ``b`` standard
normal. A network fitted this way cannot reproduce the noise for free (copying
``y`` costs ``2σ²`` per pixel), so the fit settles instead of overfitting.
RESULTS.md (issue 15) measures it against the original objective.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

#: The Monte-Carlo probe's step ε, in image units ([0, 1]): small against the noise (σ ≥ 1/255) so the
#: difference quotient is the derivative, large against float32's rounding of outputs near 1 (6e-8).
PROBE_STEP = 1e-3


def pad_to_input(image: torch.Tensor, height: int, width: int, crop: Sequence[int]) -> torch.Tensor:
    """``image`` (N×C×h×w) placed at ``crop`` = (top, left, h, w) in an N×C×``height``×``width`` grid.

    The border is the image reflected (repeated where the image is too small to
    reflect), so the network input has no artificial edges; padding is linear,
    so a probe padded the same way perturbs exactly the image's own pixels.
    """
    top, left, h, w = crop
    pads = (left, width - left - w, top, height - top - h)
    if not any(pads):
        return image
    fits = max(pads[0], pads[1]) < w and max(pads[2], pads[3]) < h
    return F.pad(image, pads, mode="reflect" if fits else "replicate")


def sure_objective(out: torch.Tensor, probed: torch.Tensor, probe: torch.Tensor, target: torch.Tensor,
                   sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(the objective to minimise, the misfit ‖out − y‖² per pixel) of one SURE step.

    ``out`` = f(y) and ``probed`` = f(y + ε·probe) are K×C×H×W (K ensemble
    members, each with its own slice of ``probe``, 1×(K·C)×H×W); ``target`` is
    y (1×C×H×W). The objective is the mean over members of their SURE, less
    the constant σ²: ``mean((out − y)²) + 2σ²·div / (C·H·W)``.
    """
    misfit = torch.mean((out - target) ** 2)
    divergence = torch.sum(probe.reshape(out.shape) * (probed - out)) / (PROBE_STEP * out.numel())
    return misfit + 2.0 * sigma ** 2 * divergence, misfit.detach()
