"""The batch package's shape: one-way dependencies, no private name crossing a file, each module importable alone."""
import ast
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "dip" / "batch"
MODULES = sorted(p.stem for p in PACKAGE.glob("*.py"))

# What each module may import from dip.batch ("__init__" is the package itself).
ALLOWED = {
    "records": set(),
    "interrupt": set(),
    "worker": {"records"},
    "local": {"records", "worker", "interrupt"},
    "ray": {"records", "worker", "interrupt"},
    "planning": {"records"},
    "manifest": {"records"},
    "__init__": {"records", "interrupt", "worker", "local", "ray", "planning", "manifest"},
}


def _batch_imports(module):
    """(imported dip.batch module, names taken from it) for every import in ``module``, lazy ones included."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text(encoding="utf-8"))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "dip.batch" or alias.name.startswith("dip.batch."):
                    found.append((alias.name.removeprefix("dip.batch").lstrip(".") or "__init__", []))
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from . import x / from .x import y
                target = node.module or "__init__"
            elif node.module == "dip.batch":
                target = "__init__"
            elif node.module and node.module.startswith("dip.batch."):
                target = node.module.removeprefix("dip.batch.")
            else:
                continue
            names = [a.name for a in node.names]
            if target == "__init__":  # `from dip.batch import records` names a submodule
                subs = [n for n in names if n in MODULES]
                found.extend((n, []) for n in subs)
                names = [n for n in names if n not in MODULES]
                if not names:
                    continue
            found.append((target, names))
    return found


def test_every_module_has_a_declared_place():
    assert set(MODULES) == set(ALLOWED)


def test_dependencies_are_one_way_and_runners_use_only_the_job_layer():
    for module in MODULES:
        imported = {target for target, _ in _batch_imports(module)} - {module}
        assert imported <= ALLOWED[module], f"dip.batch.{module} imports {sorted(imported - ALLOWED[module])}"


def test_no_import_cycle():
    graph = {m: {t for t, _ in _batch_imports(m)} - {m} for m in MODULES}
    done, on_path = set(), []

    def visit(m):
        assert m not in on_path, f"import cycle: {' -> '.join(on_path[on_path.index(m):] + [m])}"
        if m in done:
            return
        on_path.append(m)
        for n in graph[m]:
            visit(n)
        on_path.pop()
        done.add(m)

    for m in MODULES:
        visit(m)


def test_no_private_name_crosses_a_file():
    for module in MODULES:
        for target, names in _batch_imports(module):
            private = [n for n in names if n.startswith("_")]
            assert not private, f"dip.batch.{module} imports private {private} from dip.batch.{target}"


def test_each_module_imports_alone():
    """Import each module first, in a fresh copy of the package: a cycle would fail on a half-initialised module."""
    code = (
        "import importlib, sys\n"
        "import dip\n"
        f"for name in {[f'dip.batch.{m}' for m in MODULES if m != '__init__']!r}:\n"
        "    for loaded in [k for k in sys.modules if k == 'dip.batch' or k.startswith('dip.batch.')]:\n"
        "        del sys.modules[loaded]\n"
        "    importlib.import_module(name)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
