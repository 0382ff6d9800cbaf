"""dip: Deep Image Prior image restoration with no training data.

``dip.restore(image, task=...)`` fits a randomly initialised hourglass network
to one degraded image and returns the restored image.
"""
from dip.batch import BatchSummary, restore_many
from dip.errors import DipError, ImageTooLargeError
from dip.fit.settings import FitSettings, Precision, StopReason
from dip.io import load_image, save_image
from dip.metrics import psnr
from dip.nn import Hourglass, HourglassConfig, build_network, preset
from dip.pipeline import restore
from dip.result import Restoration
from dip.tasks import Task

__version__ = "0.1.0"

__all__ = [
    "BatchSummary", "DipError", "Hourglass", "HourglassConfig", "ImageTooLargeError", "Restoration",
    "FitSettings", "Precision", "StopReason", "Task", "build_network", "load_image", "preset", "psnr", "restore", "restore_many", "save_image",
]
