"""Builds the optional ``dip._C`` extension: dispatcher-registered C++ (and, when available, CUDA) operators.

dip works without it (every operator has a pure-PyTorch path), so the build
never fails for want of a compiler: when torch is not importable here (an
isolated build: use ``pip install --no-build-isolation``), when no C++
compiler works, or when compiling fails, the package is installed without it
and ``dip info`` says so.

Environment switches:
  DIP_BUILD_EXTENSION=0  never build the extension (pure-PyTorch install)
  DIP_BUILD_EXTENSION=1  the extension must build: fail the install if it cannot
  (unset)                build it when possible, else install without it
  DIP_BUILD_CUDA=1       compile the CUDA kernels (fails if torch has no CUDA, nvcc is missing, or there is
                         no target: no visible GPU and no TORCH_CUDA_ARCH_LIST)
  DIP_BUILD_CUDA=0       never compile CUDA kernels
  (unset)                compile them when torch was built with CUDA, CUDA_HOME is found, and a GPU is
                         visible or TORCH_CUDA_ARCH_LIST names the architectures
"""
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile

from setuptools import setup

try:
    import tomllib
except ImportError:  # Python 3.10: setuptools puts its vendored copy of the same parser on sys.path
    import tomli as tomllib

HERE = os.path.dirname(os.path.abspath(__file__))
MODE = os.environ.get("DIP_BUILD_EXTENSION", "").strip()


def _torch_floor() -> tuple:
    """``(major, minor)`` of the ``torch>=X.Y`` dependency in pyproject.toml, the one place the floor is written.

    It is also the oldest torch the compiled operators are built against (make test-torch-floor runs the
    suite there; the GPU machines' torch is checked by make gpu-check).
    """
    with open(os.path.join(HERE, "pyproject.toml"), "rb") as f:
        dependencies = tomllib.load(f)["project"]["dependencies"]
    for requirement in dependencies:
        match = re.fullmatch(r"torch\s*>=\s*(\d+)\.(\d+)(\.\d+)?", requirement.strip())
        if match:
            return int(match[1]), int(match[2])
    raise RuntimeError(f"pyproject.toml declares no torch>=X.Y dependency (got {dependencies})")


MIN_TORCH_FOR_EXTENSION = _torch_floor()


def _say(message: str) -> None:
    print(f"dip setup: {message}", file=sys.stderr)


def _compiler() -> list:
    """The C++ compiler torch's build will use (``$CXX``, else ``c++``), as an argv prefix."""
    cxx = os.environ.get("CXX") or "c++"
    return cxx.split()


def _accepts(flags, *, link: bool) -> bool:
    """True when the compiler builds a small program with ``flags`` (and links it when ``link``)."""
    source = "#include <vector>\nint main() { std::vector<int> v(3); return static_cast<int>(v.size()) - 3; }\n"
    if "-fopenmp" in flags:
        source = "#include <omp.h>\n" + source.replace("return", "(void)omp_get_max_threads(); return")
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "probe.cpp")
        with open(src, "w") as f:
            f.write(source)
        out = os.path.join(tmp, "probe" + ("" if link else ".o"))
        cmd = _compiler() + list(flags) + ([] if link else ["-c"]) + [src, "-o", out]
        try:
            return subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120).returncode == 0
        except (OSError, subprocess.SubprocessError):
            return False


def _want_cuda(torch, cuda_home) -> bool:
    """Whether to compile the CUDA kernels: as DIP_BUILD_CUDA says, else when torch has CUDA, nvcc and a target.

    torch's build compiles for the architectures in TORCH_CUDA_ARCH_LIST, else for the visible GPUs; with neither
    it fails, which would install dip without any compiled operator. So a CUDA build of torch on a machine with
    nvcc but no GPU (PyPI's torch for Linux is one) builds the CPU kernels only, and says so.
    """
    flag = os.environ.get("DIP_BUILD_CUDA")
    available = torch.version.cuda is not None and cuda_home is not None
    arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    has_target = arch_list not in ("", "native") or (available and torch.cuda.device_count() > 0)
    if flag == "1":
        if not available:
            raise RuntimeError(
                "DIP_BUILD_CUDA=1 but torch has no CUDA (torch.version.cuda is None) or nvcc/CUDA_HOME was not found"
            )
        if not has_target:
            raise RuntimeError("DIP_BUILD_CUDA=1 but no GPU is visible and TORCH_CUDA_ARCH_LIST is not set: set it to "
                               "the GPU architectures to compile for, e.g. TORCH_CUDA_ARCH_LIST=9.0")
        return True
    if flag is not None:
        return False
    if available and not has_target:
        _say("torch has CUDA and nvcc is found, but no GPU is visible and TORCH_CUDA_ARCH_LIST is not set: building "
             "the CPU kernels only (set TORCH_CUDA_ARCH_LIST, e.g. 9.0, to compile the CUDA kernels too)")
    return available and has_target


