"""Loads the compiled operators (``dip._C``) and reports how they were built.

The package works without them: every fused operator has a pure-PyTorch
reference that is used when the extension is missing, when the input's device
has no kernel, or when ``DIP_DISABLE_EXTENSION=1`` is set in the environment.
"""
from __future__ import annotations

import logging
import os

import torch

_DISABLED = os.environ.get("DIP_DISABLE_EXTENSION", "").strip() not in ("", "0")
_C = None
_IMPORT_ERROR: str | None = None

if _DISABLED:
    _IMPORT_ERROR = "disabled by DIP_DISABLE_EXTENSION"
else:
    try:
        from dip import _C  # noqa: F811  (loading it registers torch.ops.dip.*)
    except ImportError as exc:  # not built: fall back to the pure-PyTorch path
        _IMPORT_ERROR = str(exc)


_warned = False


def warn_if_missing() -> None:
    """Log once per process, on the ``dip`` logger, that the compiled operators are missing.

    Call it where dip starts real work (a fit), not at import: ``dip info`` reports the
    same fact itself. Nothing is logged when the extension was disabled on purpose.
    """
    global _warned
    if _warned or _C is not None or _DISABLED:
        return
    _warned = True
    logging.getLogger("dip").warning(
        "the compiled operators are not loaded (%s); running on the pure-PyTorch path, which is slower "
        "(`dip info` shows the build)", _IMPORT_ERROR)


def has_ops() -> bool:
    """True when the compiled ``torch.ops.dip`` operators are loaded and enabled."""
    return _C is not None


def has_op(name: str) -> bool:
    """True when the compiled operator ``torch.ops.dip.<name>`` is registered."""
    return has_ops() and hasattr(torch.ops.dip, name)


def build_info() -> dict:
    """How the extension was built (torch version, CUDA kernels, threads), or why it is not loaded."""
    if _C is None:
        return {"loaded": False, "reason": _IMPORT_ERROR}
    info = dict(_C.build_info())
    info["loaded"] = True
    return info
