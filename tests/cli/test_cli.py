"""The ``dip`` command line, end to end on tiny images (in-process and as a subprocess)."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dip.cli import main


@pytest.fixture
def tiny_png(tmp_path, make_image):
    path = tmp_path / "in.png"
    Image.fromarray((make_image((24, 20)) * 255).astype(np.uint8)).save(path)
    return path


def test_denoise(tiny_png, tmp_path, capsys):
    out = tmp_path / "out.png"
    assert main(["denoise", str(tiny_png), "-o", str(out), "--iterations", "3", "--network", "small", "-q"]) == 0
    assert Image.open(out).size == (20, 24)
    assert "wrote" in capsys.readouterr().out


def test_input_is_decoded_once(tiny_png, tmp_path, monkeypatch):
    # Regression: the output-format check decoded the input a second time before restore() decoded it again.
    import dip.io

    calls = []
    decode = dip.io.decode
    monkeypatch.setattr(dip.io, "decode", lambda image, **kw: calls.append(image) or decode(image, **kw))
    assert main(["denoise", str(tiny_png), "-o", str(tmp_path / "out.png"), "--iterations", "1", "--network", "small",
                 "-q"]) == 0
    assert calls == [str(tiny_png)]


def test_max_pixels_above_the_default_is_honoured_by_every_check(tiny_png, tmp_path, monkeypatch):
    # Regression: the output-format check read the input under the default limit, not under --max-pixels,
    # so an image between the two was refused although the user raised the limit.
    import dip.io

    monkeypatch.setattr(dip.io, "MAX_PIXELS", 100)
    monkeypatch.setitem(dip.io.load_image.__kwdefaults__, "max_pixels", 100)
    out = tmp_path / "out.png"
    assert main(["denoise", str(tiny_png), "-o", str(out), "--iterations", "1", "--network", "small", "-q",
                 "--max-pixels", "1000"]) == 0
    holed = np.asarray(Image.open(tiny_png).convert("RGB")).copy()
    holed[4:8, 4:8] = (255, 0, 255)
    Image.fromarray(holed).save(tmp_path / "holed.png")
    assert main(["inpaint", str(tmp_path / "holed.png"), "-o", str(out), "--iterations", "1", "--network", "small",
                 "-q", "--mask-color", "255,0,255", "--max-pixels", "1000"]) == 0


def test_super_resolve(tiny_png, tmp_path):
    out = tmp_path / "sr.png"
    assert main(["super-resolve", str(tiny_png), "-o", str(out), "--factor", "2", "--iterations", "2",
                 "--network", "small", "-q"]) == 0
    assert Image.open(out).size == (40, 48)


def test_inpaint(tiny_png, tmp_path):
    mask = tmp_path / "mask.png"
    m = np.full((24, 20), 255, np.uint8)
    m[5:10, 5:10] = 0
    Image.fromarray(m).save(mask)
    out = tmp_path / "inp.png"
    assert main(["inpaint", str(tiny_png), "--mask", str(mask), "-o", str(out), "--iterations", "2",
                 "--network", "small", "-q"]) == 0
    assert Image.open(out).size == (20, 24)


def test_reference_reports_psnr(tiny_png, tmp_path, capsys):
    out = tmp_path / "out.png"
    assert main(["denoise", str(tiny_png), "-o", str(out), "--iterations", "2", "--network", "small", "-q",
                 "--reference", str(tiny_png)]) == 0
    out = capsys.readouterr().out
    assert "PSNR" in out and "SSIM" in out


@pytest.mark.parametrize("args,message", [
    (["denoise", "missing.png", "-o", "out.png"], "not found"),
    (["denoise", "{img}", "-o", "out.xyz"], "image format"),
    (["denoise", "{img}", "-o", "nofolder/out.png"], "does not exist"),
    (["super-resolve", "{img}", "-o", "out.png", "--factor", "1"], "factor"),
    (["inpaint", "{img}", "-o", "out.png", "--mask", "{img}", "--iterations", "0"], "iterations"),
    (["denoise", "{img}", "-o", "out.png", "--sigma", "-3"], "sigma"),
])
def test_errors_are_one_line_and_non_zero(tiny_png, tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.chdir(tmp_path)
    args = [a.replace("{img}", str(tiny_png)) for a in args]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert err.startswith("dip: error:") and message in err
    assert "Traceback" not in err and err.count("\n") == 1


def test_mask_size_mismatch(tiny_png, tmp_path, capsys):
    mask = tmp_path / "mask.png"
    Image.fromarray(np.full((10, 10), 255, np.uint8)).save(mask)
    assert main(["inpaint", str(tiny_png), "--mask", str(mask), "-o", str(tmp_path / "o.png")]) == 1
    assert "mask is 10×10 but the image is 24×20" in capsys.readouterr().err


def test_info(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "C++ extension" in out and "compute path" in out


def test_console_script_runs_as_a_subprocess(tiny_png, tmp_path):
    out = tmp_path / "out.png"
    proc = subprocess.run(
        [sys.executable, "-m", "dip.cli", "denoise", str(tiny_png), "-o", str(out), "--iterations", "2",
         "--network", "small", "-q"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert out.exists()
    bad = subprocess.run([sys.executable, "-m", "dip.cli", "denoise", str(tmp_path / "none.png"), "-o", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1 and "Traceback" not in bad.stderr


def test_demo_writes_before_after_picture(tmp_path, capsys):
    out = tmp_path / "demo.png"
    assert main(["demo", "-o", str(out), "--size", "32", "--iterations", "3", "-q"]) == 0
    img = Image.open(out)
    assert img.size[0] == 3 * 32
    assert "PSNR" in capsys.readouterr().out


def test_demo_writes_the_format_its_extension_names(tmp_path):
    # Regression: the demo picture was always PNG data, whatever the extension (demo.jpg was a PNG file).
    out = tmp_path / "demo.jpg"
    assert main(["demo", "-o", str(out), "--size", "8", "--iterations", "1", "-q"]) == 0
    with Image.open(out) as img:
        assert img.format == "JPEG" and img.size == (3 * 8, 8 + 16)


@pytest.mark.parametrize("size", ["0", "-1", "21"])
def test_demo_size_out_of_range_is_one_clear_line(tmp_path, capsys, monkeypatch, size):
    # Regression: --size 0 or -1 ended in a ValueError traceback from Pillow; a side over the pixel limit
    # (--size 100000: 10 gigapixels, killed for memory) was allocated before anything checked it.
    import dip.demo
    import dip.io
    from dip.errors import DipError

    monkeypatch.setattr(dip.io, "MAX_PIXELS", 400)  # a 20×20 limit: 21 is over it, cheaply
    monkeypatch.setattr(dip.demo, "MAX_PIXELS", 400)
    assert main(["demo", "-o", str(tmp_path / "demo.png"), "--size", size, "--iterations", "1", "-q"]) == 1
    err = capsys.readouterr().err
    assert "--size must be a whole number of pixels from 4 to 20" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(DipError, match="size"):
        dip.demo.run_demo(output=str(tmp_path / "demo.png"), size=int(size), iterations=1, progress=False)
    assert not (tmp_path / "demo.png").exists()


# ---- issue 11 / 12: conventions, lost work, exit statuses -----------------------------------------------------

FIT = ["--iterations", "2", "--network", "small", "-q"]


def test_render_and_the_readme_say_an_export_runs_its_code(capsys):
    # dip render runs the program in an exported file (TorchScript, .pt2): neither its help nor the README
    # said so, beside the README's account of how dip reads untrusted files.
    for args in (["--help"], ["render", "--help"]):
        with pytest.raises(SystemExit):
            main(args)
        out = " ".join(capsys.readouterr().out.split())
        assert "render only exports you trust" in out, out
    readme = " ".join((Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8").split())
    assert "treats the files it reads as untrusted" in readme
    assert "`dip render`, `dip.export.run_exported`" in readme and "run the code contained in that file" in readme


def test_version(capsys):
    import dip

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"dip {dip.__version__}"


@pytest.mark.parametrize("code", [
    "import dip.cli",
    "from dip.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass",
    "from dip.cli import main\nassert main(['denoise', 'missing.png', '-o', 'out.png']) == 1",
])
def test_help_and_argument_errors_do_not_load_torch(code, tmp_path):
    proc = subprocess.run([sys.executable, "-c", code + "\nimport sys\nprint('torch' in sys.modules)"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "False"


@pytest.mark.parametrize("extra,fmt", [([], "PNG"), (["--format", "tif"], "TIFF")])
def test_stdin_to_stdout(tiny_png, extra, fmt):
    """cat a.png | dip denoise - -o - > b.png; the output format follows --format, else the input's."""
    import io

    proc = subprocess.run([sys.executable, "-m", "dip.cli", "denoise", "-", "-o", "-", *FIT, *extra],
                          input=tiny_png.read_bytes(), capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stderr.decode()
    img = Image.open(io.BytesIO(proc.stdout))
    assert img.format == fmt and img.size == (20, 24)
    assert b"wrote standard output" in proc.stderr  # the summary keeps out of the image's way


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_16bit_colour_from_stdin_stays_16bit(tmp_path, monkeypatch, suffix):
    # Regression: standard input was decoded by Pillow alone, which reads a 16-bit RGB PNG or TIFF at 8 bits.
    import io

    from dip.io import ImageMeta, load_image, save_image

    if suffix == ".tif":
        pytest.importorskip("tifffile")
    src = save_image(np.random.default_rng(1).random((12, 10, 3)), tmp_path / f"in{suffix}",
                     meta=ImageMeta(dtype="uint16", channels=3))
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(src.read_bytes())))
    out = tmp_path / f"out{suffix}"
    assert main(["denoise", "-", "-o", str(out), *FIT]) == 0
    assert load_image(src).meta.dtype == "uint16" and load_image(out).meta.dtype == "uint16"


