"""benchmarks/roofline.py: the iteration's FLOPs, the convolution roofline and each path's share of it."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_roofline_prints_and_writes_each_paths_share(tmp_path):
    out = tmp_path / "roofline.json"
    env = {**os.environ, "DIP_BENCH_THREADS": "1", "DIP_BENCH_HEAP": "default"}
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "roofline.py"), "--sizes", "64", "--rounds", "1",
                          "--json", str(out)], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert run.returncode == 0, run.stderr
    assert "heap default" in run.stdout and "% of roofline" in run.stdout
    row = json.loads(out.read_text())["rows"][0]
    # 64×64: the five scales' convolutions of the denoise net, forward and backward (the 512² count / 64)
    assert abs(row["gflop"] - 460.1 / 64) < 0.05
    assert row["floor_ms"] == row["gflop"] / row["conv_gflops"] * 1e3
    assert row["largest_possible_ratio"] == row["eager_ms"] / row["floor_ms"]
