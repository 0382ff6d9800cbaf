"""Planning a batch in the calling process: inputs, companions, seeds, settings, records — no worker starts here."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from batch_helpers import SIZES, TINY, write_images
from PIL import Image

import dip
import dip.batch
from dip.batch import Record, RecordStatus, find_companion, find_inputs, image_seed
from dip.batch.manifest import read_manifest, write_manifest
from dip.batch.planning import Source, fit_settings, output_path, plan_jobs, settings_fingerprint, triage
from dip.batch.records import Job
from dip.errors import DipError
from dip.fit.settings import StopReason
from dip.tasks import Task

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def no_workers(monkeypatch):
    """Fail the test if a batch gets as far as starting workers."""
    def refuse(*args, **kwargs):
        raise AssertionError("a worker pool was started")

    monkeypatch.setattr(dip.batch, "run_local", refuse)


def test_image_seed_is_stable_across_processes():
    code = "from dip.batch import image_seed; print(image_seed(3, 'scan_001.tif'))"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    runs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                           env={**env, "PYTHONHASHSEED": str(s)}).stdout.strip() for s in (1, 2)}
    assert runs == {str(image_seed(3, "scan_001.tif"))}
    assert image_seed(3, "a.png") != image_seed(4, "a.png") != image_seed(4, "b.png")
    assert 0 <= image_seed(0, "a.png") < 2**63


def test_masks_from_folder_pattern_or_single_file(tmp_path):
    image = Source(tmp_path / "in" / "scan1.png", "scan1.png")
    (tmp_path / "masks" / "sub").mkdir(parents=True)
    (tmp_path / "masks" / "scan1.tif").write_bytes(b"")
    (tmp_path / "masks" / "scan1_mask.png").write_bytes(b"")
    (tmp_path / "masks" / "sub" / "scan1.png").write_bytes(b"")
    assert find_companion(tmp_path / "masks", image, "mask") == str(tmp_path / "masks" / "scan1.tif")
    pattern = str(tmp_path / "masks" / "{stem}_mask.png")
    assert find_companion(pattern, image, "mask") == str(tmp_path / "masks" / "scan1_mask.png")
    single = tmp_path / "masks" / "scan1_mask.png"
    assert find_companion(single, Source(tmp_path / "other.png", "other.png"), "mask") == str(single)
    nested = Source(tmp_path / "in" / "sub" / "scan1.png", "sub/scan1.png")  # a --recursive input
    assert find_companion(tmp_path / "masks", nested, "mask") == str(tmp_path / "masks" / "sub" / "scan1.png")
    with pytest.raises(DipError, match="not found"):
        find_companion(tmp_path / "masks", Source(tmp_path / "in" / "scan2.png", "scan2.png"), "mask")


def test_record_round_trips_through_json_with_enums_by_identity():
    job = Job(name="a.png", input="in/a.png", output="out/a.png", seed=5, settings="abc")
    record = Record.for_job(job, RecordStatus.FAILED, iterations=3, stop_reason=StopReason.DIVERGED,
                            psnr=float("inf"), error="the fit diverged")
    line = json.loads(json.dumps(record.to_json(), allow_nan=False))
    assert line["status"] == "failed" and line["stop_reason"] == "diverged" and line["psnr"] is None
    back = Record.from_json(line)
    assert back.status is RecordStatus.FAILED and back.stop_reason is StopReason.DIVERGED
    assert back.seed == 5 and back.settings == "abc" and back.attempts == 1
    old = Record.from_json({"input": "a", "output": "b", "status": "ok", "stop_reason": "non-finite loss"})
    assert old.status is RecordStatus.OK and old.stop_reason is None and old.settings is None


def test_retry_after_divergence_draws_a_new_seed_and_keeps_it_otherwise():
    job = Job(name="a.png", input="a.png", output="o/a.png", seed=image_seed(1, "a.png"))
    diverged = Record.for_job(job, RecordStatus.FAILED, stop_reason=StopReason.DIVERGED)
    crashed = Record.for_job(job, RecordStatus.FAILED, error="the worker process died")
    assert job.retry(diverged, 1).seed == image_seed(1, "a.png#retry1") != job.seed
    assert job.retry(crashed, 1).seed == job.seed
    assert job.retry(crashed, 1).attempt == 1


def test_manifest_round_trip_ignores_lines_that_are_not_records(tmp_path):
    job = Job(name="a.png", input="in/a.png", output="out/a.png", seed=1)
    path = tmp_path / "manifest.jsonl"
    write_manifest(path, [Record.for_job(job, RecordStatus.OK, iterations=2, stop_reason=StopReason.COMPLETED)])
    with open(path, "a") as f:
        f.write("not json\n{\"input\": 1}\n")
    records = read_manifest(path)
    assert list(records) == ["in/a.png"] and records["in/a.png"].stop_reason is StopReason.COMPLETED


@pytest.mark.parametrize("how", ["folder", "glob", "file"])
def test_output_folder_that_is_the_input_folder_is_refused(tmp_path, make_image, no_workers, how):
    paths = write_images(tmp_path / "in", make_image, SIZES[:2])
    before = {p: p.read_bytes() for p in paths}
    inputs = {"folder": tmp_path / "in", "glob": str(tmp_path / "in" / "*.png"), "file": paths[0]}[how]
    with pytest.raises(DipError, match="output folder .* is where the inputs are"):
        dip.restore_many(inputs, tmp_path / "in", "denoise", progress=False, **TINY)
    assert {p: p.read_bytes() for p in paths} == before
    assert not (tmp_path / "in" / "manifest.jsonl").exists()


def test_outputs_inside_a_recursive_input_folder_are_not_inputs(tmp_path, make_image):
    write_images(tmp_path / "in", make_image, SIZES[:1])
    write_images(tmp_path / "in" / "sub", make_image, SIZES[1:2])
    write_images(tmp_path / "in" / "restored" / "sub", make_image, SIZES[1:2])  # outputs of an earlier run
    found = find_inputs(tmp_path / "in", recursive=True, out_dir=tmp_path / "in" / "restored")
    assert [s.name for s in found.sources] == ["img0.png", "sub/img0.png"]
    found = find_inputs(str(tmp_path / "in" / "**" / "*.png"), out_dir=tmp_path / "in" / "restored")
    assert [s.name for s in found.sources] == ["img0.png", "sub/img0.png"]
    assert [s.name for s in find_inputs(tmp_path / "in").sources] == ["img0.png"]  # not recursive by default


def test_input_folder_inside_the_output_folder_is_not_taken_for_outputs(tmp_path, make_image):
    # Regression: every file inside the output folder was dropped as an earlier output, so
    # restore_many("data/in", "data") failed with "no image files found in data/in", and a file of a list
    # that lies inside the output folder was dropped silently.
    data = tmp_path / "data"
    write_images(data / "in", make_image, SIZES[:2])
    found = find_inputs(data / "in", out_dir=data)
    assert [s.name for s in found.sources] == ["img0.png", "img1.png"]
    assert [j.output for j in plan_jobs(found.sources, data, 0)] == [str(data / "img0.png"), str(data / "img1.png")]
    assert [s.name for s in find_inputs(str(data / "in" / "*.png"), out_dir=data).sources] == ["img0.png", "img1.png"]
    other = write_images(tmp_path / "elsewhere", make_image, SIZES[:1], prefix="x")
    listed = [other[0], data / "in" / "img1.png"]
    assert [s.path for s in find_inputs(listed, out_dir=data).sources] == listed


def test_outputs_that_would_land_in_an_input_folder_are_refused(tmp_path, make_image):
    # Recursive: data/in/in/a.png goes to data/in/a.png, inside the input folder, where a re-run would find it.
    data = tmp_path / "data"
    write_images(data / "in" / "in", make_image, SIZES[:1])
    with pytest.raises(DipError, match=r"output of in/img0.png would be written to .* inside the input folder "
                                       r".*choose an output folder outside the inputs"):
        find_inputs(data / "in", recursive=True, out_dir=data)
    assert [s.name for s in find_inputs(data / "in", recursive=True, out_dir=tmp_path / "out").sources] == \
        ["in/img0.png"]


def test_recursive_outputs_mirror_the_tree(tmp_path):
    sources = [Source(tmp_path / "in" / "a.tif", "a.tif"), Source(tmp_path / "in" / "x" / "y" / "a.tif", "x/y/a.tif")]
    jobs = plan_jobs(sources, tmp_path / "out", run_seed=2)
    assert [j.output for j in jobs] == [str(tmp_path / "out" / "a.png"), str(tmp_path / "out" / "x" / "y" / "a.png")]
    assert jobs[0].seed != jobs[1].seed and jobs[1].seed == image_seed(2, "x/y/a.tif")
    assert output_path(tmp_path / "out", sources[1]) == tmp_path / "out" / "x" / "y" / "a.png"


def test_bad_settings_are_refused_before_any_worker_starts(tmp_path, make_image, no_workers):
    write_images(tmp_path / "in", make_image, SIZES[:1])
    for bad, match in [(dict(iterations=0), "iterations"), (dict(lr=-1.0), "learning rate"),
                       (dict(iterations="sometimes"), "iterations"), (dict(max_iterations=0), "max_iterations")]:
        with pytest.raises(DipError, match=match):
            dip.restore_many(tmp_path / "in", tmp_path / "out", "denoise", progress=False, **bad)
    assert not (tmp_path / "out").exists()


def test_cli_iterations_auto_is_accepted_and_zero_refused_before_workers(tmp_path, make_image, no_workers, capsys):
    from dip.cli import build_parser, main

    write_images(tmp_path / "in", make_image, SIZES[:1])
    args = build_parser().parse_args(["batch", "in", "-o", "out", "--task", "denoise", "--iterations", "auto"])
    assert args.iterations == "auto"
    assert build_parser().parse_args(["batch", "in", "-o", "out", "--task", "denoise"]).iterations == "auto"
    assert main(["batch", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--task", "denoise",
                 "--iterations", "0", "-q"]) == 1
    err = capsys.readouterr().err
    assert "--iterations must be a positive" in err and "Traceback" not in err


def test_settings_fingerprint_changes_with_what_decides_an_output():
    def fp(task=Task.DENOISE, factor=None, network=None, **options):
        return settings_fingerprint(task, factor, network, fit_settings(options, 0))

    base = fp()
    assert fp() == base
    assert fp(network="denoise") == base  # the task's default network, named
    others = [fp(iterations=5), fp(lr=0.02), fp(network="small"), fp(reg_noise_std=0.1),
              fp(task=Task.SUPER_RESOLUTION, factor=2), fp(task=Task.SUPER_RESOLUTION, factor=4),
              settings_fingerprint(Task.DENOISE, None, None, fit_settings({}, 1)),
              settings_fingerprint(Task.DENOISE, None, None, fit_settings({}, 0), ensemble=2),
              settings_fingerprint(Task.DENOISE, None, None, fit_settings({}, 0), ensemble=3),
              settings_fingerprint(Task.DENOISE, None, None, fit_settings({"noise_sigma": "auto"}, 0),
                                   blind_sigma=True),
              fp(noise_sigma=0.1), fp(objective="sure")]
    assert base not in others and len(set(others)) == len(others)
    # outputs made before objectives existed keep their fingerprints (these are the values of that version)
    assert (base, fp(iterations=5)) == ("ea8f79e5db169c57", "190cdbf2b6a39016")
    # one network and a known (or no) noise level: the fingerprint of outputs made before these options existed
    assert settings_fingerprint(Task.DENOISE, None, None, fit_settings({}, 0), ensemble=1, blind_sigma=False) == base


def test_bad_ensemble_is_refused_before_any_worker_starts(tmp_path, make_image, no_workers):
    write_images(tmp_path / "in", make_image, SIZES[:1])
    for bad in (0, -1, 2.5, True):
        with pytest.raises(DipError, match="ensemble="):
            dip.restore_many(tmp_path / "in", tmp_path / "out", "denoise", progress=False, ensemble=bad)
    assert not (tmp_path / "out").exists()


def test_bad_max_pixels_is_refused_before_any_worker_starts(tmp_path, make_image, no_workers):
    write_images(tmp_path / "in", make_image, SIZES[:1])
    for bad in ("big", 0, -5, 2.5):
        with pytest.raises(DipError, match="^max_pixels must be a positive integer"):
            dip.restore_many(tmp_path / "in", tmp_path / "out", "denoise", progress=False, max_pixels=bad)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("task, bad, match", [
    ("super_resolution", dict(factor=1), r"factor must be an integer from 2 to 32, got 1"),
    ("super_resolution", dict(factor=2.0), r"factor must be an integer, got 2.0"),
    ("denoise", dict(factor=2), r"factor= is only used for super-resolution"),
    ("denoise", dict(device="bogus"), r"device='bogus' is not a device"),
    ("denoise", dict(device="meta"), r"dip fits on cpu or cuda, not on meta"),
])
def test_bad_factor_or_device_is_refused_once_before_any_worker_starts(tmp_path, make_image, no_workers, task, bad,
                                                                          match):
    # Each image's fit refused them, one failed record per image, instead of one error before the batch;
    # the message is restore()'s own.
    write_images(tmp_path / "in", make_image, SIZES[:2])
    with pytest.raises(DipError, match=match):
        dip.restore(make_image((8, 8)), task, progress=False, **bad)
    with pytest.raises(DipError, match=match):
        dip.restore_many(tmp_path / "in", tmp_path / "out", task, progress=False, **bad)
    assert not (tmp_path / "out").exists()


def test_batch_device_on_ray_is_read_here_but_looked_for_on_the_workers(tmp_path, make_image, monkeypatch):
    # Ray's workers may have GPUs the calling process has not: only the device string is checked here.
    import dip.batch.ray

    def started(*args, **kwargs):
        raise RuntimeError("ray started")

    monkeypatch.setattr(dip.batch.ray, "run_on_ray", started)
    monkeypatch.setattr(dip.pipeline.torch.cuda, "is_available", lambda: False)
    write_images(tmp_path / "in", make_image, SIZES[:1])
    with pytest.raises(RuntimeError, match="ray started"):
        dip.restore_many(tmp_path / "in", tmp_path / "out", "denoise", progress=False, ray=True, device="cuda:1")
    with pytest.raises(DipError, match="no CUDA GPU"):  # a local batch runs here: the device must be here too
        dip.restore_many(tmp_path / "in", tmp_path / "out2", "denoise", progress=False, device="cuda")


@pytest.mark.parametrize("args, fragment", [
    (["--task", "super-resolve", "--factor", "1"], "--factor must be a whole number from 2 to 32, got 1"),
    (["--task", "denoise", "--device", "bogus"], "--device bogus is not a device; use --device cpu"),
])
def test_cli_batch_bad_factor_or_device_is_one_error(tmp_path, make_image, no_workers, capsys, args, fragment):
    from dip.cli import main

    write_images(tmp_path / "in", make_image, SIZES[:2])
    assert main(["batch", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "-q", *args]) == 1
    err = capsys.readouterr().err
    assert err.count("dip:") == 1 and fragment in err, err
    assert not (tmp_path / "out").exists()


def test_outputs_made_with_other_settings_are_refused_unless_forced(tmp_path, make_image):
    paths = write_images(tmp_path / "in", make_image, SIZES[:2])
    jobs = plan_jobs([Source(p, p.name) for p in paths], tmp_path / "out", 0, settings="new")
    (tmp_path / "out").mkdir()
    for job, (h, w) in zip(jobs, SIZES[:2]):  # valid outputs of the right size
        Image.new("RGB", (w, h)).save(job.output)
    previous = {jobs[0].input: Record.for_job(jobs[0], RecordStatus.OK, settings="old"),
                jobs[1].input: Record.for_job(jobs[1], RecordStatus.OK, settings="new")}
    with pytest.raises(DipError, match=r"1 output\(s\) .* other settings .*--force"):
        triage(jobs, previous, None, force=False)
    forced = triage(jobs, previous, None, force=True)
    assert forced.todo == [jobs[0]] and [r.status for r in forced.records] == [RecordStatus.SKIPPED]
    unknown = triage(jobs, {}, None, force=False)  # no manifest: a valid output counts as done
    assert unknown.todo == [] and len(unknown.records) == 2


def test_done_outputs_above_pillows_own_limit_are_skipped_under_max_pixels(tmp_path, make_image, monkeypatch):
    # Regression: the planner read sizes with Pillow's own decompression-bomb check (above 2 × MAX_IMAGE_PIXELS),
    # so an image that max_pixels allows but Pillow does not never counted as done and was fitted again and again.
    # Pillow's limit is made small here rather than the images large.
    paths = write_images(tmp_path / "in", make_image, SIZES[:1])
    (job,) = plan_jobs([Source(p, p.name) for p in paths], tmp_path / "out", 0, settings="s")
    (tmp_path / "out").mkdir()
    Image.new("RGB", SIZES[0][::-1]).save(job.output)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    plan = triage([job], {}, None, force=False, max_pixels=1000)
    assert plan.todo == [] and [r.status for r in plan.records] == [RecordStatus.SKIPPED]
    assert Image.MAX_IMAGE_PIXELS == 100
    assert triage([job], {}, None, force=False, max_pixels=100).todo == [job]  # above dip's limit: its fit says so


def test_temporaries_of_a_writer_still_running_are_kept(tmp_path, make_image):
    # Regression: planning removed every temporary beside an output, also that of a writer still running (another
    # batch writing into the same folder), whose rename then failed; only a killed writer's are stale.
    from dip.batch.planning import remove_stale_temporaries

    paths = write_images(tmp_path / "in", make_image, SIZES[:1])
    (job,) = plan_jobs([Source(p, p.name) for p in paths], tmp_path / "out", 0)
    (tmp_path / "out").mkdir()
    live = tmp_path / "out" / f".img0.png.{os.getppid()}.abc123.tmp.png"
    dead = tmp_path / "out" / ".img0.png.999999999.def456.tmp.png"
    live.write_bytes(b"")
    dead.write_bytes(b"")
    remove_stale_temporaries([job])
    assert live.exists() and not dead.exists()


def test_failed_record_beside_an_older_output_is_redone(tmp_path, make_image):
    """Bug: a forced redo that failed (diverged) left the older output of other settings and a failed record
    with the new settings; the next run took that output as done and recorded it skipped."""
    paths = write_images(tmp_path / "in", make_image, SIZES[:1])
    (job,) = plan_jobs([Source(p, p.name) for p in paths], tmp_path / "out", 0, settings="new")
    (tmp_path / "out").mkdir()
    Image.new("RGB", SIZES[0][::-1]).save(job.output)  # a valid output, made by an older run
    failed = Record.for_job(job, RecordStatus.FAILED, error="the fit diverged", stop_reason=StopReason.DIVERGED)
    plan = triage([job], {job.input: failed}, None, force=False)
    assert plan.todo == [job] and plan.records == []


def test_interrupted_forced_run_keeps_the_records_of_the_outputs_it_did_not_redo(tmp_path, make_image, monkeypatch):
    """Bug: a forced run stopped before redoing an image dropped its manifest line, so the next run (without
    --force) took the output made with the old settings as done with the new ones."""
    paths = write_images(tmp_path / "in", make_image, SIZES[:2])
    out = tmp_path / "out"
    jobs = plan_jobs([Source(p, p.name) for p in paths], out, 0, settings="old")
    out.mkdir()
    for job, (h, w) in zip(jobs, SIZES[:2]):
        Image.new("RGB", (w, h)).save(job.output)
    old = [Record.for_job(job, RecordStatus.OK, iterations=3) for job in jobs]
    write_manifest(out / "manifest.jsonl", old)

    def interrupted(todo, *args):
        report = args[-2]
        report(Record.for_job(todo[0], RecordStatus.OK, iterations=TINY["iterations"]))  # the first one is redone
        raise dip.batch.BatchInterrupted("SIGINT")

    monkeypatch.setattr(dip.batch, "_run", interrupted)
    summary = dip.restore_many(tmp_path / "in", out, "denoise", force=True, progress=False, **TINY)
    assert summary.interrupted and summary.ok == 1
    manifest = read_manifest(out / "manifest.jsonl")
    assert manifest[jobs[0].input].settings != "old"
    assert manifest[jobs[1].input] == old[1]  # the image not redone keeps its line, and so its settings
    with pytest.raises(DipError, match=r"1 output\(s\) .* other settings"):
        dip.restore_many(tmp_path / "in", out, "denoise", progress=False, **TINY)


@pytest.mark.parametrize("what", ["mask", "reference"])
def test_outputs_that_would_replace_a_mask_or_reference_are_refused(tmp_path, make_image, what):
    """Bug: with the masks (or references) in the output folder, each output path was its image's mask: the mask,
    a valid image of the right size, was taken as the finished output (or replaced by it with --force)."""
    paths = write_images(tmp_path / "in", make_image, SIZES[:2])
    write_images(tmp_path / "out", make_image, SIZES[:2])  # companions named like the images
    sources = [Source(p, p.name) for p in paths]
    folder = {"masks": tmp_path / "out"} if what == "mask" else {"references": tmp_path / "out"}
    with pytest.raises(DipError, match=f"would replace a {what}"):
        plan_jobs(sources, tmp_path / "out", 0, **folder)
    assert plan_jobs(sources, tmp_path / "restored", 0, **folder)[0].output == str(tmp_path / "restored" / "img0.png")
