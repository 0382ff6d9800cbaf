"""Export a fitted network to TorchScript, ``torch.export`` (.pt2) and ONNX.

The exported file reproduces **the network output of the last fitted state
for the stored input** ``z``: ``net(z)`` with BatchNorm on the batch
statistics of that single input (what the fit computes), cropped to the image.
That is :meth:`dip.Restoration.render`, not ``Restoration.image``: the image
``restore`` returns is a moving average of the outputs over the fit (and the
fit's outputs saw a perturbed ``z``), so it differs slightly from any single
network output.

The files do not run the live module. They hold an *export graph* rebuilt from
the network's configuration and weights out of standard operators only:
reflection/zero padding, convolutions with every BatchNorm folded in, pooling,
Lanczos downsampling as replicate padding + strided depthwise convolutions,
LeakyReLU/ReLU/SiLU/ELU, upsampling, concatenation and a sigmoid. So a file
loads with plain ``torch.jit.load`` / ``torch.export.load`` / stock
``onnxruntime`` in a process without dip, whichever path (fused C++ operators
or pure PyTorch) produced the fit.

BatchNorm: DIP normalises with the statistics of the batch in front of it
(one image), never with running averages. The export computes those batch
statistics for ``z`` (biased variance, as in training mode) and folds them, with
the affine parameters, into the preceding convolution (or into a per-channel
scale and shift where folding is not exact: after max pooling and in front of
the concatenation). The graph is then exact for ``z``; fed another input
(``z_as_input=True``), it still uses the statistics of the fit's ``z``.
"""
import json
import logging
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Final, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from dip.errors import DipError
from dip.io import atomic_write
from dip.nn.hourglass import Hourglass, HourglassConfig
from dip.ops.lanczos import lanczos_taps
from dip.ops.lanczos import padding as lanczos_padding

PathLike = Union[str, os.PathLike]

#: Name of the input of a model exported with ``z_as_input=True``.
INPUT_NAME = "z"
#: Name of the output of every exported model (1×C×H×W image in [0, 1] when the net ends in a sigmoid).
OUTPUT_NAME = "image"
#: Key of the JSON description stored in each file (TorchScript/.pt2 extra file, ONNX metadata).
METADATA_KEY = "dip.json"


# ---------------------------------------------------------------------------
# The export graph: small modules over standard operators.
# ---------------------------------------------------------------------------

