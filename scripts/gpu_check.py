#!/usr/bin/env python3
"""Check dip on a CUDA machine in one run, inside a fixed time budget (8 minutes on one H100).

    python3 scripts/gpu_check.py --out gpu-check-out        # or: make gpu-check OUT=...
    python3 scripts/gpu_check.py --dry-run                  # no GPU needed: arguments, files, the plan

Stages, in this order, each with a time cap; a stage that fails, times out or
is skipped is recorded and the next one runs:

  env      nvidia-smi, nvcc, torch / CUDA / cuDNN versions, the GPU
  build    ``python3 setup.py build_ext --inplace`` with DIP_BUILD_CUDA=1 against this machine's torch
  tests    ``pytest -k cuda tests``: every test marked ``cuda`` and every test with a CUDA device parameter
  bench    one fitting iteration of the ``denoise`` net (forward, MSE, backward, Adam) at each size:
           fused / eager × float32 / TF32 / bf16 autocast × without / with a CUDA graph of the whole step;
           last, a seed ensemble of ENSEMBLE members (one grouped network, ``restore(ensemble=K)``'s)
           at the smallest size, fused / eager in TF32
  f16      the F16 restoration: 512², σ = 25, ``dip.restore(..., iterations="auto")``, wall time and PSNR
  compile  the benchmark of ``torch.compile`` (pure net, fullgraph), most useful combinations first

Each stage past ``env`` runs in a child process with a timeout, so a crash or a
hang costs one stage; the benchmark children are restarted after a crash
for the combinations left. Everything lands in ``--out``: ``gpu_check.json``
(every figure, the GPU, torch/CUDA versions, commit), ``gpu_check.log`` and
the build and test logs. A compact table is printed last.

This process never imports dip: the build rewrites ``dip/_C*.so``, which
would crash a process that has it loaded.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_settings import cpu_line  # noqa: E402  (torch-free: the machine description every benchmark prints)

DEFAULT_F16 = ("shared/data/denoising/F16_GT.png", "../shared/data/denoising/F16_GT.png")
PATHS = ("fused", "eager", "compile")
PRECISIONS = ("float32", "tf32", "bf16")
#: The order in which torch.compile combinations are tried: each costs a compile (tens of seconds).
COMPILE_ORDER = (("tf32", 512), ("bf16", 512), ("tf32", 256), ("bf16", 256), ("float32", 512), ("float32", 256))
CHILD_START_S = 8.0  # importing torch and dip and starting CUDA in a fresh process
ENSEMBLE = 4  # members of the ensemble benchmark (issue 15: "what makes an ensemble cheap on a GPU")


@dataclass(frozen=True)
class Stage:
    name: str
    cap_s: float  # the most this stage may take
    floor_s: float  # what is kept back for it while earlier stages run
    what: str


STAGES = (
    Stage("env", 30, 10, "GPU, driver, nvcc, torch/CUDA versions"),
    Stage("build", 200, 60, "setup.py build_ext --inplace, DIP_BUILD_CUDA=1"),
    Stage("tests", 150, 30, "pytest -k cuda tests (TF32 off)"),
    Stage("bench", 120, 15, "denoise iteration: fused/eager x float32/tf32/bf16 x graph"),
    Stage("f16", 90, 35, "F16 512x512 sigma=25, automatic stop"),
    Stage("compile", 150, 0, "denoise iteration: torch.compile x precision x graph"),
)
STAGE_NAMES = tuple(s.name for s in STAGES)


# --- arguments and plan ---------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    """Command-line arguments (see the module docstring)."""
    p = argparse.ArgumentParser(description="Build, test and time dip on a CUDA machine within a time budget.")
    p.add_argument("--out", default="gpu-check-out", help="output folder (created; default: %(default)s)")
    p.add_argument("--f16", default=None,
                   help=f"the clean F16 image (default: the first of {', '.join(DEFAULT_F16)} that exists)")
    p.add_argument("--budget", type=float, default=450.0, help="seconds for everything (default: %(default)s)")
    p.add_argument("--sizes", type=int, nargs="+", default=[256, 512], help="benchmark sizes (default: 256 512)")
    p.add_argument("--skip", nargs="+", default=[], choices=STAGE_NAMES, metavar="STAGE",
                   help="stages not to run: " + ", ".join(STAGE_NAMES))
    p.add_argument("--commit", default=None, help="commit to record (default: git rev-parse HEAD, or $DIP_COMMIT)")
    p.add_argument("--dry-run", action="store_true", help="check arguments, files and the plan; print it; run nothing")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                   help="cpu runs the bench and f16 stages on the CPU, to test this script without a GPU")
    p.add_argument("--f16-size", type=int, default=None, help="crop F16 to this size (tests of the script)")
    p.add_argument("--f16-iterations", type=int, default=None,
                   help="a fixed iteration count instead of the automatic stop (tests of the script)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--part", default=None, help=argparse.SUPPRESS)
    p.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)
    p.add_argument("--combos", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.budget <= 0:
        p.error("--budget must be positive")
    if any(s < 64 for s in args.sizes):
        p.error("--sizes must be at least 64 (the denoise net halves the image five times)")
    return args


def find_f16(args) -> Path | None:
    """The F16 image given by --f16, else the first default location that exists."""
    if args.f16:
        return Path(args.f16).resolve()
    for rel in DEFAULT_F16:
        path = (ROOT / rel).resolve()
        if path.is_file():
            return path
    return None


def bench_combos(stage: str, sizes, device: str) -> list[dict]:
    """The benchmark groups of a stage; each group times one net without and with a CUDA graph."""
    if stage == "bench":
        # The large size first (the target is there), fused and eager side by side, TF32 (the default) first:
        # what a shortage of time cuts is the least telling.
        groups = [dict(path=p, size=s, precision=q) for s in sorted(sizes, reverse=True)
                  for q in ("tf32", "float32", "bf16") for p in ("fused", "eager")]
        groups += [dict(path=p, size=min(sizes), precision="tf32", members=ENSEMBLE) for p in ("fused", "eager")]
    else:
        order = [(q, s) for q, s in COMPILE_ORDER if s in sizes]
        order += [(q, s) for s in sorted(sizes) for q in PRECISIONS if (q, s) not in order]
        groups = [dict(path="compile", size=s, precision=q) for q, s in order]
    for g in groups:
        g["id"] = f"{g['path']}-{g['size']}-{g['precision']}" + (f"-k{g['members']}" if "members" in g else "")
        g["device"] = device
    return groups


def combo_notes(path: str, precision: str, device: str) -> str:
    """Why a combination measures less than its name says (empty when it measures what it says)."""
    notes = []
    if path == "fused" and precision == "bf16":
        notes.append("the fused conv block has float32/float64 kernels only: under autocast the blocks run in "
                     "float32 (TF32 convolutions); the other layers in bf16")
    if device != "cuda" and precision == "tf32":
        notes.append("TF32 exists on CUDA only: same as float32 here")
    return "; ".join(notes)


def plan(args) -> dict:
    """What would run: files found, stages with their caps, benchmark groups. ``problems`` lists what blocks it."""
    problems, notes = [], []
    for rel in ("setup.py", "tests", "csrc/cuda"):
        if not (ROOT / rel).exists():
            problems.append(f"missing {rel} under {ROOT}")
    cu = sorted(p.name for p in (ROOT / "csrc" / "cuda").glob("*.cu"))
    if not cu:
        problems.append("no CUDA sources in csrc/cuda")
    f16 = find_f16(args)
    if "f16" not in args.skip and (f16 is None or not f16.is_file()):
        problems.append(f"F16 image not found ({args.f16 or ' or '.join(DEFAULT_F16)}): give --f16 PATH "
                        f"or copy it to {ROOT / DEFAULT_F16[0]}")
    for tool in ("nvidia-smi", "nvcc"):
        if shutil.which(tool) is None:
            notes.append(f"{tool} is not on PATH here")
    stages = [dict(name=s.name, cap_s=s.cap_s, floor_s=s.floor_s, what=s.what, run=s.name not in args.skip)
              for s in STAGES]
    floors = sum(s.floor_s for s in STAGES if s.name not in args.skip)
    if floors > args.budget:
        problems.append(f"--budget {args.budget:.0f} s is below the stages' minimum {floors:.0f} s")
    combos = []
    for stage in ("bench", "compile"):
        if stage not in args.skip:
            for g in bench_combos(stage, args.sizes, args.device):
                combos.append(dict(g, stage=stage, note=combo_notes(g["path"], g["precision"], args.device)))
    return dict(root=str(ROOT), out=str(Path(args.out).resolve()), budget_s=args.budget, f16=str(f16) if f16 else None,
                cuda_sources=cu, stages=stages, combos=combos, problems=problems, notes=notes,
                commit=commit_of(args))


def print_plan(p: dict) -> None:
    print(f"gpu-check plan: repo {p['root']}, output {p['out']}, budget {p['budget_s']:.0f} s, commit {p['commit']}")
    print(f"  CUDA sources: {', '.join(p['cuda_sources']) or '-'}; F16: {p['f16'] or 'not found'}")
    for s in p["stages"]:
        state = f"cap {s['cap_s']:>4.0f} s, floor {s['floor_s']:>3.0f} s" if s["run"] else "skipped (--skip)"
        print(f"  {s['name']:<8} {state:<26} {s['what']}")
    for c in p["combos"]:
        print(f"    {c['stage']:<8} {c['id']:<22} (without and with a CUDA graph){'  note: ' + c['note'] if c['note'] else ''}")
    for n in p["notes"]:
        print(f"  note: {n}")
    for q in p["problems"]:
        print(f"  PROBLEM: {q}")
    print("plan OK" if not p["problems"] else f"plan has {len(p['problems'])} problem(s)")


def commit_of(args) -> str:
    if args.commit:
        return args.commit
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return os.environ.get("DIP_COMMIT", "unknown")


# --- the parent: runs stages, enforces time, writes the report ------------------------------------


class Report:
    """The JSON report and the log, both written as the run goes (a killed run leaves what it had)."""

    def __init__(self, out: Path, args, started: float):
        self.out = out
        self.log_path = out / "gpu_check.log"
        self.log_path.write_text("")
        self.data = dict(schema=1, started=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
                         host=socket.gethostname(), commit=commit_of(args), budget_s=args.budget,
                         argv=sys.argv[1:], stages={}, bench=[], tests={}, f16={}, env={})

    def log(self, text: str, echo: bool = True) -> None:
        if echo:
            print(text, flush=True)
        with open(self.log_path, "a") as f:
            f.write(text + "\n")

    def save(self) -> None:
        write_atomic(self.out / "gpu_check.json", json.dumps(self.data, indent=1, default=str) + "\n")


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def run_logged(cmd, report: Report, timeout: float, log_name: str | None = None, env=None) -> tuple[int | None, str]:
    """Run ``cmd`` with a timeout; returns (exit code, or None on timeout; its output). Output goes to the log.

    The command runs in its own process group, its output into a file: at the
    timeout the whole group is killed, and helpers it started (torch.compile's
    workers) cannot hold this process up by keeping a pipe open.
    """
    with tempfile.TemporaryFile(mode="w+") as sink:
        try:
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT, text=True,
                                    start_new_session=True)
        except OSError as exc:
            return 127, f"[could not run {cmd[0]}: {exc}]\n"
        try:
            rc = proc.wait(timeout=max(timeout, 1))
        except subprocess.TimeoutExpired:
            rc = None
            kill_tree(proc.pid)  # ninja puts each compiler in a process group of its own
        with contextlib.suppress(OSError):
            os.killpg(proc.pid, signal.SIGKILL)  # the group's stragglers
        proc.wait()
        sink.seek(0)
        output = sink.read()
    if rc is None:
        output += f"\n[timed out after {timeout:.0f} s]\n"
    if log_name:
        (report.out / log_name).write_text(output)
    report.log(f"$ {' '.join(map(str, cmd))}  ->  {'timeout' if rc is None else rc}", echo=False)
    report.log(output[-20000:], echo=False)
    return rc, output


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc), children first listed before their own children."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and every process below it, whatever their process groups."""
    for p in [pid, *descendants(pid)]:
        with contextlib.suppress(OSError):
            os.kill(p, signal.SIGKILL)


