"""Throughput of ``dip.restore_many`` on a local pool: images per minute per pool shape (workers × threads).

    python benchmarks/batch_throughput.py [--images 6] [--size 32] [--iterations 100] [--pools 1x2 1x1 2x1] [--rounds 1]

Each round restores a fresh folder of small noisy images into an empty output
folder, so the time includes starting the worker processes, as a real batch
would. The pool shapes alternate within each round, so that a change in the load
of a shared machine affects them alike. Prints one table row per shape
(median and best of the rounds).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_settings import cpu_line  # noqa: E402

import dip  # noqa: E402
from dip.batch import cpu_count  # noqa: E402


def make_folder(folder: Path, images: int, size: int) -> None:
    """Smooth colour gradients with Gaussian noise (σ = 25/255), one PNG each."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:size, 0:size] / size
    for i in range(images):
        clean = np.stack([np.sin(3 * x + i), np.cos(2 * y - i), x * y], axis=2) * 0.4 + 0.5
        noisy = np.clip(clean + rng.normal(0, 25 / 255, clean.shape), 0, 1)
        Image.fromarray((noisy * 255 + 0.5).astype(np.uint8)).save(folder / f"img{i:03d}.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=6)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--iterations", type=int, default=100)
    parser.add_argument("--network", default="small")
    parser.add_argument("--pools", nargs="+", default=["1x2", "1x1", "2x1"],
                        help="WORKERSxTHREADS shapes (default: 1x2 1x1 2x1)")
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    pools = [tuple(int(n) for n in p.split("x")) for p in args.pools]

    import torch

    load_before = os.getloadavg() if hasattr(os, "getloadavg") else ("?",) * 3
    times: dict = {p: [] for p in pools}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for w, t in pools:
                inputs = Path(tmp) / f"in-{r}-{w}x{t}"
                make_folder(inputs, args.images, args.size)
                start = time.perf_counter()
                summary = dip.restore_many(inputs, Path(tmp) / f"out-{r}-{w}x{t}", "denoise", workers=w, threads=t,
                                           progress=False, network=args.network, iterations=args.iterations)
                elapsed = time.perf_counter() - start
                if summary.ok != args.images:
                    raise SystemExit(f"only {summary.ok} of {args.images} images restored: {summary.records}")
                times[(w, t)].append(elapsed)

    load = os.getloadavg() if hasattr(os, "getloadavg") else ("?",) * 3
    print(f"{args.images} images {args.size}×{args.size}, denoise, network={args.network}, "
          f"{args.iterations} iterations, {args.rounds} rounds; {cpu_count()} cores, "
          f"{cpu_line()}, torch {torch.__version__}, "
          f"1-minute load average {load_before[0]:.1f} before, {load[0]:.1f} after")
    print()
    print("| workers | threads per worker | seconds (median, best) | images per minute (median, best) |")
    print("| --- | --- | --- | --- |")
    for (w, t), ts in times.items():
        med, best = statistics.median(ts), min(ts)
        print(f"| {w} | {t} | {med:.1f}, {best:.1f} | {60 * args.images / med:.1f}, {60 * args.images / best:.1f} |")


if __name__ == "__main__":
    main()
