"""Batch restoration on a local pool of worker processes, on tiny images with a tiny network.

Every batch here spawns real worker processes, so the images are at most 32²
and the fits a few iterations long.
"""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from batch_helpers import SIZES, TINY, CrashOnce, NaNNet, write_images
from PIL import Image

import dip
from dip.batch import RecordStatus, image_seed, output_is_valid
from dip.errors import DipError
from dip.fit.settings import StopReason

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
LEAK = "leaked semaphore"


def _manifest(out_dir):
    lines = (Path(out_dir) / "manifest.jsonl").read_text().splitlines()
    return {Path(r["input"]).name: r for r in map(json.loads, lines)}


@pytest.fixture(scope="module")
def batch_inputs(tmp_path_factory):
    """Five tiny images, one corrupt file, and references for the good ones."""
    from conftest import _astronaut

    root = tmp_path_factory.mktemp("batch")
    good = write_images(root / "in", _astronaut)
    (root / "in" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    write_images(root / "ref", _astronaut)
    return root, good


@pytest.fixture(scope="module")
def local_run(batch_inputs):
    root, _ = batch_inputs
    out = root / "out-local"
    summary = dip.restore_many(root / "in", out, "denoise", workers=2, seed=7, reference_dir=root / "ref",
                               progress=False, **TINY)
    return out, summary


def test_local_pool_restores_every_image(batch_inputs, local_run):
    _, good = batch_inputs
    out, summary = local_run
    assert (summary.ok, summary.failed, summary.skipped) == (len(good), 1, 0)
    manifest = _manifest(out)
    assert set(manifest) == {p.name for p in good} | {"broken.png"}
    settings = {r["settings"] for r in manifest.values()}
    assert len(settings) == 1 and None not in settings
    for path, (h, w) in zip(good, SIZES):
        record = manifest[path.name]
        assert record["status"] == "ok" and record["iterations"] == TINY["iterations"]
        assert record["stop_reason"] == "completed" and record["seconds"] > 0
        assert record["psnr"] is not None and record["psnr"] > 5
        assert isinstance(record["ssim"], float) and -1 <= record["ssim"] <= 1  # dip.metrics.ssim (scikit-image)
        assert record["seed"] == image_seed(7, path.name)
        with Image.open(record["output"]) as img:
            assert img.size == (w, h)
    assert all(r.status is RecordStatus.OK for r in summary.records if Path(r.input).name != "broken.png")


def test_corrupt_input_is_reported_failed_after_one_retry(local_run):
    out, _ = local_run
    record = _manifest(out)["broken.png"]
    assert record["status"] == "failed" and record["attempts"] == 2
    assert "cannot read" in record["error"]
    assert not Path(record["output"]).exists()


def test_second_run_skips_everything_and_other_settings_need_force(tmp_path, make_image):
    write_images(tmp_path / "in", make_image, SIZES[:3])
    first = dip.restore_many(tmp_path / "in", tmp_path / "out", "super-resolve", factor=2, workers=2,
                             progress=False, **TINY)
    assert first.ok == 3
    for path, (h, w) in zip(sorted((tmp_path / "out").glob("*.png")), SIZES[:3]):
        assert Image.open(path).size == (2 * w, 2 * h)
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "out").glob("*.png")}
    second = dip.restore_many(tmp_path / "in", tmp_path / "out", "super_resolution", factor=2, workers=2,
                              progress=False, **TINY)
    assert (second.ok, second.failed, second.skipped) == (0, 0, 3)
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "out").glob("*.png")} == stamps
    records = _manifest(tmp_path / "out")
    assert all(r["status"] == "skipped" and r["iterations"] == TINY["iterations"] for r in records.values())

    # Another iteration count: refused with a clear message, nothing touched …
    other = dict(TINY, iterations=TINY["iterations"] + 1)
    with pytest.raises(DipError, match=r"3 output\(s\) .* made with other settings.*--force"):
        dip.restore_many(tmp_path / "in", tmp_path / "out", "super_resolution", factor=2, workers=2,
                         progress=False, **other)
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "out").glob("*.png")} == stamps
    # … and redone with force.
    forced = dip.restore_many(tmp_path / "in", tmp_path / "out", "super_resolution", factor=2, workers=2,
                              force=True, progress=False, **other)
    assert (forced.ok, forced.skipped) == (3, 0)
    assert all(r["iterations"] == other["iterations"] for r in _manifest(tmp_path / "out").values())


