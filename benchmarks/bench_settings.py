"""Settings every benchmark shares: threads, device, synchronisation of a timed call, machine description.

    DIP_BENCH_THREADS=N    torch threads for every benchmark (default 2, the reference machine's cores)
    DIP_BENCH_DEVICE=cuda  run the benchmarks that take a device on the GPU (default cpu; also --device)
    DIP_BENCH_HEAP=kept    freed memory stays in the process heap, as during a fit (``dip.memory.kept_heap``);
                           ``default``: glibc's own policy, which returns large blocks to the system at once

Every benchmark script and ``scripts/gpu_check.py`` describe the machine with
:func:`machine` / :func:`machine_line` (or :func:`cpu_line` for the CPU alone).
torch is imported only by the functions that need it, so the CPU description
works before torch is installed.
"""
from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path
from typing import Optional

#: Threads for every benchmark (this project's reference machine has 2 cores).
THREADS = int(os.environ.get("DIP_BENCH_THREADS", "2"))


#: ``kept`` (the default): benchmarks hold memory as a fit does; ``default``: as plain PyTorch does.
HEAP = os.environ.get("DIP_BENCH_HEAP", "kept")


def heap_policy():
    """A context in which the benchmark's memory is held under :data:`HEAP` (what it applied: ``machine()['heap']``)."""
    from contextlib import nullcontext

    from dip.memory import kept_heap

    if HEAP not in ("kept", "default"):
        raise SystemExit(f"DIP_BENCH_HEAP={HEAP!r}: use 'kept' or 'default'")
    return kept_heap(need=0) if HEAP == "kept" else nullcontext(False)  # a benchmark has the machine to itself


def device() -> str:
    """The benchmark device: ``DIP_BENCH_DEVICE`` (set by ``--device``), default ``cpu``."""
    return os.environ.get("DIP_BENCH_DEVICE", "cpu")


def synchronize(dev: str) -> None:
    """Wait for the device's queued work (a no-op on the CPU)."""
    import torch

    if torch.device(dev).type == "cuda":
        torch.cuda.synchronize()


def timed(fn, dev: str):
    """``fn`` followed by a device synchronisation: what a benchmark must time on an asynchronous device."""
    import torch

    if torch.device(dev).type != "cuda":
        return fn

    def call():
        result = fn()
        torch.cuda.synchronize()
        return result

    return call


def cpu_model() -> dict:
    """``lscpu``'s model name and whether the AVX-512, AVX512-BF16 and AMX flags are present."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        out = ""
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    flags = fields.get("Flags", "").split()
    return {"model": fields.get("Model name", platform.processor() or "?").strip(),
            "cores": os.cpu_count(), "avx512f": "avx512f" in flags, "avx512_bf16": "avx512_bf16" in flags,
            "amx_bf16": "amx_bf16" in flags}


def commit() -> str:
    root = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or os.environ.get("DIP_COMMIT", "unknown")
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("DIP_COMMIT", "unknown")


def cpu_line(cpu: Optional[dict] = None) -> str:
    """The CPU as one phrase, e.g. ``AMD EPYC (avx512f, avx512_bf16; 2 cores)``."""
    cpu = cpu_model() if cpu is None else cpu
    flags = [f for f in ("avx512f", "avx512_bf16", "amx_bf16") if cpu.get(f)]
    return f"{cpu.get('model', '?')} ({', '.join(flags) or 'no AVX-512/AMX'}; {cpu.get('cores', '?')} cores)"


def machine(dev: Optional[str] = None, threads: Optional[int] = None) -> dict:
    """What a result needs beside it: CPU, GPU, torch and CUDA versions, threads, device, load, commit.

    ``dev`` and ``threads`` default to the benchmark settings (``DIP_BENCH_DEVICE``, ``DIP_BENCH_THREADS``).
    """
    import torch

    info = {"cpu": cpu_model(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
            "python": platform.python_version(), "threads": THREADS if threads is None else threads,
            "device": dev or device(), "heap": HEAP, "commit": commit(), "host": platform.node(),
            "load_average": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def machine_line(info: Optional[dict] = None) -> str:
    """:func:`machine` as one line, printed beside every figure."""
    info = machine() if info is None else info
    parts = [cpu_line(info["cpu"])]
    if info.get("gpu"):
        parts.append(f"GPU {info['gpu']}")
    parts.append(f"torch {info['torch']}" + (f" (CUDA {info['torch_cuda']})" if info.get("torch_cuda") else ""))
    parts += [f"python {info['python']}", f"{info['threads']} threads", f"device {info['device']}",
              f"heap {info.get('heap', '?')}",
              f"load average {info['load_average']}", f"commit {str(info['commit'])[:10]}"]
    return "; ".join(parts)


def announce() -> dict:
    """Start a benchmark script: torch's threads to :data:`THREADS`, the machine printed as the first line."""
    import torch

    torch.set_num_threads(THREADS)
    info = machine(threads=THREADS)
    print("#", machine_line(info), flush=True)
    return info


def write_rows(path: Optional[str], info: dict, rows: list) -> None:
    """Write a script's figures as JSON, ``{"machine": info, "rows": rows}``, when ``path`` is given."""
    if path:
        import json

        Path(path).write_text(json.dumps({"machine": info, "rows": rows}, indent=1))
