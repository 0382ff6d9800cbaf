"""Checkpoints of a fit: written atomically, read back with ``torch.load(weights_only=True)``.

A checkpoint holds everything that continues a fit exactly (weights,
optimizer state, the input ``z``, the perturbation generator's state, the
moving average, the stopping and divergence-guard state, the history so far)
and a ``meta`` dictionary that says what it belongs to: the network
architecture, the image size and a fingerprint of the observation. Only
tensors, numbers, strings, lists and dictionaries are stored, so loading
never runs code from the file.
"""
from __future__ import annotations

import hashlib
import os
import pickle
from pathlib import Path
from typing import Union

import torch

from dip.errors import DipError
from dip.io import atomic_write

#: Bumped when the layout changes; older files are refused with a clear message.
FORMAT = 2


def save_checkpoint(path: Union[str, os.PathLike], state: dict) -> Path:
    """Write ``state`` to ``path`` atomically (a crash leaves the previous checkpoint intact)."""
    state = {**state, "format": FORMAT}
    return atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: Union[str, os.PathLike], device=None) -> dict:
    """Read a checkpoint written by :func:`save_checkpoint` (``weights_only`` loading only)."""
    path = Path(path)
    if not path.is_file():
        raise DipError(f"checkpoint not found: {path}")
    if path.stat().st_size == 0:
        raise DipError(f"{path} is empty, not a dip checkpoint (was its write interrupted?)")
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Unsupported global" in str(exc):  # a pickle that would run code or build foreign objects
            raise DipError(f"{path} is not a dip checkpoint: it holds Python objects other than tensors "
                           "and plain values, so it was not loaded") from None
        raise DipError(f"{path} is not a readable dip checkpoint; it may be truncated or another kind of file") from None
    except Exception as exc:  # truncated files, foreign formats
        raise DipError(f"{path} is not a readable dip checkpoint ({type(exc).__name__}); "
                       "it may be truncated or another kind of file") from None
    if not isinstance(state, dict) or "meta" not in state:
        raise DipError(f"{path} is not a dip checkpoint")
    if state.get("format") != FORMAT:
        raise DipError(f"{path} is a dip checkpoint of format {state.get('format')}, this dip reads format {FORMAT}; "
                       "start the fit again")
    return state


def fingerprint(t: torch.Tensor) -> str:
    """A short digest of a tensor's values (identifies the observed image in a checkpoint)."""
    data = t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()
    return hashlib.sha256(data).hexdigest()[:16]


def architecture(net: torch.nn.Module) -> dict:
    """Parameter and buffer names with their shapes: what a state dict must match."""
    return {k: list(v.shape) for k, v in net.state_dict().items()}


def check_compatible(saved: dict, current: dict, path="the checkpoint") -> None:
    """Refuse to resume from a checkpoint whose ``meta`` does not describe this fit.

    Both dictionaries may hold ``task``, ``network`` (the preset configuration),
    ``architecture`` (see :func:`architecture`), ``image_size`` (the restored
    image, H×W), ``input_shape`` (``z``), ``observation`` (a fingerprint),
    ``objective``, ``early_stopping`` and ``settings`` (the fit's lr, seed …); each present in both must agree.
    """
    def differs(key):
        return key in saved and key in current and saved[key] != current[key]

    if differs("task"):
        raise DipError(f"{path} is from a {saved['task']} fit, not {current['task']}")
    if differs("network") or differs("architecture"):
        raise DipError(
            f"{path} was written for a different network architecture; resume with the same network "
            f"(the checkpoint's: {saved.get('network') or 'a custom module'})"
        )
    if differs("image_size") or differs("input_shape"):
        raise DipError(
            f"{path} was written for a {_size(saved.get('image_size'))} image, this one is "
            f"{_size(current.get('image_size'))}; a fit resumes only on the same image"
        )
    if differs("observation"):
        raise DipError(f"{path} was written for a different image (or mask/factor) of the same size")
    if differs("objective"):
        raise DipError(f"{path} is from a fit with objective={saved['objective']!r}, this one is "
                       f"{current['objective']!r}; resume with the same objective")
    if "settings" in saved and "settings" in current:
        _check_same_settings(saved["settings"], current["settings"], path)
    if differs("early_stopping"):
        raise DipError(
            f"{path} was written with iterations={'auto' if saved['early_stopping'] else 'N'} "
            f"and other stopping settings; resume with the same ones"
        )


def _check_same_settings(saved: dict, current: dict, path) -> None:
    changed = [k for k in current if k in saved and saved[k] != current[k]]
    if changed:
        shown = ", ".join(f"{k}={saved[k]!r} (here {current[k]!r})" for k in changed)
        raise DipError(f"{path} was written by a fit with {shown}; resume with the same settings "
                       "(a checkpoint continues the same fit)")


def _size(hw) -> str:
    return "?" if not hw else "×".join(str(int(v)) for v in hw)
