"""Builds the ``dip._C`` extension: dispatcher-registered C++ (and, when available, CUDA) operators.

Environment switches:
  DIP_BUILD_CUDA=1   compile the CUDA kernels (fails if torch has no CUDA or nvcc is missing)
  DIP_BUILD_CUDA=0   never compile CUDA kernels
  (unset)            compile them when torch was built with CUDA and CUDA_HOME is found
"""
import glob
import os

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

HERE = os.path.dirname(os.path.abspath(__file__))


def _want_cuda() -> bool:
    flag = os.environ.get("DIP_BUILD_CUDA")
    available = torch.version.cuda is not None and CUDA_HOME is not None
    if flag is None:
        return available
    if flag == "1" and not available:
        raise RuntimeError(
            "DIP_BUILD_CUDA=1 but torch has no CUDA (torch.version.cuda is None) or nvcc/CUDA_HOME was not found"
        )
    return flag == "1"


def _sources(pattern):
    return sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern), recursive=True))


def extension():
    with_cuda = _want_cuda()
    sources = _sources("csrc/*.cpp") + _sources("csrc/cpu/*.cpp")
    cxx = ["-O3", "-std=c++20", "-fopenmp"]  # torch >= 2.14 headers require C++20
    macros = []
    if with_cuda:
        sources += _sources("csrc/cuda/*.cu")
        macros.append(("DIP_WITH_CUDA", None))
    extra = {"cxx": cxx}
    if with_cuda:
        extra["nvcc"] = ["-O3", "--use_fast_math", "-std=c++20"]
    kind = CUDAExtension if with_cuda else CppExtension
    return kind(
        name="dip._C",
        sources=sources,
        include_dirs=[os.path.join(HERE, "csrc", "include")],
        define_macros=macros,
        extra_compile_args=extra,
        extra_link_args=["-fopenmp"],
    )


setup(
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