def child_cmd(args, stage: str, part: Path, deadline: float, combos: list[dict] | None = None) -> list[str]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", stage, "--part", str(part),
           "--deadline", repr(deadline), "--device", args.device, "--out", str(Path(args.out).resolve())]
    if combos is not None:
        cmd += ["--combos", json.dumps(combos)]
    f16 = find_f16(args)
    if f16:
        cmd += ["--f16", str(f16)]
    if args.f16_size:
        cmd += ["--f16-size", str(args.f16_size)]
    if args.f16_iterations:
        cmd += ["--f16-iterations", str(args.f16_iterations)]
    return cmd


def read_part(part: Path) -> list[dict]:
    if not part.exists():
        return []
    records = []
    for line in part.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            records.append(json.loads(line))
    return records


def child_env() -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def stage_env(args, report: Report, timeout: float, workdir: Path) -> dict:
    info = {"python": sys.version.split()[0], "platform": platform.platform(), "cpu": cpu_line()}
    for name, cmd in (("nvidia_smi", ["nvidia-smi"]), ("nvcc", ["nvcc", "--version"])):
        rc, out = run_logged(cmd, report, min(20.0, timeout))
        info[name] = out.strip()[-3000:] if rc == 0 else f"unavailable ({'timeout' if rc is None else rc})"
        if name == "nvcc" and rc == 0:
            m = re.search(r"release ([\d.]+)", out)
            info["nvcc_release"] = m.group(1) if m else None
    part = workdir / "env.jsonl"
    rc, out = run_logged(child_cmd(args, "env", part, time.time() + timeout), report, timeout, env=child_env())
    for rec in read_part(part):
        info.update(rec)
    report.data["env"] = info
    gpu = info.get("gpu") or "no GPU seen"
    report.log(f"  GPU {gpu}; torch {info.get('torch')}; CUDA {info.get('torch_cuda')}; cuDNN {info.get('cudnn')}; "
               f"nvcc {info.get('nvcc_release')}")
    if rc != 0:
        return dict(status="failed", reason=f"the torch probe exited {rc}: {out.strip().splitlines()[-1:]}")
    return dict(status="ok")