def test_invalid_output_is_redone(tmp_path, make_image):
    write_images(tmp_path / "in", make_image, SIZES[:1])
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "img0.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    summary = dip.restore_many(tmp_path / "in", tmp_path / "out", "denoise", workers=1, progress=False, **TINY)
    assert summary.ok == 1
    assert output_is_valid(tmp_path / "out" / "img0.png", (SIZES[0][1], SIZES[0][0]))


def test_diverged_fit_is_failed_retried_with_a_new_seed_and_redone_on_a_rerun(tmp_path, make_image):
    """Bug 2: a diverged fit was recorded ok, written, retried with its old seed, and skipped as done."""
    write_images(tmp_path / "in", make_image, SIZES[:1])
    out = tmp_path / "out"
    for run in range(2):
        summary = dip.restore_many(tmp_path / "in", out, "denoise", workers=1, seed=3, retries=1, progress=False,
                                   network=NaNNet(), iterations=3)
        assert (summary.ok, summary.failed, summary.skipped) == (0, 1, 0), f"run {run}"
        record = summary.records[0]
        assert record.status is RecordStatus.FAILED and record.stop_reason is StopReason.DIVERGED
        assert "diverged" in record.error and record.attempts == 2
        assert record.seed == image_seed(3, "img0.png#retry1") != image_seed(3, "img0.png")
        assert not (out / "img0.png").exists(), "a diverged fit was written as done"
        assert _manifest(out)["img0.png"]["stop_reason"] == "diverged"


def test_worker_that_dies_is_replaced_and_its_image_retried(tmp_path, make_image):
    write_images(tmp_path / "in", make_image, SIZES[:3])
    marker = tmp_path / "crashed"
    summary = dip.restore_many(tmp_path / "in", tmp_path / "out", "denoise", workers=2, progress=False,
                               callbacks=[CrashOnce(marker)], **TINY)
    assert marker.exists()
    assert (summary.ok, summary.failed) == (3, 0)
    assert max(r.attempts for r in summary.records) == 2


def test_inpaint_batch_with_mask_pattern(tmp_path, make_image):
    write_images(tmp_path / "in", make_image, SIZES[:2])
    (tmp_path / "masks").mkdir()
    for i, (h, w) in enumerate(SIZES[:2]):
        m = np.full((h, w), 255, np.uint8)
        m[4:10, 4:10] = 0
        Image.fromarray(m).save(tmp_path / "masks" / f"img{i}_mask.png")
    (tmp_path / "in" / "nomask.png").write_bytes((tmp_path / "in" / "img0.png").read_bytes())
    summary = dip.restore_many(tmp_path / "in", tmp_path / "out", "inpaint",
                               masks=str(tmp_path / "masks" / "{stem}_mask.png"), workers=1, progress=False, **TINY)
    records = _manifest(tmp_path / "out")
    assert records["img0.png"]["status"] == records["img1.png"]["status"] == "ok"
    assert records["nomask.png"]["status"] == "failed"
    assert "mask for nomask.png not found" in records["nomask.png"]["error"]
    assert summary.failed == 1


