"""Iteration time of a fit under each thread policy, quiet and beside competing CPU-bound processes.

Each configuration (torch threads × OpenMP wait policy) runs in a fresh
process, since the wait policy is read when torch loads its OpenMP runtime.
A competing process is a bounded Python busy loop started before and killed
after each measurement. Prints one table (median ms per iteration of the
``small`` net at 128², the ``dip demo`` workload, and of ``denoise`` with
``--network denoise``).

    python benchmarks/threads_under_load.py --compete 0 1 --iterations 30
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

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

POLICIES = {
    "default": {},
    "passive": {"OMP_WAIT_POLICY": "PASSIVE"},
}


def _busy(seconds: float) -> subprocess.Popen:
    code = f"import time\nend = time.time() + {seconds}\nwhile time.time() < end:\n    pass\n"
    return subprocess.Popen([sys.executable, "-c", code])


def measure(threads: int, policy: str, competing: int, network: str, size: int, iterations: int) -> dict:
    env = dict(os.environ)
    for key in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS"):
        env.pop(key, None)
    env.update(POLICIES[policy])
    rivals = [_busy(600) for _ in range(competing)]
    try:
        time.sleep(0.5 if competing else 0)
        out = subprocess.run([sys.executable, "-c", CHILD, str(threads), network, str(size), str(iterations)],
                             env=env, capture_output=True, text=True, check=True, timeout=1800)
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
    ap.add_argument("--policies", nargs="+", default=list(POLICIES), choices=list(POLICIES))
    ap.add_argument("--network", default="small")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--iterations", type=int, default=30)
    args = ap.parse_args()
    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                 platform.processor())
    flags = open("/proc/cpuinfo").read()
    print(f"# {model}; avx512f: {'avx512f' in flags}; amx: {'amx_tile' in flags}; cores: {os.cpu_count()}; "
          f"load average before: {os.getloadavg()[0]:.2f}; {args.network} net at {args.size}²")
    print("| competing processes | threads | wait policy | ms per iteration |")
    print("|---|---|---|---|")
    for competing in args.compete:
        for threads in args.threads:
            for policy in args.policies:
                r = measure(threads, policy, competing, args.network, args.size, args.iterations)
                label = f"auto ({r['threads']})" if threads == 0 else str(threads)
                print(f"| {competing} | {label} | {policy} | {r['median_ms']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