def stage_build(args, report: Report, timeout: float, workdir: Path) -> dict:
    suffix = _ext_suffix()
    for stale in (ROOT / "dip").glob("_C" + suffix):
        stale.unlink()  # a failed build must not leave an old extension to be tested
    env = dict(os.environ, DIP_BUILD_CUDA="1" if args.device == "cuda" else "0", DIP_BUILD_EXTENSION="1",
               TORCH_CUDA_ARCH_LIST="9.0",
               MAX_JOBS=os.environ.get("MAX_JOBS", "16"))
    toolchain = {}
    if args.device == "cuda":
        toolchain = cuda_toolchain(workdir)
        env.update(toolchain["env"])
        report.log(f"  CUDA_HOME {toolchain['env'].get('CUDA_HOME')}; extra headers/libraries {toolchain['extra']}")
    start = time.time()
    rc, out = run_logged([sys.executable, "setup.py", "build_ext", "--inplace"], report, timeout - 15,
                         log_name="build.log", env=env)
    result = dict(compile_s=round(time.time() - start, 1), toolchain=toolchain)
    if rc != 0:
        errors = [line.strip() for line in out.splitlines() if re.search(r"\berror\b[:(]|Error:|FAILED:", line)]
        tail = errors[:8] or [line.strip() for line in out.splitlines() if line.strip()][-6:]
        what = f"timed out after {timeout - 15:.0f} s" if rc is None else f"failed ({rc})"
        report.log(f"  build {what}:\n    " + "\n    ".join(tail))
        return dict(result, status="timeout" if rc is None else "failed", reason=f"{what}: " + " | ".join(tail)[:1500])
    part = workdir / "build.jsonl"
    rc, out = run_logged(child_cmd(args, "verify", part, time.time() + 30), report, 30, env=child_env())
    info = {k: v for rec in read_part(part) for k, v in rec.items()}
    result.update(info)
    ok = rc == 0 and info.get("loaded") and (args.device != "cuda" or info.get("cuda_kernels"))
    report.log(f"  built in {result['compile_s']} s; extension {info}")
    return dict(result, status="ok" if ok else "failed",
                reason=None if ok else f"the extension does not load its CUDA kernels: {info or out[-500:]}")


