"""One Deep Image Prior fitting iteration (forward, MSE, backward, Adam step) of the denoise net.

Run: ``pytest benchmarks/test_fit_iteration.py --benchmark-only`` (add ``--large`` for 512²).
"""
import pytest
import torch

from dip.nn import build_network

SIZES = [64, 128, 256, pytest.param(512, marks=pytest.mark.large)]


def make_step(size: int, device: str = "cpu"):
    """A closure running one fitting iteration of the `denoise` preset at size×size."""
    torch.manual_seed(0)
    net = build_network("denoise").to(device)
    z = (torch.rand(1, 32, size, size, device=device) * 0.1)
    target = torch.rand(1, 3, size, size, device=device)
    opt = torch.optim.Adam(net.parameters(), lr=0.01)

    def step():
        opt.zero_grad(set_to_none=True)
        out = net(z + torch.randn_like(z) / 30)
        loss = torch.mean((out - target) ** 2)
        loss.backward()
        opt.step()
        if device != "cpu":
            torch.cuda.synchronize()
        return loss

    return step


@pytest.mark.parametrize("size", SIZES)
def test_iteration_cpu(benchmark, size):
    benchmark.group = f"fit iteration {size}x{size}"
    step = make_step(size)
    for _ in range(2):  # warm-up: allocator, oneDNN primitive caches
        step()
    rounds = {64: 20, 128: 10, 256: 5, 512: 3}[size]
    benchmark.pedantic(step, rounds=rounds, iterations=1)
    benchmark.extra_info["threads"] = torch.get_num_threads()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
@pytest.mark.parametrize("size", [256, 512])
def test_iteration_cuda(benchmark, size):
    benchmark.group = f"fit iteration {size}x{size} cuda"
    step = make_step(size, "cuda")
    for _ in range(5):
        step()
    benchmark.pedantic(step, rounds=20, iterations=1)
