"""Bad input on the command line (issue 11): a clear one-line message, the right exit status, no traceback,
and the user's files untouched.

Each case is ``(id, arguments, exit status, fragment of the message)``. Paths in the arguments are relative to
a folder of fixtures (see :func:`files`), which is also the working directory. Every case runs with ``FIT``'s options
before its own, so that one that reaches a fit by mistake asks for a tiny one, so a check that fails to refuse costs seconds, not minutes.
"""
import argparse
import hashlib
import os
import shlex

import numpy as np
import pytest
from PIL import Image

from dip.cli import main

FIT = "--iterations 2 --network small -q"


def case(name, args, status, fragment, xfail=None):
    marks = [pytest.mark.xfail(strict=True, reason=xfail)] if xfail else []
    return pytest.param(args, status, fragment, id=name, marks=marks)


CASES = [
    # the input
    case("missing-file", "denoise missing.png -o out.png", 1, "not found"),
    case("input-is-folder", "denoise folder -o out.png", 1, "is a folder"),
    case("not-an-image", "denoise text.png -o out.png", 1, "not an image"),
    case("empty-file", "denoise empty.png -o out.png", 1, "not an image"),
    case("one-pixel", "denoise one.png -o out.png", 1, "at least 4×4"),
    case("nan-npy", "denoise nan.npy -o out.png", 1, "NaN"),
    case("too-many-pixels", "denoise in.png -o out.png --max-pixels 100", 1, "--max-pixels"),
    case("sr-result-too-large", "super-resolve in.png -o out.png --factor 4 --max-pixels 1000", 1, "limit of 1,000"),
    # where the result goes: never over a file dip reads, never lost after the fit
    case("output-is-input", "denoise in.png -o in.png", 1, "is the input image"),
    case("output-is-input-via-symlink", "denoise in.png -o link.png", 1, "is the input image"),
    case("output-is-input-via-hardlink", "denoise in.png -o hard.png", 1, "is the input image"),
    case("output-is-input-other-spelling", "denoise in.png -o ./folder/../in.png", 1, "is the input image"),
    case("output-is-mask", "inpaint in.png --mask mask.png -o mask.png", 1, "is --mask"),
    case("export-over-input", "denoise in.png -o out.png --export-torchscript in.png", 1, "is the input image"),
    case("plot-same-as-output", "denoise in.png -o out.png --plot out.png", 1, "both name"),
    case("output-is-folder", "denoise in.png -o folder", 1, "is a folder"),
    case("output-folder-missing", "denoise in.png -o nowhere/out.png", 1, "does not exist"),
    case("output-folder-not-writable", "denoise in.png -o {readonly}/out.png", 1, "cannot write"),
    case("output-unknown-format", "denoise in.png -o out.xyz", 1, "image format"),
    case("rgba-into-jpeg", "denoise rgba.png -o out.jpg", 1, "alpha"),
    case("format-with-file-output", "denoise in.png -o out.png --format tif", 1, "--format"),
    # numbers
    case("seed-beyond-64-bits", f"denoise in.png -o out.png --seed {2 ** 70}", 1, "--seed"),
    case("seed-negative", "denoise in.png -o out.png --seed -1", 1, "--seed"),
    case("seed-not-a-number", "denoise in.png -o out.png --seed 1.5", 2, "--seed"),
    case("iterations-zero", "denoise in.png -o out.png --iterations 0", 1, "--iterations"),
    case("iterations-absurd", "denoise in.png -o out.png --iterations 100000000000", 1, "iterations"),
    case("iterations-not-a-number", "denoise in.png -o out.png --iterations many", 2, "--iterations"),
    case("max-iterations-zero", "denoise in.png -o out.png --max-iterations 0", 1, "--max-iterations"),
    case("max-iterations-with-fixed-count", "denoise in.png -o out.png --iterations 5 --max-iterations 9", 1,
     "--max-iterations"),
    case("factor-1", "super-resolve in.png -o out.png --factor 1", 1, "--factor"),
    case("factor-33", "super-resolve in.png -o out.png --factor 33", 1, "--factor"),
    case("lr-zero", "denoise in.png -o out.png --lr 0", 1, "--lr"),
    case("lr-nan", "denoise in.png -o out.png --lr nan", 1, "--lr"),
    case("reg-noise-negative", "denoise in.png -o out.png --reg-noise-std -1", 1, "--reg-noise-std"),
    case("reg-noise-nan", "denoise in.png -o out.png --reg-noise-std nan", 1, "--reg-noise-std"),
    case("sigma-negative", "denoise in.png -o out.png --sigma -3", 1, "--sigma"),
    case("sigma-nan", "super-resolve in.png -o out.png --factor 2 --sigma nan", 1, "--sigma"),
    case("max-pixels-zero", "denoise in.png -o out.png --max-pixels 0", 1, "--max-pixels"),
    case("sigma-not-a-number", "denoise in.png -o out.png --sigma loud", 2, "--sigma"),
    case("sigma-auto-without-noise", "denoise flat.png -o out.png --sigma auto", 1, "give --sigma or leave it out"),
    case("ensemble-zero", "denoise in.png -o out.png --ensemble 0", 1, "--ensemble 0: must be a positive integer"),
    case("ensemble-negative", "super-resolve in.png -o out.png --factor 2 --ensemble -2", 1, "--ensemble -2"),
    case("ensemble-not-a-number", "denoise in.png -o out.png --ensemble two", 2, "--ensemble"),
    # the library's own words for a keyword ("objective must be …") name the flag typed (regression: they did not)
    case("objective-unknown", "denoise in.png -o out.png --objective bogus", 1, "--objective must be one of mse, sure"),
    case("precision-unknown", "denoise in.png -o out.png --precision bogus", 1, "--precision must be 'auto'"),
    case("batch-workers-zero", "batch imgs -o batch --task denoise --workers 0", 1, "--workers must be a positive"),
    case("batch-threads-zero", "batch imgs -o batch --task denoise --threads 0", 1, "--threads must be a positive"),
    case("batch-retries-negative", "batch imgs -o batch --task denoise --retries -1", 1, "--retries must be"),
    case("batch-objective-unknown", "batch imgs -o batch --task denoise --objective bogus", 1,
         "--objective must be one of"),
    case("batch-max-pixels-zero", "batch imgs -o batch --task denoise --max-pixels 0", 1, "--max-pixels must be"),
    case("batch-seed-negative", "batch imgs -o batch --task denoise --seed -1", 1, "--seed must be"),
    # devices
    case("device-tpu", "denoise in.png -o out.png --device tpu", 1, "--device tpu"),
    case("device-banana", "denoise in.png -o out.png --device banana", 1, "--device banana"),
    case("device-meta", "denoise in.png -o out.png --device meta", 1, "--device meta"),
    # inpainting masks
    case("inpaint-without-mask", "inpaint in.png -o out.png", 1, "--mask"),
    case("mask-and-mask-color", "inpaint in.png -o out.png --mask mask.png --mask-color 0,0,0", 1, "not both"),
    case("mask-missing", "inpaint in.png -o out.png --mask nomask.png", 1, "mask not found"),
    case("mask-size-mismatch", "inpaint in.png -o out.png --mask mask_small.png", 1, "mask is 10×10 but the image is 24×20"),
    case("mask-all-zero", "inpaint in.png -o out.png --mask mask_zero.png", 1, "all zero"),
    case("mask-color-out-of-range", "inpaint in.png -o out.png --mask-color 300,0,0", 2, "R,G,B"),
    case("mask-for-denoise", "denoise in.png -o out.png --mask mask.png", 2, "unrecognized arguments"),
    # network, exports, plot
    case("unknown-network", "denoise in.png -o out.png --network huge", 1, "unknown network preset"),
    case("torchscript-named-onnx", "denoise in.png -o out.png --export-torchscript net.onnx", 1, "net.pt"),
    case("onnx-named-pt", "denoise in.png -o out.png --export-onnx net.pt", 1, "net.onnx"),
    case("program-named-pt", "denoise in.png -o out.png --export-program net.pt", 1, "net.pt2"),
    case("export-folder-missing", "denoise in.png -o out.png --export-onnx nowhere/net.onnx", 1, "does not exist"),
    case("plot-unknown-format", "denoise in.png -o out.png --plot curves.gif", 1, "plot format"),
    # the uncertainty map: checked like the other outputs, before the fit
    case("uncertainty-is-input", "denoise in.png -o out.png --ensemble 2 --uncertainty in.png", 1,
         "--uncertainty in.png is the input image"),
    case("uncertainty-is-mask", "inpaint in.png --mask mask.png -o out.png --ensemble 2 --uncertainty mask.png", 1,
         "is --mask"),
    case("uncertainty-same-as-output", "denoise in.png -o out.png --ensemble 2 --uncertainty out.png", 1, "both name"),
    case("uncertainty-folder-missing", "denoise in.png -o out.png --ensemble 2 --uncertainty nowhere/map.png", 1,
         "does not exist"),
    case("uncertainty-unknown-format", "denoise in.png -o out.png --ensemble 2 --uncertainty map.xyz", 1,
         "image format of map.xyz"),
    case("uncertainty-without-a-map", "denoise in.png -o out.png --iterations 2 --uncertainty map.png", 1,
         "--uncertainty needs a map"),
    # reference
    case("reference-missing", "denoise in.png -o out.png --reference clean.png", 1, "reference image not found"),
    case("reference-wrong-size", "denoise in.png -o out.png --reference one_by_ten.png", 1, "reference is"),
    # checkpoints
    case("resume-missing", "denoise in.png -o out.png --resume none.ckpt", 1, "not found"),
    case("resume-empty", "denoise in.png -o out.png --resume empty.ckpt", 1, "empty"),
    case("resume-not-a-checkpoint", "denoise in.png -o out.png --resume in.png", 1, "not a dip checkpoint"),
    case("resume-foreign-torch-file", "denoise in.png -o out.png --resume foreign.ckpt", 1, "not a dip checkpoint"),
    case("resume-unsafe-pickle", "denoise in.png -o out.png --resume unsafe.ckpt", 1, "not a dip checkpoint"),
    case("checkpoint-every-alone", "denoise in.png -o out.png --checkpoint-every 5", 1,
     "--checkpoint-every needs --checkpoint"),
    case("overwrite-checkpoint-alone", "denoise in.png -o out.png --overwrite-checkpoint", 1,
         "--overwrite-checkpoint needs --checkpoint"),
    case("checkpoint-every-zero", "denoise in.png -o out.png --checkpoint fit.ckpt --checkpoint-every 0", 1,
     "--checkpoint-every"),
]


