"""The README's Python examples run as written (on tiny images, with a small, short fit)."""
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import dip

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


@pytest.fixture
def workspace(tmp_path, monkeypatch, make_image, noisy):
    """The files and names the examples use, and a restore() made cheap: small net, a few steps."""
    monkeypatch.chdir(tmp_path)
    clean = make_image(32)
    observed = noisy(clean)
    Image.fromarray(dip.io.to_uint8(observed)).save("noisy.png")
    Image.fromarray(dip.io.to_uint8(clean[::2, ::2])).save("small.png")
    Image.fromarray(dip.io.to_uint8(clean)).save("holes.png")
    mask = np.full((32, 32), 255, np.uint8)
    mask[10:20, 10:20] = 0
    Image.fromarray(mask).save("mask.png")
    real = dip.restore

    def cheap(*args, **kwargs):
        kwargs.setdefault("network", "small")
        kwargs["progress"] = False
        kwargs["device"] = "cpu"
        if kwargs.get("iterations", "auto") in ("auto", None):
            kwargs.setdefault("max_iterations", 12)
        else:
            kwargs["iterations"] = min(int(kwargs["iterations"]), 6)
        if "early_stopping" in kwargs:
            es = kwargs["early_stopping"]
            kwargs["early_stopping"] = dip.fit.EarlyStopping(window=3, patience=4, select=es.select)
        if "checkpoint_every" in kwargs:
            kwargs["checkpoint_every"] = 2
        return real(*args, **kwargs)

    monkeypatch.setattr(dip, "restore", cheap)
    names = dict(dip=dip, img=observed, noisy=observed, clean=clean, next_frame=observed,
                 my_blur=lambda x: x * 0.9)
    return names


def test_the_readme_has_examples():
    assert len(BLOCKS) >= 4


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(workspace, index):
    code = BLOCKS[index]
    if "onnx" in code:
        pytest.importorskip("onnxruntime")
        pytest.importorskip("onnxscript")
    if "plot(" in code:
        pytest.importorskip("matplotlib")
    namespace = dict(workspace)
    exec(compile(code, f"README.md python block {index}", "exec"), namespace)  # noqa: S102
