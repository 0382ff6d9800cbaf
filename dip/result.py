"""The outcome of a restoration: the image, how it was obtained, and the fitted network."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional, Union

import numpy as np
import torch
from PIL import Image
from torch import nn

from dip.fit.loop import FitResult, History
from dip.fit.settings import StopReason
from dip.io import LoadedImage, save_image, to_pil
from dip.metrics import psnr, ssim
from dip.tasks import Task


@dataclass
class Restoration:
    """A restored image and the fit that produced it.

    ``image`` is the exponential moving average of the network outputs (what
    the original work reports) at iteration ``stopped_at`` — the end of the
    fit — or with the automatic stop centred on the iterate it picked (read a
    fifth of ``stopped_at`` later, at most ``FitSettings.average_lag``, see
    :mod:`dip.fit.stopping`), cropped to the
    image and with the alpha channel, if the input had one, put back.
    ``network`` holds the weights of that same iterate ``stopped_at``, so
    :meth:`render`, every export and ``init=`` warm starts use the network
    that produced the returned image: ``network(net_input)`` cropped by
    ``crop`` is its raw output there (``image`` is the average of such
    outputs, so the two differ slightly). With ``select="weight_ema"``
    ``network`` holds the moving average of the weights at the returned
    iterate and ``image`` is its output, so :meth:`render` equals ``image``.
    ``output`` is the last raw output the fit computed.

    Quality fields: ``ssim`` (with a reference and scikit-image),
    ``noise_sigma_estimate`` (the observation's noise std, [0, 1] units,
    :func:`dip.noise.estimate_sigma`), and ``uncertainty``, an H×W map that is a
    *relative* indicator of where the restoration is unsure (not a calibrated
    error): the per-pixel std of the ensemble members' returned images, or for
    a single automatic fit the moving std of its outputs at the returned
    iterate (None for a single fit with a fixed iteration count). With
    ``ensemble`` = K > 1, ``image`` is the mean of the members' returned images
    (``members``, K×H×W×C, each at its own variance minimum,
    ``member_iterations``) and ``network``/``net_input`` are member 0's.
    """

    image: np.ndarray  # H×W×C float32 in [0, 1]
    history: History
    network: nn.Module
    net_input: torch.Tensor
    iterations: int
    task: Task
    crop: tuple  # (top, left, height, width) of the image inside the network output
    output: Optional[np.ndarray] = None  # H×W×C last raw network output
    stop_reason: StopReason = StopReason.COMPLETED
    seconds: float = 0.0
    settings: dict = field(default_factory=dict)  # FitSettings.to_dict() plus task, factor, device, network
    stopped_at: int = 0  # the iteration ``image`` and ``network`` belong to
    psnr: Optional[float] = None  # of ``image`` against the reference, when one was given
    #: with the automatic stop, every image it can return (see :class:`dip.fit.Selection`), by name
    candidates: dict = field(default_factory=dict)
    source: Optional[LoadedImage] = None  # the input as read (its file's metadata travels to save())
    ssim: Optional[float] = None  # of ``image`` against the reference (needs scikit-image)
    noise_sigma_estimate: Optional[float] = None
    uncertainty: Optional[np.ndarray] = None  # H×W float32, relative
    ensemble: int = 1
    members: Optional[np.ndarray] = None  # K×H×W×C, the members' returned images (ensemble > 1)
    member_iterations: Optional[list] = None
    #: the iteration of the last checkpoint this fit wrote to ``checkpoint=`` (None: none was written, or no
    #: ``checkpoint=``); what a resume of that file continues from
    checkpoint_at: Optional[int] = None

    @classmethod
    def from_fit(cls, result: FitResult, problem, network: nn.Module, z: torch.Tensor, crop: tuple,
                 settings: dict, reference: Optional[torch.Tensor] = None, *,
                 noise_sigma_estimate: Optional[float] = None, uncertainty: Optional[torch.Tensor] = None,
                 ensemble: int = 1, members: Optional[torch.Tensor] = None,
                 member_iterations: Optional[list] = None, checkpoint_at: Optional[int] = None) -> Restoration:
        """Assemble the restoration of ``problem`` from a finished fit (``network`` holds the returned iterate)."""
        image = tensor_to_image(result.image)
        quality = None if reference is None else psnr(image, tensor_to_image(reference))
        similarity = None if reference is None else ssim(image, tensor_to_image(reference))
        if problem.alpha is not None:
            image = np.concatenate([image, _resize_alpha(problem.alpha, *problem.output_size)[:, :, None]], axis=2)
        return cls(image=image, history=result.history, network=network, net_input=z,
                   iterations=result.iterations, task=problem.task, crop=crop, output=tensor_to_image(result.output),
                   stop_reason=result.stop_reason, seconds=result.seconds, settings=settings,
                   stopped_at=result.stopped_at, psnr=quality,
                   candidates={name: tensor_to_image(t) for name, t in result.candidates.items()},
                   source=problem.source, ssim=similarity, noise_sigma_estimate=noise_sigma_estimate,
                   uncertainty=None if uncertainty is None else uncertainty.detach().float().cpu().numpy(),
                   ensemble=ensemble, member_iterations=member_iterations, checkpoint_at=checkpoint_at,
                   members=None if members is None else np.stack([tensor_to_image(m[None]) for m in members]))

    @property
    def meta(self):
        """What the input file carried (bit depth, value range, ICC, DPI …): :meth:`save` writes it back."""
        if self.source is None or getattr(self.source, "meta", None) is None:
            return None
        scale = self.image.shape[0] // max(1, self.source.size[0])
        return self.source.meta.resized(scale) if scale > 1 else self.source.meta

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

    def save_uncertainty(self, path: Union[str, os.PathLike]):
        """Write ``uncertainty`` as a colour-mapped image with its scale (a relative indicator); see :mod:`dip.uncertainty`."""
        from dip.errors import DipError
        from dip.uncertainty import save_uncertainty

        if self.uncertainty is None:
            raise DipError("this restoration has no uncertainty map: use ensemble=K > 1 or iterations='auto'")
        return save_uncertainty(self.uncertainty, path)

    def render(self) -> torch.Tensor:
        """Run the network of the returned iterate on its input: the cropped 1×C×H×W output (no averaging)."""
        self.network.train()  # DIP's BatchNorm uses the statistics of the single image, as in the fit
        with torch.no_grad():
            out = self.network(self.net_input)
        top, left, h, w = self.crop
        return out[:, :, top : top + h, left : left + w]

    def export_torchscript(self, path: Union[str, os.PathLike], *, z_as_input: bool = False):
        """Write the fitted network and its input to a TorchScript file; see :func:`dip.export.to_torchscript`.

        The file reproduces :meth:`render` (the network output of the returned
        iterate, cropped), not the averaged ``image``.
        """
        from dip.export import to_torchscript

        return to_torchscript(self._fitted_network(), self.net_input, path, crop=self.crop, z_as_input=z_as_input)

    def export_onnx(self, path: Union[str, os.PathLike], *, z_as_input: bool = False,
                    opset_version: Optional[int] = None):
        """Write the fitted network and its input to an ONNX file; see :func:`dip.export.to_onnx`.

        ``opset_version`` (default: the exporter's) is the ONNX opset the file
        declares; one the exporter cannot write raises ``DipError``.
        """
        from dip.export import to_onnx

        return to_onnx(self._fitted_network(), self.net_input, path, crop=self.crop, z_as_input=z_as_input,
                       opset_version=opset_version)

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
                            title=title or f"dip {self.task}: {self.stop_reason}", psnr=self.psnr)

    def __repr__(self) -> str:
        h, w, c = self.image.shape
        return (f"Restoration(task={self.task.value!r}, image={h}×{w}×{c}, iterations={self.iterations}, "
                f"stopped_at={self.stopped_at}, stop_reason={self.stop_reason.value!r}, seconds={self.seconds:.1f})")


def tensor_to_image(t: torch.Tensor) -> np.ndarray:
    """A 1×C×H×W tensor as an H×W×C float32 array clipped to [0, 1]."""
    return t.detach()[0].float().clamp(0, 1).permute(1, 2, 0).cpu().numpy().astype(np.float32)


def _resize_alpha(alpha: np.ndarray, h: int, w: int) -> np.ndarray:
    if alpha.shape == (h, w):
        return alpha
    img = Image.fromarray(alpha.astype(np.float32), mode="F").resize((w, h), Image.BICUBIC)
    return np.clip(np.asarray(img, dtype=np.float32), 0, 1)
