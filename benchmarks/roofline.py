"""How close one fitting iteration of the ``denoise`` net comes to this machine's convolution roofline.

The iteration's work is almost all convolutions, so its time cannot fall below
its FLOPs at the rate of the best convolution it contains: the 132→128 3×3
convolution at full resolution, channels_last, forward and backward (what the
fused path runs). This script counts the iteration's FLOPs
(``torch.utils.flop_counter``), times that convolution, and times the fused and
eager iterations interleaved, all with the same threads and heap policy
(``DIP_BENCH_THREADS``, ``DIP_BENCH_HEAP``). It prints, per size: GFLOP, the
roofline rate, the floor it implies, each path's time and share of the
roofline, and the largest eager/fused ratio any fused path could reach
(eager time ÷ floor).

    DIP_BENCH_THREADS=2 python benchmarks/roofline.py --sizes 256 512 --rounds 5 --json roofline.json
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_settings import announce, heap_policy, write_rows  # noqa: E402
from iteration_interleaved import interleaved  # noqa: E402

from dip.nn import build_network  # noqa: E402


def iteration_flops(size: int) -> float:
    """FLOPs of forward + backward of the eager ``denoise`` net on a 32×size² input (Adam's few are left out)."""
    from torch.utils.flop_counter import FlopCounterMode

    net = build_network("denoise", fused=False)
    z = torch.rand(1, 32, size, size)
    with FlopCounterMode(display=False) as counter:
        F.mse_loss(net(z), torch.rand(1, 3, size, size)).backward()
    return float(counter.get_total_flops())


def conv_rate(size: int, rounds: int) -> float:
    """GFLOP/s of the net's largest convolution (132→128, 3×3, full resolution, channels_last), forward + backward."""
    x = torch.randn(1, 132, size + 2, size + 2).contiguous(memory_format=torch.channels_last).requires_grad_()
    w = torch.randn(128, 132, 3, 3).contiguous(memory_format=torch.channels_last).requires_grad_()
    grad = torch.randn(1, 128, size, size).contiguous(memory_format=torch.channels_last)

    def once():
        torch.autograd.grad(F.conv2d(x, w), (x, w), grad)

    once()
    once()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        once()
        times.append(time.perf_counter() - start)
    return 3 * 2 * 132 * 128 * 9 * size * size / statistics.median(times) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", default=None, help="also write the figures to this file")
    args = ap.parse_args()
    info = announce()
    rows = []
    for size in args.sizes:
        gflop = iteration_flops(size) / 1e9
        with heap_policy():
            rate = conv_rate(size, args.rounds)
            times = interleaved(size, args.rounds)
        floor_ms = gflop / rate * 1e3
        row = {"size": size, "gflop": gflop, "conv_gflops": rate, "floor_ms": floor_ms,
               "fused_ms": times["fused_ms"], "eager_ms": times["eager_ms"], "ratio": times["ratio"],
               "fused_of_roofline": floor_ms / times["fused_ms"], "eager_of_roofline": floor_ms / times["eager_ms"],
               "largest_possible_ratio": times["eager_ms"] / floor_ms, "load": os.getloadavg()[0]}
        print(f"{size}²: {gflop:.1f} GFLOP; roofline {rate:.0f} GFLOP/s → floor {floor_ms:.0f} ms; "
              f"fused {row['fused_ms']:.0f} ms ({100 * row['fused_of_roofline']:.0f} % of roofline), "
              f"eager {row['eager_ms']:.0f} ms ({100 * row['eager_of_roofline']:.0f} %); eager/fused "
              f"{row['ratio']:.2f}×, at most {row['largest_possible_ratio']:.2f}× for any fused path "
              f"(load {row['load']:.2f})", flush=True)
        rows.append(row)
    write_rows(args.json, info, rows)


if __name__ == "__main__":
    main()
