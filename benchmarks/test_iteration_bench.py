"""One DIP fitting iteration of the ``denoise`` net: fused vs pure eager vs torch.compile(pure).

An iteration is forward, MSE against a fixed target, backward and an Adam
step, on a 32-channel noise input with 3 outputs, ``DIP_BENCH_THREADS``
threads (default 2), float32, on the CPU or (``--device cuda``) the GPU, where
the timed call ends with ``torch.cuda.synchronize()``.
``benchmarks/iteration_interleaved.py`` runs the fused and eager paths
alternately in one process, for ratios on a shared machine.

    pytest benchmarks/ --benchmark-only                       # 64², 128², 256²; fused and eager
    DIP_BENCH_LARGE=1 pytest benchmarks/ --benchmark-only     # adds 512²
    DIP_BENCH_COMPILE=1 pytest benchmarks/ --benchmark-only   # adds torch.compile of the pure net (~100 s compile each)
    DIP_BENCH_MEMORY=1 pytest benchmarks/ --benchmark-only    # adds peak-memory runs

Peak memory is measured in a fresh subprocess per path and size: the
process's peak RSS (``VmHWM`` in ``/proc/self/status``) after two
iterations, minus its RSS once the net, input and optimiser exist, i.e.
what one iteration adds (activations saved for backward, gradients, Adam
state, workspace). The figure is attached to the benchmark's ``extra_info``.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from bench_settings import THREADS, device, heap_policy, timed

from dip._extension import has_op
from dip.nn import build_network
from dip.pipeline import lay_out_ensemble

SIZES = [64, 128, 256] + ([512] if os.environ.get("DIP_BENCH_LARGE") else [])
PATHS = ["fused", "eager"] + (["compile"] if os.environ.get("DIP_BENCH_COMPILE") else [])


def make_step(path: str, size: int, seed: int = 0, dev: str = "cpu", precision: str = "float32", members: int = 1):
    """A closure running one fitting iteration of the denoise net on the given path and device.

    ``precision="bfloat16"`` runs the forward under bf16 autocast, as a fit with that precision does
    (float32 weights, loss and Adam). ``members=K`` fits a seed ensemble of K as one grouped network,
    channels_last on the CPU as ``restore(ensemble=K)`` runs it.
    """
    torch.manual_seed(seed)
    net = build_network("denoise", fused=None if path == "fused" else False, members=members).to(dev)
    g = torch.Generator().manual_seed(seed)
    z = torch.rand(1, 32 * members, size, size, generator=g).to(dev)
    target = torch.rand(members, 3, size, size, generator=g).to(dev)
    if members > 1:
        net, z = lay_out_ensemble(net, z, torch.device(dev))
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    model = torch.compile(net, fullgraph=True) if path == "compile" else net

    bf16 = precision == "bfloat16"

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(torch.device(dev).type, dtype=torch.bfloat16, enabled=bf16):
            out = model(z)
        loss = F.mse_loss(out.float(), target)
        loss.backward()
        opt.step()
        return loss

    return step


def _status_mib(field: str = "VmRSS") -> float:
    """A memory field of /proc/self/status in MiB (VmRSS: now; VmHWM: this process image's peak)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_memory_child(path: str, size: int, members: int = 1) -> dict:
    """Run in a subprocess: one warm-up and one timed iteration; report peak RSS growth in MiB."""
    torch.set_num_threads(THREADS)
    step = make_step(path, size, members=members)
    base = _status_mib("VmRSS")
    with heap_policy():
        step()
        step()
    # VmHWM, not ru_maxrss: Linux carries the parent's peak RSS across fork + exec into ru_maxrss, so a child
    # started by a big benchmark process would report the parent's peak for every path.
    peak = _status_mib("VmHWM")
    return {"path": path, "size": size, "members": members, "base_mib": base, "peak_mib": peak,
            "iteration_mib": peak - base}


def measure_peak_memory(path: str, size: int, members: int = 1) -> dict:
    """Peak-memory figures of one path, size and ensemble size, from a fresh Python process."""
    code = (
        f"import json, sys; sys.path.insert(0, {os.getcwd()!r}); sys.path.insert(0, {os.path.dirname(__file__)!r})\n"
        "from test_iteration_bench import peak_memory_child\n"
        f"print(json.dumps(peak_memory_child({path!r}, {size:d}, {members:d})))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(autouse=True)
def _threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(previous)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("path", PATHS)
def test_fit_iteration(benchmark, path, size):
    dev = device()
    if path == "fused" and not has_op("conv_block"):
        pytest.skip("compiled dip ops not loaded (python setup.py build_ext --inplace)")
    if dev == "cuda" and not torch.cuda.is_available():
        pytest.skip("--device cuda without a CUDA device")
    benchmark.group = f"denoise iteration {size}x{size} {dev}"
    step = timed(make_step(path, size, dev=dev), dev)
    step()  # warm-up (and compilation for torch.compile)
    rounds = (3 if size >= 256 else 10) if dev == "cpu" else 20
    benchmark.pedantic(step, rounds=rounds, iterations=1, warmup_rounds=1)
    benchmark.extra_info.update(threads=THREADS, torch=torch.__version__, path=path, size=size, device=dev)
    if os.environ.get("DIP_BENCH_MEMORY") and dev == "cpu":
        benchmark.extra_info.update(measure_peak_memory(path, size))
