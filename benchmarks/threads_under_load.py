"""Iteration time of a fit under each thread policy, quiet and beside competing CPU-bound processes.

Each configuration (torch threads × OpenMP wait policy) runs in a fresh
process, since the wait policy is read when torch loads its OpenMP runtime.
A competing process is a bounded Python busy loop started before and killed
after each measurement. Prints one table (median ms per iteration of the
``small`` net at 128², the ``dip demo`` workload, and of ``denoise`` with
``--network denoise``).

    python benchmarks/threads_under_load.py --compete 0 1 --iterations 30
    python benchmarks/threads_under_load.py --fit --compete 0 1 --iterations 300   # dip.restore(threads=…)

``--fit`` times whole ``dip.restore`` fits instead (what the command line
runs), threads "auto" (the governor included) against fixed counts; the
competing process starts either before the fit or, with ``--late``, in the
middle of it (the governor's case). The figure is the median step time over
the second half of the fit.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_settings import cpu_line  # noqa: E402

CHILD = r"""
import json, statistics, sys, time
import torch
import torch.nn.functional as F
from dip.nn import build_network
threads, network, size, iterations = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
if threads > 0:
    torch.set_num_threads(threads)
else:
    from dip.threads import configure_threads
    configure_threads(None)
torch.manual_seed(0)
net = build_network(network)
cin = net.config.in_channels
z = torch.rand(1, cin, size, size)
target = torch.rand(1, 3, size, size)
opt = torch.optim.Adam(net.parameters(), lr=0.01)
times = []
for i in range(iterations + 3):
    t = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    F.mse_loss(net(z), target).backward()
    opt.step()
    if i >= 3:
        times.append(time.perf_counter() - t)
print(json.dumps({"median_ms": 1e3 * statistics.median(times), "threads": torch.get_num_threads()}))
"""

FIT_CHILD = r"""
import json, statistics, sys, time
import numpy as np
import torch
import dip
threads, network, size, iterations = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
threads = threads if threads == "auto" else int(threads)
img = np.random.default_rng(0).random((size, size, 3)).astype(np.float32)
stamps = []
r = dip.restore(img, iterations=iterations, network=network, progress=False, threads=threads,
                callbacks=[lambda step: stamps.append(time.perf_counter())])
steps = [b - a for a, b in zip(stamps, stamps[1:])][len(stamps) // 2:]
print(json.dumps({"median_ms": 1e3 * statistics.median(steps), "threads": torch.get_num_threads()}))
"""

POLICIES = {
    "default": {},
    "passive": {"OMP_WAIT_POLICY": "PASSIVE"},
    # GNU OpenMP (torch's Linux wheels) spins this many times before it sleeps; the default is 300000.
    "spin1k": {"GOMP_SPINCOUNT": "1000"},
    "spin10k": {"GOMP_SPINCOUNT": "10000"},
    "spin100k": {"GOMP_SPINCOUNT": "100000"},
}


def _busy(seconds: float) -> subprocess.Popen:
    code = f"import time\nend = time.time() + {seconds}\nwhile time.time() < end:\n    pass\n"
    return subprocess.Popen([sys.executable, "-c", code])


def measure(threads, policy: str, competing: int, network: str, size: int, iterations: int, *,
            fit: bool = False, late: float = 0.0) -> dict:
    """One configuration in a fresh process; ``late`` > 0 starts the competitors that many seconds in."""
    env = dict(os.environ)
    for key in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS"):
        env.pop(key, None)
    env.update(POLICIES[policy])
    rivals = [] if late else [_busy(600) for _ in range(competing)]
    try:
        time.sleep(0.5 if competing and not late else 0)
        child = subprocess.Popen([sys.executable, "-c", FIT_CHILD if fit else CHILD, str(threads), network,
                                  str(size), str(iterations)], env=env, stdout=subprocess.PIPE, text=True)
        if late and competing:
            time.sleep(late)
            rivals = [_busy(600) for _ in range(competing)]
        stdout, _ = child.communicate(timeout=1800)
        if child.returncode:
            raise RuntimeError(f"the measuring process failed ({child.returncode})")
        out = subprocess.CompletedProcess(child.args, child.returncode, stdout)
    finally:
        for p in rivals:
            p.kill()
            p.wait()
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--compete", type=int, nargs="+", default=[0, 1], help="numbers of competing busy processes")
    ap.add_argument("--threads", type=int, nargs="+", default=[2, 1, 0],
                    help="torch threads (0: dip.threads.configure_threads(None), the automatic choice)")
    ap.add_argument("--policies", nargs="+", default=["default", "passive"], choices=list(POLICIES))
    ap.add_argument("--network", default="small")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--iterations", type=int, default=30)
    ap.add_argument("--fit", action="store_true", help="time dip.restore fits (threads 0 means threads='auto')")
    ap.add_argument("--late", type=float, default=0.0, help="start the competitors this many seconds into the run")
    args = ap.parse_args()
    print(f"# {cpu_line()}; load average before: {os.getloadavg()[0]:.2f}; {args.network} net at {args.size}²")
    print("| competing processes | threads | wait policy | ms per iteration |")
    print("|---|---|---|---|")
    for competing in args.compete:
        for threads in args.threads:
            for policy in args.policies:
                count = "auto" if args.fit and threads == 0 else threads
                r = measure(count, policy, competing, args.network, args.size, args.iterations, fit=args.fit,
                            late=args.late)
                label = f"auto (ends at {r['threads']})" if threads == 0 else str(threads)
                print(f"| {competing} | {label} | {policy} | {r['median_ms']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