def test_recursive_batch_mirrors_the_tree_and_skips_its_own_outputs(tmp_path, make_image, capsys):
    from dip.cli import main

    write_images(tmp_path / "in", make_image, SIZES[:1])
    write_images(tmp_path / "in" / "a" / "b", make_image, SIZES[1:2])
    out = tmp_path / "in" / "restored"  # inside the input tree: its files must not become inputs
    args = ["batch", str(tmp_path / "in"), "-o", str(out), "--task", "denoise", "--recursive",
            "--iterations", "2", "--network", "small", "--workers", "1", "-q"]
    assert main(args) == 0
    assert "2 restored" in capsys.readouterr().out
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png")) == ["a/b/img0.png", "img0.png"]
    with Image.open(out / "a" / "b" / "img0.png") as img:
        assert img.size == (SIZES[1][1], SIZES[1][0])
    assert main(args) == 0
    assert "0 restored, 2 skipped, 0 failed" in capsys.readouterr().out


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_stop_signal_then_rerun_completes_without_truncated_files(tmp_path, make_image, signum):
    n = 6
    write_images(tmp_path / "in", make_image, [(32, 32)] * n)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "dip.cli", "batch", str(tmp_path / "in"), "-o", str(out), "--task", "denoise",
           "--iterations", "150", "--network", "small", "--workers", "2", "-q"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**ENV, "PYTHONFAULTHANDLER": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not list(out.glob("img*.png")) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert proc.poll() is None, "the batch ended before it could be interrupted: " + proc.stderr.read()
        proc.send_signal(signum)
        err = _stderr_or_stacks(proc, timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "interrupted" in err and LEAK not in err
    done = list(out.glob("img*.png"))
    assert 0 < len(done) < n
    for path in done:  # every output there is complete
        with Image.open(path) as img:
            img.load()
            assert img.size == (32, 32)
    assert not list(out.glob(".*.tmp*")), "a temporary file was left behind"
    assert {r["status"] for r in _manifest(out).values()} <= {"ok"}
    if signum != signal.SIGTERM:
        return
    summary = dip.restore_many(tmp_path / "in", out, "denoise", workers=2, progress=False, network="small",
                               iterations=150)
    assert summary.skipped == len(done) and summary.ok == n - len(done) and summary.failed == 0
    assert len(list(out.glob("img*.png"))) == n


def test_a_stop_signal_takes_effect_where_the_runner_looks_not_inside_the_pool(tmp_path, make_image, monkeypatch):
    """The signal lands while the runner is inside concurrent.futures (here: its ``wait``).

    A handler that raised there could leave one of the pool's locks half-taken and its manager thread waiting on
    it forever; the handler only notes the request, the call returns, and the runner stops the pool afterwards.
    """
    import dip.batch.local as local

    write_images(tmp_path / "in", make_image, SIZES[:3])
    real_wait, returned = local.wait, []

    def wait_receiving_sigterm(*args, **kwargs):
        if not returned:
            os.kill(os.getpid(), signal.SIGTERM)
        result = real_wait(*args, **kwargs)
        returned.append(True)
        return result

    monkeypatch.setattr(local, "wait", wait_receiving_sigterm)
    before = signal.getsignal(signal.SIGTERM)
    summary = dip.restore_many(tmp_path / "in", tmp_path / "out", "denoise", workers=1, progress=False,
                               network="small", iterations=400)
    assert returned, "the stop was raised inside the pool's wait"
    assert summary.interrupted and summary.ok < 3
    assert signal.getsignal(signal.SIGTERM) is before


def test_stop_on_signals_notes_the_signal_and_gives_the_handlers_back():
    from dip.batch.interrupt import BatchInterrupted, stop_on_signals

    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    with stop_on_signals() as stop:
        stop.check()  # nothing requested yet
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)  # the handlers ran: they did not raise
        assert stop.requested and stop.signal == "SIGINT"
        with pytest.raises(BatchInterrupted, match="SIGINT"):
            stop.check()
    assert {s: signal.getsignal(s) for s in before} == before


def _stderr_or_stacks(proc, timeout):
    """The stderr of ``proc`` once it ends; if it has not ended within ``timeout`` s, fail with the Python stacks
    of it and its workers (``PYTHONFAULTHANDLER=1`` in its environment makes SIGABRT print them)."""
    try:
        return proc.communicate(timeout=timeout)[1]
    except subprocess.TimeoutExpired:
        exited = proc.poll()
        for pid in [*_children(proc.pid), proc.pid]:
            try:
                os.kill(pid, signal.SIGABRT)
            except ProcessLookupError:
                pass
        _, err = proc.communicate(timeout=60)
        pytest.fail(f"the batch had not finished {timeout} s after the signal (exit status then: {exited}, "
                    f"None = still running); its stderr and stacks:\n{err[-30000:]}")


def _children(pid):
    """Pids of the live (not zombie) processes whose parent is ``pid``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(entry.name))
    return found


def _alive(pid):
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc to find the workers")
def test_workers_die_with_a_killed_parent(tmp_path, make_image):
    write_images(tmp_path / "in", make_image, [(32, 32)] * 2)
    cmd = [sys.executable, "-m", "dip.cli", "batch", str(tmp_path / "in"), "-o", str(tmp_path / "out"),
           "--task", "denoise", "--iterations", "1000000", "--network", "small", "--workers", "2", "-q"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers = []
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            workers = [p for p in _children(proc.pid)
                       if b"spawn_main" in Path(f"/proc/{p}/cmdline").read_bytes() and
                       b"resource_tracker" not in Path(f"/proc/{p}/cmdline").read_bytes()]
            if len(workers) == 2:
                break
            time.sleep(0.1)
        assert len(workers) == 2, "the workers did not start"
        time.sleep(5)  # let them get into their fits
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        deadline = time.monotonic() + 30
        while any(_alive(p) for p in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        survivors = [p for p in workers if _alive(p)]
    finally:
        for p in workers:
            if _alive(p):
                os.kill(p, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()
    assert not survivors, "workers kept running after their parent was killed"


SCRIPT = """
import dip
IN, OUT = {inputs!r}, {out!r}