def real_nvcc() -> Path | None:
    """The nvcc binary, following links and one-line wrapper scripts (``exec /path/bin/nvcc "$@"``)."""
    found = shutil.which("nvcc")
    if not found:
        return None
    path = Path(found).resolve()
    with open(path, "rb") as f:
        if f.read(4) == b"\x7fELF":
            return path
    m = re.search(r"(/\S*/bin/nvcc)\b", path.read_text(errors="replace"))
    return Path(m.group(1)).resolve() if m else path


def cuda_toolchain(workdir: Path) -> dict:
    """Environment for building CUDA code: CUDA_HOME, and the CUDA library headers of the pip packages.

    torch's headers include cuBLAS/cuSPARSE/cuSOLVER headers that a CUDA
    install holding only the compiler lacks; torch's pip wheels bring them in
    site-packages/nvidia/cu13 (or nvidia/<lib>), added to CPATH/LIBRARY_PATH
    (after the toolkit's own), with a libcudart.so link when only the
    versioned library is there.
    """
    import site

    env, extra = {}, []
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if not home:
        nvcc = real_nvcc()
        if Path("/usr/local/cuda/bin/nvcc").exists():
            home = "/usr/local/cuda"
        elif nvcc is not None:
            home = str(nvcc.parent.parent)
    if home:
        env["CUDA_HOME"] = home
        env["PATH"] = f"{home}/bin{os.pathsep}{os.environ.get('PATH', '')}"
    includes, libs = [], []
    for sp in site.getsitepackages() + [site.getusersitepackages()]:
        nv = Path(sp) / "nvidia"
        includes += [str(p) for p in sorted(nv.glob("cu*/include")) + sorted(nv.glob("*/include")) if p.is_dir()]
        libs += [str(p) for p in sorted(nv.glob("cu*/lib")) + sorted(nv.glob("*/lib")) if p.is_dir()]
    includes, libs = list(dict.fromkeys(includes)), list(dict.fromkeys(libs))
    has_cudart = home and any((Path(home) / d / "libcudart.so").exists()
                              for d in ("lib64", "lib", "targets/x86_64-linux/lib"))
    if not has_cudart:
        versioned = next((p for d in libs for p in sorted(Path(d).glob("libcudart.so.*"))), None)
        if versioned is not None:
            link_dir = workdir / "cudart"
            link_dir.mkdir(exist_ok=True)
            with contextlib.suppress(FileExistsError):
                (link_dir / "libcudart.so").symlink_to(versioned)
            libs.append(str(link_dir))
    if includes:
        env["CPATH"] = os.pathsep.join(filter(None, [os.environ.get("CPATH"), *includes]))
        extra += includes
    if libs:
        env["LIBRARY_PATH"] = os.pathsep.join(filter(None, [os.environ.get("LIBRARY_PATH"), *libs]))
        extra += libs
    return dict(env=env, extra=extra, nvcc=str(real_nvcc()))


def _ext_suffix() -> str:
    import sysconfig

    return sysconfig.get_config_var("EXT_SUFFIX") or ".so"


TEST_LINE = re.compile(r"^(\S+::\S+)\s+(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)")


def stage_tests(args, report: Report, timeout: float, workdir: Path) -> dict:
    # -k cuda: the tests marked `cuda` (markers are keywords) and those with a "cuda" device parameter.
    cmd = [sys.executable, "-m", "pytest", "-v", "-rfE", "-p", "no:cacheprovider", "-k", "cuda", "tests",
           "-W", "ignore::DeprecationWarning", "--continue-on-collection-errors"]
    if _has_module("pytest_timeout"):
        cmd += ["--timeout", "120"]
    # float32 tests compare kernels at float32 tolerances: no TF32 in cuBLAS/cuDNN (NVIDIA's switch).
    env = dict(child_env(), NVIDIA_TF32_OVERRIDE="0")
    rc, out = run_logged(cmd, report, timeout - 5, log_name="pytest.log", env=env)
    counts, failed = {}, []
    for line in out.splitlines():
        m = TEST_LINE.match(line.strip())
        if m:
            counts[m.group(2).lower()] = counts.get(m.group(2).lower(), 0) + 1
            if m.group(2) in ("FAILED", "ERROR"):
                failed.append(m.group(1))
    summary = next((line.strip("= ") for line in reversed(out.splitlines()) if re.search(r"\d+ (passed|failed)", line)),
                   "")
    report.data["tests"] = dict(counts=counts, failed=failed, summary=summary, exit_code=rc)
    report.log(f"  {summary or counts}" + (f"; failed: {', '.join(failed[:20])}" if failed else ""))
    if rc is None:
        return dict(status="timeout", reason=f"pytest ran past {timeout - 5:.0f} s after {sum(counts.values())} tests")
    if rc == 5 or not counts:
        return dict(status="failed", reason="pytest collected no CUDA test")
    return dict(status="ok" if rc == 0 else "failed", reason=None if rc == 0 else f"{len(failed)} failed")


