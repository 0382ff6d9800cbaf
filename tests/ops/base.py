"""The checks every fused operator must pass, shared by the operators' test files.

An operator describes itself once with an :class:`OpSpec`: its compiled op, its
pure-PyTorch reference, the public function that dispatches between them,
sample inputs, and the dtypes each device has kernels for. The functions here
then run the same checks on any device and dtype:

* :func:`check_against_reference` – outputs and input gradients of the fused op
  vs the reference, inputs in several memory layouts (contiguous,
  channels_last, strided, transposed), tolerance by dtype;
* :func:`check_gradcheck` – ``gradcheck``/``gradgradcheck`` on the eager op and
  on the TorchScript-scripted public function (float64);
* :func:`check_autocast` – the fused op vs the reference, both under the same
  ``torch.autocast`` (float32 inputs, bf16 tolerance), inputs in several layouts;
* :func:`check_opcheck` – ``torch.library.opcheck`` on every sample;
* :func:`check_compile` – ``torch.compile(fullgraph=True)`` (aot_eager) against eager,
  optionally under autocast.

Parametrize tests with ``DEVICES`` and ``dtypes_for``: the CUDA parameter
carries the ``cuda`` marker (``pytest -m cuda`` selects it) and skips where no
GPU is present; on a GPU it fails loudly when the CUDA kernels are missing.
The checks run with TF32 off (:func:`no_tf32`): they measure the kernels'
float32 arithmetic, not cuDNN's reduced-precision mode.
"""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Optional

import pytest
import torch

from dip import _extension

#: Relative tolerance by dtype: max |fused − reference| ≤ tol · max(|reference|, floor).
TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}

CUDA_PRESENT = torch.cuda.is_available()

#: The devices every check runs on.
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not CUDA_PRESENT, reason="no CUDA device")]),
]

LAYOUTS = ("contiguous", "channels_last", "strided", "transposed")


@dataclass
class Sample:
    """One call of an operator: ``args`` (the first ``n_tensors`` are differentiable tensors) and a label."""

    args: tuple
    n_tensors: int = 1
    label: str = ""

    def tensors(self) -> tuple:
        return self.args[: self.n_tensors]

    def with_tensors(self, tensors) -> tuple:
        return (*tensors, *self.args[self.n_tensors:])


@dataclass
class OpSpec:
    """What the shared checks need to know about one fused operator."""

    name: str  # "dip::lanczos_downsample"
    fused: Callable  # calls the compiled operator on a sample's args
    reference: Callable  # the pure-PyTorch reference, same args
    public: Callable  # the dispatching public function, same args
    samples: Callable[[str, torch.dtype, torch.Generator], Iterable[Sample]]
    dtypes: dict = field(default_factory=dict)  # device type -> dtypes with kernels
    scriptable: Optional[Callable[[], torch.nn.Module]] = None  # a module calling ``public``, for TorchScript
    opcheck_ops: tuple = ()  # (OpOverload, args builder from a Sample) pairs for opcheck
    tol: dict = field(default_factory=lambda: dict(TOL))
    floor: float = 1e-30  # smallest reference magnitude the tolerance scales with

    def has_kernel(self, device: str) -> bool:
        return _extension.has_op(self.name.split("::")[1]) and torch._C._dispatch_has_kernel_for_dispatch_key(
            self.name, "CUDA" if device == "cuda" else "CPU")

    def require(self, device: str) -> None:
        """Skip without the compiled op; on a GPU machine, fail when its CUDA kernel is missing."""
        if not _extension.has_ops():
            pytest.skip(f"dip._C is not built or disabled: {_extension.build_info()}")
        if not self.has_kernel(device):
            if device == "cuda":
                pytest.fail(f"a GPU is present but {self.name} has no CUDA kernel: {_extension.build_info()}")
            pytest.skip(f"{self.name} has no {device} kernel")


