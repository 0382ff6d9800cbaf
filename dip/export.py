"""Export a fitted network to TorchScript, ``torch.export`` (.pt2) and ONNX.

The exported file reproduces **the network's output for its input** ``z``:
``net(z)`` with BatchNorm on the batch statistics of that single input (what
the fit computes), cropped to the image. That is :meth:`dip.Restoration.render`,
not ``Restoration.image``, which is a moving average of the outputs over the
fit (and the fit's outputs saw a perturbed ``z``).

What is exported is the live network itself, frozen (:func:`freeze`):

* a deep copy, on the CPU in float32, so the fitted network is left as it is;
* every fused module (``FusedConvBlock``, ``LanczosDownsample`` on the
  compiled operator) swapped for its pure-PyTorch twin (its ``unfused()``,
  same parameter and buffer names), so the files hold standard operators
  only and load with plain ``torch.jit.load`` / ``torch.export.load`` /
  stock ``onnxruntime`` in a process without dip;
* every BatchNorm frozen to the batch statistics it sees in one train-mode
  pass over ``z`` (computed in float64, biased variance as in training), then
  switched to eval mode, so the network computes the same function of ``z``;
* each block's BatchNorm folded into its convolution with
  :func:`torch.nn.utils.fusion.fuse_conv_bn_eval` where that is exact: after
  a strided convolution, average pooling or Lanczos downsampling (linear
  maps that keep constants), and after max pooling only when no BatchNorm
  gain is negative. The BatchNorm after each concatenation stays, in eval mode.

Fed another input (``z_as_input=True``), the model still normalises with the
statistics of the fit's ``z``.
"""
import copy
import json
import logging
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Final, Optional, Union

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from dip.errors import DipError
from dip.io import atomic_write
from dip.nn.blocks import ConvBlock, LanczosDownsample
from dip.nn.hourglass import Hourglass
from dip.ops import lanczos

PathLike = Union[str, os.PathLike]

#: Name of the input of a model exported with ``z_as_input=True``.
INPUT_NAME = "z"
#: Name of the output of every exported model (1×C×H×W image in [0, 1] when the net ends in a sigmoid).
OUTPUT_NAME = "image"
#: Key of the JSON description stored in each file (TorchScript/.pt2 extra file, ONNX metadata).
METADATA_KEY = "dip.json"
#: Modules of ``dip.ops`` whose ``onnx_translations()`` map their compiled operators to standard ONNX.
_OP_MODULES = (lanczos,)
#: Downsamplers that are linear and keep constants: a per-channel affine map commutes with them.
_AFFINE_COMMUTING = (nn.Identity, nn.AvgPool2d, LanczosDownsample)


class CroppedNetwork(nn.Module):
    """``net(z)`` with fixed margins (top, left, bottom, right) removed from the output.

    An input of the fit's size gives exactly the image region; another size
    loses the same borders.
    """

    top: Final[int]
    left: Final[int]
    bottom: Final[int]
    right: Final[int]

    def __init__(self, net: nn.Module, margins: tuple[int, int, int, int]):
        super().__init__()
        self.net = net
        self.top, self.left, self.bottom, self.right = margins

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        out = self.net(z)
        return out[:, :, self.top : out.shape[2] - self.bottom, self.left : out.shape[3] - self.right]


class BakedInput(nn.Module):
    """A :class:`CroppedNetwork` with its input ``z`` stored as a buffer: takes no input."""

    def __init__(self, generator: CroppedNetwork, z: torch.Tensor):
        super().__init__()
        self.generator = generator
        self.register_buffer("z", z)

    def forward(self) -> torch.Tensor:
        return self.generator(self.z)


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


def _unfuse(net: nn.Module) -> None:
    """Replace, in place, every submodule that has an ``unfused()`` twin by that twin."""
    if callable(getattr(net, "unfused", None)):
        net.unfused()  # the root changes in place
    for name, module in list(net.named_modules()):
        if name and callable(getattr(module, "unfused", None)):
            parent, _, child = name.rpartition(".")
            setattr(net.get_submodule(parent), child, module.unfused())


