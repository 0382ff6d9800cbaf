"""Replay ensemble read rules on the curves of ``quality_ensemble.py --history`` (issue 15). Not part of CI.

    python benchmarks/ensemble_reads.py F.json [F2.json …]

For every record with K > 1 members and each of its sub-ensembles (first k members) it prints the PSNR of the
mean of the members' moving averages read where each rule says: what dip returned (the record's PSNR: each member
centred on its own variance minimum), the joint minimum (all members centred on the minimum of their mean
variance), the mean-image minimum (centred on the minimum of the moving variance of the mean output, when the
record has it), the joint minimum b + d iterations, b + f·b (a delay that scales with the fit's pace), and the first
iteration after b where the members' mean variance reaches r × its minimum ("variance xr"); and the
oracle (best average, picked with the ground truth). A last table gives each rule's mean and worst loss against
the oracle over the full ensembles of every record read.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dip.fit.settings import FitSettings  # noqa: E402
from dip.fit.stopping import centred_read  # noqa: E402

DELAYS = (100, 200, 300, 400)
FRACTIONS = (0.2, 0.3, 0.4, 0.5, 0.6)
RISES = (1.05, 1.1, 1.2, 1.3, 1.5)


def centred(index: int) -> int:
    """Where dip reads the average centred on a minimum at curve index ``index`` (iteration index + 1)."""
    return int(centred_read(torch.tensor(index + 1), FitSettings().average_lag)) - 1


def at(curve: list, index: int) -> float:
    """``curve`` at ``index``, or its last value when the fit ended before (dip then returns its last average)."""
    return curve[min(index, len(curve) - 1)]


def risen(curve: list, start: int, factor: float) -> int:
    """The first index after ``start`` where ``curve`` is ``factor`` × its value there (the last index if never)."""
    floor = curve[start]
    return next((i for i in range(start, len(curve)) if curve[i] >= factor * floor), len(curve) - 1)


def argmin(curve: list) -> int:
    return min((v, i) for i, v in enumerate(curve) if v is not None and math.isfinite(v))[1]


def reads(record: dict, k: int) -> dict:
    """PSNR of the first ``k`` members' mean average read by each rule, by rule name (with the oracle)."""
    h = record["history"]
    ema, joint = h[f"psnr_ema_{k}"], argmin(h["variance"])
    own = record["psnr"] if k == record["ensemble"] else \
        next(s["psnr"] for s in record["sub_ensembles"] if s["ensemble"] == k)
    rules = {"returned (dip)": own, "joint minimum": at(ema, centred(joint))}
    if f"mean_variance_{k}" in h:
        rules["mean-image minimum"] = at(ema, centred(argmin(h[f"mean_variance_{k}"])))
    rules.update({f"joint+{d}": at(ema, joint + d) for d in DELAYS})
    rules.update({f"joint+{f:.1f}b": at(ema, joint + round(f * (joint + 1))) for f in FRACTIONS})
    rules.update({f"variance x{r}": at(ema, risen(h["variance"], joint, r)) for r in RISES})
    rules["oracle"] = max(ema)
    return rules


def replay(record: dict) -> list[str]:
    h, k_all = record["history"], record["ensemble"]
    joint = argmin(h["variance"])
    lines = [f"{record['case']} seed {record['seed']} K={k_all}: joint minimum at iteration {joint + 1}, "
             f"members' own {record.get('member_iterations')}, ran {record['iterations']}"]
    for k in sorted({int(key.rsplit("_", 1)[1]) for key in h if key.startswith("psnr_ema_")}):
        ema = h[f"psnr_ema_{k}"]
        lines.append(f"  k={k}: " + "  ".join(f"{name} {value:.2f}" for name, value in reads(record, k).items())
                     + f" (at {ema.index(max(ema)) + 1})")
    return lines


def losses(records: list) -> list[str]:
    """Each rule's mean and worst loss against the oracle over the full ensembles of ``records``."""
    table = [reads(r, r["ensemble"]) for r in records]
    lines = [f"\nloss to the oracle over {len(table)} full ensembles (mean / worst):"]
    for name in table[0]:
        if name != "oracle" and all(name in t for t in table):
            gaps = [t[name] - t["oracle"] for t in table]
            lines.append(f"  {name:20s} {sum(gaps) / len(gaps):+.3f} / {min(gaps):+.2f}")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", type=Path, help="JSON written by quality_ensemble.py --history --json")
    records = [r for path in parser.parse_args().files for r in json.loads(path.read_text())["records"]
               if r.get("history") and r["ensemble"] > 1]
    for record in records:
        print("\n".join(replay(record)))
    if records:
        print("\n".join(losses(records)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
