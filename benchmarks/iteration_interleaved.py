"""Fused vs pure-eager fitting iterations of the ``denoise`` net, interleaved in one process.

Alternating the two paths (fused, eager, fused, eager, …) exposes both to the
same machine load, so their ratio stays meaningful on a shared machine where
absolute times do not. Prints the machine, the load average and one line per
size: medians, eager ÷ fused, and (``--memory``) the peak memory one
iteration adds in a fresh process per path. Both paths hold memory as a fit
does (``DIP_BENCH_HEAP=kept``, the default) or as plain PyTorch does
(``DIP_BENCH_HEAP=default``).

    DIP_BENCH_THREADS=2 python benchmarks/iteration_interleaved.py --sizes 128 256 512 --rounds 5 --memory
    DIP_BENCH_THREADS=2 python benchmarks/iteration_interleaved.py --sizes 64 128 --members 4   # ensembles
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_settings import announce, heap_policy, write_rows  # noqa: E402
from test_iteration_bench import make_step, measure_peak_memory  # noqa: E402


def interleaved(size: int, rounds: int, precisions=("float32",), members: int = 1) -> dict:
    """Median seconds per iteration of each path, alternating fused and eager ``rounds`` times.

    With several ``precisions`` every (path, precision) pair joins the rotation; the keys of the
    extra pairs are ``<path>_<precision>_ms`` and their ratios are taken against float32 eager.
    With ``members`` > 1 the grouped network also races the same number of single fused networks
    stepped one after the other (``singles_ms``, ``singles_over_fused``).
    """
    steps = {}
    for precision in precisions:
        for path in ("fused", "eager"):
            key = path if precision == "float32" else f"{path}_{precision}"
            steps[key] = make_step(path, size, precision=precision, members=members)
    if members > 1:
        singles = [make_step("fused", size, seed=k) for k in range(members)]
        steps["singles"] = lambda: [step() for step in singles]
    for step in steps.values():
        step()
        step()
    times: dict = {path: [] for path in steps}
    for _ in range(rounds):
        for path, step in steps.items():
            start = time.perf_counter()
            step()
            times[path].append(time.perf_counter() - start)
    med = {path: statistics.median(v) for path, v in times.items()}
    row = {"size": size, "members": members, "load": os.getloadavg()[0]}
    row.update({f"{key}_ms": 1e3 * value for key, value in med.items()})
    if "fused" in med and "eager" in med:
        row["ratio"] = med["eager"] / med["fused"]
    for key, value in med.items():
        if key not in ("fused", "eager", "singles") and "eager" in med:
            row[f"eager_over_{key}"] = med["eager"] / value
    if "singles" in med:
        row["singles_over_fused"] = med["singles"] / med["fused"]
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[128, 256])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--memory", action="store_true", help="also peak memory per iteration (fresh process per path)")
    ap.add_argument("--precisions", nargs="+", default=["float32"], choices=["float32", "bfloat16"],
                    help="also time bf16 autocast (what precision='bfloat16' runs)")
    ap.add_argument("--members", type=int, default=1,
                    help="time a seed ensemble of this many members (one grouped network, as ensemble=K fits)")
    ap.add_argument("--json", default=None, help="also write the figures to this file")
    args = ap.parse_args()
    info = announce()
    rows = []
    for size in args.sizes:
        with heap_policy():
            row = interleaved(size, args.rounds, args.precisions, args.members)
        line = (f"{size}²{f' K={args.members}' if args.members > 1 else ''}: fused {row['fused_ms']:.1f} ms, eager {row['eager_ms']:.1f} ms, "
                f"eager/fused {row['ratio']:.2f}× (load {row['load']:.2f})")
        for key in row:
            if key.startswith("eager_over_"):
                name = key[len("eager_over_"):]
                line += f"; {name} {row[name + '_ms']:.1f} ms, eager/{name} {row[key]:.2f}×"
        if "singles_over_fused" in row:
            line += (f"; {args.members} single fused networks one after the other {row['singles_ms']:.1f} ms, "
                     f"singles/grouped {row['singles_over_fused']:.2f}×")
        if args.memory:
            mem = {p: measure_peak_memory(p, size, args.members)["iteration_mib"] for p in ("fused", "eager")}
            row.update(fused_mib=mem["fused"], eager_mib=mem["eager"], memory_ratio=mem["fused"] / mem["eager"])
            line += f"; memory fused {mem['fused']:.0f} MiB, eager {mem['eager']:.0f} MiB, ratio {row['memory_ratio']:.2f}"
        print(line, flush=True)
        rows.append(row)
    write_rows(args.json, info, rows)


if __name__ == "__main__":
    main()
