#!/usr/bin/env bash
# Compiler-free install check: in a fresh virtual environment (torch from the system), with no working
# C/C++ compiler, `pip install` must succeed and dip must run on the pure-PyTorch path.
# Usage: bash scripts/check_pure_install.sh   (from anywhere; takes about a minute)
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
python="${PYTHON:-python3}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# A copy of the sources (tracked and new files, nothing ignored), so no build/ left by other builds is reused.
mkdir "$work/src"
(cd "$repo" && git ls-files -co --exclude-standard -z | tar --null -T - -cf -) | tar -xf - -C "$work/src"

"$python" -m venv --system-site-packages "$work/venv"
# A venv may bring its own old setuptools, which would shadow the system's; the build needs >= 77 (SPDX licence).
"$work/venv/bin/python" -m pip uninstall --quiet -y setuptools >/dev/null 2>&1 || true
"$work/venv/bin/python" -m pip install --quiet --disable-pip-version-check "setuptools>=77" wheel
CC=false CXX=false "$work/venv/bin/python" -m pip install --quiet --disable-pip-version-check \
    --no-build-isolation --no-deps "$work/src"

cd "$work"  # not the repository: `import dip` must find the installed copy
# An editable install of dip on this machine (a developer's or CI's `make install`) adds an import hook that
# would serve dip._C from that checkout; a user's machine has none, so the check drops such hooks.
strip_editable='import sys; sys.meta_path[:] = [f for f in sys.meta_path if not str(getattr(f, "__module__", "")).startswith("__editable__")]'
"$work/venv/bin/python" - "$work/venv" <<'PY'
import sys; sys.meta_path[:] = [f for f in sys.meta_path if not str(getattr(f, "__module__", "")).startswith("__editable__")]
import importlib.metadata
import pathlib

import numpy as np

import dip
from dip import _extension

venv = pathlib.Path(sys.argv[1]).resolve()
where = pathlib.Path(dip.__file__).resolve()
assert venv in where.parents, f"imported dip from {where}, not from the fresh venv {venv}"
assert not list(where.parent.glob("_C*")), "the compiler-free install contains a compiled extension"
assert not _extension.has_ops(), "the compiled operators are loaded in a compiler-free install"
assert dip.__version__ == importlib.metadata.version("dip-restore"), "dip.__version__ differs from the metadata"
image = np.random.default_rng(0).random((24, 24, 3)).astype(np.float32)
result = dip.restore(image, "denoise", network="small", iterations=2, progress=False)
assert result.image.shape == (24, 24, 3) and result.iterations == 2
print(f"compiler-free install: dip {dip.__version__} from {where.parent}, pure-PyTorch restore OK")
PY
info="$("$work/venv/bin/python" -c "$strip_editable
from dip.cli import main; sys.exit(main(['info']))")"
echo "$info" | grep -c "pure-PyTorch" | grep -qx 1 || { echo "dip info should say once that it runs on the pure-PyTorch path:"; echo "$info"; exit 1; }
echo "compiler-free install check passed"
