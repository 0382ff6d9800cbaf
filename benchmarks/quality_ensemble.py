"""Blind denoising quality: automatic stop, blind σ, seed ensembles (issue 15). Not part of CI.

For each crop × noise seed × ensemble size K, one ``dip.restore`` with
``iterations="auto"`` (no ground truth used by the stop; optionally
``noise_sigma="auto"``), and on the same trajectory the best iterate picked
with the ground truth (the oracle: the best PSNR of the members' mean moving
average or mean raw output over all iterations). Reports PSNR / SSIM of the
returned image, its gap to that oracle, the σ estimate, seconds, and CBM3D
(``bm3d`` package, skipped when missing) and non-local means (scikit-image) on
the same noisy inputs. Noise: ``numpy.random.default_rng(seed).normal(0, σ, shape)``
added in [0, 1] and clipped. A K-member fit also reports its first 1, 2, 4, … members as
sub-ensembles (each with its own oracle): member k is seed ``seed + k``, so ``--ensemble 4`` alone
measures K = 1, 2 and 4 (K = 1 there is the K = 1 fit's network and input, with other random
input perturbations and the pure grouped blocks).

    python benchmarks/quality_ensemble.py --device cuda --seeds 0,1,2 --ensemble 1,2,4 --time-budget 170 \
        --json quality_ensemble.json
    python benchmarks/quality_ensemble.py --device cpu --size 32 --network small --cases astronaut --seeds 0 \
        --ensemble 1,2 --max-iterations 300        # a smoke test

``--time-budget`` stops starting new fits once that many seconds have passed
(the runs done so far are written); the order is seed by seed, so a cut keeps
every crop at the first seeds.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_settings  # noqa: E402

import dip  # noqa: E402
from dip.fit import EarlyStopping  # noqa: E402
from dip.fit.stopping import VarianceStopper  # noqa: E402
from dip.metrics import psnr_torch, ssim  # noqa: E402
from dip.noise import estimate_sigma  # noqa: E402
from dip.pipeline import resolve_device  # noqa: E402

# name: a file under --data, or "skimage:<function>"
CASES = {
    "f16": "denoising/F16_GT.png",
    "kate": "inpainting/kate.png",
    "astronaut": "skimage:astronaut",
    "ihc": "skimage:immunohistochemistry",
    # held out: never used to choose settings
    "coffee": "skimage:coffee",
    "chelsea": "skimage:chelsea",
}
DEV_SET = "f16,kate,astronaut,ihc"


def load(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        arr = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    return arr


def center_crop(arr: np.ndarray, size: int) -> np.ndarray:
    h, w = arr.shape[:2]
    th, tw = min(size, h), min(size, w)
    top, left = (h - th) // 2, (w - tw) // 2
    return arr[top : top + th, left : left + tw]


def clean_crop(name: str, data: Path, size: int):
    source = CASES[name]
    if source.startswith("skimage:"):
        from skimage import data as skdata

        arr = getattr(skdata, source.split(":", 1)[1])().astype(np.float32) / 255.0
        arr = arr[:, :, None] if arr.ndim == 2 else arr[:, :, :3]
    else:
        path = data / source
        if not path.exists():
            return None
        arr = load(path)
    return np.ascontiguousarray(center_crop(arr, size))


class Oracle:
    """Keeps, on the device, the best PSNR any iterate reached (the mean average or mean raw output of the
    first k members, for each k in ``prefixes``; the last is the whole ensemble)."""

    def __init__(self, reference: np.ndarray, device, prefixes=(1,), curves: bool = False, window: int = 100):
        self.reference = torch.from_numpy(reference.transpose(2, 0, 1).copy())[None].to(device)
        self.prefixes = list(prefixes)
        self.best = None
        self.iteration = None
        self.curves = [] if curves else None  # per iteration: [average, raw output] × prefix PSNR, on the device
        # With curves, also the stop signal of dip.fit.stopping applied to each sub-ensemble's *mean* output
        # (the moving variance of the mean image): a candidate joint stop rule, replayed offline.
        self.mean_stats = [VarianceStopper(EarlyStopping(window=window)) for _ in self.prefixes] if curves else None
        self.mean_variance = [] if curves else None

    def __call__(self, step) -> None:
        ema_means, output_means = ([image[:k].mean(0, keepdim=True) for k in self.prefixes]
                                   for image in (step.ema, step.output))
        values = []
        for means in (ema_means, output_means):
            value = torch.stack([psnr_torch(m, self.reference) for m in means])
            values.append(value)
            if self.best is None:
                self.best = value.clone()
                self.iteration = torch.full_like(value, step.iteration, dtype=torch.long)
            better = value > self.best
            torch.where(better, value, self.best, out=self.best)
            torch.where(better, torch.full_like(self.iteration, step.iteration), self.iteration, out=self.iteration)
        if self.curves is not None:
            self.curves.append(torch.stack(values))
            self.mean_variance.append(torch.stack([stats.update(m, m, step.iteration)
                                                   for stats, m in zip(self.mean_stats, output_means)]))

    def curve_dict(self) -> dict:
        """The kept curves by name: ``psnr_ema_k`` / ``psnr_k`` for the mean of the first k members."""
        curves = torch.stack(self.curves).cpu() if self.curves else torch.empty(0, 2, len(self.prefixes))
        named = {f"{name}_{k}": curves[:, row, i].tolist() for row, name in enumerate(("psnr_ema", "psnr"))
                 for i, k in enumerate(self.prefixes)}
        if self.mean_variance:
            spread = torch.stack(self.mean_variance).cpu()
            named.update({f"mean_variance_{k}": spread[:, i].tolist() for i, k in enumerate(self.prefixes)})
        return named


def prefixes(members: int) -> list:
    """The sub-ensembles a K-member fit also measures: its first 1, 2, 4, … members, and all K. Member k
    is the network and input of seed ``seed + k`` and the members never interact (grouped convolutions,
    per-channel BatchNorm, per-member stop), so the first k of them are a k-member ensemble of this seed."""
    return sorted({2 ** i for i in range(members.bit_length()) if 2 ** i < members} | {members})


def classical(observed: np.ndarray, gt: np.ndarray, sigma: float) -> dict:
    rows = {}
    try:
        import bm3d
    except ImportError:
        rows["CBM3D"] = {"note": "bm3d not installed"}
    else:
        t = time.perf_counter()
        out = bm3d.bm3d_rgb(observed, sigma_psd=sigma) if observed.shape[2] == 3 else \
            bm3d.bm3d(observed[:, :, 0], sigma_psd=sigma)[:, :, None]
        rows["CBM3D"] = _row(np.clip(out, 0, 1), gt, time.perf_counter() - t)
    try:
        from skimage.restoration import denoise_nl_means
    except ImportError:
        rows["NLM"] = {"note": "scikit-image not installed"}
    else:
        t = time.perf_counter()
        s = estimate_sigma(observed)
        out = denoise_nl_means(observed, h=0.8 * s, sigma=s, patch_size=5, patch_distance=6, fast_mode=True,
                               channel_axis=-1)
        rows["NLM"] = _row(np.clip(out, 0, 1), gt, time.perf_counter() - t)
    return rows


def _row(image, gt, seconds) -> dict:
    image = np.asarray(image, dtype=np.float32)
    return {"psnr": dip.psnr(image, gt), "ssim": ssim(image, gt), "seconds": seconds}


def run(name, gt, seed, members, args, precision: str = "float32", objective: str = "mse") -> dict:
    observed = np.clip(gt + np.random.default_rng(seed).normal(0, args.sigma / 255, gt.shape), 0, 1)
    observed = observed.astype(np.float32)
    oracle = Oracle(gt, args.device, prefixes(members), curves=args.history, window=args.window)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    t = time.perf_counter()
    r = dip.restore(observed, iterations="auto", max_iterations=args.max_iterations, device=args.device,
                    seed=1000 * seed, network=args.network, reference=gt, progress=False, ensemble=members,
                    noise_sigma="auto" if args.blind_sigma else None, callbacks=[oracle], precision=precision,
                    objective=objective,
                    early_stopping=EarlyStopping(window=args.window, patience=args.patience))
    seconds = time.perf_counter() - t
    best = float(oracle.best[-1])
    record = {"case": name, "seed": seed, "ensemble": members, "precision": precision, "objective": objective,
              "psnr": r.psnr,
              "ssim": r.ssim,
              "oracle_psnr": best, "gap": r.psnr - best,
              "stopped_at": r.stopped_at, "iterations": r.iterations, "stop_reason": r.stop_reason.value,
              "sigma_estimate": r.noise_sigma_estimate * 255, "seconds": seconds,
              "input_psnr": dip.psnr(observed, gt), "oracle_iteration": int(oracle.iteration[-1])}
    if r.members is not None:
        record["member_psnr"] = [dip.psnr(m, gt) for m in r.members]
        record["member_iterations"] = r.member_iterations
        record["sub_ensembles"] = [_sub_ensemble(r.members[:k], gt, float(b), int(i)) | {"ensemble": k}
                                   for k, b, i in zip(oracle.prefixes[:-1], oracle.best[:-1], oracle.iteration[:-1])]
    if args.history:  # to replay other stop rules offline: the stop signal and both PSNR curves, per iteration
        record["history"] = {k: v for k, v in r.history.as_dict().items() if k in ("variance", "loss", "psnr", "psnr_ema")}
        record["history"].update(oracle.curve_dict())  # per sub-ensemble; "variance" is the members' mean score
    first = precision == args.precision[0] and objective == args.objective[0]
    if members == min(args.ensemble) and first and not args.no_classical:
        record["classical"] = classical(observed, gt, args.sigma / 255)
    return record


def _sub_ensemble(members: np.ndarray, gt: np.ndarray, oracle: float, iteration: int) -> dict:
    image = np.clip(members.mean(axis=0), 0, 1)
    value = dip.psnr(image, gt)
    return {"psnr": value, "ssim": ssim(image, gt), "oracle_psnr": oracle, "oracle_iteration": iteration,
            "gap": value - oracle}


def summary(records) -> str:
    lines = ["| case | seed | K | variant | PSNR / SSIM | oracle | gap | stop (iter / ran, reason) | σ̂ | s | CBM3D "
             "| NLM |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    classical_of = {(r["case"], r["seed"]): r["classical"] for r in records if "classical" in r}
    for r in records:
        c = classical_of.get((r["case"], r["seed"]), {})
        anchors = [f"{c[k]['psnr']:.2f} / {c[k]['ssim']:.3f}" if "psnr" in c.get(k, {}) else "—"
                   for k in ("CBM3D", "NLM")]
        lines.append(f"| {r['case']} | {r['seed']} | {r['ensemble']} | {_variant(r)} | "
                     f"{r['psnr']:.2f} / {r['ssim']:.3f} | "
                     f"{r['oracle_psnr']:.2f} | {r['gap']:+.2f} | {r['stopped_at']} / {r['iterations']}, "
                     f"{r['stop_reason']} | {r['sigma_estimate']:.1f} | {r['seconds']:.1f} | "
                     f"{anchors[0]} | {anchors[1]} |")
        for sub in r.get("sub_ensembles", []):
            lines.append(f"| {r['case']} | {r['seed']} | first {sub['ensemble']} of {r['ensemble']} | "
                         f"{_variant(r)} | {sub['psnr']:.2f} / {sub['ssim']:.3f} | "
                         f"{sub['oracle_psnr']:.2f} | {sub['gap']:+.2f} | | | | {anchors[0]} | {anchors[1]} |")
    by_k = {}
    for r in records:
        by_k.setdefault((r["ensemble"], _variant(r)), []).append(r)
        for sub in r.get("sub_ensembles", []):
            by_k.setdefault((sub["ensemble"], _variant(r)), []).append(sub)
    for (k, variant), rs in sorted(by_k.items()):
        lines.append(f"\nK={k}, {variant}: mean PSNR {np.mean([r['psnr'] for r in rs]):.2f}, mean SSIM "
                     f"{np.mean([r['ssim'] for r in rs]):.3f}, mean gap {np.mean([r['gap'] for r in rs]):+.2f}, "
                     f"worst gap {min(r['gap'] for r in rs):+.2f}, mean s {_mean_seconds(rs)} ({len(rs)} runs)")
    return "\n".join(lines)


def _variant(record) -> str:
    """The precision, and the objective when it is not the original one."""
    objective = record.get("objective", "mse")
    return record.get("precision", "float32") + ("" if objective == "mse" else f", {objective}")


def _mean_seconds(rows) -> str:
    seconds = [r["seconds"] for r in rows if "seconds" in r]  # a sub-ensemble has no time of its own
    return f"{np.mean(seconds):.1f}" if seconds else "— (sub-ensembles of larger fits)"


def _ints(text: str) -> list:
    return [int(v) for v in text.split(",") if v.strip()]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data", help="test image folder")
    parser.add_argument("--cases", default=DEV_SET, help=f"comma-separated subset of {', '.join(CASES)}")
    parser.add_argument("--size", type=int, default=128, help="centre crop side")
    parser.add_argument("--sigma", type=float, default=25.0, help="noise std in 0–255 units")
    parser.add_argument("--seeds", default="0,1,2", help="noise seeds (the fit's seed is 1000×noise seed)")
    parser.add_argument("--ensemble", default="1,2,4", help="ensemble sizes K")
    parser.add_argument("--device", default=None, help="cpu, cuda … (default: CUDA when available)")
    parser.add_argument("--network", default="denoise", help="network preset")
    parser.add_argument("--max-iterations", type=int, default=3000, help="cap of the automatic stop")
    parser.add_argument("--window", type=int, default=EarlyStopping.window)
    parser.add_argument("--patience", type=int, default=EarlyStopping.patience)
    parser.add_argument("--precision", default="float32",
                        help="comma-separated fit precisions, e.g. float32,bfloat16 (each case runs in each)")
    parser.add_argument("--objective", default="mse",
                        help="comma-separated fit objectives, e.g. mse,sure (each case runs with each; sure uses "
                             "the estimated σ)")
    parser.add_argument("--blind-sigma", action="store_true",
                        help="also stop at the estimated noise level (noise_sigma='auto')")
    parser.add_argument("--no-classical", action="store_true", help="skip CBM3D and NLM")
    parser.add_argument("--history", action="store_true",
                        help="keep each fit's per-iteration stop signal and PSNR curves (per sub-ensemble) in the JSON")
    parser.add_argument("--time-budget", type=float, default=None, help="seconds after which no new fit starts")
    parser.add_argument("--json", type=Path, default=None, help="write the records and the machine here")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.cases.split(",") if n.strip()]
    unknown = [n for n in names if n not in CASES]
    if unknown:
        parser.error(f"unknown case(s) {', '.join(unknown)}; choose from {', '.join(CASES)}")
    args.ensemble = _ints(args.ensemble)
    args.precision = [p.strip() for p in args.precision.split(",") if p.strip()]
    args.objective = [o.strip() for o in args.objective.split(",") if o.strip()]
    device = resolve_device(args.device)
    args.device = str(device)
    machine = bench_settings.machine(args.device, torch.get_num_threads())
    print(f"# dip quality/ensemble: {bench_settings.machine_line(machine)}; size {args.size}, σ {args.sigma}, net {args.network}, "
          f"window {args.window}, patience {args.patience}, blind σ stop {args.blind_sigma}", flush=True)
    crops = {n: clean_crop(n, args.data, args.size) for n in names}
    skipped = [n for n, c in crops.items() if c is None]
    if skipped:
        print(f"# skipped (file not under {args.data}): {', '.join(skipped)}", flush=True)
    start, records, cut = time.perf_counter(), [], False
    for seed in _ints(args.seeds):
        for name, gt in crops.items():
            for members, precision, objective in itertools.product(args.ensemble, args.precision, args.objective):
                if gt is None:
                    continue
                if args.time_budget is not None and time.perf_counter() - start > args.time_budget:
                    cut = True
                    break
                record = run(name, gt, seed, members, args, precision, objective)
                records.append(record)
                print(json.dumps(record, default=float), flush=True)
                if args.json:
                    args.json.write_text(json.dumps({"machine": machine, "args": {k: str(v) for k, v in vars(args).items()},
                                                     "records": records}, indent=1, default=float))
    if cut:
        print(f"# time budget of {args.time_budget:.0f} s reached after {len(records)} fits", flush=True)
    print(summary(records))
    return 0


if __name__ == "__main__":
    sys.exit(main())
