"""Replay ensemble read rules on the curves of ``quality_ensemble.py --history`` (issue 15). Not part of CI.

    python benchmarks/ensemble_reads.py F.json [F2.json …]

For every record with K > 1 members and each of its sub-ensembles (first k members) it prints the PSNR of the
mean of the members' moving averages read where each rule says: dip's own (each member centred on its own
variance minimum: the record's PSNR), the joint minimum (all members centred on the minimum of their mean
variance), the mean-image minimum (centred on the minimum of the moving variance of the mean output, when the
record has it) and the joint minimum + d iterations; and the oracle (best average, picked with the ground truth).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dip.fit.settings import FitSettings  # noqa: E402
from dip.fit.stopping import CENTRE_DIVISOR  # noqa: E402

DELAYS = (100, 200, 300, 400)


def centred(index: int) -> int:
    """Where dip reads the average centred on a minimum at curve index ``index`` (iteration index + 1)."""
    iteration = index + 1
    return iteration + min(iteration // CENTRE_DIVISOR, FitSettings().average_lag) - 1


def at(curve: list, index: int) -> float:
    """``curve`` at ``index``, or its last value when the fit ended before (dip then returns its last average)."""
    return curve[min(index, len(curve) - 1)]


def argmin(curve: list) -> int:
    return min((v, i) for i, v in enumerate(curve) if v is not None and math.isfinite(v))[1]


def replay(record: dict) -> list[str]:
    h, k_all = record["history"], record["ensemble"]
    joint = argmin(h["variance"])
    lines = [f"{record['case']} seed {record['seed']} K={k_all}: joint minimum at iteration {joint + 1}, "
             f"members' own {record.get('member_iterations')}, ran {record['iterations']}"]
    for k in sorted({int(key.rsplit("_", 1)[1]) for key in h if key.startswith("psnr_ema_")}):
        ema = h[f"psnr_ema_{k}"]
        own = record["psnr"] if k == k_all else next(s["psnr"] for s in record["sub_ensembles"] if s["ensemble"] == k)
        row = f"  k={k}: own minima {own:.2f}  joint minimum {at(ema, centred(joint)):.2f}"
        if f"mean_variance_{k}" in h:
            m = argmin(h[f"mean_variance_{k}"])
            row += f"  mean-image minimum {at(ema, centred(m)):.2f} (at {m + 1})"
        row += "".join(f"  joint+{d} {at(ema, joint + d):.2f}" for d in DELAYS)
        best = max(ema)
        lines.append(row + f"  | oracle {best:.2f} (at {ema.index(best) + 1})")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", type=Path, help="JSON written by quality_ensemble.py --history --json")
    for path in parser.parse_args().files:
        for record in json.loads(path.read_text())["records"]:
            if record.get("history") and record["ensemble"] > 1:
                print("\n".join(replay(record)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
