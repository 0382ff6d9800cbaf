"""Print the requirements of the named optional-dependency groups of pyproject.toml, one per line.

Used by the Makefile to install test tools next to an existing editable install of dip without
reinstalling (and so recompiling) dip itself: ``pip install $(python scripts/extras.py test ray)``.
``--torch-floor`` prints instead the X.Y of the ``torch>=X.Y`` dependency (scripts/check_torch_floor.sh
installs that torch; setup.py reads the same line).
"""
import re
import sys
from pathlib import Path

try:
    import tomllib
except ImportError:  # Python 3.10: pip carries a copy of the same parser
    from pip._vendor import tomli as tomllib

project = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())["project"]
if sys.argv[1:] == ["--torch-floor"]:
    floors = [m for r in project["dependencies"] if (m := re.fullmatch(r"torch\s*>=\s*(\d+\.\d+)(\.\d+)?", r.strip()))]
    if not floors:
        sys.exit(f"pyproject.toml declares no torch>=X.Y dependency (got {project['dependencies']})")
    print(floors[0][1])
    sys.exit()
extras = project["optional-dependencies"]
missing = [name for name in sys.argv[1:] if name not in extras]
if missing:
    sys.exit(f"unknown extras: {', '.join(missing)} (known: {', '.join(extras)})")
print("\n".join(dict.fromkeys(req for name in sys.argv[1:] for req in extras[name])))