@torch.no_grad()
def _freeze_batch_norm(net: nn.Module, z: torch.Tensor) -> None:
    """Write into every BatchNorm's running buffers the batch statistics it sees on ``z``, then ``eval()``."""
    stats: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]] = {}

    def record(module: nn.Module, inputs: tuple) -> None:
        x = inputs[0].double()
        stats[module] = (x.mean(dim=(0, 2, 3)), x.var(dim=(0, 2, 3), unbiased=False))

    norms = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    hooks = [m.register_forward_pre_hook(record) for m in norms]
    try:
        net.train()(z)
    finally:
        for hook in hooks:
            hook.remove()
    for m in norms:
        mean, var = stats[m]
        m.running_mean.copy_(mean)
        m.running_var.copy_(var)
    net.eval()


def _fold_batch_norm(net: nn.Module) -> None:
    """Fold, in place, each eval-mode ``ConvBlock``'s BatchNorm into its convolution where that is exact."""
    for block in net.modules():
        if not isinstance(block, ConvBlock) or not isinstance(block.bn, nn.BatchNorm2d):
            continue
        down = block.downsampler
        # max(s·x) = s·max(x) needs s ≥ 0; the sign of the gain is the sign of s.
        if isinstance(down, _AFFINE_COMMUTING) or (isinstance(down, nn.MaxPool2d) and bool((block.bn.weight >= 0).all())):
            block.conv = fuse_conv_bn_eval(block.conv, block.bn)
            block.bn = nn.Identity()


def freeze(net: nn.Module, z: torch.Tensor) -> nn.Module:
    """A frozen copy of the fitted ``net`` computing ``net(z)`` (train mode) as a fixed function (see module doc).

    Pure PyTorch, float32 on the CPU, in eval mode, without gradients. ``net``
    itself is not changed.
    """
    frozen = copy.deepcopy(net).to("cpu", torch.float64)
    _unfuse(frozen)
    _freeze_batch_norm(frozen, z.detach().to("cpu", torch.float64))
    _fold_batch_norm(frozen)
    frozen = frozen.float().requires_grad_(False)
    for module in frozen.modules():
        if isinstance(module, nn.Conv2d):
            module.weight.data = module.weight.data.contiguous()  # fused blocks keep channels_last weights
    return frozen


def _margins(z: torch.Tensor, crop: Optional[Sequence[int]]) -> tuple[int, int, int, int]:
    h, w = z.shape[2:]
    if crop is None:
        return 0, 0, 0, 0
    top, left, ch, cw = (int(v) for v in crop)
    if top < 0 or left < 0 or ch < 1 or cw < 1 or top + ch > h or left + cw > w:
        raise DipError(f"crop {tuple(crop)} (top, left, height, width) does not fit in the {h}×{w} output")
    return top, left, h - top - ch, w - left - cw