def main():
    summary = dip.restore_many(IN, OUT, "denoise", workers=1, network="small", iterations=2, progress=False)
    print(summary)
"""


@pytest.mark.parametrize("guarded", [False, True], ids=["no-main-guard", "main-guard"])
def test_script_without_main_guard_is_told_what_to_do(tmp_path, make_image, guarded):
    write_images(tmp_path / "in", make_image, SIZES[:2])
    script = tmp_path / "restore_all.py"
    tail = 'if __name__ == "__main__":\n    main()\n' if guarded else "main()\n"
    script.write_text(textwrap.dedent(SCRIPT.format(inputs=str(tmp_path / "in"), out=str(tmp_path / "out"))) + tail)
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=ENV, capture_output=True, text=True,
                          timeout=300)
    assert LEAK not in proc.stderr
    if guarded:
        assert proc.returncode == 0, proc.stderr
        assert "2 restored, 0 skipped, 0 failed" in proc.stdout
    else:
        assert proc.returncode != 0
        assert 'if __name__ == "__main__":' in proc.stderr and str(script) in proc.stderr
        assert "worker process died" not in proc.stderr + proc.stdout
        assert proc.stderr.count("Traceback") == 1, proc.stderr  # the parent's only: workers leave quietly


def test_cli_batch_exit_status(batch_inputs, tmp_path, capsys):
    root, good = batch_inputs
    from dip.cli import main

    args = ["batch", str(root / "in" / "img[01].png"), "-o", str(tmp_path / "out"), "--task", "denoise",
            "--iterations", "2", "--network", "small", "--workers", "1", "-q"]
    assert main(args) == 0
    assert "2 restored, 0 skipped, 0 failed" in capsys.readouterr().out
    assert main(["batch", str(root / "in"), "-o", str(tmp_path / "out2"), "--task", "super-resolve", "-q"]) == 1
    assert "--factor" in capsys.readouterr().err


def test_ssim_is_null_without_scikit_image(batch_inputs, tmp_path, monkeypatch):
    from dip.batch.records import Job
    from dip.batch.worker import restore_one
    from dip.tasks import Task

    root, good = batch_inputs
    monkeypatch.setitem(sys.modules, "skimage.metrics", None)  # "import skimage.metrics" raises ImportError
    job = Job(name=good[0].name, input=str(good[0]), output=str(tmp_path / "out.png"), seed=0,
              reference=str(root / "ref" / good[0].name))
    record = restore_one(job, Task.DENOISE, dict(TINY, iterations=2))
    assert record.status is RecordStatus.OK, record.error
    assert record.psnr is not None and record.ssim is None
    assert record.to_json()["ssim"] is None


def test_cli_batch_rerun_with_another_ensemble_needs_force(batch_inputs, tmp_path, capsys):
    root, _ = batch_inputs
    from dip.cli import main

    args = ["batch", str(root / "in" / "img0.png"), "-o", str(tmp_path / "out"), "--task", "denoise",
            "--iterations", "2", "--network", "small", "--workers", "1", "-q"]
    assert main(args) == 0
    first = _manifest(tmp_path / "out")["img0.png"]
    stamp = (tmp_path / "out" / "img0.png").stat().st_mtime_ns
    capsys.readouterr()
    assert main([*args, "--ensemble", "2"]) == 1
    err = capsys.readouterr().err
    assert "made with other settings" in err and "--force" in err and "Traceback" not in err
    assert (tmp_path / "out" / "img0.png").stat().st_mtime_ns == stamp
    assert main([*args, "--ensemble", "2", "--force"]) == 0
    redone = _manifest(tmp_path / "out")["img0.png"]
    assert redone["status"] == "ok" and redone["settings"] != first["settings"]
    assert main([*args, "--ensemble", "2"]) == 0  # the same K again: skipped
    assert _manifest(tmp_path / "out")["img0.png"]["status"] == "skipped"
