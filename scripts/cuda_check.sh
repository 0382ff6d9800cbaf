#!/usr/bin/env bash
# Proves that the CUDA kernels of dip._C compile, on a machine with nvcc but no GPU.
#
# Builds the extension with DIP_BUILD_CUDA=1 for sm_80 and sm_90 against a CUDA
# build of torch installed in its own virtualenv (.cuda-venv by default), into a
# temporary directory: the in-place build of the main environment is left alone
# and nothing is run. Exits non-zero when anything fails to compile.
#
# Environment:
#   CUDA_CHECK_VENV    virtualenv to use/create (default: <repo>/.cuda-venv)
#   CUDA_CHECK_TORCH   torch requirement installed there (default: torch==2.14.1)
#   CUDA_HOME          CUDA root; default: the root of the real nvcc found on PATH
#   MAX_JOBS           parallel compile jobs (default: number of cores)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${CUDA_CHECK_VENV:-$ROOT/.cuda-venv}"
TORCH_REQ="${CUDA_CHECK_TORCH:-torch==2.14.1}"
ARCHS="8.0;9.0"

die() { echo "cuda-check: $*" >&2; exit 1; }

# The nvcc on PATH may be a wrapper script (`exec /path/to/cuda/bin/nvcc "$@"`):
# CUDA_HOME must be the root of the real compiler, where its headers live.
real_nvcc() {
  local nvcc target
  nvcc="$(command -v nvcc)" || die "nvcc not found on PATH"
  nvcc="$(readlink -f "$nvcc")"
  if ! head -c 4 "$nvcc" | grep -q $'\x7fELF'; then
    target="$(grep -oE '/[^[:space:]"'"'"']*/bin/nvcc' "$nvcc" | head -n 1 || true)"
    [ -n "$target" ] || die "$nvcc is a script that does not name the real nvcc"
    nvcc="$(readlink -f "$target")"
  fi
  [ -x "$nvcc" ] || die "$nvcc is not executable"
  echo "$nvcc"
}

if [ -z "${CUDA_HOME:-}" ]; then
  NVCC="$(real_nvcc)"
  CUDA_HOME="$(dirname "$(dirname "$NVCC")")"
fi
[ -x "$CUDA_HOME/bin/nvcc" ] || die "no nvcc under CUDA_HOME=$CUDA_HOME"
export CUDA_HOME
export PATH="$CUDA_HOME/bin:$PATH"
echo "cuda-check: CUDA_HOME=$CUDA_HOME ($("$CUDA_HOME/bin/nvcc" --version | tail -n 1))"

start=$(date +%s)
if [ ! -x "$VENV/bin/python" ]; then
  echo "cuda-check: creating $VENV"
  python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.__version__.split('+')[0] == '${TORCH_REQ#torch==}' and torch.version.cuda else 1)" 2>/dev/null; then
  echo "cuda-check: installing $TORCH_REQ into $VENV"
  "$PY" -m pip install --quiet "$TORCH_REQ" setuptools wheel ninja numpy
fi
echo "cuda-check: torch $("$PY" -c 'import torch; print(torch.__version__, "CUDA", torch.version.cuda)')"

# The CUDA toolkit here has nvcc but not the library headers torch includes
# (cublas_v2.h, cusparse.h, ...): they ship with the wheel's nvidia-* packages.
SITE="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
NV="$SITE/nvidia/cu13"
[ -d "$NV/include" ] || die "no $NV/include (is $TORCH_REQ a CUDA 13 build?)"
export CPATH="$NV/include${CPATH:+:$CPATH}"
export LIBRARY_PATH="$NV/lib${LIBRARY_PATH:+:$LIBRARY_PATH}"
export TORCH_CUDA_ARCH_LIST="$ARCHS"
export DIP_BUILD_CUDA=1
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"

BUILD="$(mktemp -d "${TMPDIR:-/tmp}/dip-cuda-check.XXXXXX")"
trap 'rm -rf "$BUILD"' EXIT
cd "$ROOT"
# --build-temp/--build-lib keep objects and the .so out of the source tree.
if ! "$PY" setup.py --quiet build_ext --build-temp "$BUILD/temp" --build-lib "$BUILD/lib" >"$BUILD/log" 2>&1; then
  cat "$BUILD/log" >&2
  die "compilation FAILED"
fi
so="$(find "$BUILD/lib" -name '_C*.so' | head -n 1)"
[ -n "$so" ] || { cat "$BUILD/log" >&2; die "no _C*.so was produced"; }
# Each csrc/cuda/*.cu must have produced its object (csrc/cuda/x.cu -> temp/csrc/cuda/x.o).
cus=0
for cu in csrc/cuda/*.cu; do
  [ -e "$cu" ] || continue
  [ -s "$BUILD/temp/${cu%.cu}.o" ] || { cat "$BUILD/log" >&2; die "$cu was not compiled"; }
  cus=$((cus + 1))
done
[ "$cus" -gt 0 ] || die "no CUDA sources under csrc/cuda"
# Every requested architecture must be among the nvcc targets of the build.
ninja_file="$(find "$BUILD/temp" -name build.ninja | head -n 1)"
for sm in sm_80 sm_90; do
  grep -q "code=$sm" "$ninja_file" || die "the CUDA objects were not built for $sm"
done
echo "cuda-check: $cus CUDA source(s) in $(( $(date +%s) - start )) s"
echo "CUDA kernels compiled for sm_80, sm_90"