def test_truncated_image_on_stdin_is_one_clear_line(tiny_png, tmp_path, monkeypatch, capsys):
    # Regression: Pillow's lazy decode failed outside dip's reader: "dip: error: OSError: image file is truncated".
    import io

    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(tiny_png.read_bytes()[:300])))
    assert main(["denoise", "-", "-o", str(tmp_path / "out.png"), *FIT]) == 1
    err = capsys.readouterr().err
    assert "cannot read image from standard input" in err and "dip-stdin" not in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("source", ["file", "stdin"])
def test_max_pixels_above_pillows_own_limit_is_honoured(tiny_png, tmp_path, monkeypatch, capsys, source):
    # Regression: Pillow's decompression-bomb check (above 2 × Image.MAX_IMAGE_PIXELS) ran inside Image.open
    # before dip's, so --max-pixels above it was not honoured and the refusal was in Pillow's words.
    # Pillow's limit is made small (24×20 = 480 px > 2 × 200) rather than the image large.
    import io

    from PIL import Image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 200)
    if source == "stdin":
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(tiny_png.read_bytes())))
    given = "-" if source == "stdin" else str(tiny_png)
    assert main(["denoise", given, "-o", str(tmp_path / "out.png"), *FIT, "--max-pixels", "1000"]) == 0
    if source == "stdin":
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(tiny_png.read_bytes())))
    assert main(["denoise", given, "-o", str(tmp_path / "out.png"), *FIT, "--max-pixels", "100"]) == 1
    err = capsys.readouterr().err
    assert "more than the limit of 100; crop or downscale it, or raise --max-pixels" in err
    assert "decompression bomb" not in err