def export_module(net: nn.Module, z: torch.Tensor, *, crop: Optional[Sequence[int]] = None,
                  z_as_input: bool = False) -> nn.Module:
    """The module every export writes: the frozen fitted network (:func:`freeze`), cropped, on CPU.

    Args:
        net: the fitted network (``Restoration.network``): any ``Hourglass``,
            fused or pure, on any device.
        z: its input, 1×C×H×W (``Restoration.net_input``).
        crop: (top, left, height, width) of the image inside the output
            (``Restoration.crop``); ``None`` keeps the whole output.
        z_as_input: return a module taking ``z`` (any spatial size the network
            takes; the crop then removes the same margins). Default: a module
            with ``z`` stored inside, taking no input.

    Returns:
        An ``nn.Module`` of standard operators whose output for ``z`` equals
        ``net(z)`` in training mode (batch statistics), cropped.
    """
    check_fitted(net)
    cfg = net.config
    if not isinstance(z, torch.Tensor) or z.dim() != 4 or z.shape[0] != 1 or z.shape[1] != cfg.in_channels:
        shape = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
        raise DipError(f"z must be a 1×{cfg.in_channels}×H×W tensor (the network's input), got {shape}")
    generator = CroppedNetwork(freeze(net, z), _margins(z, crop)).eval()
    if z_as_input:
        return generator
    return BakedInput(generator, z.detach().to("cpu", torch.float32).clone()).eval()


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
                   z_as_input: bool = False, lite: bool = False) -> Path:
    """Write the fitted network as a TorchScript file (load with ``torch.jit.load``), atomically.

    The module takes no input and returns the 1×C×H×W image (``crop`` applied),
    or with ``z_as_input=True`` takes ``z`` (any spatial size the net permits).
    ``lite=True`` writes the lite-interpreter format instead (PyTorch Mobile,
    conventionally ``.ptl``; load with ``torch.jit.mobile._load_for_lite_interpreter``).
    TorchScript is deprecated in PyTorch but still what LibTorch C++ programs
    load; :func:`to_program` writes its successor. See :func:`export_module`
    for the other arguments.
    """
    module = export_module(net, z, crop=crop, z_as_input=z_as_input)
    with warnings.catch_warnings():
        # torch.jit.script/save warn that TorchScript is deprecated; exporting it is the point here.
        warnings.simplefilter("ignore", category=DeprecationWarning)
        warnings.simplefilter("ignore", category=FutureWarning)
        scripted = torch.jit.script(module)
        extra = {METADATA_KEY: _metadata(net, z, crop, z_as_input, "torchscript-lite" if lite else "torchscript")}
        if lite:
            return atomic_write(path, lambda tmp: scripted._save_for_lite_interpreter(str(tmp), _extra_files=extra))
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
        raise DipError(f"torch.export failed on the frozen network: {type(exc).__name__}: {exc}") from exc
    extra = {METADATA_KEY: _metadata(net, z, crop, z_as_input, "torch.export")}
    return atomic_write(path, lambda tmp: torch.export.save(program, tmp, extra_files=extra))


def onnx_translations() -> dict:
    """``custom_translation_table`` entries mapping the loaded ``dip::`` operators to standard ONNX.

    Each operator's translation lives beside it in ``dip.ops``; this collects them.
    """
    table = {}
    for module in _OP_MODULES:
        table.update(module.onnx_translations())
    return table


def _import_onnx():
    """The ``onnx`` module, or a :class:`DipError` saying what to install."""
    try:
        import onnx
    except ImportError as exc:
        raise DipError("ONNX export needs the onnx and onnxscript packages: pip install onnx onnxscript") from exc
    return onnx


def _check_opset(opset_version: Optional[int]) -> None:
    """Refuse an opset the ``torch.export``-based exporter cannot write (it starts at 18)."""
    if opset_version is None:
        return
    newest = _import_onnx().defs.onnx_opset_version()
    if isinstance(opset_version, bool) or not isinstance(opset_version, int) or not 18 <= opset_version <= newest:
        raise DipError(f"opset_version must be an integer from 18 to {newest} (the ONNX exporter writes opset 18 "
                       f"or newer, the installed onnx knows up to {newest}), got {opset_version!r}")


def _onnx_program(module: nn.Module, args: tuple, opset_version: Optional[int], **options):
    """``torch.onnx.export(dynamo=True)`` of ``module``, holding it to ``opset_version`` when given."""
    _check_opset(opset_version)
    registration_log = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration_log.level
    try:
        # The exporter logs a warning for each missing torchvision op and warns about
        # its own deprecated internals; neither concerns this graph.
        registration_log.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", category=FutureWarning)
            program = torch.onnx.export(module, args, dynamo=True, opset_version=opset_version,
                                        custom_translation_table=onnx_translations(), external_data=False,
                                        verbose=False, **options)
    except ImportError as exc:
        raise DipError(f"ONNX export needs onnx and onnxscript: pip install onnx onnxscript ({exc})") from exc
    finally:
        registration_log.setLevel(level)
    written = {o.domain: o.version for o in program.model_proto.opset_import}
    got = written.get("", written.get("ai.onnx"))
    if opset_version is not None and got != opset_version:
        raise DipError(f"the ONNX exporter wrote opset {got} instead of the requested {opset_version}; "
                       f"use opset {got} or leave opset_version unset")
    return program


