"""scripts/gpu_check.py without a GPU: arguments, the dry run, the time plan, restarts, the table."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu_check.py"


@pytest.fixture(scope="module")
def gc():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def f16(tmp_path):
    path = tmp_path / "F16_GT.png"
    Image.new("RGB", (64, 64), (120, 40, 200)).save(path)
    return path


def _run(*args):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)


def test_defaults(gc):
    args = gc.parse_args([])
    assert args.out == "gpu-check-out" and args.sizes == [256, 512] and args.budget == 450
    assert args.device == "cuda" and not args.dry_run and args.skip == []


@pytest.mark.parametrize("argv", [["--budget", "0"], ["--sizes", "32"], ["--skip", "nonsense"],
                                  ["--device", "tpu"]])
def test_bad_arguments_are_refused(gc, argv, capsys):
    with pytest.raises(SystemExit) as exc:
        gc.parse_args(argv)
    assert exc.value.code == 2
    assert "error" in capsys.readouterr().err


def test_dry_run_prints_the_plan(f16, tmp_path):
    res = _run("--dry-run", "--f16", str(f16), "--out", str(tmp_path / "out"), "--commit", "abc123")
    assert res.returncode == 0, res.stdout + res.stderr
    out = res.stdout
    assert "plan OK" in out and "commit abc123" in out
    for stage in ("env", "build", "tests", "bench", "f16", "compile"):
        assert f"  {stage} " in out
    assert "fused-512-tf32" in out and "compile-512-tf32" in out
    assert "conv_block_kernel.cu" in out
    assert not (tmp_path / "out").exists()  # a dry run writes nothing


def test_dry_run_fails_without_the_image(tmp_path):
    res = _run("--dry-run", "--f16", str(tmp_path / "missing.png"))
    assert res.returncode == 2
    assert "F16 image not found" in res.stdout and "--f16 PATH" in res.stdout


def test_dry_run_without_the_f16_stage_needs_no_image(tmp_path):
    res = _run("--dry-run", "--f16", str(tmp_path / "missing.png"), "--skip", "f16")
    assert res.returncode == 0, res.stdout
    assert "skipped (--skip)" in res.stdout


def test_plan_refuses_a_budget_below_the_floors(gc, f16):
    p = gc.plan(gc.parse_args(["--budget", "100", "--f16", str(f16)]))
    assert any("below the stages' minimum" in q for q in p["problems"])


def test_stage_caps_keep_time_for_later_stages(gc):
    names = gc.STAGE_NAMES
    build = names.index("build")
    later = sum(s.floor_s for s in gc.STAGES[build + 1:])
    # Plenty of time: the cap. Little time: what the later stages' floors leave.
    assert gc.stage_timeout(build, [], deadline=10_000, now=0) == gc.STAGES[build].cap_s
    assert gc.stage_timeout(build, [], deadline=later + 30, now=0) == 30
    # A skipped later stage keeps nothing back.
    assert gc.stage_timeout(build, ["tests", "bench", "f16"], deadline=100, now=0) == 100
    assert sum(s.floor_s for s in gc.STAGES) <= gc.parse_args([]).budget


def test_benchmark_combinations(gc):
    bench = gc.bench_combos("bench", [512, 256], "cuda")
    assert len(bench) == 2 * 2 * 3 + 2
    assert {(c["path"], c["precision"]) for c in bench} == {(p, q) for p in ("fused", "eager")
                                                            for q in ("float32", "tf32", "bf16")}
    assert [c["id"] for c in bench[:2]] == ["fused-512-tf32", "eager-512-tf32"]  # the headline pair first
    assert [c["id"] for c in bench[-2:]] == ["fused-256-tf32-k4", "eager-256-tf32-k4"]  # the ensemble last
    assert all(c["members"] == gc.ENSEMBLE for c in bench[-2:]) and "members" not in bench[0]
    compiled = gc.bench_combos("compile", [256, 512], "cuda")
    assert [c["id"] for c in compiled][:2] == ["compile-512-tf32", "compile-512-bf16"]
    assert len(compiled) == 6
    only_small = gc.bench_combos("compile", [256], "cuda")
    assert [c["id"] for c in only_small] == ["compile-256-tf32", "compile-256-bf16", "compile-256-float32"]
    assert "float32" in gc.combo_notes("fused", "bf16", "cuda")
    assert gc.combo_notes("eager", "tf32", "cuda") == ""


def _fake_child(gc, monkeypatch, tmp_path, script: str):
    """Replace the benchmark child by ``script`` (python), which gets the part file and an attempt counter."""
    counter = tmp_path / "attempts"

    def child_cmd(args, stage, part, deadline, combos=None):
        return [sys.executable, "-c", script, str(part), str(counter), json.dumps(combos)]

    monkeypatch.setattr(gc, "child_cmd", child_cmd)


CRASH_THEN_FINISH = r"""
import json, os, sys
part, counter, combos = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
n = int(open(counter).read()) + 1 if os.path.exists(counter) else 1
open(counter, "w").write(str(n))
with open(part, "a") as f:
    for c in combos:
        f.write(json.dumps({"event": "start", "id": c["id"]}) + "\n")
        f.flush()
        if n == 1:
            os._exit(11)  # dies inside the first group, as a crashed CUDA context would
        for graph in (False, True):
            f.write(json.dumps({"event": "result", "id": c["id"], "path": c["path"], "size": c["size"],
                                "precision": c["precision"], "graph": graph, "status": "ok",
                                "median_ms": 2.0 if c["path"] == "fused" else 3.0}) + "\n")
