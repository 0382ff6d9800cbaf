"""The protocol of the fit's optional features.

The loop in :mod:`dip.fit.loop` is short: it takes a step, then hands the
:class:`~dip.fit.loop.Step` to each monitor in turn. A monitor (the variance
stopper, the divergence guard, the discrepancy stop, the PSNR recorder, the
checkpointer, the learning-rate warm-up) keeps its own state, and a
checkpoint is the union of the monitors' ``state_dict()``.
"""
from __future__ import annotations

from typing import Optional, Protocol, runtime_checkable

from dip.fit.settings import StopReason


@runtime_checkable
class Monitor(Protocol):
    """Something the fit consults after every accepted step."""

    #: key of this monitor's state in a checkpoint (unique within a fit)
    name: str

    def on_step(self, step) -> Optional[StopReason]:
        """Look at the finished step; return a :class:`StopReason` to end the fit, else None."""

    def state_dict(self) -> dict:
        """Tensors and plain values that restore this monitor exactly."""

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned."""
