"""Fitting a network to one degraded image: settings, the loop, and its monitors.

``dip.fit.fit`` is the loop, ``dip.fit.Step`` what callbacks and monitors see
after each step, ``dip.fit.FitSettings`` everything a fit takes and
``dip.fit.StopReason`` why it ended.
"""
from dip.fit.loop import Callback, FitResult, History, Step, fit, make_noise_input
from dip.fit.monitors import Monitor
from dip.fit.settings import FitSettings, Precision, Selection, StopReason

__all__ = ["Callback", "FitResult", "FitSettings", "History", "Monitor", "Precision", "Selection", "Step",
           "StopReason", "fit", "make_noise_input"]
