"""Packaging: the wheel's metadata, the single version, and an install that needs no compiler."""
from __future__ import annotations

import os
import runpy
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest

import dip

ROOT = Path(__file__).resolve().parent.parent


def test_version_is_the_installed_metadata():
    from importlib import metadata

    try:
        installed = metadata.version("dip-restore")
    except metadata.PackageNotFoundError:
        pytest.skip("dip-restore is not installed here (make install); scripts/check_pure_install.sh checks it in CI")
    assert dip.__version__ == installed


def test_py_typed_marker_ships():
    assert (Path(dip.__file__).parent / "py.typed").is_file()


def test_license_file_matches_the_declared_licence():
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0" in text
    assert 'license = "Apache-2.0"' in (ROOT / "pyproject.toml").read_text()


def _setup_helpers() -> dict:
    """The functions and constants of setup.py, loaded without running setup()."""
    return runpy.run_path(str(ROOT / "setup.py"), run_name="dip_setup")


def test_torch_floor_has_one_owner():
    floor = subprocess.run([sys.executable, str(ROOT / "scripts" / "extras.py"), "--torch-floor"], check=True,
                           capture_output=True, text=True).stdout.strip()
    assert f'"torch>={floor}"' in (ROOT / "pyproject.toml").read_text()
    assert ".".join(map(str, _setup_helpers()["MIN_TORCH_FOR_EXTENSION"])) == floor


def _torch_with_cuda(gpus: int) -> SimpleNamespace:
    return SimpleNamespace(version=SimpleNamespace(cuda="13.0"), cuda=SimpleNamespace(device_count=lambda: gpus))


def test_cuda_torch_without_a_gpu_builds_the_cpu_kernels(monkeypatch, capsys):
    """PyPI's torch for Linux has CUDA; with nvcc but no GPU and no TORCH_CUDA_ARCH_LIST, torch's build of CUDA
    kernels fails (no architecture to compile for), which installed dip without any compiled operator."""
    want_cuda = _setup_helpers()["_want_cuda"]
    monkeypatch.delenv("DIP_BUILD_CUDA", raising=False)
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    assert not want_cuda(_torch_with_cuda(gpus=0), "/usr/local/cuda")
    assert "CPU kernels only" in capsys.readouterr().err
    assert want_cuda(_torch_with_cuda(gpus=1), "/usr/local/cuda")
    assert not want_cuda(_torch_with_cuda(gpus=1), None)
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    assert want_cuda(_torch_with_cuda(gpus=0), "/usr/local/cuda")
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "native")
    monkeypatch.setenv("DIP_BUILD_CUDA", "1")
    with pytest.raises(RuntimeError, match="TORCH_CUDA_ARCH_LIST"):
        want_cuda(_torch_with_cuda(gpus=0), "/usr/local/cuda")
    monkeypatch.setenv("DIP_BUILD_CUDA", "0")
    assert not want_cuda(_torch_with_cuda(gpus=1), "/usr/local/cuda")


@pytest.mark.slow
def test_wheel_builds_without_a_compiler(tmp_path):
    """`pip wheel` with no working compiler gives a pure wheel carrying the metadata a package index expects."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs the git checkout to copy the sources")
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                           capture_output=True).stdout.decode().split("\0")
    src = tmp_path / "src"
    for name in filter(None, files):
        if (ROOT / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    env = {**os.environ, "CC": "false", "CXX": "false"}
    env.pop("DIP_BUILD_EXTENSION", None)
    run = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-q",
                          str(src), "-w", str(tmp_path / "out")], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    (wheel,) = (tmp_path / "out").glob("*.whl")
    assert wheel.name == f"dip_restore-{dip.__version__}-py3-none-any.whl"
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        info = f"dip_restore-{dip.__version__}.dist-info"
        metadata = zf.read(f"{info}/METADATA").decode()
        entry_points = zf.read(f"{info}/entry_points.txt").decode()
    assert "dip/py.typed" in names and f"{info}/licenses/LICENSE" in names
    assert not [n for n in names if n.startswith("dip/_C")]
    assert "Name: dip-restore\n" in metadata and f"Version: {dip.__version__}\n" in metadata
    assert "License-Expression: Apache-2.0\n" in metadata and "Classifier: Typing :: Typed" in metadata
    assert "Requires-Dist: torch>=2.11" in metadata
    assert "dip = dip.cli:main" in entry_points


def test_missing_extension_is_logged_once(monkeypatch, caplog):
    from dip import _extension

    monkeypatch.setattr(_extension, "_C", None)
    monkeypatch.setattr(_extension, "_DISABLED", False)
    monkeypatch.setattr(_extension, "_IMPORT_ERROR", "No module named 'dip._C'")
    monkeypatch.setattr(_extension, "_warned", False)
    with caplog.at_level("WARNING", logger="dip"):
        _extension.warn_if_missing()
        _extension.warn_if_missing()
    assert caplog.text.count("pure-PyTorch path") == 1
