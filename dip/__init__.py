"""dip: Deep Image Prior image restoration with no training data.

``dip.restore(image, task=...)`` fits a randomly initialised hourglass network
to one degraded image and returns the restored image.

The public names are imported on first use (PEP 562), so ``import dip`` and
the ``dip`` command's ``--help``, ``--version`` and argument errors do not
wait for torch to load.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

#: public name → the module that defines it
_PUBLIC = {
    "BatchSummary": "dip.batch", "restore_many": "dip.batch",
    "DipError": "dip.errors", "ImageTooLargeError": "dip.errors",
    "FitSettings": "dip.fit.settings", "Objective": "dip.fit.settings", "Precision": "dip.fit.settings", "StopReason": "dip.fit.settings",
    "load_image": "dip.io", "save_image": "dip.io",
    "psnr": "dip.metrics",
    "Hourglass": "dip.nn", "HourglassConfig": "dip.nn", "build_network": "dip.nn", "preset": "dip.nn",
    "restore": "dip.pipeline",
    "Restoration": "dip.result",
    "Task": "dip.tasks",
}

__all__ = [
    "BatchSummary", "DipError", "FitSettings", "Hourglass", "HourglassConfig", "ImageTooLargeError", "Objective",
    "Precision", "Restoration", "StopReason", "Task", "build_network", "load_image", "preset", "psnr", "restore", "restore_many",
    "save_image",
]

if TYPE_CHECKING:  # what static tools and IDEs see
    from dip.batch import BatchSummary, restore_many
    from dip.errors import DipError, ImageTooLargeError
    from dip.fit.settings import FitSettings, Objective, Precision, StopReason
    from dip.io import load_image, save_image
    from dip.metrics import psnr
    from dip.nn import Hourglass, HourglassConfig, build_network, preset
    from dip.pipeline import restore
    from dip.result import Restoration
    from dip.tasks import Task


def __getattr__(name: str):
    module = _PUBLIC.get(name)
    if module is not None:
        value = getattr(importlib.import_module(module), name)
    elif not name.startswith("__"):
        try:  # a submodule used as an attribute (dip.io, dip.physics …)
            value = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module 'dip' has no attribute {name!r}") from None
    else:
        raise AttributeError(f"module 'dip' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))
