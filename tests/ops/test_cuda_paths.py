"""The fused CUDA path the way a fit uses it: under autocast, captured in a CUDA graph, on a side stream.

GPU only (``cuda`` marker); each test skips where no GPU is present and fails
on a GPU machine whose build has no CUDA kernels.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dip import _extension
from dip.nn import FusedConvBlock, build_network
from dip.ops.lanczos import lanczos_downsample, lanczos_downsample_reference

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]

SMALL = dict(in_channels=4, channels_down=(8, 16), channels_up=(8, 16), channels_skip=(4, 4))


@pytest.fixture(autouse=True)
def _cuda_kernels():
    ok = _extension.has_op("conv_block") and torch._C._dispatch_has_kernel_for_dispatch_key("dip::conv_block", "CUDA")
    assert ok, f"a GPU is present but dip._C has no CUDA kernels: {_extension.build_info()}"


def _nets(**opts):
    torch.manual_seed(0)
    fused = build_network("small", **SMALL, **opts).cuda()
    torch.manual_seed(0)
    pure = build_network("small", fused=False, **SMALL, **opts).cuda()
    assert any(isinstance(m, FusedConvBlock) for m in fused.modules())
    return fused, pure


def test_fused_net_under_bf16_autocast():
    """The fused op runs its ATen calls in its input's dtype: autocast must not turn them into bf16."""
    fused, pure = _nets()
    z = torch.rand(1, 4, 37, 31, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = fused(z)
        expected = pure(z)
    assert out.shape == expected.shape
    out.float().square().mean().backward()
    expected.float().square().mean().backward()
    assert (out.float() - expected.float()).abs().max().item() < 0.1  # bf16 layers on both sides
    for name, p in fused.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def _adam_steps(net, z, target, steps, graph):
    """Losses of ``steps`` fitting iterations after 3 warm-up ones, replayed from one CUDA graph if ``graph``."""
    opt = torch.optim.Adam(net.parameters(), lr=0.01, capturable=True)

    def body():
        loss = F.mse_loss(net(z), target)
        loss.backward()
        opt.step()
        return loss

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            opt.zero_grad(set_to_none=True)
            body()
    torch.cuda.current_stream().wait_stream(side)
    opt.zero_grad(set_to_none=True)
    if not graph:
        losses = []
        for _ in range(steps):
            losses.append(body().item())
            for p in net.parameters():
                p.grad = None
        return losses
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        static_loss = body()
    losses = []
    for _ in range(steps):
        g.replay()
        losses.append(static_loss.item())
    return losses


def test_whole_fused_step_in_a_cuda_graph():
    """Forward, backward and Adam of the fused net captured once and replayed = the same steps run eagerly."""
    g = torch.Generator().manual_seed(0)
    z = torch.rand(1, 4, 33, 29, generator=g).cuda()
    target = torch.rand(1, 3, 33, 29, generator=g).cuda()
    torch.manual_seed(0)
    a = build_network("small", **SMALL).cuda()
    torch.manual_seed(0)
    b = build_network("small", **SMALL).cuda()
    eager = _adam_steps(a, z, target, 5, graph=False)
    replayed = _adam_steps(b, z, target, 5, graph=True)
    assert replayed[-1] < replayed[0]  # the replays really train the net
    for x, y in zip(eager, replayed):
        assert abs(x - y) <= 1e-4 * abs(x), (eager, replayed)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert (p - q).abs().max().item() <= 1e-3 * max(p.abs().max().item(), 1.0), name
    for (name, p), q in zip(a.named_buffers(), b.buffers()):
        if p.is_floating_point():  # the parameters' bound: running statistics drift with them (H200: 1e-4)
            assert (p - q).abs().max().item() <= 1e-3 * max(p.abs().max().item(), 1.0), name
        else:
            assert torch.equal(p, q), name


def test_kernels_run_on_the_current_stream():
    """Work queued on a side stream is ordered with the kernels (they use the current stream, not stream 0)."""
    fused, _ = _nets()
    z = torch.rand(1, 4, 64, 64, device="cuda")
    expected = fused(z).detach()
    x = torch.randn(2, 3, 257, 255, device="cuda", dtype=torch.float64)
    expected_down = lanczos_downsample_reference(x, 4)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        big = torch.randn(4096, 4096, device="cuda")
        for _ in range(4):  # keep the side stream busy, so unordered kernels would read unfinished inputs
            big = big @ big * 1e-3
        z2 = z + big[0, 0] * 0  # produced on the side stream, after the long queue
        out = fused(z2)
        down = lanczos_downsample(x + big[0, 0].double() * 0, 4)
    torch.cuda.current_stream().wait_stream(side)
    torch.testing.assert_close(out.detach(), expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(down, expected_down, rtol=1e-10, atol=1e-10)


def test_lanczos_on_a_second_device_index_if_present():
    if torch.cuda.device_count() < 2:
        pytest.skip("one GPU")
    x = torch.randn(1, 3, 64, 64, device="cuda:1")
    torch.testing.assert_close(lanczos_downsample(x, 2).cpu(), lanczos_downsample_reference(x.cpu(), 2))