def _has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def stage_combos(args, report: Report, timeout: float, workdir: Path, stage: str) -> dict:
    """Run a stage's benchmark groups in child processes, restarting after a crash, until time runs out."""
    deadline = time.time() + timeout
    todo = bench_combos(stage, args.sizes, args.device)
    done: dict[str, list] = {}
    attempt = 0
    while todo and deadline - time.time() > CHILD_START_S + 5:
        attempt += 1
        part = workdir / f"{stage}-{attempt}.jsonl"
        rc, out = run_logged(child_cmd(args, stage, part, deadline - 3, todo), report, deadline - time.time(),
                             env=child_env())
        started = None
        for rec in read_part(part):
            if rec.get("event") == "start":
                started = rec["id"]
            elif rec.get("event") == "result":
                done.setdefault(rec["id"], []).append(rec)
                report.data["bench"].append(rec)
                started = None
        if started is not None:  # the child died or was stopped inside this group
            why = "timed out" if rc is None else f"the process exited {rc}"
            rec = dict(event="result", id=started, stage=stage, status="crashed", reason=f"{why}: {_last_line(out)}")
            rec.update(_combo_fields(started))
            done.setdefault(started, []).append(rec)
            report.data["bench"].append(rec)
        todo = [c for c in todo if c["id"] not in done]
        if rc == 0 or rc is None:
            break
    for c in todo:
        rec = dict(event="result", id=c["id"], stage=stage, status="skipped", reason="time budget",
                   **_combo_fields(c["id"]))
        report.data["bench"].append(rec)
    ran = sum(1 for recs in done.values() for r in recs if r.get("status") == "ok")
    bad = [r for recs in done.values() for r in recs if r.get("status") in ("failed", "crashed")]
    for r in bad:
        report.log(f"  {r['id']} graph={r.get('graph')}: {r['status']}: {r.get('reason')}")
    report.log(f"  {ran} measurement(s) ok, {len(bad)} failed, {len(todo)} group(s) not reached")
    status = "ok" if not bad and not todo else ("partial" if ran else "failed")
    return dict(status=status, measurements_ok=ran, failed=len(bad), not_reached=len(todo))


def _combo_fields(combo_id: str) -> dict:
    path, size, precision = combo_id.split("-")
    return dict(path=path, size=int(size), precision=precision)


