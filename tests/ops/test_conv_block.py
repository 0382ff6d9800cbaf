"""The fused conv block against its pure-PyTorch reference (``dip.nn.ConvBlock``).

Tolerances: float64 1e-9, float32 1e-4, relative to the reference's largest
magnitude (or to 1 when that is smaller, so that quantities which are zero
in exact arithmetic, like the conv-bias gradient under batch statistics,
are compared absolutely).
"""
from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from dip._extension import has_op
from dip.nn import ConvBlock, FusedConvBlock, active_path, build_network
from dip.ops.conv_block import conv_block

requires_ops = pytest.mark.skipif(
    not has_op("conv_block"),
    reason="compiled dip ops not loaded (run `python setup.py build_ext --inplace`; unset DIP_DISABLE_EXTENSION)",
)
pytestmark = requires_ops

TOL = {torch.float64: 1e-9, torch.float32: 1e-4}


def _cuda_ready() -> bool:
    return (
        torch.cuda.is_available()
        and has_op("conv_block")
        and torch._C._dispatch_has_kernel_for_dispatch_key("dip::conv_block", "CUDA")
    )


DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not _cuda_ready(), reason="needs a GPU and the CUDA kernels")),
]

# (in, out, k, stride, N, H, W, pad, bias): every k, stride, channel count,
# batch size and padding mode appears, on odd sizes.
CASES = [
    (3, 4, 3, 1, 1, 9, 7, "reflection", True),
    (4, 32, 3, 2, 2, 11, 9, "reflection", True),
    (32, 4, 1, 1, 2, 7, 9, "reflection", True),
    (4, 128, 5, 1, 1, 9, 11, "reflection", False),
    (128, 32, 5, 2, 2, 9, 7, "reflection", True),
    (32, 128, 1, 1, 1, 5, 7, "zero", False),
    (3, 32, 3, 2, 2, 7, 9, "zero", True),
    (128, 3, 3, 1, 2, 7, 5, "reflection", False),
    (4, 4, 1, 2, 1, 9, 9, "reflection", True),
    (32, 32, 5, 1, 2, 5, 7, "zero", True),
]


def _close(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str) -> None:
    scale = max(expected.abs().max().item(), 1.0)
    err = (actual.to(expected.dtype) - expected).abs().max().item()
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol:.1g} x {scale:.3g}"


def _pair(case, dtype, device, seed=0):
    cin, cout, k, stride, _, _, _, pad, bias = case
    torch.manual_seed(seed)
    ref = ConvBlock(cin, cout, k, stride, bias=bias, pad=pad).to(device, dtype)
    with torch.no_grad():  # non-trivial affine parameters and running stats
        ref.bn.weight.uniform_(0.5, 1.5)
        ref.bn.bias.uniform_(-0.5, 0.5)
        ref.bn.running_mean.uniform_(-0.5, 0.5)
        ref.bn.running_var.uniform_(0.5, 2.0)
    fused = FusedConvBlock(cin, cout, k, stride, bias=bias, pad=pad).to(device, dtype)
    fused.load_state_dict(ref.state_dict())
    return ref, fused


def _input(case, dtype, device, contiguous=True):
    cin, _, _, _, n, h, w, _, _ = case
    if contiguous:
        return torch.randn(n, cin, h, w, dtype=dtype, device=device)
    # Non-contiguous: a transposed view of a larger tensor, every other column.
    base = torch.randn(n, cin, 2 * w, h, dtype=dtype, device=device)
    return base.transpose(2, 3)[:, :, :, ::2]


