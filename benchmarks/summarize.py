"""Markdown tables from pytest-benchmark JSON files, written beside each file and printed.

    pytest benchmarks/ --benchmark-only --benchmark-json=results/run.json
    python benchmarks/summarize.py results/run.json        # writes results/run.md

The header names the machine the JSON came from (CPU model and its AVX-512 /
AMX flags, GPU, torch and CUDA versions, threads, device, commit: recorded by
benchmarks/conftest.py). Then one table per benchmark group (median, min,
rounds, ratio to the group's fastest), and for the iteration benchmark the
fused / eager / compile table by size with the ratios and peak memory.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path


def _fmt(v, spec=".2f") -> str:
    return "–" if v is None else format(v, spec)


def machine_line(data: dict) -> str:
    """One line naming the machine, torch and the settings of the run."""
    m = data.get("machine_info", {})
    dip = m.get("dip") or {}
    cpu = dip.get("cpu") or {}
    model = cpu.get("model") or m.get("cpu", {}).get("brand_raw", "?")
    flags = [f for f in ("avx512f", "avx512_bf16", "amx_bf16") if cpu.get(f)]
    parts = [f"CPU {model} ({', '.join(flags) if flags else 'no AVX-512/AMX'})"]
    if dip.get("gpu"):
        parts.append(f"GPU {dip['gpu']}")
    first = (data.get("benchmarks") or [{}])[0].get("extra_info", {})
    parts.append(f"torch {dip.get('torch') or first.get('torch', '?')}"
                 + (f" (CUDA {dip['torch_cuda']})" if dip.get("torch_cuda") else ""))
    parts.append(f"{dip.get('threads', first.get('threads', '?'))} threads")
    parts.append(f"device {dip.get('device', first.get('device', 'cpu'))}")
    parts.append(f"commit {str(dip.get('commit') or data.get('commit_info', {}).get('id', '?'))[:10]}")
    return "Machine: " + ", ".join(parts)


def group_tables(data: dict) -> list[str]:
    """One table per benchmark group: median and min in ms, rounds, and the ratio to the group's fastest."""
    groups: dict[str, list] = {}
    for b in data.get("benchmarks", []):
        groups.setdefault(b.get("group") or "(no group)", []).append(b)
    lines = []
    for group, items in groups.items():
        fastest = min(b["stats"]["median"] for b in items)
        lines += ["", f"### {group}", "", "| benchmark | median ms | min ms | rounds | × fastest |", "|---|---|---|---|---|"]
        for b in sorted(items, key=lambda b: b["stats"]["median"]):
            s = b["stats"]
            lines.append(f"| {b['name']} | {s['median'] * 1e3:.2f} | {s['min'] * 1e3:.2f} | {s['rounds']} | "
                         f"{s['median'] / fastest:.2f} |")
    return lines


def iteration_table(data: dict) -> list[str]:
    """The iteration benchmark by size: fused / eager / compile medians, their ratios and peak memory."""
    rows: dict = {}
    for b in data.get("benchmarks", []):
        info = b.get("extra_info", {})
        if "path" in info and "size" in info:
            key = (info["size"], info.get("device", "cpu"))
            rows.setdefault(key, {})[info["path"]] = (b["stats"]["median"] * 1e3, info.get("iteration_mib"))
    if not rows:
        return []
    lines = ["", "### denoise iteration by size", "",
             "| size | device | fused ms | eager ms | compile ms | eager/fused | compile/fused | fused MiB | eager MiB |"
             " fused/eager mem |", "|---|---|---|---|---|---|---|---|---|---|"]

    def ratio(a, b):
        return None if a is None or b is None else a / b

    for (size, dev), r in sorted(rows.items()):
        f, e, c = (r.get(k, (None, None)) for k in ("fused", "eager", "compile"))
        lines.append(f"| {size}² | {dev} | {_fmt(f[0], '.1f')} | {_fmt(e[0], '.1f')} | {_fmt(c[0], '.1f')} | "
                     f"{_fmt(ratio(e[0], f[0]))} | {_fmt(ratio(c[0], f[0]))} | {_fmt(f[1], '.0f')} | "
                     f"{_fmt(e[1], '.0f')} | {_fmt(ratio(f[1], e[1]))} |")
    return lines


def summarize(data: dict) -> str:
    """The whole Markdown summary of one pytest-benchmark JSON document."""
    return "\n".join([machine_line(data)] + iteration_table(data) + group_tables(data)) + "\n"


def write_beside(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` with the suffix ``.md``, atomically; returns that path."""
    target = path.with_suffix(".md")
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=target.name + ".")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, target)
    return target


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__)
        return 2
    for name in argv:
        path = Path(name)
        text = summarize(json.loads(path.read_text()))
        print(text)
        print(f"(written to {write_beside(path, text)})\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