def _last_line(out: str) -> str:
    lines = [line for line in out.strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


def stage_f16(args, report: Report, timeout: float, workdir: Path) -> dict:
    f16 = find_f16(args)
    if f16 is None or not f16.is_file():
        return dict(status="skipped", reason=f"F16 image not found: {args.f16 or DEFAULT_F16}")
    part = workdir / "f16.jsonl"
    rc, out = run_logged(child_cmd(args, "f16", part, time.time() + timeout - 2), report, timeout - 2,
                         env=child_env())
    recs = read_part(part)
    result = next((r for r in recs if r.get("event") == "result"), None)
    progress = [r for r in recs if r.get("event") == "progress"]
    if result is None:
        last = progress[-1] if progress else {}
        why = "timed out" if rc is None else f"exited {rc}: {_last_line(out)}"
        report.data["f16"] = dict(progress=last)
        report.log(f"  F16 {why}; last progress {last}")
        return dict(status="timeout" if rc is None else "failed", reason=why)
    report.data["f16"] = result
    report.log(f"  F16 {result['size']}: PSNR {result['psnr']:.2f} dB (noisy {result['psnr_noisy']:.2f}) in "
               f"{result['restore_s']:.1f} s, {result['iterations']} iterations, stop: {result['stop_reason']}")
    return dict(status="ok")


STAGE_FUNCS = {"env": stage_env, "build": stage_build, "tests": stage_tests,
               "bench": lambda *a: stage_combos(*a, stage="bench"), "f16": stage_f16,
               "compile": lambda *a: stage_combos(*a, stage="compile")}


def stage_timeout(index: int, skip, deadline: float, now: float) -> float:
    """A stage's time: its cap, less what the later stages' floors keep back from the time left."""
    later = sum(s.floor_s for s in STAGES[index + 1:] if s.name not in skip)
    return min(STAGES[index].cap_s, deadline - now - later)


def run_all(args) -> int:
    started = time.time()
    deadline = started + args.budget
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    report = Report(out, args, started)
    report.log(f"dip gpu-check: {ROOT} -> {out}, budget {args.budget:.0f} s, commit {report.data['commit']}")
    workdir = Path(tempfile.mkdtemp(prefix="dip-gpu-check-"))
    for i, stage in enumerate(STAGES):
        if stage.name in args.skip:
            report.data["stages"][stage.name] = dict(status="skipped", reason="--skip")
            continue
        timeout = stage_timeout(i, args.skip, deadline, time.time())
        if timeout < 5:
            report.data["stages"][stage.name] = dict(status="skipped", reason="time budget")
            report.log(f"[{stage.name}] skipped: {timeout:.0f} s left for it")
            continue
        report.log(f"[{stage.name}] {stage.what} (up to {timeout:.0f} s)")
        t0 = time.time()
        try:
            result = STAGE_FUNCS[stage.name](args, report, timeout, workdir)
        except Exception as exc:  # a stage's own bug must not stop the others
            result = dict(status="failed", reason=f"{type(exc).__name__}: {exc}")
        result["seconds"] = round(time.time() - t0, 1)
        report.data["stages"][stage.name] = result
        report.save()
    report.data["total_s"] = round(time.time() - started, 1)
    report.save()
    shutil.rmtree(workdir, ignore_errors=True)
    table = summary_table(report.data)
    report.log(table)
    bad = [n for n, s in report.data["stages"].items() if s.get("status") not in ("ok", "skipped")]
    return 1 if bad else 0


# --- the summary table ----------------------------------------------------------------------------


def summary_table(data: dict) -> str:
    """The compact table printed last: stages, ms/iteration per path and precision, ratios, F16."""
    env = data.get("env", {})
    lines = [f"== dip gpu-check: {env.get('gpu', '?')} | torch {env.get('torch', '?')} | CUDA {env.get('torch_cuda', '?')}"
             f" | commit {str(data.get('commit', '?'))[:10]} | {data.get('total_s', '?')} s =="]
    for name, s in data.get("stages", {}).items():
        lines.append(f"{name:<8} {s.get('status', '?'):<8} {s.get('seconds', 0):>6} s  {s.get('reason') or ''}"[:160])
    tests = data.get("tests") or {}
    if tests:
        lines.append(f"tests: {tests.get('summary') or tests.get('counts')}")
        lines += [f"  FAILED {t}" for t in tests.get("failed", [])[:15]]
    lines += bench_table(data.get("bench", []))
    f16 = data.get("f16") or {}
    if f16.get("psnr") is not None:
        lines.append(f"F16 {f16['size']}: PSNR {f16['psnr']:.2f} dB (noisy {f16['psnr_noisy']:.2f} dB), "
                     f"restore() {f16['restore_s']:.1f} s wall, {f16['iterations']} iterations "
                     f"(picked {f16.get('stopped_at')}), stop: {f16['stop_reason']}; targets <= 30 s, >= 32 dB")
    elif f16:
        lines.append(f"F16: not finished; last progress {f16.get('progress')}")
    return "\n".join(lines)


def _timings(records: list[dict]) -> tuple[dict, dict]:
    """Median ms of the successful records: single networks by (path, precision, size, graph), and
    ensembles by (members, size, precision) then (path, graph)."""
    single, ensembles = {}, {}
    for r in records:
        if r.get("status") != "ok":
            continue
        if r.get("members", 1) > 1:
            ensembles.setdefault((r["members"], r["size"], r["precision"]), {})[(r["path"], bool(r["graph"]))] = \
                r["median_ms"]
        else:
            single[(r["path"], r["precision"], r["size"], bool(r["graph"]))] = r["median_ms"]
    return single, ensembles


def bench_table(records: list[dict]) -> list[str]:
    ms, ensembles = _timings(records)
    sizes = sorted({r["size"] for r in records if "size" in r})
    if not sizes:
        return []
    head = "ms/iteration".ljust(17) + "".join(f"{f'{s}² eager':>11}{f'{s}² graph':>11}" for s in sizes)
    lines = [head]
    for path in PATHS:
        for prec in PRECISIONS:
            cells = []
            for s in sizes:
                for graph in (False, True):
                    v = ms.get((path, prec, s, graph))
                    cells.append(f"{v:>11.2f}" if v is not None else f"{'-':>11}")
            lines.append(f"{path:<8}{prec:<9}" + "".join(cells))
    for s in sizes:
        for prec in PRECISIONS:
            parts = []
            for graph in (False, True):
                f, e, c = (ms.get((p, prec, s, graph)) for p in PATHS)
                tag = "graph" if graph else "no graph"
                if f and e:
                    parts.append(f"eager/fused {e / f:.2f}x ({tag})")
                if f and c:
                    parts.append(f"compile/fused {c / f:.2f}x ({tag})")
            if parts:
                lines.append(f"  {s}² {prec}: " + ", ".join(parts))
    lines += _ensemble_lines(ensembles, ms)
    bad = [r for r in records if r.get("status") not in ("ok", None)]
    for r in bad[:12]:
        lines.append(f"  {r['id']} graph={r.get('graph', '-')}: {r['status']}: {str(r.get('reason'))[:110]}")
    return lines


def _ensemble_lines(ensembles: dict, single: dict) -> list[str]:
    """One line per ensemble benchmark: ms per iteration, eager/fused, and the cost per member vs one network."""
    lines = []
    for (k, s, prec), t in sorted(ensembles.items()):
        for graph in (False, True):
            f, e = t.get(("fused", graph)), t.get(("eager", graph))
            if f is None and e is None:
                continue
            tag = "graph" if graph else "no graph"
            cells = [f"{p} {v:.2f} ms" for p, v in (("fused", f), ("eager", e)) if v is not None]
            if f and e:
                cells.append(f"eager/fused {e / f:.2f}x")
            one = single.get(("fused", prec, s, graph))
            if f and one:
                cells.append(f"fused per member / one fused network {f / k / one:.2f}x")
            lines.append(f"  ensemble K={k} {s}² {prec} ({tag}): " + ", ".join(cells))
    return lines


# --- children: run inside fresh processes, write JSON lines to --part ------------------------------


class Part:
    """Appends JSON records to the part file, flushed at once (a killed child leaves what it wrote)."""

    def __init__(self, path: str):
        self.path = path

    def emit(self, **record) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record, default=str) + "\n")