def dtypes_for(spec: OpSpec) -> list:
    """(device, dtype) parameters for every device and the dtypes its kernels take."""
    params = []
    for device in DEVICES:
        name = device if isinstance(device, str) else device.values[0]
        marks = () if isinstance(device, str) else device.marks
        for dtype in spec.dtypes.get(name, ()):
            params.append(pytest.param(name, dtype, marks=marks, id=f"{name}-{str(dtype).replace('torch.', '')}"))
    return params


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str = "",
                     floor: float = 1e-30) -> None:
    """max |actual − expected| ≤ tol · max(|expected|, floor), compared in float64 on the CPU."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert torch.isfinite(a).all(), f"{what}: non-finite values"
    err = (a - e).abs().max().item() if a.numel() else 0.0
    scale = max(e.abs().max().item() if e.numel() else 0.0, floor)
    assert err <= tol * scale, f"{what}: max error {err:.3e} > {tol:.0e} × {scale:.3e}"


def in_layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """``x`` (N×C×H×W) with the same values in another memory layout (not contiguous except for 'contiguous')."""
    if layout == "contiguous":
        return x.contiguous()
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "strided":  # every other column of a wider tensor
        wide = torch.empty(*x.shape[:3], 2 * x.shape[3], dtype=x.dtype, device=x.device)
        wide[..., ::2] = x
        return wide[..., ::2]
    if layout == "transposed":  # H and W swapped in storage
        return x.transpose(2, 3).contiguous().transpose(2, 3)
    raise ValueError(layout)


def _cast(sample: Sample, device: str, dtype: torch.dtype, layout: str = "contiguous") -> tuple:
    tensors = tuple(in_layout(t.to(device=device, dtype=dtype), layout) if t.dim() == 4 else t.to(device, dtype)
                    for t in sample.tensors())
    return sample.with_tensors(tensors)


@contextlib.contextmanager
def no_tf32():
    """float32 matmuls and convolutions in full float32 (cuDNN's default TF32 rounds to 10 bits)."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


@no_tf32()
def check_against_reference(spec: OpSpec, device: str, dtype: torch.dtype, layouts=("contiguous",),
                            seed: int = 0) -> None:
    """Fused op vs reference: outputs and gradients of every sample, inputs in each layout.

    Inputs are drawn in float64 and cast, and the reference runs in float64 on
    the CPU, so the error measured is the fused kernel's alone.
    """
    spec.require(device)
    gen = torch.Generator().manual_seed(seed)
    tol = spec.tol[dtype]
    for sample in spec.samples(device, dtype, gen):
        ref_args = _cast(sample, "cpu", torch.float64)
        ref_in = [t.clone().requires_grad_() for t in ref_args[: sample.n_tensors]]
        expected = spec.reference(*sample.with_tensors(ref_in))
        grad = torch.randn(expected.shape, generator=gen, dtype=torch.float64)
        expected_grads = torch.autograd.grad(expected, ref_in, grad)
        for layout in layouts:
            args = _cast(sample, device, dtype, layout)
            ins = [t.detach().clone() if layout == "contiguous" else t.detach() for t in args[: sample.n_tensors]]
            ins = [t.requires_grad_() for t in ins]
            out = spec.fused(*sample.with_tensors(ins))
            what = f"{spec.name} {sample.label} {device} {dtype} {layout}"
            assert out.dtype == dtype and out.device.type == device, what
            assert_rel_close(out, expected, tol, f"{what} output", spec.floor)
            grads = torch.autograd.grad(out, ins, grad.to(device=device, dtype=dtype))
            for i, (g, e) in enumerate(zip(grads, expected_grads)):
                assert_rel_close(g, e, tol, f"{what} grad {i}", spec.floor)


@no_tf32()
def check_autocast(spec: OpSpec, device: str, dtype: torch.dtype = torch.bfloat16, layouts=LAYOUTS,
                   seed: int = 0) -> None:
    """Fused op vs reference with float32 inputs, both run under ``torch.autocast(device, dtype)``.

    Each side computes in what autocast and its own rules give (the fused op
    may keep some steps in float32): outputs must be float32 or ``dtype``,
    input gradients float32, and both within ``dtype``'s tolerance of the
    reference's.
    """
    spec.require(device)
    gen = torch.Generator().manual_seed(seed)
    tol = spec.tol[dtype]
    for sample in spec.samples(device, torch.float32, gen):
        ref_in = [t.detach().clone().requires_grad_() for t in _cast(sample, device, torch.float32)[: sample.n_tensors]]
        with torch.autocast(device, dtype=dtype):
            expected = spec.reference(*sample.with_tensors(ref_in))
        grad = torch.randn(expected.shape, generator=gen, dtype=torch.float64).to(device)
        expected_grads = torch.autograd.grad(expected, ref_in, grad.to(expected.dtype))
        for layout in layouts:
            args = _cast(sample, device, torch.float32, layout)
            ins = [t.detach().clone() if layout == "contiguous" else t.detach() for t in args[: sample.n_tensors]]
            ins = [t.requires_grad_() for t in ins]
            with torch.autocast(device, dtype=dtype):
                out = spec.fused(*sample.with_tensors(ins))
            what = f"{spec.name} {sample.label} {device} autocast {dtype} {layout}"
            assert out.dtype in (torch.float32, dtype), f"{what}: output dtype {out.dtype}"
            assert_rel_close(out, expected, tol, f"{what} output", spec.floor)
            grads = torch.autograd.grad(out, ins, grad.to(out.dtype))
            for i, (g, e) in enumerate(zip(grads, expected_grads)):
                assert g.dtype == torch.float32, f"{what} grad {i}: dtype {g.dtype}"
                assert_rel_close(g, e, tol, f"{what} grad {i}", spec.floor)


@no_tf32()
def check_gradcheck(spec: OpSpec, device: str, max_samples: int = 2) -> None:
    """gradcheck and gradgradcheck in float64 on the eager fused op and on the scripted public function."""
    spec.require(device)
    gen = torch.Generator().manual_seed(1)
    functions = [("eager", spec.fused)]
    if spec.scriptable is not None:
        scripted = torch.jit.script(spec.scriptable())
        functions.append(("scripted", lambda *args: scripted(*args)))
    for sample in list(spec.samples(device, torch.float64, gen))[:max_samples]:
        args = _cast(sample, device, torch.float64)
        for kind, fn in functions:
            ins = tuple(t.detach().clone().requires_grad_() for t in args[: sample.n_tensors])

            def call(*tensors, fn=fn, sample=sample):
                return fn(*sample.with_tensors(tensors))

            assert torch.autograd.gradcheck(call, ins), f"{kind} {sample.label}"
            assert torch.autograd.gradgradcheck(call, ins), f"{kind} {sample.label}"


def check_opcheck(spec: OpSpec, device: str, dtype: torch.dtype = torch.float64, max_samples: int = 1) -> None:
    """``torch.library.opcheck`` (schema, fake tensor, autograd registration) on each registered op."""
    spec.require(device)
    gen = torch.Generator().manual_seed(2)
    for sample in list(spec.samples(device, dtype, gen))[:max_samples]:
        args = _cast(sample, device, dtype)
        for op, build in spec.opcheck_ops:
            for requires_grad in (False, True):
                tensors = tuple(t.detach().clone().requires_grad_(requires_grad) for t in args[: sample.n_tensors])
                torch.library.opcheck(op, build(sample.with_tensors(tensors)))


@no_tf32()
def check_compile(spec: OpSpec, device: str, dtype: torch.dtype = torch.float64,
                  autocast: Optional[torch.dtype] = None) -> None:
    """``torch.compile(fullgraph=True)`` of the public function (aot_eager traces both directions) vs eager.

    With ``autocast``, the function runs under ``torch.autocast(device, autocast)`` (inside the compiled region).
    """
    spec.require(device)
    gen = torch.Generator().manual_seed(3)
    sample = next(iter(spec.samples(device, dtype, gen)))
    args = _cast(sample, device, dtype)

    def fn(*tensors):
        with torch.autocast(device, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            out = spec.public(*sample.with_tensors(tuple(t * 2.0 for t in tensors)))
        return out.float().square().sum() if autocast else out.square().sum()

    ins = tuple(t.detach().clone().requires_grad_() for t in args[: sample.n_tensors])
    expected = fn(*ins)
    expected_grads = torch.autograd.grad(expected, ins)
    torch._dynamo.reset()
    out = torch.compile(fn, backend="aot_eager", fullgraph=True)(*ins)
    grads = torch.autograd.grad(out, ins)
    assert_rel_close(out, expected, 1e-12, "compiled output")
    for g, e in zip(grads, expected_grads):
        assert_rel_close(g, e, 1e-12, "compiled grad")


def run_isolated(code: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter on this checkout (a crash there fails the test, not the run)."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    path = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": path})


def check_fake_rejects(op, cases) -> None:
    """Each ``(args, error, pattern)`` of ``cases``: the compiled ``op`` and its fake kernel (the tensors made fake
    under ``FakeTensorMode``, as torch.compile and torch.export trace) both raise ``error`` matching ``pattern``."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    for args, error, pattern in cases:
        with pytest.raises(error, match=pattern):
            op(*args)
        mode = FakeTensorMode()
        fake = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        with mode, pytest.raises(error, match=pattern):
            op(*fake)