class Affine(nn.Module):
    """Per-channel ``x · scale + shift`` (a folded BatchNorm that cannot go into a convolution)."""

    def __init__(self, scale: torch.Tensor, shift: torch.Tensor):
        super().__init__()
        self.register_buffer("scale", scale.reshape(1, -1, 1, 1))
        self.register_buffer("shift", shift.reshape(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale + self.shift


class LanczosDepthwise(nn.Module):
    """Lanczos downsampling as replicate padding and two strided depthwise convolutions (separable taps)."""

    def __init__(self, channels: int, factor: int, support: int):
        super().__init__()
        taps = lanczos_taps(factor, support, dtype=torch.float32)
        before, after = lanczos_padding(factor, support)
        self.pad = nn.ReplicationPad2d((before, after, before, after))
        self.rows = nn.Conv2d(channels, channels, (taps.numel(), 1), (factor, 1), groups=channels, bias=False)
        self.cols = nn.Conv2d(channels, channels, (1, taps.numel()), (1, factor), groups=channels, bias=False)
        with torch.no_grad():
            self.rows.weight.copy_(taps.view(1, 1, -1, 1).expand(channels, 1, -1, 1))
            self.cols.weight.copy_(taps.view(1, 1, 1, -1).expand(channels, 1, 1, -1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cols(self.rows(self.pad(x)))


class ExportLevel(nn.Module):
    """One scale of the hourglass in the export graph (same data flow as ``dip.nn.hourglass._Scale``)."""

    has_skip: Final[bool]

    def __init__(self, skip: nn.Module, down: nn.Module, deeper: nn.Module, upsample: nn.Module,
                 merge: nn.Module, up: nn.Module, has_skip: bool):
        super().__init__()
        self.has_skip = has_skip
        self.skip, self.down, self.deeper = skip, down, deeper
        self.upsample, self.merge, self.up = upsample, merge, up

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.upsample(self.deeper(self.down(x)))
        y = y[:, :, : x.shape[2], : x.shape[3]]
        if self.has_skip:
            y = torch.cat([self.skip(x), y], dim=1)
        return self.up(self.merge(y))


class ExportedGenerator(nn.Module):
    """The generator ``z ↦ image`` with folded BatchNorm, cropped by fixed margins.

    ``margins`` = (top, left, bottom, right) pixels removed from the network
    output, so an input of the fit's size gives exactly the image region and
    another size loses the same borders.
    """

    top: Final[int]
    left: Final[int]
    bottom: Final[int]
    right: Final[int]

    def __init__(self, body: nn.Module, head: nn.Module, margins: tuple[int, int, int, int]):
        super().__init__()
        self.body, self.head = body, head
        self.top, self.left, self.bottom, self.right = margins

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        out = self.head(self.body(z))
        return out[:, :, self.top : out.shape[2] - self.bottom, self.left : out.shape[3] - self.right]


class BakedGenerator(nn.Module):
    """An :class:`ExportedGenerator` with its input ``z`` stored as a buffer: takes no input."""

    def __init__(self, generator: ExportedGenerator, z: torch.Tensor):
        super().__init__()
        self.generator = generator
        self.register_buffer("z", z)

    def forward(self) -> torch.Tensor:
        return self.generator(self.z)


# ---------------------------------------------------------------------------
# Building the export graph from a fitted Hourglass.
# ---------------------------------------------------------------------------

def _activation(name: str) -> nn.Module:
    # Same choices (and LeakyReLU slope) as dip.nn.blocks.make_activation, built here so
    # that the export graph never holds a dip module.
    return {"LeakyReLU": lambda: nn.LeakyReLU(0.2), "ReLU": nn.ReLU, "Swish": nn.SiLU, "ELU": nn.ELU,
            "none": nn.Identity}[name]()


class _Builder:
    """Walks the fitted network's weights, computing each BatchNorm's batch statistics on ``z``."""

    def __init__(self, net: Hourglass):
        self.net = net
        self.cfg: HourglassConfig = net.config
        self.state = {k: v.detach().to("cpu", torch.float32) for k, v in net.state_dict().items()
                      if v.is_floating_point()}

    def _eps(self, name: str) -> float:
        try:
            return float(getattr(self.net.get_submodule(name), "eps", 1e-5))
        except AttributeError:
            return 1e-5

    def _batch_norm(self, name: str, x: torch.Tensor):
        """(output, scale, shift) of train-mode BatchNorm ``name`` on ``x``; scale/shift in float64."""
        xd = x.double()
        mean = xd.mean(dim=(0, 2, 3))
        var = xd.var(dim=(0, 2, 3), unbiased=False)
        scale = self.state[f"{name}.weight"].double() / torch.sqrt(var + self._eps(name))
        shift = self.state[f"{name}.bias"].double() - mean * scale
        out = F.batch_norm(x, None, None, self.state[f"{name}.weight"], self.state[f"{name}.bias"],
                           training=True, eps=self._eps(name))
        return out, scale, shift

    def block(self, name: str, x: torch.Tensor, stride: int = 1, downsample: str = "stride"):
        """Export a ``ConvBlock`` called ``name`` fed ``x``: (module, its output on x)."""
        cfg = self.cfg
        weight = self.state[f"{name}.conv.weight"]
        bias = self.state.get(f"{name}.conv.bias")
        k = weight.shape[-1]
        p = (k - 1) // 2
        reflect = cfg.pad == "reflection" and p > 0
        conv_stride = stride if downsample == "stride" else 1
        zero_pad = p if cfg.pad == "zero" else 0
        layers: list[nn.Module] = []
        if reflect:
            layers.append(nn.ReflectionPad2d(p))
            x = F.pad(x, (p,) * 4, mode="reflect")
        y = F.conv2d(x, weight, bias, conv_stride, zero_pad)
        down: Optional[nn.Module] = None
        if stride != 1 and downsample != "stride":
            if downsample == "avg":
                down = nn.AvgPool2d(stride, stride)
            elif downsample == "max":
                down = nn.MaxPool2d(stride, stride)
            else:
                down = LanczosDepthwise(weight.shape[0], stride, int(downsample[-1]))
            y = down(y)
        affine: Optional[nn.Module] = None
        if cfg.batch_norm:
            y, scale, shift = self._batch_norm(f"{name}.bn", y)
            if isinstance(down, nn.MaxPool2d):
                # max(s·x) ≠ s·max(x) when s < 0: keep the BatchNorm after the pooling.
                affine = Affine(scale.float(), shift.float())
            else:
                # Stride, average pooling and Lanczos are linear and keep constants, so
                # the BatchNorm moves in front of them and into the convolution.
                b = torch.zeros_like(scale) if bias is None else bias.double()
                weight = (weight.double() * scale.view(-1, 1, 1, 1)).float()
                bias = (b * scale + shift).float()
        conv = nn.Conv2d(weight.shape[1], weight.shape[0], k, conv_stride, zero_pad, bias=bias is not None)
        with torch.no_grad():
            conv.weight.copy_(weight)
            if bias is not None:
                conv.bias.copy_(bias)
        layers.append(conv)
        if down is not None:
            layers.append(down)
        if affine is not None:
            layers.append(affine)
        act = _activation(cfg.act)
        layers.append(act)
        return nn.Sequential(*layers), act(y)

    def level(self, i: int, prefix: str, x: torch.Tensor):
        """Export scale ``i`` (module ``prefix``) fed ``x``: (module, its output on x)."""
        cfg = self.cfg
        has_skip = cfg.channels_skip[i] > 0
        skip: nn.Module = nn.Identity()
        skip_out = None
        if has_skip:
            skip, skip_out = self.block(f"{prefix}.skip", x)
        d0, y = self.block(f"{prefix}.down.0", x, 2, cfg.downsample)
        d1, y = self.block(f"{prefix}.down.1", y)
        deeper: nn.Module = nn.Identity()
        if i + 1 < cfg.scales:
            deeper, y = self.level(i + 1, f"{prefix}.deeper", y)
        upsample = nn.Upsample(scale_factor=2, mode=cfg.upsample,
                               align_corners=None if cfg.upsample == "nearest" else False)
        y = upsample(y)[:, :, : x.shape[2], : x.shape[3]]
        if has_skip:
            y = torch.cat([skip_out, y], dim=1)
        merge: nn.Module = nn.Identity()
        if cfg.batch_norm:
            y, scale, shift = self._batch_norm(f"{prefix}.merge_bn", y)
            merge = Affine(scale.float(), shift.float())
        up, y = self.block(f"{prefix}.up", y)
        up_1x1: nn.Module = nn.Identity()
        if cfg.up_1x1:
            up_1x1, y = self.block(f"{prefix}.up_1x1", y)
        module = ExportLevel(skip, nn.Sequential(d0, d1), deeper, upsample, merge, nn.Sequential(up, up_1x1), has_skip)
        return module, y

    def head(self, y: torch.Tensor):
        weight = self.state["head.weight"]
        bias = self.state.get("head.bias")
        conv = nn.Conv2d(weight.shape[1], weight.shape[0], 1, bias=bias is not None)
        with torch.no_grad():
            conv.weight.copy_(weight)
            if bias is not None:
                conv.bias.copy_(bias)
        layers: list[nn.Module] = [conv]
        if self.cfg.sigmoid:
            layers.append(nn.Sigmoid())
        head = nn.Sequential(*layers)
        return head, head(y)


def check_fitted(net: nn.Module) -> None:
    """Raise :class:`DipError` unless ``net`` is a dip ``Hourglass`` that has been fitted.

    "Fitted" means every BatchNorm has normalised at least one batch
    (``num_batches_tracked > 0``), which the first fitting step does. A network
    without BatchNorm cannot be told apart from a fresh one and is accepted.
    """
    if not isinstance(net, Hourglass):
        raise DipError(
            f"export supports dip's Hourglass networks, got {type(net).__name__}; "
            "for your own module use torch.export or torch.onnx.export directly"
        )
    for name, module in net.named_modules():
        tracked = getattr(module, "num_batches_tracked", None)
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and tracked is not None and int(tracked) == 0:
            raise DipError(
                f"the network has not been fitted yet (BatchNorm {name or 'layer'} has never seen a batch): "
                "export the network of a finished dip.restore() or dip.fit()"
            )


def export_module(net: nn.Module, z: torch.Tensor, *, crop: Optional[Sequence[int]] = None,
                  z_as_input: bool = False) -> nn.Module:
    """The export graph of a fitted ``Hourglass`` for input ``z`` (on CPU, float32, eval mode).

    Args:
        net: the fitted network (``Restoration.network``).
        z: its input, 1×C×H×W (``Restoration.net_input``).
        crop: (top, left, height, width) of the image inside the output
            (``Restoration.crop``); ``None`` keeps the whole output.
        z_as_input: return a module taking ``z`` (any spatial size the network
            takes; the crop then removes the same margins). Default: a module
            with ``z`` stored inside, taking no input.

    Returns:
        A plain ``nn.Module`` of standard operators whose output for ``z``
        equals ``net(z)`` in training mode (batch statistics), cropped.
    """
    check_fitted(net)
    cfg = net.config
    if not isinstance(z, torch.Tensor) or z.dim() != 4 or z.shape[0] != 1 or z.shape[1] != cfg.in_channels:
        shape = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
        raise DipError(f"z must be a 1×{cfg.in_channels}×H×W tensor (the network's input), got {shape}")
    z = z.detach().to("cpu", torch.float32)
    h, w = z.shape[2:]
    margins = (0, 0, 0, 0)
    if crop is not None:
        top, left, ch, cw = (int(v) for v in crop)
        if top < 0 or left < 0 or ch < 1 or cw < 1 or top + ch > h or left + cw > w:
            raise DipError(f"crop {tuple(crop)} (top, left, height, width) does not fit in the {h}×{w} output")
        margins = (top, left, h - top - ch, w - left - cw)
    builder = _Builder(net)
    with torch.no_grad():
        body, y = builder.level(0, "body", z)
        head, _ = builder.head(y)
    generator = ExportedGenerator(body, head, margins).eval()
    for p in generator.parameters():
        p.requires_grad_(False)
    if z_as_input:
        return generator
    return BakedGenerator(generator, z.clone()).eval()


def _metadata(net: Hourglass, z: torch.Tensor, crop, z_as_input: bool, fmt: str) -> str:
    from dip import __version__

    return json.dumps({
        "format": fmt, "dip_version": __version__, "torch_version": torch.__version__,
        "network": net.config.to_dict(), "z_shape": list(z.shape), "crop": None if crop is None else list(crop),
        "z_as_input": z_as_input, "input": INPUT_NAME if z_as_input else None, "output": OUTPUT_NAME,
    })


def _example_args(z: torch.Tensor, z_as_input: bool) -> tuple:
    return (z.detach().to("cpu", torch.float32),) if z_as_input else ()


def _dynamic_shapes(net: Hourglass, z: torch.Tensor, z_as_input: bool):
    """Height and width of ``z`` dynamic in multiples of ``2**scales`` (what ``restore`` pads to).

    For those sizes every scale halves exactly; for others the exported graph
    would depend on whether the upsampled map is one pixel larger, which
    torch.export fixes at the example's answer.
    """
    if not z_as_input:
        return None
    multiple = net.config.multiple()
    if z.shape[2] % multiple or z.shape[3] % multiple:
        raise DipError(f"with z_as_input, z's height and width must be multiples of {multiple} "
                       f"(2**scales), got {z.shape[2]}×{z.shape[3]}")
    lo = max(1, -(-net.config.min_size() // multiple))
    h = multiple * torch.export.Dim("h_blocks", min=lo)
    w = multiple * torch.export.Dim("w_blocks", min=lo)
    return {INPUT_NAME: {2: h, 3: w}}


def to_torchscript(net: nn.Module, z: torch.Tensor, path: PathLike, *, crop: Optional[Sequence[int]] = None,
                   z_as_input: bool = False) -> Path:
    """Write the fitted network as a TorchScript file (load with ``torch.jit.load``), atomically.

    The module takes no input and returns the 1×C×H×W image (``crop`` applied),
    or with ``z_as_input=True`` takes ``z`` (any spatial size the net permits).
    TorchScript is deprecated in PyTorch but still what many C++ and mobile
    runtimes load; :func:`to_program` writes its successor. See
    :func:`export_module` for the arguments.
    """
    module = export_module(net, z, crop=crop, z_as_input=z_as_input)
    with warnings.catch_warnings():
        # torch.jit.script/save warn that TorchScript is deprecated; exporting it is the point here.
        warnings.simplefilter("ignore", category=DeprecationWarning)
        warnings.simplefilter("ignore", category=FutureWarning)
        scripted = torch.jit.script(module)
        extra = {METADATA_KEY: _metadata(net, z, crop, z_as_input, "torchscript")}
        return atomic_write(path, lambda tmp: torch.jit.save(scripted, tmp, _extra_files=extra))


def to_program(net: nn.Module, z: torch.Tensor, path: PathLike, *, crop: Optional[Sequence[int]] = None,
               z_as_input: bool = False) -> Path:
    """Write the fitted network as a ``torch.export`` program (``.pt2``; load with ``torch.export.load``).

    Run it with ``torch.export.load(path).module()()`` (or ``(z)`` with
    ``z_as_input=True``, then dynamic in height and width). See
    :func:`export_module` for the arguments.
    """
    module = export_module(net, z, crop=crop, z_as_input=z_as_input)
    args = _example_args(z, z_as_input)
    try:
        program = torch.export.export(module, args, dynamic_shapes=_dynamic_shapes(net, z, z_as_input))
    except Exception as exc:  # torch.export reports unsupported constructs with many exception types
        raise DipError(f"torch.export failed on the export graph: {type(exc).__name__}: {exc}") from exc
    extra = {METADATA_KEY: _metadata(net, z, crop, z_as_input, "torch.export")}
    return atomic_write(path, lambda tmp: torch.export.save(program, tmp, extra_files=extra))


def to_onnx(net: nn.Module, z: torch.Tensor, path: PathLike, *, crop: Optional[Sequence[int]] = None,
            z_as_input: bool = False, opset_version: Optional[int] = None) -> Path:
    """Write the fitted network as an ONNX model (standard operators only), atomically.

    Uses the ``torch.export``-based exporter (``torch.onnx.export(dynamo=True)``);
    the graph's output is named ``image`` and, with ``z_as_input=True``, its
    input ``z`` with dynamic height and width. The written model passes
    ``onnx.checker.check_model`` and runs in stock ``onnxruntime``. See
    :func:`export_module` for the other arguments.
    """
    try:
        import onnx
    except ImportError as exc:
        raise DipError("ONNX export needs the onnx and onnxscript packages: pip install onnx onnxscript") from exc
    module = export_module(net, z, crop=crop, z_as_input=z_as_input)
    args = _example_args(z, z_as_input)
    registration_log = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration_log.level
    try:
        # The exporter logs a warning for each missing torchvision op and warns about
        # its own deprecated internals; neither concerns this graph.
        registration_log.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", category=FutureWarning)
            program = torch.onnx.export(
                module, args, dynamo=True, input_names=[INPUT_NAME] if z_as_input else None,
                output_names=[OUTPUT_NAME], dynamic_shapes=_dynamic_shapes(net, z, z_as_input),
                opset_version=opset_version, external_data=False, optimize=True, verbose=False,
            )
    except ImportError as exc:
        raise DipError(f"ONNX export needs onnxscript: pip install onnxscript ({exc})") from exc
    finally:
        registration_log.setLevel(level)
    model = program.model_proto
    onnx.helper.set_model_props(model, {METADATA_KEY: _metadata(net, z, crop, z_as_input, "onnx")})
    try:
        onnx.checker.check_model(model, full_check=True)
    except onnx.checker.ValidationError as exc:  # pragma: no cover - a bug in the exporter or here
        raise DipError(f"the exported ONNX model is invalid: {exc}") from exc
    return atomic_write(path, lambda tmp: onnx.save_model(model, tmp))


def _lanczos_downsample_onnx(x, factor: int, support: int = 2):
    """ONNX translation of ``dip::lanczos_downsample``: edge ``Pad`` and two strided depthwise ``Conv``.

    The image is reshaped to (N·C)×1×H×W so one single-channel filter serves
    every channel, as in :func:`dip.ops.lanczos.lanczos_downsample_reference`.
    """
    from onnxscript import ir
    from onnxscript import opset18 as op

    taps = lanczos_taps(factor, support, dtype=torch.float32).numpy()
    k = taps.size
    before, after = lanczos_padding(factor, support)
    y = op.Reshape(x, op.Concat(op.Constant(value_ints=[-1, 1]), op.Shape(x, start=2), axis=0))
    y = op.Pad(y, op.Constant(value_ints=[0, 0, before, before, 0, 0, after, after]), mode="edge")
    y = op.Conv(y, op.Constant(value=ir.tensor(taps.reshape(1, 1, k, 1))), strides=[factor, 1])
    y = op.Conv(y, op.Constant(value=ir.tensor(taps.reshape(1, 1, 1, k))), strides=[1, factor])
    return op.Reshape(y, op.Concat(op.Shape(x, start=0, end=2), op.Shape(y, start=2), axis=0))


def onnx_translations() -> dict:
    """``custom_translation_table`` entries mapping the loaded ``dip::`` operators to standard ONNX."""
    from dip import _extension

    table = {}
    if _extension.has_op("lanczos_downsample"):
        table[torch.ops.dip.lanczos_downsample.default] = _lanczos_downsample_onnx
    return table


def operator_to_onnx(operator: nn.Module, example: torch.Tensor, path: PathLike) -> Path:
    """Write a degradation operator (e.g. ``dip.physics.Downsample``) as an ONNX model, atomically.

    Input ``image`` (the example's batch and channels, any height and width),
    output ``observation``. The fused ``dip::`` operators export as standard
    ONNX (Lanczos: edge padding and strided depthwise convolutions), so the
    file runs in stock onnxruntime.
    """
    import onnx

    dims = {2: torch.export.Dim.AUTO, 3: torch.export.Dim.AUTO}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=FutureWarning)
        program = torch.onnx.export(
            operator.eval(), (example,), dynamo=True, input_names=["image"], output_names=["observation"],
            dynamic_shapes={"x": dims}, custom_translation_table=onnx_translations(), external_data=False,
            verbose=False,
        )
    onnx.checker.check_model(program.model_proto, full_check=True)
    return atomic_write(path, lambda tmp: onnx.save_model(program.model_proto, tmp))


def _load(path: Path):
    """(callable running the model with no input, the dip metadata or None, input count) for an exported file."""
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        try:
            import onnx
            import onnxruntime
        except ImportError as exc:
            raise DipError("running an ONNX model needs onnx and onnxruntime: pip install onnx onnxruntime") from exc
        model = onnx.load(str(path))
        props = {p.key: p.value for p in model.metadata_props}
        session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        meta = json.loads(props[METADATA_KEY]) if METADATA_KEY in props else None
        return (lambda: torch.from_numpy(session.run(None, {})[0])), meta, len(session.get_inputs())
    extra: dict[str, str] = {METADATA_KEY: ""}
    if suffix == ".pt2":
        module = torch.export.load(str(path), extra_files=extra).module()
        n_inputs = None
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", category=DeprecationWarning)
            module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
        n_inputs = len(module.forward.schema.arguments) - 1  # minus self
    meta = json.loads(extra[METADATA_KEY]) if extra[METADATA_KEY] else None
    return module, meta, n_inputs


def read_metadata(path: PathLike) -> Optional[dict]:
    """The JSON description dip stored in an exported file (format, network, crop, …), or ``None``."""
    return _load(Path(path))[1]


def run_exported(path: PathLike) -> torch.Tensor:
    """Run an exported file that takes no input (``z`` baked in) and return its 1×C×H×W output.

    The format follows the extension: ``.onnx`` runs in onnxruntime, ``.pt2``
    with ``torch.export.load``, anything else (``.pt``, ``.ts``) with
    ``torch.jit.load``.
    """
    path = Path(path)
    if not path.is_file():
        raise DipError(f"cannot read {path}: no such file")
    try:
        run, meta, n_inputs = _load(path)
    except DipError:
        raise
    except Exception as exc:  # each format's loader has its own exception types for a bad file
        raise DipError(f"cannot load {path} as {path.suffix or 'TorchScript'} model: {exc}") from exc
    if n_inputs or (meta is not None and meta.get("z_as_input")):
        raise DipError(f"{path} takes the network input z (it was exported with z_as_input=True); "
                       "`dip render` runs models with z baked in: export without z_as_input")
    try:
        with torch.no_grad():
            out = run()
    except Exception as exc:
        raise DipError(f"cannot run {path}: {exc}") from exc
    if not isinstance(out, torch.Tensor) or out.dim() != 4 or out.shape[0] != 1:
        raise DipError(f"{path} does not return a 1×C×H×W image tensor")
    return out