"""


def test_a_crashed_child_is_restarted_for_the_groups_left(gc, monkeypatch, tmp_path):
    _fake_child(gc, monkeypatch, tmp_path, CRASH_THEN_FINISH)
    args = gc.parse_args(["--out", str(tmp_path), "--sizes", "256"])
    report = gc.Report(tmp_path, args, 0.0)
    result = gc.stage_combos(args, report, 60, tmp_path, stage="bench")
    by_status = {}
    for r in report.data["bench"]:
        by_status.setdefault(r["status"], []).append(r["id"])
    assert by_status["crashed"] == ["fused-256-tf32"]
    assert len(by_status["ok"]) == 2 * 7  # the other seven groups (two of the ensemble), without and with a graph
    assert result["status"] == "partial" and result["failed"] == 1
    assert (tmp_path / "attempts").read_text() == "2"
    table = gc.summary_table(report.data)
    assert "eager/fused 1.50x (no graph)" in table and "crashed" in table


HANG = r"""
import json, subprocess, sys, time
part, counter, combos = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
# A helper in a session of its own, as ninja's compilers or torch.compile's workers are.
helper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
open(counter + ".helper", "w").write(str(helper.pid))
with open(part, "a") as f:
    f.write(json.dumps({"event": "start", "id": combos[0]["id"]}) + "\n")
time.sleep(60)
"""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_a_hung_child_is_stopped_at_the_stage_deadline(gc, monkeypatch, tmp_path):
    _fake_child(gc, monkeypatch, tmp_path, HANG)
    args = gc.parse_args(["--out", str(tmp_path), "--sizes", "256"])
    report = gc.Report(tmp_path, args, 0.0)
    result = gc.stage_combos(args, report, gc.CHILD_START_S + 9, tmp_path, stage="compile")
    statuses = [r["status"] for r in report.data["bench"]]
    assert statuses[0] == "crashed" and "timed out" in report.data["bench"][0]["reason"]
    assert statuses[1:] == ["skipped"] * 2 and result["not_reached"] == 2
    helper = int((tmp_path / "attempts.helper").read_text())
    for _ in range(50):  # SIGKILL takes effect when the process is next scheduled
        if not _alive(helper):
            break
        time.sleep(0.1)
    assert not _alive(helper), "a helper of the timed-out child survived"


def test_summary_table_from_a_report(gc):
    data = dict(commit="0123456789abcdef", total_s=301.5,
                env=dict(gpu="NVIDIA H100 80GB HBM3", torch="2.11.0+cu130", torch_cuda="13.0"),
                stages=dict(env=dict(status="ok", seconds=2), tests=dict(status="failed", seconds=80, reason="1 failed")),
                tests=dict(summary="120 passed, 1 failed", failed=["tests/ops/test_x.py::test_y[cuda]"]),
                bench=[dict(path=p, size=512, precision="tf32", graph=g, status="ok", median_ms=ms)
                       for p, g, ms in (("fused", False, 10.0), ("eager", False, 16.0), ("fused", True, 8.0),
                                        ("eager", True, 9.0), ("compile", False, 12.0))]
                + [dict(path=p, size=512, precision="tf32", graph=False, members=4, status="ok", median_ms=ms)
                   for p, ms in (("fused", 30.0), ("eager", 45.0))],
                f16=dict(size="512x512", psnr=32.5, psnr_noisy=20.2, restore_s=25.0, iterations=2400,
                         stopped_at=2100, stop_reason="plateau"))
    table = gc.summary_table(data)
    assert table.splitlines()[0].startswith("== dip gpu-check: NVIDIA H100 80GB HBM3 | torch 2.11.0+cu130")
    assert "eager/fused 1.60x (no graph)" in table and "eager/fused 1.12x (graph)" in table
    assert "compile/fused 1.20x (no graph)" in table
    assert ("ensemble K=4 512² tf32 (no graph): fused 30.00 ms, eager 45.00 ms, eager/fused 1.50x, "
            "fused per member / one fused network 0.75x") in table
    assert "eager/fused 1.60x (no graph)" in table  # the ensemble does not overwrite the single network's cells
    assert "FAILED tests/ops/test_x.py::test_y[cuda]" in table
    assert "PSNR 32.50 dB" in table and "25.0 s" in table


def test_benchmark_child_on_the_cpu(gc, tmp_path):
    """The measuring code itself, on the pure net at 64² (CUDA graphs are skipped off CUDA)."""
    part = tmp_path / "part.jsonl"
    combos = [dict(path="eager", size=64, precision="float32", id="eager-64-float32", device="cpu", stage="bench"),
              dict(path="eager", size=64, precision="float32", id="eager-64-float32-k2", device="cpu", stage="bench",
                   members=2)]
    assert gc.main(["--child", "bench", "--part", str(part), "--deadline", "1e12", "--device", "cpu",
                    "--combos", json.dumps(combos)]) == 0
    records = gc.read_part(part)
    assert records[0] == {"event": "start", "id": "eager-64-float32"}
    plain, graph = records[1:3]
    assert plain["status"] == "ok" and plain["median_ms"] > 0 and plain["iters"] >= 5 and plain["loss"] > 0
    assert graph["status"] == "skipped" and "CUDA" in graph["reason"]
    assert records[3] == {"event": "start", "id": "eager-64-float32-k2"}
    ensemble = records[4]
    assert ensemble["status"] == "ok" and ensemble["members"] == 2 and ensemble["loss"] > 0
