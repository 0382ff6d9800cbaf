"""The ``dip`` command line, end to end on tiny images (in-process and as a subprocess)."""
import subprocess
import sys

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
    assert "PSNR" in capsys.readouterr().out


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