def test_library_errors_name_the_flags_in_every_subcommand(tiny_png, tmp_path, capsys):
    # Regression: restore()'s "iterations must be a positive integer" reached `dip demo --iterations 0` as it
    # was, and the per-image errors of `dip batch` were printed in the API's words (max_pixels, device='…').
    from dip.cli import cli_message

    assert main(["demo", "-o", str(tmp_path / "d.png"), "--size", "8", "--iterations", "0", "-q"]) == 1
    assert "dip: error: --iterations must be a positive integer, got 0" in capsys.readouterr().err
    assert cli_message("learning rate (lr) must be in (0, inf)") == "learning rate (--lr) must be in (0, inf)"
    assert cli_message("the mask must be grey; seed is …") == "the mask must be grey; --seed is …"  # subjects only
    folder = tmp_path / "imgs"
    folder.mkdir()
    tiny_png.rename(folder / "a.png")
    assert main(["batch", str(folder), "-o", str(tmp_path / "out"), "--task", "denoise", "--workers", "1",
                 "--max-pixels", "10", "--retries", "0", *FIT]) == 1
    err = capsys.readouterr().err
    assert "more than the limit of 10; crop or downscale it, or raise --max-pixels" in err and "max_pixels" not in err


def test_stdin_that_is_not_an_image():
    proc = subprocess.run([sys.executable, "-m", "dip.cli", "denoise", "-", "-o", "-", *FIT],
                          input=b"hello", capture_output=True, timeout=300)
    assert proc.returncode == 1 and proc.stdout == b""
    assert b"standard input is not an image" in proc.stderr and b"Traceback" not in proc.stderr


