"""Lanczos downsampling, forward + backward (gradient wrt the input), issue 3; CPU, or the GPU with --device cuda.

Three implementations of the same operator, measured in one run and grouped
per case so their ratios read directly:

* ``fused``   – ``torch.ops.dip.lanczos_downsample`` and its backward op;
* ``grouped`` – the pure-PyTorch reference (replicate pad, separable
  depthwise convolutions), ``dip.ops.lanczos.lanczos_downsample_reference``;
* ``dense``   – the original Deep Image Prior formulation: a replicate-pad copy,
  then a dense C→C ``conv2d`` with the 2-D taps on the diagonal, stride = factor
  (its weight does not require grad).

Threads: ``torch.set_num_threads(DIP_BENCH_THREADS)``, 2 unless set. Timings
are medians of ``ROUNDS`` rounds after warm-up; a ratio summary (median of
dense or grouped over median of fused, targets ≥ 10× and ≥ 3×) is printed at
the end. Run::

    DIP_BENCH_THREADS=1 python -m pytest benchmarks/test_lanczos_bench.py
    python -m pytest benchmarks/test_lanczos_bench.py --device cuda
"""
import os

import pytest
import torch
import torch.nn.functional as F
from bench_settings import THREADS, device, timed

from dip import _extension
from dip.ops.lanczos import lanczos_downsample, lanczos_downsample_reference, lanczos_taps, padding

ROUNDS = int(os.environ.get("DIP_BENCH_ROUNDS", "20"))
SUPPORT = 2
CASES = {
    "1x3x1024x1024 x4": ((1, 3, 1024, 1024), 4),
    "1x3x512x512 x8": ((1, 3, 512, 512), 8),
}
TARGETS = {"dense": 10.0, "grouped": 3.0}  # minimum speed-up of fused over each

_medians = {}


def _dense_original(factor, channels, dtype, dev="cpu"):
    taps = lanczos_taps(factor, SUPPORT, dtype=dtype)
    weight = torch.zeros(channels, channels, taps.numel(), taps.numel(), dtype=dtype)
    for c in range(channels):
        weight[c, c] = torch.outer(taps, taps)
    weight = weight.to(dev)
    before, after = padding(factor, SUPPORT)

    def run(x, factor, support):
        return F.conv2d(F.pad(x, (before, after, before, after), mode="replicate"), weight, stride=factor)

    return run


def _fused(x, factor, support):
    return lanczos_downsample(x, factor, support)


@pytest.fixture(scope="module", autouse=True)
def threads_and_summary(request):
    previous = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(previous)
    if not _medians:
        return
    lines = [f"Lanczos fwd+bwd on {device()}, torch {torch.__version__}, {THREADS} thread(s): medians and speed-ups"]
    for case in CASES:
        times = {impl: _medians.get((case, impl)) for impl in ("fused", "grouped", "dense")}
        line = f"  {case}: " + ", ".join(f"{impl} {t * 1e3:.2f} ms" for impl, t in times.items() if t is not None)
        if times["fused"]:
            for other, target in TARGETS.items():
                if times[other]:
                    ratio = times[other] / times["fused"]
                    verdict = "meets" if ratio >= target else "MISSES"
                    line += f"; {other}/fused {ratio:.1f}x ({verdict} >= {target:.0f}x)"
        lines.append(line)
    # Fixture teardown output is captured; write past the capture to the terminal.
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():
        print("\n" + "\n".join(lines))


@pytest.mark.parametrize("impl", ["fused", "grouped", "dense"])
@pytest.mark.parametrize("case", list(CASES))
def test_lanczos_forward_backward(benchmark, case, impl):
    shape, factor = CASES[case]
    dev = device()
    if dev == "cuda" and not torch.cuda.is_available():
        pytest.skip("--device cuda without a CUDA device")
    if impl == "fused" and not _extension.has_op("lanczos_downsample"):
        pytest.skip(f"dip._C is not built or disabled: {_extension.build_info()}")
    fn = {
        "fused": _fused,
        "grouped": lanczos_downsample_reference,
        "dense": _dense_original(factor, shape[1], torch.float32, dev),
    }[impl]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen).to(dev).requires_grad_()
    grad_out = torch.randn(shape[0], shape[1], shape[2] // factor, shape[3] // factor, generator=gen).to(dev)

    def step():
        x.grad = None
        fn(x, factor, SUPPORT).backward(grad_out)

    benchmark.group = f"lanczos fwd+bwd {case}, {dev}, {THREADS} thread(s)"
    benchmark.extra_info.update(threads=THREADS, torch=torch.__version__, impl=impl, device=dev)
    benchmark.pedantic(timed(step, dev), rounds=ROUNDS, iterations=1, warmup_rounds=3)
    assert x.grad is not None and x.grad.shape == x.shape
    if benchmark.stats is not None:  # None under --benchmark-disable
        _medians[(case, impl)] = benchmark.stats.stats.median
