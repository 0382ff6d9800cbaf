"""The outcome of a restoration: the image, how it was obtained, and the fitted network."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional, Union

import numpy as np
import torch
from PIL import Image
from torch import nn

from dip.fit.loop import History
from dip.fit.settings import StopReason
from dip.io import save_image, to_pil


@dataclass
class Restoration:
    """A restored image and the fit that produced it.

    ``image`` is the exponential moving average of the network outputs (what
    the original work reports) at iteration ``stopped_at`` — the end of the
    fit, or with the automatic stop the iterate it picked — cropped to the
    image and with the alpha channel, if the input had one, put back. ``output`` is the last raw
    network output; ``network`` and ``net_input`` regenerate it:
    ``network(net_input)`` cropped by ``crop``.
    """

    image: np.ndarray  # H×W×C float32 in [0, 1]
    history: History
    network: nn.Module
    net_input: torch.Tensor
    iterations: int
    task: str
    crop: tuple  # (top, left, height, width) of the image inside the network output
    output: Optional[np.ndarray] = None  # H×W×C last raw network output
    stop_reason: StopReason = StopReason.COMPLETED
    seconds: float = 0.0
    settings: dict = field(default_factory=dict)
    stopped_at: int = 0  # the iteration ``image`` belongs to (the detected point of an automatic stop)
    psnr: Optional[float] = None  # of ``image`` against the reference, when one was given
    #: with the automatic stop, every image it can return (see ``dip.stopping.SELECTIONS``), by name
    candidates: dict = field(default_factory=dict)

    @property
    def interrupted(self) -> bool:
        """True when the fit was stopped by Ctrl-C before it finished."""
        return self.stop_reason is StopReason.INTERRUPTED

    def to_pil(self) -> Image.Image:
        """The restored image as a PIL image (8 bits per channel)."""
        return to_pil(self.image)

    def save(self, path: Union[str, os.PathLike], *, jpeg_quality: int = 95):
        """Write the restored image to ``path`` (format from the extension), atomically.

        With the input's :class:`dip.io.ImageMeta` in ``meta``, the file keeps the input's depth, value
        range, ICC profile and DPI where the format can hold them (see :func:`dip.io.save_image`).
        """
        return save_image(self.image, path, meta=getattr(self, "meta", None), jpeg_quality=jpeg_quality)

    def render(self) -> torch.Tensor:
        """Run the fitted network on its input again: the cropped 1×C×H×W output (no averaging)."""
        self.network.train()  # DIP's BatchNorm uses the statistics of the single image, as in the fit
        with torch.no_grad():
            out = self.network(self.net_input)
        top, left, h, w = self.crop
        return out[:, :, top : top + h, left : left + w]

    def export_torchscript(self, path: Union[str, os.PathLike], *, z_as_input: bool = False):
        """Write the fitted network and its input to a TorchScript file; see :func:`dip.export.to_torchscript`.

        The file reproduces :meth:`render` (the last network output, cropped),
        not the averaged ``image``.
        """
        from dip.export import to_torchscript

        return to_torchscript(self._fitted_network(), self.net_input, path, crop=self.crop, z_as_input=z_as_input)

    def export_onnx(self, path: Union[str, os.PathLike], *, z_as_input: bool = False):
        """Write the fitted network and its input to an ONNX file; see :func:`dip.export.to_onnx`."""
        from dip.export import to_onnx

        return to_onnx(self._fitted_network(), self.net_input, path, crop=self.crop, z_as_input=z_as_input)

    def export_program(self, path: Union[str, os.PathLike], *, z_as_input: bool = False):
        """Write the fitted network and its input to a ``torch.export`` .pt2 file; see :func:`dip.export.to_program`."""
        from dip.export import to_program

        return to_program(self._fitted_network(), self.net_input, path, crop=self.crop, z_as_input=z_as_input)

    def _fitted_network(self) -> nn.Module:
        from dip.errors import DipError

        if self.iterations < 1:
            raise DipError("this restoration finished no fitting step, so there is no fitted network to export")
        return self.network

    def plot(self, path: Union[str, os.PathLike], *, title: Optional[str] = None):
        """Draw loss (and PSNR, with a reference) against iterations to ``path``; needs matplotlib.

        The returned iterate (``stopped_at``), the end of the fit and the PSNR
        peak are marked. Returns the path.
        """
        from dip.plot import plot_history

        return plot_history(self.history, path, stopped_at=self.stopped_at, iterations=self.iterations,
                            title=title or f"dip {self.task}: {self.stop_reason}")

    def __repr__(self) -> str:
        h, w, c = self.image.shape
        return (f"Restoration(task={self.task!r}, image={h}×{w}×{c}, iterations={self.iterations}, "
                f"stopped_at={self.stopped_at}, stop_reason={self.stop_reason!r}, seconds={self.seconds:.1f})")
