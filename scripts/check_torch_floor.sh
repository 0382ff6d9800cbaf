#!/usr/bin/env bash
# Proves that dip builds and passes its tests on the oldest torch it declares (pyproject.toml: torch>=X.Y).
#
# In a virtual environment of its own this installs the newest X.Y.* torch from the package index (PyPI's
# Linux wheel is a CUDA build that also runs on the CPU: it pulls several GB of nvidia-* wheels, which is why
# .ci/run does not run this), copies the sources (tracked and new files) into <venv>/src, compiles dip there
# (make install-test), checks that `dip info` reports the operators loaded and built against X.Y, then runs
# the whole suite (make test) and the pure-PyTorch path (make test-pure). The checkout itself is left alone:
# an in-place build there would replace its dip/_C*.so, which is built against your own torch.
# A second run reuses the venv and recompiles only when setup.py, pyproject.toml or csrc/ changed.
#
# Usage: bash scripts/check_torch_floor.sh   (or make test-torch-floor; about 26 minutes on 2 cores)
# Environment:
#   TORCH_FLOOR_VENV  the virtual environment (default: <repo>/.venv-torch-floor, git-ignored)
#   PYTHON            the interpreter that creates it (default: python3)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
VENV="${TORCH_FLOOR_VENV:-$ROOT/.venv-torch-floor}"
SRC="$VENV/src"
say() { echo "torch-floor: $*"; }

floor="$("$PYTHON" "$ROOT/scripts/extras.py" --torch-floor)"
start=$(date +%s)
if [ ! -x "$VENV/bin/python" ]; then
  say "creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
torch_here() { "$PY" -c 'import torch; print(torch.__version__)' 2>/dev/null || true; }
case "$(torch_here)" in
  "$floor".*) ;;
  *)
    say "installing torch==$floor.* into $VENV"
    # One resolve with the build tools, so that setuptools stays within what this torch accepts.
    "$PY" -m pip install --quiet --disable-pip-version-check "torch==$floor.*" "setuptools>=77" wheel ninja numpy
    rm -rf "$SRC/build"  # the Makefile's stamps: the operators must be rebuilt against this torch
    ;;
esac
say "torch $(torch_here)"

# A fresh copy of the sources, keeping build/ (the Makefile's stamps) and the compiled dip/_C*.so; tar keeps
# the files' times, so make compiles again only when setup.py, pyproject.toml or csrc/ changed.
mkdir -p "$SRC"
find "$SRC" -mindepth 1 -maxdepth 1 ! -name build ! -name dip -exec rm -rf {} +
if [ -d "$SRC/dip" ]; then
  find "$SRC/dip" -mindepth 1 -maxdepth 1 ! -name '_C*.so' -exec rm -rf {} +
fi
(cd "$ROOT" && git ls-files -co --exclude-standard -z | tar --null -T - -cf -) | tar -xf - -C "$SRC"

cd "$SRC"
# An install without the compiled operators (a failed compile) still leaves make's stamp: compile again.
compgen -G "dip/_C*.so" >/dev/null || rm -rf build
make install-test PYTHON="$PY"
info="$("$VENV/bin/dip" info)"
echo "$info"
if ! grep -q "C++ extension: loaded (built against torch $floor\." <<<"$info"; then
  say "FAILED: the compiled operators are not loaded, or not built against torch $floor"
  exit 1
fi
status=0
make test PYTHON="$PY" || status=1
make test-pure PYTHON="$PY" || status=1
verdict=$([ "$status" = 0 ] && echo "passed" || echo "FAILED")
say "torch $(torch_here): build and tests $verdict in $(( $(date +%s) - start )) s"
exit "$status"