class _Stop(Exception):
    pass


@pytest.fixture
def captured_restore(monkeypatch):
    """Replace dip.restore by a stub that records its arguments and stops the command there."""
    import dip

    calls = []

    def stub(image, task, **options):
        calls.append((image, task, options))
        raise _Stop

    monkeypatch.setattr(dip, "restore", stub)
    return calls


@pytest.mark.parametrize("command", [["denoise"], ["super-resolve", "--factor", "2"], ["inpaint", "--mask", "{img}"]])
def test_sigma_is_given_in_0_255_units_to_every_task(tiny_png, tmp_path, captured_restore, command):
    argv = [command[0], str(tiny_png), "-o", str(tmp_path / "o.png"), "--sigma", "25.5", *FIT,
            *(a.replace("{img}", str(tiny_png)) for a in command[1:])]
    with pytest.raises(_Stop):
        main(argv)
    assert captured_restore[0][2]["noise_sigma"] == pytest.approx(0.1)


def _restore_then(monkeypatch, **changes):
    """Run the real fit, then change fields of its Restoration (what the fit would have reported)."""
    import dataclasses

    import dip

    real = dip.restore

    def restore(*args, **kwargs):
        return dataclasses.replace(real(*args, **kwargs), **changes)

    monkeypatch.setattr(dip, "restore", restore)


def test_diverged_fit_exits_non_zero_and_says_which_image_was_kept(tiny_png, tmp_path, monkeypatch, capsys):
    from dip.fit.settings import StopReason

    _restore_then(monkeypatch, stop_reason=StopReason.DIVERGED, stopped_at=1)
    out = tmp_path / "out.png"
    assert main(["denoise", str(tiny_png), "-o", str(out), *FIT]) == 3
    err = capsys.readouterr().err
    assert out.exists()
    assert "diverged" in err and f"{out} holds the last good image (iteration 1)" in err


def test_interrupted_fit_exits_130_with_the_best_image(tiny_png, tmp_path, monkeypatch, capsys):
    from dip.fit.settings import StopReason

    _restore_then(monkeypatch, stop_reason=StopReason.INTERRUPTED)
    out = tmp_path / "out.png"
    assert main(["denoise", str(tiny_png), "-o", str(out), *FIT]) == 130
    assert out.exists() and "holds the best image so far" in capsys.readouterr().err


@pytest.fixture
def failing_save(monkeypatch):
    """Make Restoration.save fail (read-only file system) in the folders added to the returned list."""
    from dip.result import Restoration

    original, blocked = Restoration.save, []

    def save(self, path):
        if any(Path(path).resolve().parent == folder.resolve() for folder in blocked):
            raise OSError(30, "Read-only file system", str(path))
        return original(self, path)

    monkeypatch.setattr(Restoration, "save", save)
    return blocked


def test_result_that_cannot_be_written_is_saved_in_the_working_directory(tiny_png, tmp_path, monkeypatch, capsys,
                                                                          failing_save):
    work, dest = tmp_path / "work", tmp_path / "dest"
    work.mkdir()
    dest.mkdir()
    monkeypatch.chdir(work)
    failing_save.append(dest)
    assert main(["denoise", str(tiny_png), "-o", str(dest / "out.png"), *FIT]) == 1
    rescued = work / "out.dip-rescued.png"
    assert Image.open(rescued).size == (20, 24)
    err = capsys.readouterr().err
    assert "Read-only file system" in err and f"saved to {rescued}" in err and "Traceback" not in err


def test_result_goes_to_the_temp_folder_when_the_working_directory_fails_too(tiny_png, tmp_path, monkeypatch,
                                                                               capsys, failing_save):
    import tempfile

    work, dest, tmp = tmp_path / "work", tmp_path / "dest", tmp_path / "tmp"
    for folder in (work, dest, tmp):
        folder.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    failing_save.extend([dest, work])
    (tmp / "out.dip-rescued.png").write_bytes(b"an earlier rescue")  # never overwritten
    assert main(["denoise", str(tiny_png), "-o", str(dest / "out.png"), *FIT]) == 1
    assert (tmp / "out.dip-rescued.png").read_bytes() == b"an earlier rescue"
    assert Image.open(tmp / "out.dip-rescued-1.png").size == (20, 24)
    assert f"saved to {tmp / 'out.dip-rescued-1.png'}" in capsys.readouterr().err


