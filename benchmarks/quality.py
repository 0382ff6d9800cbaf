"""Restoration quality on the original work's test images (issue 6). Not part of CI.

Runs each case once for the original fixed number of iterations (or
``--iterations-cap``) with the automatic stop's rule watching in the
background, so that one fit yields, on the same trajectory:

- the image the automatic stop returns and when it would have stopped,
- the oracle peak (the best PSNR any iterate reached; needs ground truth),
- the image after the fixed iteration count of the original work,
- every image the rule can return (the ``selections`` table: one column per
  ``dip.fit.Selection``, the network with the moving average of its weights,
  ``weight_ema``, included),

and compares them with classical methods computed here: CBM3D (the ``bm3d``
package) and non-local means (scikit-image) for denoising, bicubic
interpolation for super-resolution.

    python benchmarks/quality.py                                  # every case, full size (GPU)
    python benchmarks/quality.py --size 256 --cases f16,zebra4 --device cpu --network small
    python benchmarks/quality.py --selections-only                 # the selections table only (no classical)

The data folder defaults to ``../shared/data`` beside the repository root.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_settings  # noqa: E402

import dip  # noqa: E402
from dip.fit import EarlyStopping, Selection  # noqa: E402
from dip.fit.stopping import VarianceStopper  # noqa: E402
from dip.metrics import psnr_torch  # noqa: E402
from dip.ops.lanczos import lanczos_downsample  # noqa: E402
from dip.pipeline import resolve_device  # noqa: E402
from dip.tasks import task_defaults  # noqa: E402

SELECTIONS = [s.value for s in Selection]

SIGMA = 25.0 / 255.0
CASES = {
    # name: (task, ground truth, mask or factor)
    "f16": ("denoise", "denoising/F16_GT.png", None),
    "zebra4": ("super_resolution", "sr/zebra_GT.png", 4),
    "zebra8": ("super_resolution", "sr/zebra_GT.png", 8),
    "barbara": ("inpaint", "restoration/barbara.png", "bernoulli50"),
    "kate": ("inpaint", "inpainting/kate.png", "inpainting/kate_mask.png"),
    "vase": ("inpaint", "inpainting/vase.png", "inpainting/vase_mask.png"),
    "library": ("inpaint", "inpainting/library.png", "inpainting/library_mask.png"),
}


def load(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        img = img.convert("L") if img.mode in ("L", "LA", "I", "I;16") else img.convert("RGB")
        arr = np.asarray(img, dtype=np.float32) / 255.0
    return arr[:, :, None] if arr.ndim == 2 else arr


def center_crop(arr: np.ndarray, size, multiple: int = 1) -> np.ndarray:
    """The central ``size``×``size`` (or the whole image), both sides cut to a multiple of ``multiple``."""
    h, w = arr.shape[:2]
    th, tw = (h, w) if size is None else (min(size, h), min(size, w))
    th, tw = th - th % multiple, tw - tw % multiple
    top, left = (h - th) // 2, (w - tw) // 2
    return arr[top : top + th, left : left + tw]


def to_tensor(arr: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))[None]


def to_array(t: torch.Tensor) -> np.ndarray:
    return t[0].clamp(0, 1).permute(1, 2, 0).cpu().numpy().astype(np.float32)


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    from skimage.metrics import structural_similarity

    return float(structural_similarity(a, b, channel_axis=-1, data_range=1.0))


def quantize(arr: np.ndarray) -> np.ndarray:
    return np.round(np.clip(arr, 0, 1) * 255.0) / 255.0


def make_case(name: str, data: Path, size, seed: int):
    """(task, observation, ground truth, restore() options) of a case."""
    task, gt_file, extra = CASES[name]
    multiple = extra if isinstance(extra, int) else 1
    gt = center_crop(load(data / gt_file), size, multiple)
    if task == "denoise":
        rng = np.random.default_rng(seed)
        observed = quantize(gt + rng.normal(0.0, SIGMA, gt.shape)).astype(np.float32)
        return task, observed, gt, {}
    if task == "super_resolution":
        low = lanczos_downsample(to_tensor(gt).double(), extra)
        return task, quantize(to_array(low)), gt, {"factor": extra}
    if extra == "bernoulli50":
        mask = (np.random.default_rng(seed).random(gt.shape[:2]) >= 0.5).astype(np.float32)
    else:
        mask = (center_crop(load(data / extra), size)[:, :, 0] > 0.5).astype(np.float32)
    return task, gt * mask[:, :, None], gt, {"mask": mask}


class Shadow:
    """A callback that applies the automatic stop's rule without stopping the fit.

    It records the iteration and time at which ``restore(iterations="auto")``
    would have stopped and every image that rule could return then, and keeps
    the iterate with the best PSNR (the oracle), all on the fit's device. Its
    stopper tracks the weight average (``select="weight_ema"``) so that every
    selection is among the images; the stop itself does not depend on ``select``.
    """

    def __init__(self, config: EarlyStopping, reference: np.ndarray, device):
        self.stopper = VarianceStopper(replace(config, select=Selection.WEIGHT_EMA), check_every=10)
        self.loop = None
        self.reference = to_tensor(reference).to(device)
        self.start = time.perf_counter()
        self.stop = None  # (iteration, detected iteration, seconds, {name: image})
        self.best_psnr = None
        self.best_image = None
        self.best_iteration = None

    def __call__(self, step) -> None:
        if self.loop is None:
            self.loop = step.loop
            self.stopper.on_start(step.loop)  # before its first update: the weight average starts at step 1
        if self.stop is None:
            self.stopper.update(step.output, step.ema, step.iteration)
            if self.stopper.should_stop(step.iteration):
                self.stopper.render_average(step.loop)
                images = {k: to_array(v) for k, v in self.stopper.candidates(step.ema).items()}
                self.stop = (step.iteration, self.stopper.best(), time.perf_counter() - self.start, images)
        for image in (step.ema, step.output):
            value = psnr_torch(image, self.reference)
            if self.best_psnr is None:
                self.best_psnr, self.best_image = value.clone(), image.clone()
                self.best_iteration = torch.zeros((), dtype=torch.long, device=image.device) + step.iteration
            better = value > self.best_psnr
            torch.where(better, value, self.best_psnr, out=self.best_psnr)
            torch.where(better, image, self.best_image, out=self.best_image)
            torch.where(better, torch.full_like(self.best_iteration, step.iteration), self.best_iteration,
                        out=self.best_iteration)


def classical(task: str, observed: np.ndarray, gt: np.ndarray, factor) -> dict:
    """PSNR / SSIM / seconds of the classical baselines for ``task``."""
    rows = {}
    if task == "denoise":
        try:
            import bm3d

            t = time.perf_counter()
            if observed.shape[2] == 3:
                out = bm3d.bm3d_rgb(observed, sigma_psd=SIGMA)
            else:
                out = bm3d.bm3d(observed[:, :, 0], sigma_psd=SIGMA)[:, :, None]
            rows["CBM3D"] = _row(np.clip(out, 0, 1).astype(np.float32), gt, time.perf_counter() - t)
        except ImportError:
            rows["CBM3D"] = {"note": "bm3d not installed (pip install bm3d)"}
        from skimage.restoration import denoise_nl_means, estimate_sigma

        t = time.perf_counter()
        sigma = float(np.mean(estimate_sigma(observed, channel_axis=-1)))
        out = denoise_nl_means(observed, h=0.8 * sigma, sigma=sigma, patch_size=5, patch_distance=6,
                               fast_mode=True, channel_axis=-1)
        rows["NLM (skimage)"] = _row(np.clip(out, 0, 1).astype(np.float32), gt, time.perf_counter() - t)
    elif task == "super_resolution":
        t = time.perf_counter()
        h, w = gt.shape[:2]
        pil = dip.io.to_pil(observed).resize((w, h), Image.BICUBIC)
        out = np.asarray(pil, dtype=np.float32) / 255.0
        rows["bicubic"] = _row(out.reshape(gt.shape), gt, time.perf_counter() - t)
    return rows


def _row(image, gt, seconds) -> dict:
    return {"psnr": dip.psnr(image, gt), "ssim": ssim(image, gt), "seconds": seconds}


def run_case(name, args) -> dict:
    task, observed, gt, options = make_case(name, args.data, args.size, args.seed)
    defaults = task_defaults(task, options.get("factor"))
    fixed = defaults.iterations
    cap = fixed if args.iterations_cap is None else min(fixed, args.iterations_cap)
    config = EarlyStopping(window=args.window, patience=args.patience)
    shadow = Shadow(config, gt, torch.device(args.device))
    result = dip.restore(observed, task, iterations=cap, reference=gt, device=args.device, seed=args.seed,
                         network=args.network, progress=not args.quiet, callbacks=[shadow], **options)
    record = {
        "case": name, "task": task, "size": list(gt.shape), "network": args.network or defaults.network,
        "fixed_iterations": fixed, "ran": result.iterations, "seconds": result.seconds,
        "rollbacks": len(result.history.rollbacks),
        "fixed": dict(_row(result.image, gt, result.seconds), iteration=result.iterations,
                      complete=result.iterations == fixed),
        "oracle": dict(_row(to_array(shadow.best_image), gt, None), iteration=int(shadow.best_iteration)),
    }
    if shadow.stop is not None:
        stopped, detected, seconds, images = shadow.stop
        record["auto"] = dict(_row(images[config.select], gt, seconds), iteration=detected, stopped=stopped)
        record["selections"] = {k: dip.psnr(v, gt) for k, v in images.items()}
    else:  # the rule never fired: restore(iterations="auto") would run to the cap and pick the best iterate
        shadow.stopper.render_average(shadow.loop)
        images = {k: to_array(v) for k, v in shadow.stopper.candidates(to_tensor(result.image)).items()}
        record["auto"] = dict(_row(images[config.select], gt, result.seconds), iteration=shadow.stopper.best(),
                              stopped=result.iterations)
        record["selections"] = {k: dip.psnr(v, gt) for k, v in images.items() if k != "ema"}
    record["classical"] = {} if args.selections_only else classical(task, observed, gt, options.get("factor"))
    record["input_psnr"] = dip.psnr(observed, gt) if task != "super_resolution" else None
    return record


def table(records, selections_only: bool = False) -> str:
    """The markdown tables: the automatic stop against the oracle, the fixed count and classical methods; the selections."""
    lines = [] if selections_only else [*_comparison(records), ""]
    lines.append("| case: PSNR of each selection | " + " | ".join(SELECTIONS) + " |")
    lines.append("| --- |" + " --- |" * len(SELECTIONS))
    for r in records:
        s = r["selections"]
        lines.append(f"| {r['case']} | " + " | ".join(f"{s[k]:.2f}" if k in s else "—" for k in SELECTIONS) + " |")
    return "\n".join(lines)


def _comparison(records) -> list:
    lines = [
        "| case | size | net | auto stop: PSNR / SSIM (iter, stopped at, s) | oracle peak: PSNR / SSIM (iter) "
        "| gap | fixed count: PSNR / SSIM (iter, s) | classical: PSNR / SSIM |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in records:
        a, o, f = r["auto"], r["oracle"], r["fixed"]
        fixed_note = "" if f["complete"] else f" of {r['fixed_iterations']}"
        anchors = "; ".join(
            f"{k} {v['psnr']:.2f} / {v['ssim']:.3f}" if "psnr" in v else f"{k}: {v['note']}"
            for k, v in r["classical"].items()) or "—"
        h, w, c = r["size"]
        lines.append(
            f"| {r['case']} | {h}×{w}×{c} | {r['network']} | {a['psnr']:.2f} / {a['ssim']:.3f} "
            f"({a['iteration']}, {a['stopped']}, {a['seconds']:.0f}) | {o['psnr']:.2f} / {o['ssim']:.3f} "
            f"({o['iteration']}) | {a['psnr'] - o['psnr']:+.2f} | {f['psnr']:.2f} / {f['ssim']:.3f} "
            f"({f['iteration']}{fixed_note}, {f['seconds']:.0f}) | {anchors} |")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data", help="test image folder")
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of {', '.join(CASES)}")
    parser.add_argument("--size", type=int, default=None, help="centre crop side in pixels (default: full images)")
    parser.add_argument("--device", default=None, help="cpu, cuda … (default: CUDA when available)")
    parser.add_argument("--network", default=None, help="network preset (default: the task's)")
    parser.add_argument("--iterations-cap", type=int, default=None,
                        help="run at most this many iterations (default: the original fixed count)")
    parser.add_argument("--window", type=int, default=EarlyStopping.window, help="variance window")
    parser.add_argument("--patience", type=int, default=EarlyStopping.patience, help="stopping patience")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--json", type=Path, default=None, help="also write the records here")
    parser.add_argument("--selections-only", action="store_true",
                        help="skip the classical baselines and print only the selections table (PSNR per Selection)")
    parser.add_argument("-q", "--quiet", action="store_true")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.data.is_dir():
        parser.error(f"data folder {args.data} not found (pass --data)")
    names = [n.strip() for n in args.cases.split(",") if n.strip()]
    unknown = [n for n in names if n not in CASES]
    if unknown:
        parser.error(f"unknown case(s) {', '.join(unknown)}; choose from {', '.join(CASES)}")
    device = resolve_device(args.device)
    args.device = str(device)
    machine = bench_settings.machine(args.device, torch.get_num_threads())
    print(f"# dip quality: {bench_settings.machine_line(machine)}; size {args.size or 'full'}, "
          f"cap {args.iterations_cap or 'none'}, window {args.window}, patience {args.patience}, seed {args.seed}", flush=True)
    records = []
    for name in names:
        record = run_case(name, args)
        records.append(record)
        print(json.dumps(record, default=float), flush=True)
        if args.json:
            args.json.write_text(json.dumps({"machine": machine, "records": records}, indent=1, default=float))
    print(table(records, args.selections_only))
    return 0


if __name__ == "__main__":
    sys.exit(main())