def child_env_probe(args, part: Part) -> None:
    import torch

    info = dict(torch=torch.__version__, torch_cuda=torch.version.cuda,
                cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
                cuda_available=torch.cuda.is_available())
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, capability=f"{props.major}.{props.minor}", sms=props.multi_processor_count,
                    gpu_memory_gib=round(props.total_memory / 2**30, 1), device_count=torch.cuda.device_count())
    part.emit(**info)


def child_verify(args, part: Part) -> None:
    import torch

    from dip import _extension

    info = dict(_extension.build_info())
    info["cuda_kernels"] = bool(_extension.has_op("conv_block") and all(
        torch._C._dispatch_has_kernel_for_dispatch_key(f"dip::{op}", "CUDA")
        for op in ("conv_block", "conv_block_backward", "lanczos_downsample", "_lanczos_downsample_backward")))
    part.emit(**info)


def _sync(torch, device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _set_tf32(torch, on: bool) -> None:
    torch.backends.cuda.matmul.allow_tf32 = on
    torch.backends.cudnn.allow_tf32 = on


def _autocast(torch, precision: str, device: str):
    if precision != "bf16":
        return contextlib.nullcontext()
    # cache_enabled=False: autocast's weight-cast cache must not outlive a captured graph.
    return torch.autocast(device_type=device, dtype=torch.bfloat16, cache_enabled=False)


def _time_ms(torch, fn, iters: int, device: str) -> list[float]:
    """Per-call times in ms: CUDA events around each call on CUDA, the host clock (after a sync) elsewhere."""
    times = []
    if device == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        times = [s.elapsed_time(e) for s, e in events]
    else:
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def _iterations_for(torch, fn, device: str, seconds: float = 0.75) -> int:
    """How many timed calls fit in about ``seconds`` (5 to 50), from two calls."""
    _sync(torch, device)
    t0 = time.perf_counter()
    fn()
    fn()
    _sync(torch, device)
    per = (time.perf_counter() - t0) / 2
    return int(max(5, min(50, seconds / max(per, 1e-6))))


def _make_net(torch, combo: dict):
    from dip.nn import FusedConvBlock, build_network

    members = combo.get("members", 1)
    torch.manual_seed(0)
    net = build_network("denoise", fused=None if combo["path"] == "fused" else False, members=members)
    net = net.to(combo["device"])
    if combo["path"] == "fused" and not any(isinstance(m, FusedConvBlock) for m in net.modules()):
        raise RuntimeError("the fused net has no fused blocks: the extension is not loaded")
    g = torch.Generator().manual_seed(0)
    size = combo["size"]
    z = (torch.rand(1, members * net.config.in_channels, size, size, generator=g) * 0.1).to(combo["device"])
    target = torch.rand(members, 3, size, size, generator=g).to(combo["device"])
    return net, z, target


def _measure_group(torch, combo: dict, part: Part, deadline: float) -> None:
    """Time one (path, size, precision) without and with a CUDA graph of the whole step."""
    import torch.nn.functional as F

    from dip.ops import device_check

    device, precision = combo["device"], combo["precision"]
    _set_tf32(torch, precision != "float32")
    net, z, target = _make_net(torch, combo)
    model = torch.compile(net, fullgraph=True, dynamic=False) if combo["path"] == "compile" else net
    base = dict(event="result", id=combo["id"], stage=combo.get("stage"), path=combo["path"], size=combo["size"],
                members=combo.get("members", 1), precision=precision, device=device, tf32=precision != "float32",
                note=combo_notes(combo["path"], precision, device))
    for graph in (False, True):
        rec = dict(base, graph=graph)
        if graph and device != "cuda":
            part.emit(**rec, status="skipped", reason="CUDA graphs need a CUDA device")
            continue
        if time.time() > deadline - 5:
            part.emit(**rec, status="skipped", reason="time budget")
            continue
        try:
            rec.update(_measure(torch, F, model, net, z, target, precision, device, graph))
            rec["status"] = "ok"
            if combo["path"] == "fused":
                rec["device_check"] = device_check.verdicts()
                if not all(rec["device_check"].values()):
                    rec["status"] = "fallback"
                    rec["reason"] = "a fused kernel failed its device check: the reference ran"
        except Exception as exc:
            rec.update(status="failed", reason=f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:400]}"
                       if str(exc).strip() else type(exc).__name__)
            part.emit(**rec)
            _check_device_alive(torch, device)
            continue
        part.emit(**rec)


def _check_device_alive(torch, device: str) -> None:
    """Exit (for a restart) when the CUDA context is broken, e.g. after a failed capture or a bad access."""
    try:
        _sync(torch, device)
        torch.zeros(1, device=device).add_(1).cpu()
    except Exception:
        os._exit(3)


