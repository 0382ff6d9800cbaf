"""Fitting a network to one degraded image: settings, the loop, and its monitors.

``dip.fit.fit`` is the loop, ``dip.fit.Step`` what callbacks and monitors see
after each step, ``dip.fit.FitSettings`` everything a fit takes and
``dip.fit.StopReason`` why it ended.
"""
from dip.fit.loop import Callback, FitLoop, FitResult, History, Step, default_monitors, fit, make_noise_input
from dip.fit.monitors import Monitor
from dip.fit.settings import (
    EarlyStopping,
    FitSettings,
    GuardSettings,
    Objective,
    Precision,
    Selection,
    StopMode,
    StopReason,
)

__all__ = ["Callback", "EarlyStopping", "FitLoop", "FitResult", "FitSettings", "GuardSettings", "History", "Monitor",
           "Objective", "Precision", "Selection", "Step", "StopMode", "StopReason", "default_monitors", "fit", "make_noise_input"]