def _check_block(case, dtype, device, contiguous=True, training=True, steps=2):
    tol = TOL[dtype]
    ref, fused = _pair(case, dtype, device)
    ref.train(training)
    fused.train(training)
    for step in range(steps):
        x = _input(case, dtype, device, contiguous)
        x_ref = x.detach().clone().requires_grad_()
        x_fus = x.detach().clone().requires_grad_()
        out_ref, out_fus = ref(x_ref), fused(x_fus)
        _close(out_fus, out_ref, tol, f"output (step {step})")
        grad = torch.randn_like(out_ref)
        out_ref.backward(grad)
        out_fus.backward(grad)
        _close(x_fus.grad, x_ref.grad, tol, "grad input")
        for (name, p_ref), p_fus in zip(ref.named_parameters(), fused.parameters()):
            _close(p_fus.grad, p_ref.grad, tol, f"grad {name}")
        for (name, b_ref), b_fus in zip(ref.named_buffers(), fused.buffers()):
            if b_ref.is_floating_point():
                _close(b_fus, b_ref, tol, f"buffer {name}")
            else:
                assert torch.equal(b_fus, b_ref), name


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "{}-{}-k{}-s{}-n{}-{}x{}-{}-{}".format(*c[:8], "b" if c[8] else "nob"))
def test_block_matches_reference(case, dtype, device):
    _check_block(case, dtype, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("case", [CASES[1], CASES[2], CASES[4]], ids=["k3s2", "k1", "k5s2"])
def test_non_contiguous_input(case, dtype, device):
    _check_block(case, dtype, device, contiguous=False, steps=1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", [CASES[0], CASES[4], CASES[5]], ids=["k3", "k5s2", "zero-k1"])
def test_eval_mode_uses_running_stats(case, device):
    _check_block(case, torch.float64, device, training=False, steps=1)


@pytest.mark.parametrize("device", DEVICES)
def test_cumulative_average_when_momentum_is_none(device):
    case = CASES[1]
    ref, fused = _pair(case, torch.float64, device)
    ref.bn.momentum = fused.bn.momentum = None
    for _ in range(3):
        x = _input(case, torch.float64, device)
        ref(x)
        fused(x)
    _close(fused.bn.running_mean, ref.bn.running_mean, 1e-9, "running_mean")
    _close(fused.bn.running_var, ref.bn.running_var, 1e-9, "running_var")
    assert fused.bn.num_batches_tracked.item() == ref.bn.num_batches_tracked.item() == 3


def _op_args(dtype, k=3, stride=1, reflect=True, bias=True, training=True, cin=3, cout=4, device="cpu"):
    g = torch.Generator().manual_seed(1)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype).to(device)

    x = r(2, cin, 7, 5)
    return (
        x, r(cout, cin, k, k), r(cout) if bias else None, r(cout).abs() + 0.5, r(cout),
        r(cout), r(cout).abs() + 0.5, training, stride, (k - 1) // 2, reflect, 1e-5, 0.2,
    )


GRAD_CASES = [(3, 1, True, True), (3, 2, True, False), (1, 1, True, True), (5, 2, False, True), (3, 1, True, "eval")]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("k,stride,reflect,mode", GRAD_CASES)
def test_gradcheck(k, stride, reflect, mode, device):
    training = mode != "eval"
    args = list(_op_args(torch.float64, k, stride, reflect, training=training, device=device))
    for i in (0, 1, 2, 3, 4):
        args[i] = args[i].requires_grad_()

    def f(x, w, b, gamma, beta):
        return torch.ops.dip.conv_block(x, w, b, gamma, beta, *args[5:])[0]

    # The CUDA kernels sum the batch statistics with atomics, so two backward passes may differ in the
    # last bits (seen on an H200: "Backward is not reentrant"); deterministic mode routes to the reference.
    nondet_tol = 1e-10 if device == "cuda" else 0.0
    assert torch.autograd.gradcheck(f, tuple(args[:5]), nondet_tol=nondet_tol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("k,stride,reflect,mode", GRAD_CASES)
def test_opcheck(k, stride, reflect, mode, device):
    training = mode != "eval"
    args = list(_op_args(torch.float32, k, stride, reflect, bias=k != 1, training=training, device=device))
    torch.library.opcheck(torch.ops.dip.conv_block.default, tuple(args))
    for i in (0, 1, 3, 4):
        args[i] = args[i].requires_grad_()
    torch.library.opcheck(torch.ops.dip.conv_block.default, tuple(args))
    out, y, mean, var = torch.ops.dip.conv_block(*args)
    grad = torch.randn_like(out)
    x, w, _, gamma, beta = (a.detach() if a is not None else None for a in args[:5])
    for need_x in (True, False):
        back = (grad, x, w, y.detach(), mean.detach(), var.detach(), gamma, beta, training, stride, (k - 1) // 2,
                reflect, 1e-5, 0.2, need_x)
        torch.library.opcheck(torch.ops.dip.conv_block_backward.default, back)


def test_op_rejects_bad_arguments():
    args = list(_op_args(torch.float32))
    with pytest.raises(RuntimeError, match="padding"):
        torch.ops.dip.conv_block(*args[:9], 0, *args[10:])
    bad = list(args)
    bad[0] = bad[0][:, :, :1, :1]  # reflection padding wider than the image
    with pytest.raises(RuntimeError, match="reflection padding"):
        torch.ops.dip.conv_block(*bad)


def _small_nets(dtype, device="cpu"):
    opts = dict(in_channels=4, channels_down=(8, 16), channels_up=(8, 16), channels_skip=(4, 4))
    torch.manual_seed(0)
    fused = build_network("small", **opts).to(device, dtype)
    torch.manual_seed(0)
    pure = build_network("small", fused=False, **opts).to(device, dtype)
    return fused, pure


def test_nets_share_parameters_and_names():
    fused, pure = _small_nets(torch.float32)
    assert any(isinstance(m, FusedConvBlock) for m in fused.modules())
    assert not any(isinstance(m, FusedConvBlock) for m in pure.modules())
    assert list(fused.state_dict()) == list(pure.state_dict())
    for (name, a), b in zip(fused.state_dict().items(), pure.state_dict().values()):
        assert torch.equal(a, b), name
    pure.load_state_dict(fused.state_dict())


def test_active_path():
    assert active_path().startswith("fused C++")


def test_options_outside_the_fused_op_fall_back():
    net = build_network("small", act="Swish", downsample="avg")
    assert not any(isinstance(m, FusedConvBlock) for m in net.modules())


# Fitting iterations compared per dtype. In float32 the 30-step trajectory is
# chaotic at the 1e-3 level whatever the implementation: the pure net alone,
# run in NCHW and in channels_last, ends 1e-3 apart after 30 Adam steps and
# both are ~8 % off the float64 trajectory. So the 30-step 1e-4 check is made
# in float64, where rounding does not feed the chaos; float32 is held to 1e-4
# over the first 10 steps.
FIT_STEPS = {torch.float64: 30, torch.float32: 10}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_whole_net_output_and_fit(dtype, device):
    fused, pure = _small_nets(dtype, device)
    g = torch.Generator().manual_seed(0)
    z = torch.rand(1, 4, 29, 27, generator=g, dtype=dtype).to(device)
    target = torch.rand(1, 3, 29, 27, generator=g, dtype=dtype).to(device)
    _close(fused(z), pure(z), TOL[dtype], "net output")
    losses = {}
    for name, net in (("fused", fused), ("pure", pure)):
        opt = torch.optim.Adam(net.parameters(), lr=0.01)
        for _ in range(FIT_STEPS[dtype]):
            opt.zero_grad(set_to_none=True)
            loss = F.mse_loss(net(z), target)
            loss.backward()
            opt.step()
        losses[name] = loss.item()
    assert abs(losses["fused"] - losses["pure"]) <= 1e-4 * abs(losses["pure"]), losses


def test_torchscript_of_fused_net():
    fused, pure = _small_nets(torch.float64)
    scripted = torch.jit.script(fused)
    z = torch.rand(2, 4, 17, 19, dtype=torch.float64)
    out, expected = scripted(z), pure(z)
    _close(out, expected, 1e-9, "scripted output")
    out.sum().backward()
    expected.sum().backward()
    for (name, a), b in zip(fused.named_parameters(), pure.parameters()):
        _close(a.grad, b.grad, 1e-9, f"scripted grad {name}")
    _close(fused.body.down[0].bn.running_mean, pure.body.down[0].bn.running_mean, 1e-9, "scripted running_mean")


def test_torch_compile_fullgraph_of_fused_net():
    fused, pure = _small_nets(torch.float32)
    reference = copy.deepcopy(fused)
    compiled = torch.compile(fused, fullgraph=True)
    z = torch.rand(1, 4, 16, 16)
    out, expected = compiled(z), reference(z)
    _close(out, expected, 1e-4, "compiled output")
    out.sum().backward()
    expected.sum().backward()
    for (name, a), b in zip(fused.named_parameters(), reference.parameters()):
        _close(a.grad, b.grad, 1e-4, f"compiled grad {name}")


def test_disabled_extension_builds_the_pure_net():
    code = (
        "from dip.nn import active_path, build_network, FusedConvBlock\n"
        "net = build_network('small')\n"
        "assert not any(isinstance(m, FusedConvBlock) for m in net.modules())\n"
        "print(active_path())\n"
    )
    env = dict(os.environ, DIP_DISABLE_EXTENSION="1")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=os.getcwd())
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "pure PyTorch"


def test_functional_falls_back_without_kernel():
    """bfloat16 has no compiled kernel: conv_block must run the reference and still give the right shape."""
    dtype = torch.bfloat16
    x = torch.randn(1, 3, 7, 7, dtype=dtype)
    args = (x, torch.randn(4, 3, 3, 3, dtype=dtype), None, torch.ones(4, dtype=dtype), torch.zeros(4, dtype=dtype),
            None, None, None, True, 0.1, 1e-5, 1, 1, True, 0.2)
    assert conv_block(*args).shape == (1, 4, 7, 7)


def test_backward_materialises_no_gradient_for_the_conv_output():
    """Only ``out`` is differentiated: autograd must not zero-fill a full-size gradient for ``y`` (a regression)."""
    block = FusedConvBlock(8, 16, 3)
    x = torch.randn(1, 8, 32, 32, requires_grad=True)
    out = block(x)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        out.sum().backward()
    fills = [e.name for e in prof.events() if e.name in ("aten::zeros", "aten::zero_", "aten::fill_")
             and e.input_shapes and list(e.input_shapes[0]) == list(out.shape)]
    assert not fills, fills


def test_fused_net_uses_fused_upsampling_and_a_gemm_head():
    """The fused net's upsampling and 1×1 head run without NCHW copies and match the pure net."""
    from dip.ops.upsample import UpsampleBilinear2x

    fused, pure = _small_nets(torch.float64)
    assert any(isinstance(m, UpsampleBilinear2x) for m in fused.modules())
    assert not any(isinstance(m, UpsampleBilinear2x) for m in pure.modules())
    assert list(fused.state_dict()) == list(pure.state_dict())
    z = torch.rand(1, 4, 24, 24, dtype=torch.float64)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        out = fused(z)
        out.sum().backward()
    names = {e.name for e in prof.events()}
    assert "aten::upsample_bilinear2d" not in names and "aten::upsample_bilinear2d_backward" not in names
    head_shape = list(fused.head.weight.shape)
    head_convs = [e.name for e in prof.events() if "conv" in e.name and e.input_shapes
                  and any(list(s) == head_shape for s in e.input_shapes)]
    assert not head_convs, head_convs
    _close(out, pure(z), 1e-9, "net output")



def test_fused_net_under_cpu_bfloat16_autocast():
    """Issue 13: under CPU bf16 autocast the kernel's own ATen convolution returned bf16 into a float32 kernel.

    The fused net must run forward and backward under autocast, give float32 gradients, and stay within
    bf16 accuracy of the float32 net (the pure net under the same autocast is itself ~9 % off in gradient
    norm on this tiny net, so the float32 net is the reference).
    """
    fused, pure = _small_nets(torch.float32)
    z = torch.rand(1, 4, 24, 24, generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fused(z)
    out.float().square().sum().backward()
    expected = pure(z)
    expected.square().sum().backward()
    _close(out.float(), expected, 2e-2, "net output")
    grads = torch.cat([p.grad.flatten() for p in fused.parameters()])
    assert grads.dtype == torch.float32 and torch.isfinite(grads).all()
    reference = torch.cat([p.grad.flatten() for p in pure.parameters()])
    error = ((grads - reference).norm() / reference.norm()).item()
    assert error <= 0.05, f"gradients {error:.3g} off the float32 net's (relative norm)"