def _measure(torch, F, model, net, z, target, precision: str, device: str, graph: bool) -> dict:
    opt = torch.optim.Adam(net.parameters(), lr=0.01, capturable=graph)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def body():
        with _autocast(torch, precision, device):
            out = model(z)
        loss = F.mse_loss(out.float(), target)
        loss.backward()
        opt.step()
        return loss

    def step():
        opt.zero_grad(set_to_none=True)
        return body()

    t0 = time.perf_counter()
    step()  # the first call: compilation, cuDNN autotuning, the device check of fused kernels
    _sync(torch, device)
    first_s = time.perf_counter() - t0
    if not graph:
        for _ in range(2):
            step()
        fn = step
        result = {}
    else:
        fn, loss_holder = _capture(torch, step, body, opt)
        result = {"captured": True}
    iters = _iterations_for(torch, fn, device)
    times = _time_ms(torch, fn, iters, device)
    result.update(median_ms=round(statistics.median(times), 3), min_ms=round(min(times), 3), iters=iters,
                  first_call_s=round(first_s, 2))
    if device == "cuda":
        result["peak_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    loss = loss_holder[0] if graph else step()
    result["loss"] = float(loss.detach().float())
    if not (result["loss"] == result["loss"]):
        raise FloatingPointError("the loss is NaN after the timed iterations")
    return result


def _capture(torch, step, body, opt):
    """Capture forward, backward and the Adam step into one CUDA graph; returns (replay, [static loss])."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=True)
    with torch.cuda.graph(g):
        static_loss = body()
    g.replay()
    torch.cuda.synchronize()
    return g.replay, [static_loss]


def child_bench(args, part: Part) -> None:
    import torch

    if args.device == "cuda":
        torch.backends.cudnn.benchmark = True  # every path alike; the first call autotunes (not timed)
        torch.zeros(1, device="cuda")
    combos = json.loads(args.combos)
    compile_s = None
    for combo in combos:
        left = args.deadline - time.time()
        need = 10 + (compile_s or 20) * 1.2 if combo["path"] == "compile" else 5
        if left < need:
            for graph in (False, True):
                part.emit(event="result", id=combo["id"], stage=combo.get("stage"), path=combo["path"],
                          size=combo["size"], precision=combo["precision"], graph=graph, status="skipped",
                          reason=f"time budget ({left:.0f} s left, about {need:.0f} s needed)")
            continue
        part.emit(event="start", id=combo["id"])
        t0 = time.time()
        _measure_group(torch, combo, part, args.deadline)
        if combo["path"] == "compile":
            compile_s = max(compile_s or 0, time.time() - t0)
        if args.device == "cuda":
            torch.cuda.empty_cache()


def _psnr(a, b) -> float:
    import numpy as np

    mse = float(np.mean((np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


def child_f16(args, part: Part) -> None:
    import inspect

    import numpy as np
    import torch
    from PIL import Image

    import dip

    clean = np.asarray(Image.open(args.f16).convert("RGB"), dtype=np.float32) / 255.0
    if args.f16_size:
        clean = np.ascontiguousarray(clean[: args.f16_size, : args.f16_size])
    rng = np.random.default_rng(0)
    noisy = np.clip(clean + rng.normal(0, 25 / 255, clean.shape), 0, 1).astype(np.float32)
    if args.device == "cuda":
        torch.zeros(1, device="cuda")
        torch.cuda.synchronize()
    t_start = time.perf_counter()
    kwargs = dict(iterations=args.f16_iterations or "auto", reference=clean, device=args.device, progress=False)
    if "callbacks" in inspect.signature(dip.restore).parameters:
        def progress(step):
            it = getattr(step, "iteration", None)
            if it is not None and it % 250 == 0:
                part.emit(event="progress", iteration=it, seconds=round(time.perf_counter() - t_start, 1))

        kwargs["callbacks"] = [progress]
    result = dip.restore(noisy, "denoise", **kwargs)
    _sync(torch, args.device)
    restore_s = time.perf_counter() - t_start
    image = np.asarray(result.image, dtype=np.float32)
    rec = dict(event="result", size=f"{clean.shape[1]}x{clean.shape[0]}", restore_s=round(restore_s, 2),
               psnr=round(_psnr(image, clean), 3), psnr_noisy=round(_psnr(noisy, clean), 3),
               psnr_reported=getattr(result, "psnr", None), iterations=getattr(result, "iterations", None),
               stopped_at=getattr(result, "stopped_at", None), stop_reason=str(getattr(result, "stop_reason", "?")),
               fit_s=getattr(result, "seconds", None), device=args.device, image=args.f16, sigma=25,
               noise="numpy default_rng(0), clipped to [0, 1]")
    if args.device == "cuda":
        from dip.ops import device_check

        rec["peak_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        rec["device_check"] = device_check.verdicts()
    part.emit(**rec)
    with contextlib.suppress(Exception):
        Image.fromarray((np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8)).save(Path(args.out) / "f16_restored.png")


CHILDREN = {"env": child_env_probe, "verify": child_verify, "bench": child_bench, "compile": child_bench,
            "f16": child_f16}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        CHILDREN[args.child](args, Part(args.part))
        return 0
    p = plan(args)
    if args.dry_run:
        print_plan(p)
        return 0 if not p["problems"] else 2
    if p["problems"]:
        print("gpu-check: " + "; ".join(p["problems"]) + " (the stages that need them are skipped)", flush=True)
    return run_all(args)


if __name__ == "__main__":
    sys.exit(main())