def _sources(pattern):
    return sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern), recursive=True))


def _extension_and_command():
    """``([Extension], {"build_ext": ...})``, or ``([], {})`` when the extension is not to be built."""
    if MODE == "0":
        _say("DIP_BUILD_EXTENSION=0: installing without the compiled operators (pure-PyTorch path)")
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        if MODE == "1":
            raise
        _say("torch is not importable in this build environment, so the compiled operators are not built; "
             "to build them, install torch first and use pip install --no-build-isolation")
        return [], {}
    torch_version = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])
    if not _accepts([], link=False):
        if MODE == "1":
            raise RuntimeError(f"DIP_BUILD_EXTENSION=1 but the C++ compiler {' '.join(_compiler())!r} does not work")
        _say(f"no working C++ compiler ({' '.join(_compiler())!r}): installing without the compiled operators")
        return [], {}
    if torch_version < MIN_TORCH_FOR_EXTENSION and MODE != "1":
        _say(f"torch {torch.__version__} is older than {'.'.join(map(str, MIN_TORCH_FOR_EXTENSION))}, the oldest "
             "with which the compiled operators pass their tests: installing without them (pure-PyTorch path; "
             "DIP_BUILD_EXTENSION=1 builds them anyway)")
        return [], {}
    openmp = _accepts(["-fopenmp"], link=True)
    # No -std flag: torch's build adds the C++ standard its own headers need (C++17 or C++20 by version).
    cxx = ["-O3"]
    link = []
    if openmp:
        cxx.append("-fopenmp")
        link.append("-fopenmp")
    else:
        _say("the compiler does not take -fopenmp: building without OpenMP (the loops run on one thread)")
    with_cuda = _want_cuda(torch, CUDA_HOME)
    sources = _sources("csrc/*.cpp") + _sources("csrc/cpu/*.cpp")
    macros = []
    extra = {"cxx": cxx}
    if with_cuda:
        sources += _sources("csrc/cuda/*.cu")
        macros.append(("DIP_WITH_CUDA", None))
        extra["nvcc"] = ["-O3", "--use_fast_math"]
    kind = CUDAExtension if with_cuda else CppExtension
    ext = kind(name="dip._C", sources=sources, include_dirs=[os.path.join(HERE, "csrc", "include")],
               define_macros=macros, extra_compile_args=extra, extra_link_args=link)

    class OptionalBuildExtension(BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)):
        """Builds the extension; unless DIP_BUILD_EXTENSION=1, a failure installs dip without it."""

        def build_extensions(self):
            try:
                super().build_extensions()
            except Exception as exc:  # compiler and linker failures come in several exception types
                if MODE == "1":
                    raise
                _say(f"building the compiled operators failed ({type(exc).__name__}: {exc}); installing without "
                     "them: dip runs on the pure-PyTorch path (set DIP_BUILD_EXTENSION=1 to make this an error)")
                self.extensions = []  # nothing was built: nothing to copy into the wheel or the source tree

    return [ext], {"build_ext": OptionalBuildExtension}


def _drop_stale_extension() -> None:
    """Without the extension, make sure an earlier build's ``dip/_C`` in build/lib is not packed into this one."""
    for stale in glob.glob(os.path.join(HERE, "build", "lib*", "dip", "_C*")):
        os.remove(stale)


# setuptools runs this file as __main__; tests load it under another name to reach the helpers above.
if __name__ == "__main__":
    ext_modules, cmdclass = _extension_and_command()
    if not ext_modules:
        _drop_stale_extension()
    setup(ext_modules=ext_modules, cmdclass=cmdclass)
