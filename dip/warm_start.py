"""Warm start: initialise a new fit with the weights of a previous one (similar images, video frames)."""
import os
from collections.abc import Mapping
from typing import Optional

import torch
from torch import nn

from dip.errors import DipError


def warm_start(net: nn.Module, init) -> Optional[torch.Tensor]:
    """Copy the weights of ``init`` into ``net``; return ``init``'s input ``z`` when it has one.

    ``init`` is a :class:`dip.Restoration`, a fitted network of the same
    architecture, or its ``state_dict()``. Exported files (TorchScript, .pt2,
    ONNX) cannot be used: their convolutions have the BatchNorm statistics of
    the fit folded in, so the original weights are no longer there.
    """
    from dip.nn.hourglass import Hourglass
    from dip.result import Restoration

    z = None
    if isinstance(init, Restoration):
        init, z = init.network, init.net_input
    if isinstance(init, (str, os.PathLike)):
        raise DipError(
            f"init={os.fspath(init)!r}: exported files hold weights with BatchNorm folded in and cannot seed a fit; "
            "pass the previous Restoration, its .network, or torch.load() of its network.state_dict()"
        )
    if isinstance(init, nn.Module):
        if isinstance(init, Hourglass) and isinstance(net, Hourglass):
            _check_same_config(net.config.to_dict(), init.config.to_dict())
        state = init.state_dict()
    elif isinstance(init, Mapping):
        state = init
    else:
        raise DipError(f"init must be a Restoration, a network or a state_dict, got {type(init).__name__}")
    own = net.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    if missing or unexpected or wrong:
        details = [f"{label}: {', '.join(keys[:3])}{' …' if len(keys) > 3 else ''}"
                   for label, keys in (("missing", missing), ("unexpected", unexpected), ("other shape", wrong)) if keys]
        raise DipError("init has a different architecture than the network being fitted (" + "; ".join(details) + ")")
    with torch.no_grad():
        for key, value in own.items():
            value.copy_(state[key])
    return z


def _check_same_config(mine: dict, theirs: dict) -> None:
    diff = [k for k in mine if mine[k] != theirs.get(k)]
    if diff:
        shown = ", ".join(f"{k}={theirs.get(k)!r} (here {mine[k]!r})" for k in diff)
        raise DipError(f"init has a different architecture than the network being fitted: {shown}")


#: Iterations over which a warm-started fit ramps its learning rate up to the full value
#: (by the fit's learning-rate schedule, :class:`dip.fit.monitors.LearningRate`).
WARMUP_ITERATIONS = 25