def to_onnx(net: nn.Module, z: torch.Tensor, path: PathLike, *, crop: Optional[Sequence[int]] = None,
            z_as_input: bool = False, opset_version: Optional[int] = None) -> Path:
    """Write the fitted network as an ONNX model (standard operators only), atomically.

    Uses the ``torch.export``-based exporter (``torch.onnx.export(dynamo=True)``);
    the graph's output is named ``image`` and, with ``z_as_input=True``, its
    input ``z`` with dynamic height and width. ``opset_version`` (default: the
    exporter's) is the ONNX opset the file declares; one the exporter cannot
    write raises :class:`DipError`. The written model passes
    ``onnx.checker.check_model`` and runs in stock ``onnxruntime``. See
    :func:`export_module` for the other arguments.
    """
    onnx = _import_onnx()
    _check_opset(opset_version)  # before the network is frozen
    module = export_module(net, z, crop=crop, z_as_input=z_as_input)
    program = _onnx_program(module, _example_args(z, z_as_input), opset_version,
                            input_names=[INPUT_NAME] if z_as_input else None, output_names=[OUTPUT_NAME],
                            dynamic_shapes=_dynamic_shapes(net, z, z_as_input), optimize=True)
    model = program.model_proto
    onnx.helper.set_model_props(model, {METADATA_KEY: _metadata(net, z, crop, z_as_input, "onnx")})
    try:
        onnx.checker.check_model(model, full_check=True)
    except onnx.checker.ValidationError as exc:  # pragma: no cover - a bug in the exporter or here
        raise DipError(f"the exported ONNX model is invalid: {exc}") from exc
    return atomic_write(path, lambda tmp: onnx.save_model(model, tmp))


def operator_to_onnx(operator: nn.Module, example: torch.Tensor, path: PathLike, *,
                     opset_version: Optional[int] = None) -> Path:
    """Write a degradation operator (e.g. ``dip.physics.Downsample``) as an ONNX model, atomically.

    Input ``image`` (the example's batch and channels, any height and width),
    output ``observation``. The fused ``dip::`` operators export through
    their translations to standard ONNX (Lanczos: edge padding and strided
    depthwise convolutions), so the file runs in stock onnxruntime.
    """
    onnx = _import_onnx()
    dims = {2: torch.export.Dim.AUTO, 3: torch.export.Dim.AUTO}
    program = _onnx_program(operator.eval(), (example,), opset_version, input_names=["image"],
                            output_names=["observation"], dynamic_shapes={"x": dims})
    onnx.checker.check_model(program.model_proto, full_check=True)
    return atomic_write(path, lambda tmp: onnx.save_model(program.model_proto, tmp))


def _load_onnx(path: Path):
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


def _load(path: Path):
    """(callable running the model with no input, the dip metadata or None, input count) for an exported file."""
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        return _load_onnx(path)
    extra: dict[str, str] = {METADATA_KEY: ""}
    n_inputs = None
    if suffix == ".pt2":
        module = torch.export.load(str(path), extra_files=extra).module()
    elif suffix == ".ptl":
        from torch.jit.mobile import _load_for_lite_interpreter

        module = _load_for_lite_interpreter(str(path), map_location="cpu")
        extra = {}  # the lite loader does not read extra files; z_as_input shows when calling it fails
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", category=DeprecationWarning)
            module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
        n_inputs = len(module.forward.schema.arguments) - 1  # minus self
    meta = json.loads(extra[METADATA_KEY]) if extra.get(METADATA_KEY) else None
    return module, meta, n_inputs


def read_metadata(path: PathLike) -> Optional[dict]:
    """The JSON description dip stored in an exported file (format, network, crop, …), or ``None``."""
    return _load(Path(path))[1]


def run_exported(path: PathLike) -> torch.Tensor:
    """Run an exported file that takes no input (``z`` baked in) and return its 1×C×H×W output.

    The format follows the extension: ``.onnx`` runs in onnxruntime, ``.pt2``
    with ``torch.export.load``, ``.ptl`` in the lite interpreter, anything
    else (``.pt``, ``.ts``) with ``torch.jit.load``.

    The file is a program and this runs the code it contains (unlike images and checkpoints, which dip reads as
    untrusted data): call it only on exports you trust.
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
