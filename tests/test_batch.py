"""Batch restoration (``dip.restore_many`` / ``dip batch``) on tiny images with a tiny network.

Every batch here spawns real worker processes (or Ray workers), so the images
are at most 32² and the fits a few iterations long.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import dip
from dip.batch import _find_companion, image_seed, output_is_valid
from dip.errors import DipError

ROOT = Path(__file__).resolve().parent.parent
TINY = dict(network="small", iterations=4)
SIZES = [(24, 20), (20, 28), (32, 32), (28, 24), (24, 24)]


class CrashOnce:
    """A fit callback that kills its worker process at iteration 2 of the first fit to get there."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __call__(self, step):
        if step.iteration != 2:
            return False
        try:
            os.close(os.open(self.marker, os.O_CREAT | os.O_EXCL))  # only one process wins
        except FileExistsError:
            return False
        os._exit(3)


def _write_images(folder, make_image, sizes=SIZES, prefix="img"):
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (h, w) in enumerate(sizes):
        path = folder / f"{prefix}{i}.png"
        Image.fromarray((make_image((h, w)) * 255).astype(np.uint8)).save(path)
        paths.append(path)
    return paths


def _manifest(out_dir):
    lines = (Path(out_dir) / "manifest.jsonl").read_text().splitlines()
    return {Path(r["input"]).name: r for r in map(json.loads, lines)}


def _outputs(out_dir):
    return {p.name: p.read_bytes() for p in sorted(Path(out_dir).glob("*.png"))}


@pytest.fixture(scope="module")
def batch_inputs(tmp_path_factory):
    """Five tiny images, one corrupt file, and references for the good ones."""
    from conftest import _astronaut

    root = tmp_path_factory.mktemp("batch")
    good = _write_images(root / "in", _astronaut)
    (root / "in" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    _write_images(root / "ref", _astronaut)
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
    for path, (h, w) in zip(good, SIZES):
        record = manifest[path.name]
        assert record["status"] == "ok" and record["iterations"] == TINY["iterations"]
        assert record["stop_reason"] == "completed" and record["seconds"] > 0
        assert record["psnr"] is not None and record["psnr"] > 5
        assert record["seed"] == image_seed(7, path.name)
        with Image.open(record["output"]) as img:
            assert img.size == (w, h)


def test_corrupt_input_is_reported_failed_after_one_retry(local_run):
    out, _ = local_run
    record = _manifest(out)["broken.png"]
    assert record["status"] == "failed" and record["attempts"] == 2
    assert "cannot read" in record["error"]
    assert not Path(record["output"]).exists()


def test_second_run_skips_everything(tmp_path, make_image):
    _write_images(tmp_path / "in", make_image, SIZES[:4])
    first = dip.restore_many(tmp_path / "in", tmp_path / "out", "super-resolve", factor=2, workers=2,
                             progress=False, **TINY)
    assert first.ok == 4
    for path, (h, w) in zip(sorted((tmp_path / "out").glob("*.png")), SIZES[:4]):
        assert Image.open(path).size == (2 * w, 2 * h)
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "out").glob("*.png")}
    second = dip.restore_many(tmp_path / "in", tmp_path / "out", "super_resolution", factor=2, workers=2,
                              progress=False, **TINY)
    assert (second.ok, second.failed, second.skipped) == (0, 0, 4)
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "out").glob("*.png")} == stamps
    records = _manifest(tmp_path / "out")
    assert all(r["status"] == "skipped" and r["iterations"] == TINY["iterations"] for r in records.values())


def test_invalid_output_is_redone(tmp_path, make_image):
    _write_images(tmp_path / "in", make_image, SIZES[:1])
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "img0.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    summary = dip.restore_many(tmp_path / "in", tmp_path / "out", "denoise", workers=1, progress=False, **TINY)
    assert summary.ok == 1
    assert output_is_valid(tmp_path / "out" / "img0.png", (SIZES[0][1], SIZES[0][0]))


def test_worker_that_dies_is_replaced_and_its_image_retried(tmp_path, make_image):
    _write_images(tmp_path / "in", make_image, SIZES[:3])
    marker = tmp_path / "crashed"
    summary = dip.restore_many(tmp_path / "in", tmp_path / "out", "denoise", workers=2, progress=False,
                               callbacks=[CrashOnce(marker)], **TINY)
    assert marker.exists()
    assert (summary.ok, summary.failed) == (3, 0)
    assert max(r["attempts"] for r in summary.records) == 2


def test_image_seed_is_stable_across_processes():
    code = "from dip.batch import image_seed; print(image_seed(3, 'scan_001.tif'))"
    runs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                           env={**os.environ, "PYTHONHASHSEED": str(s)}).stdout.strip() for s in (1, 2)}
    assert runs == {str(image_seed(3, "scan_001.tif"))}
    assert image_seed(3, "a.png") != image_seed(4, "a.png") != image_seed(4, "b.png")
    assert 0 <= image_seed(0, "a.png") < 2**63


def test_masks_from_folder_pattern_or_single_file(tmp_path):
    image = tmp_path / "in" / "scan1.png"
    (tmp_path / "masks").mkdir()
    (tmp_path / "masks" / "scan1.tif").write_bytes(b"")
    (tmp_path / "masks" / "scan1_mask.png").write_bytes(b"")
    assert _find_companion(tmp_path / "masks", image, "mask") == str(tmp_path / "masks" / "scan1.tif")
    pattern = str(tmp_path / "masks" / "{stem}_mask.png")
    assert _find_companion(pattern, image, "mask") == str(tmp_path / "masks" / "scan1_mask.png")
    single = tmp_path / "masks" / "scan1_mask.png"
    assert _find_companion(single, tmp_path / "other.png", "mask") == str(single)
    with pytest.raises(DipError, match="not found"):
        _find_companion(tmp_path / "masks", tmp_path / "in" / "scan2.png", "mask")


