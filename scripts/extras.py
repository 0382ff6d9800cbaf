"""Print the requirements of the named optional-dependency groups of pyproject.toml, one per line.

Used by the Makefile to install test tools next to an existing editable install of dip without
reinstalling (and so recompiling) dip itself: ``pip install $(python scripts/extras.py test ray)``.
"""
import sys
from pathlib import Path

try:
    import tomllib
except ImportError:  # Python 3.10: pip carries a copy of the same parser
    from pip._vendor import tomli as tomllib

extras = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())["project"][
    "optional-dependencies"]
missing = [name for name in sys.argv[1:] if name not in extras]
if missing:
    sys.exit(f"unknown extras: {', '.join(missing)} (known: {', '.join(extras)})")
print("\n".join(dict.fromkeys(req for name in sys.argv[1:] for req in extras[name])))