@pytest.fixture
def rgba_with_hole(tmp_path, make_image):
    rgba = np.dstack([(make_image((24, 20)) * 255).astype(np.uint8), np.full((24, 20), 255, np.uint8)])
    rgba[5:10, 5:10] = (255, 0, 255, 0)
    path = tmp_path / "holes.png"
    Image.fromarray(rgba).save(path)
    return path


def test_mask_alpha_fills_the_transparent_pixels(rgba_with_hole, tmp_path):
    out = tmp_path / "filled.jpg"  # no alpha left once the holes are filled, so JPEG holds it
    assert main(["inpaint", str(rgba_with_hole), "--mask", "alpha", "-o", str(out), *FIT]) == 0
    assert Image.open(out).mode == "RGB"


def test_mask_color_marks_the_missing_pixels(rgba_with_hole, tmp_path):
    out = tmp_path / "filled.png"
    assert main(["inpaint", str(rgba_with_hole), "--mask-color", "255,0,255", "-o", str(out), *FIT]) == 0
    assert Image.open(out).size == (20, 24)


def test_progress_bar_names_the_cli_task(tiny_png, tmp_path, capsys):
    assert main(["super-resolve", str(tiny_png), "-o", str(tmp_path / "o.png"), "--factor", "2",
                 "--iterations", "2", "--network", "small"]) == 0
    err = capsys.readouterr().err
    assert "dip super-resolve" in err and "super_resolution" not in err


@pytest.mark.parametrize("message,expected", [
    ("inpainting needs mask= (same size)", "inpainting needs --mask (same size)"),
    ("super-resolution needs factor= (an integer)", "super-resolution needs --factor (an integer)"),
    ("no CUDA GPU is available; use device='cpu'", "no CUDA GPU is available; use --device cpu"),
    ("iterations=100 is too many (or use iterations='auto')", "--iterations 100 is too many (or use --iterations auto)"),
    ("checkpoint= needs checkpoint_every=N", "--checkpoint needs --checkpoint-every N"),
    ("raise max_pixels if you trust the file", "raise --max-pixels if you trust the file"),
    ("the number of iterations", "the number of iterations"),
    ("ensemble=0: must be a positive integer", "--ensemble 0: must be a positive integer"),
    ("give noise_sigma= or leave it out", "give --sigma or leave it out"),
    ("noise_sigma=0.1 is too high", "noise_sigma=0.1 is too high"),  # another unit: not a --sigma value
])
def test_library_keywords_become_flags(message, expected):
    from dip.cli import cli_message

    assert cli_message(message) == expected


def test_demo_noise_level(tmp_path, capsys):
    out = tmp_path / "demo.png"
    assert main(["demo", "-o", str(out), "--size", "32", "--iterations", "2", "--sigma", "50", "-q"]) == 0
    assert "σ=50" in capsys.readouterr().out


def _batch_options(tmp_path, monkeypatch, *options) -> dict:
    """The keyword arguments `dip batch … OPTIONS` passes to dip.restore_many (which is not run)."""
    import dip

    seen = {}

    class Summary:
        interrupted, failed, records, manifest = False, 0, [], tmp_path / "manifest.jsonl"

    def fake_restore_many(*args, **kwargs):
        seen.update(kwargs)
        return Summary()

    monkeypatch.setattr(dip, "restore_many", fake_restore_many)
    (tmp_path / "in").mkdir()
    assert main(["batch", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--task", "denoise", *options,
                 "-q"]) == 0
    return seen


def test_batch_takes_sigma_in_0_255_units(tmp_path, monkeypatch):
    assert _batch_options(tmp_path, monkeypatch, "--sigma", "25")["noise_sigma"] == pytest.approx(25 / 255)


# ---- issue 15: ensembles, the uncertainty map, the blind noise level, SSIM -------------------------------------


def test_ensemble_writes_the_uncertainty_map_with_its_scale_bar(tiny_png, tmp_path, capsys):
    from dip.uncertainty import uncertainty_image

    out, unsure = tmp_path / "out.png", tmp_path / "map.png"
    assert main(["denoise", str(tiny_png), "-o", str(out), "--ensemble", "2", "--uncertainty", str(unsure),
                 *FIT]) == 0
    assert Image.open(out).size == (20, 24)
    layout = uncertainty_image(np.zeros((24, 20), np.float32)).shape  # a 24×20 map above its scale bar
    with Image.open(unsure) as img:
        assert img.format == "PNG" and img.mode == "RGB" and img.size == (layout[1], layout[0])
        assert layout[0] > 24 * layout[1] // 20  # the bar and its labels add rows under the zoomed map
    assert f"wrote {unsure}" in capsys.readouterr().out