def test_inpaint_batch_with_mask_pattern(tmp_path, make_image):
    _write_images(tmp_path / "in", make_image, SIZES[:2])
    (tmp_path / "masks").mkdir()
    for i, (h, w) in enumerate(SIZES[:2]):
        m = np.full((h, w), 255, np.uint8)
        m[4:10, 4:10] = 0
        Image.fromarray(m).save(tmp_path / "masks" / f"img{i}_mask.png")
    (tmp_path / "in" / "nomask.png").write_bytes((tmp_path / "in" / "img0.png").read_bytes())
    summary = dip.restore_many(tmp_path / "in", tmp_path / "out", "inpaint", masks=str(tmp_path / "masks" / "{stem}_mask.png"),
                               workers=1, progress=False, **TINY)
    records = _manifest(tmp_path / "out")
    assert records["img0.png"]["status"] == records["img1.png"]["status"] == "ok"
    assert records["nomask.png"]["status"] == "failed" and "mask for nomask.png not found" in records["nomask.png"]["error"]
    assert summary.failed == 1


def test_sigterm_then_rerun_completes_without_truncated_files(tmp_path, make_image):
    n = 6
    _write_images(tmp_path / "in", make_image, [(32, 32)] * n)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "dip.cli", "batch", str(tmp_path / "in"), "-o", str(out), "--task", "denoise",
           "--iterations", "150", "--network", "small", "--workers", "2", "-q"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not list(out.glob("img*.png")) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert proc.poll() is None, "the batch ended before it could be interrupted: " + proc.stderr.read()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "interrupted" in err
    done = list(out.glob("img*.png"))
    assert 0 < len(done) < n
    for path in done:  # every output there is complete
        with Image.open(path) as img:
            img.load()
            assert img.size == (32, 32)
    assert not list(out.glob(".*.tmp*")), "a temporary file was left behind"
    assert {r["status"] for r in _manifest(out).values()} <= {"ok"}

    summary = dip.restore_many(tmp_path / "in", out, "denoise", workers=2, progress=False, network="small", iterations=3)
    assert summary.skipped == len(done) and summary.ok == n - len(done) and summary.failed == 0
    assert len(list(out.glob("img*.png"))) == n


def test_cli_batch_exit_status(batch_inputs, tmp_path, capsys):
    root, good = batch_inputs
    from dip.cli import main

    args = ["batch", str(root / "in" / "img[01].png"), "-o", str(tmp_path / "out"), "--task", "denoise",
            "--iterations", "2", "--network", "small", "--workers", "1", "-q"]
    assert main(args) == 0
    assert "2 restored, 0 skipped, 0 failed" in capsys.readouterr().out
    assert main(["batch", str(root / "in"), "-o", str(tmp_path / "out2"), "--task", "super-resolve", "-q"]) == 1
    assert "factor" in capsys.readouterr().err


def test_ray_missing_says_how_to_install(tmp_path, make_image, monkeypatch):
    _write_images(tmp_path / "in", make_image, SIZES[:1])
    monkeypatch.setitem(sys.modules, "ray", None)  # makes `import ray` fail
    with pytest.raises(DipError, match=r"pip install 'dip\[ray\]'"):
        dip.restore_many(tmp_path / "in", tmp_path / "out", "denoise", ray=True, progress=False, **TINY)


# --- Ray (skipped only when Ray is not installed; CI installs dip[ray]) ---------------------------------------

@pytest.fixture(scope="module")
def ray_local():
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # listen on 127.0.0.1 only (read on import)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_ray_gives_the_same_results_as_the_local_pool(batch_inputs, local_run, ray_local):
    root, _ = batch_inputs
    out_local, local = local_run
    out_ray = root / "out-ray"
    summary = dip.restore_many(root / "in", out_ray, "denoise", ray=True, seed=7, reference_dir=root / "ref",
                               progress=False, **TINY)
    assert (summary.ok, summary.failed, summary.skipped) == (local.ok, local.failed, local.skipped)
    assert _outputs(out_ray) == _outputs(out_local)  # byte-identical, whichever process fitted which image
    ray_records, local_records = _manifest(out_ray), _manifest(out_local)
    for name, record in local_records.items():
        for key in ("status", "iterations", "stop_reason", "seed", "psnr"):
            assert ray_records[name][key] == record[key], (name, key)


def test_ray_task_whose_worker_dies_is_retried(tmp_path, make_image, ray_local):
    from ray import cloudpickle

    _write_images(tmp_path / "in", make_image, SIZES[:3])
    marker = tmp_path / "crashed"
    # Ray workers cannot import this test module: ship the callback's class by value.
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    try:
        summary = dip.restore_many(tmp_path / "in", tmp_path / "out", "denoise", ray=True, progress=False,
                                   callbacks=[CrashOnce(marker)], **TINY)
    finally:
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    assert marker.exists()
    assert (summary.ok, summary.failed) == (3, 0)
    assert len(list((tmp_path / "out").glob("img*.png"))) == 3