def _png(path, array):
    Image.fromarray(array).save(path)


@pytest.fixture
def files(tmp_path, make_image, monkeypatch):
    """The fixture folder (also the working directory) and where a folder dip cannot write to is."""
    rgb = (make_image((24, 20)) * 255).astype(np.uint8)
    _png(tmp_path / "in.png", rgb)
    _png(tmp_path / "rgba.png", np.dstack([rgb, np.full((24, 20), 128, np.uint8)]))
    _png(tmp_path / "one.png", rgb[:1, :1])
    _png(tmp_path / "one_by_ten.png", rgb[:10, :10])
    mask = np.full((24, 20), 255, np.uint8)
    mask[5:10, 5:10] = 0
    _png(tmp_path / "mask.png", mask)
    _png(tmp_path / "mask_small.png", np.full((10, 10), 255, np.uint8))
    _png(tmp_path / "mask_zero.png", np.zeros((24, 20), np.uint8))
    _png(tmp_path / "flat.png", np.full((24, 20, 3), 128, np.uint8))  # no noise to estimate
    (tmp_path / "text.png").write_text("this is not an image\n")
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "empty.ckpt").write_bytes(b"")
    bad = rgb.astype(np.float32) / 255
    bad[0, 0, 0] = np.nan
    np.save(tmp_path / "nan.npy", bad)
    import torch

    torch.save({"weights": torch.zeros(2)}, tmp_path / "foreign.ckpt")
    torch.save(argparse.Namespace(code="not allowed by weights_only loading"), tmp_path / "unsafe.ckpt")
    (tmp_path / "folder").mkdir()
    (tmp_path / "imgs").mkdir()
    _png(tmp_path / "imgs" / "a.png", rgb)
    os.symlink(tmp_path / "in.png", tmp_path / "link.png")
    os.link(tmp_path / "in.png", tmp_path / "hard.png")
    monkeypatch.chdir(tmp_path)
    return tmp_path, _read_only_folder(tmp_path)


def _read_only_folder(tmp_path):
    folder = tmp_path / "readonly"
    folder.mkdir()
    folder.chmod(0o555)
    if os.access(folder, os.W_OK):
        # root writes anyway: a "folder" under a regular file can never be written to
        blocker = tmp_path / "a_file"
        blocker.write_text("")
        return blocker
    return folder


def _digests(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())
            if p.is_file() and not p.is_symlink()}


def run_cli(argv, capsys):
    """(exit status, stderr) of ``dip ARGV`` run in this process."""
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's usage errors
        code = exc.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize("args,status,fragment", CASES)
def test_bad_input(files, capsys, args, status, fragment):
    folder, readonly = files
    before = _digests(folder)
    argv = shlex.split(args.format(readonly=readonly))
    argv[1:1] = shlex.split(FIT)  # the case's own options come later and win
    code, err = run_cli(argv, capsys)
    assert code == status, err
    assert fragment in err
    assert "Traceback" not in err
    if status == 1:
        lines = [line for line in err.splitlines() if line.startswith("dip: error:")]
        assert len(lines) == 1, err
    assert _digests(folder) == before  # no input, mask or other file changed
    assert not (folder / "out.png").exists()