def test_quality_options_reach_restore_in_the_apis_units(tiny_png, tmp_path, captured_restore):
    with pytest.raises(_Stop):
        main(["denoise", str(tiny_png), "-o", str(tmp_path / "o.png"), "--sigma", "auto", "--ensemble", "3", *FIT])
    options = captured_restore[0][2]
    assert options["noise_sigma"] == "auto" and options["ensemble"] == 3


def test_blind_noise_level_and_ssim_are_in_the_summary_line(tiny_png, tmp_path, capsys):
    out = tmp_path / "out.png"
    assert main(["denoise", str(tiny_png), "-o", str(out), "--sigma", "auto", "--reference", str(tiny_png),
                 *FIT]) == 0
    summary = capsys.readouterr().out
    assert "estimated σ " in summary and "PSNR" in summary and "SSIM 0." in summary


def test_uncertainty_without_a_map_after_an_automatic_fit_is_an_error_but_the_image_is_written(
        tiny_png, tmp_path, capsys):
    out, unsure = tmp_path / "out.png", tmp_path / "map.png"
    code = main(["denoise", str(tiny_png), "-o", str(out), "--iterations", "auto", "--max-iterations", "3",
                 "--network", "small", "-q", "--uncertainty", str(unsure)])
    err = capsys.readouterr().err
    assert code == 1 and out.exists() and not unsure.exists()
    assert "no uncertainty map" in err and "--ensemble K" in err and "Traceback" not in err


def test_info_says_what_ensembles_run_on(capsys):
    from dip.nn import active_path

    assert main(["info"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("compute path"))
    assert active_path() in line and "ensembles too" in line


def test_batch_takes_ensemble_and_blind_sigma(tmp_path, monkeypatch):
    seen = _batch_options(tmp_path, monkeypatch, "--sigma", "auto", "--ensemble", "2")
    assert seen["noise_sigma"] == "auto" and seen["ensemble"] == 2


# ---- the fit's objective and precision ---------------------------------------------------------------------


def test_objective_and_precision_reach_restore(tiny_png, tmp_path, captured_restore):
    with pytest.raises(_Stop):
        main(["denoise", str(tiny_png), "-o", str(tmp_path / "o.png"), "--objective", "sure", "--precision", "auto",
              *FIT])
    options = captured_restore[0][2]
    assert options["objective"] == "sure" and options["precision"] == "auto"
    with pytest.raises(_Stop):  # not given: restore()'s own defaults
        main(["denoise", str(tiny_png), "-o", str(tmp_path / "o.png"), *FIT])
    assert "objective" not in captured_restore[1][2] and "precision" not in captured_restore[1][2]


def test_batch_takes_objective_and_precision(tmp_path, monkeypatch):
    seen = _batch_options(tmp_path, monkeypatch, "--objective", "sure", "--precision", "float32")
    assert seen["objective"] == "sure" and seen["precision"] == "float32"


def test_sure_denoises_from_the_command_line(tiny_png, tmp_path, capsys):
    out = tmp_path / "out.png"
    assert main(["denoise", str(tiny_png), "-o", str(out), "--objective", "sure", *FIT]) == 0
    assert Image.open(out).size == (20, 24)


def test_sure_outside_denoising_is_explained_in_flags(tiny_png, tmp_path, capsys):
    code = main(["super-resolve", str(tiny_png), "-o", str(tmp_path / "o.png"), "--factor", "2", "--objective",
                 "sure", *FIT])
    err = capsys.readouterr().err
    assert code != 0 and "--objective sure is for denoising only" in err and "--objective mse" in err
    assert "objective=" not in err and "Traceback" not in err


def test_unknown_objective_or_precision_is_one_clear_line(tiny_png, tmp_path, capsys):
    for flag, word in (("--objective", "l1"), ("--precision", "float8")):
        assert main(["denoise", str(tiny_png), "-o", str(tmp_path / "o.png"), flag, word, *FIT]) != 0
        err = capsys.readouterr().err
        assert flag[2:] in err and repr(word) in err and "Traceback" not in err and len(err.splitlines()) == 1
