"""The ``dip`` command line: restore an image, report the installation, run the demo."""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

from dip.errors import DipError
from dip.fit.settings import StopReason
from dip.io import check_folder
from dip.tasks import Task

EXIT_ERROR = 1
EXIT_INTERRUPTED = 130


def _iterations(text: str):
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number or 'auto', got {text!r}") from None


def _common(p: argparse.ArgumentParser, *, output: bool = True) -> None:
    if output:
        p.add_argument("-o", "--output", required=True, help="where to write the restored image (.png, .jpg, .tif …)")
    p.add_argument("--iterations", type=_iterations, default="auto",
                   help="'auto' (default): stop when the outputs settle, without ground truth; "
                        "N: exactly N fitting steps")
    p.add_argument("--max-iterations", type=int, default=None,
                   help="cap of the automatic stop (default: the task's original count)")
    p.add_argument("--checkpoint", default=None, help="write the fit's state to this file every --checkpoint-every steps")
    p.add_argument("--checkpoint-every", type=int, default=None, metavar="N",
                   help="iterations between checkpoints (default 100 when --checkpoint is given)")
    p.add_argument("--resume", default=None, metavar="PATH", help="continue the fit saved in this checkpoint")
    p.add_argument("--plot", default=None, metavar="PATH",
                   help="draw loss (and PSNR with --reference) against iterations to this .png/.pdf/.svg")
    p.add_argument("--network", default=None, help="network preset: denoise, sr, inpaint or small (default: the task's)")
    p.add_argument("--lr", type=float, default=0.01, help="Adam learning rate (default 0.01)")
    p.add_argument("--reg-noise-std", type=float, default=None, help="std of the input perturbation (default: the task's)")
    p.add_argument("--reference", default=None, help="clean image, if known: PSNR is reported")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 … (default: CUDA when available)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--max-pixels", type=int, default=None, help="refuse images with more pixels than this")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads of the fit (default: the free cores, counting CPU affinity, container quota "
                        "and other running processes)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def _export_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--export-torchscript", metavar="FILE", default=None,
                   help="also write the fitted network, with its input baked in, as TorchScript (.pt)")
    p.add_argument("--export-program", metavar="FILE", default=None,
                   help="also write it as a torch.export program (.pt2)")
    p.add_argument("--export-onnx", metavar="FILE", default=None, help="also write it as ONNX (.onnx)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dip", description="Deep Image Prior: restore an image with no training data.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("denoise", help="remove noise from an image")
    p.add_argument("input", help="the noisy image")
    p.add_argument("--sigma", type=float, default=None,
                   help="noise std in 0–255 units, if known: the fit stops once it fits the image to that level")
    _common(p)
    _export_options(p)

    p = sub.add_parser("super-resolve", help="upscale an image by an integer factor")
    p.add_argument("input", help="the low-resolution image")
    p.add_argument("--factor", type=int, required=True, help="upscaling factor (2–32)")
    _common(p)
    _export_options(p)

    p = sub.add_parser("inpaint", help="fill in missing pixels")
    p.add_argument("input", help="the image with missing pixels")
    p.add_argument("--mask", required=True, help="mask image of the same size: white = known pixel, black = missing")
    _common(p)
    _export_options(p)

    _batch_parser(sub)

    sub.add_parser("info", help="versions, compiled extension, devices")

    p = sub.add_parser("render", help="run an exported network (.pt, .pt2 or .onnx) and write its image")
    p.add_argument("model", help="a file written by --export-torchscript, --export-program or --export-onnx")
    p.add_argument("-o", "--output", required=True, help="where to write the image (.png, .jpg, .tif …)")

    p = sub.add_parser("demo", help="restore a built-in noisy example and write a before/after picture")
    p.add_argument("-o", "--output", default="dip-demo.png", help="before/after picture (default dip-demo.png)")
    p.add_argument("--size", type=int, default=None, help="side of the example image in pixels")
    p.add_argument("--iterations", type=int, default=None, help="fitting steps")
    p.add_argument("--device", default=None, help="cpu or cuda (default: CUDA when available)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    return parser


#: Commands that run a fit (and so parallel regions by the thousand).
_FITTING_COMMANDS = ("denoise", "super-resolve", "inpaint", "demo")


def _restart_with_wait_policy() -> None:
    """Re-run this command once with the OpenMP wait policy of ``dip.threads`` in the environment.

    Importing dip has already loaded torch and its OpenMP runtime, which reads
    the policy only at start-up; without it, threads spin at every parallel
    region and a fit beside another busy process slows down many times over.
    A policy the user set (``OMP_WAIT_POLICY``) is kept, and nothing restarts.
    """
    from dip.threads import WAIT_POLICY_ENV

    if os.environ.get("DIP_NO_RESTART") or any(key in os.environ for key in WAIT_POLICY_ENV):
        return
    env = dict(os.environ, DIP_NO_RESTART="1", **WAIT_POLICY_ENV)
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, "-m", "dip.cli", *sys.argv[1:]], env)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``dip`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    if argv is None and os.name == "posix" and args.command in _FITTING_COMMANDS:
        _restart_with_wait_policy()
    try:
        if args.command == "info":
            return _info()
        if args.command == "batch":
            return _batch(args)
        if args.command == "render":
            return _render(args)
        if args.command == "demo":
            from dip.demo import run_demo

            return run_demo(output=args.output, size=args.size, iterations=args.iterations,
                            device=args.device, progress=not args.quiet)
        return _restore(args)
    except DipError as exc:
        print(f"dip: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("dip: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (OSError, RuntimeError) as exc:
        print(f"dip: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_ERROR


def _restore(args) -> int:
    import dip
    from dip.io import check_output_path

    output = check_output_path(args.output)
    exports = _export_targets(args)
    task = Task.parse(args.command)
    options = dict(
        iterations=args.iterations, max_iterations=args.max_iterations, network=args.network, lr=args.lr, reg_noise_std=args.reg_noise_std,
        reference=args.reference, device=args.device, seed=args.seed, progress=not args.quiet,
    )
    options.update({key: getattr(args, key) for key in ("max_pixels", "threads") if getattr(args, key) is not None})
    if args.checkpoint is not None:
        options.update(checkpoint=args.checkpoint,
                       checkpoint_every=100 if args.checkpoint_every is None else args.checkpoint_every)
    elif args.checkpoint_every is not None:
        raise DipError("--checkpoint-every needs --checkpoint PATH")
    if args.resume is not None:
        options["resume"] = args.resume
    if args.plot is not None:
        _check_plot_path(args.plot)
    if task == "denoise" and args.sigma is not None:
        if args.sigma <= 0:
            raise DipError(f"--sigma must be positive (noise std in 0–255 units), got {args.sigma}")
        options["noise_sigma"] = args.sigma / 255.0
    if task == "super_resolution":
        options["factor"] = args.factor
    if task == "inpaint":
        options["mask"] = args.mask
    result = dip.restore(args.input, task, **options)
    result.save(output)
    summary = f"wrote {output} ({result.iterations} iterations, {result.stop_reason}"
    if result.stopped_at != result.iterations:
        summary += f", image of iteration {result.stopped_at}"
    summary += f", {result.seconds:.1f} s"
    if result.psnr is not None:
        summary += f", PSNR {result.psnr:.2f} dB"
    print(summary + ")")
    for method, path in exports:
        getattr(result, method)(path)
        print(f"wrote {path}")
    if args.plot is not None and result.history.loss:
        print(f"wrote {result.plot(args.plot)}")
    if result.history.rollbacks:
        print(f"dip: the loss diverged {len(result.history.rollbacks)} time(s); the fit was rolled back "
              "with a lower learning rate", file=sys.stderr)
    if result.interrupted:
        print(f"dip: interrupted after {result.iterations} iterations; {output} holds the best image so far "
              f"(iteration {result.stopped_at})", file=sys.stderr)
        return EXIT_INTERRUPTED
    if result.stop_reason is StopReason.DIVERGED:
        print(f"dip: warning: the fit diverged after {result.iterations} iterations; {output} holds the last good image",
              file=sys.stderr)
    return 0


def _batch_parser(sub) -> None:
    p = sub.add_parser("batch", help="restore every image of a folder or glob, locally or on a Ray cluster")
    p.add_argument("inputs", metavar="IN_DIR_OR_GLOB", help="a folder of images, or a quoted glob such as 'scans/*.tif'")
    p.add_argument("-o", "--output", required=True, metavar="OUT_DIR",
                   help="folder for <name>.png outputs and manifest.jsonl (images already there are skipped)")
    p.add_argument("--task", required=True, choices=["denoise", "super-resolve", "inpaint"])
    p.add_argument("--factor", type=int, default=None, help="upscaling factor for super-resolve (2–32)")
    p.add_argument("--masks", "--mask-dir", "--mask", dest="masks", default=None, metavar="MASKS",
                   help="for inpaint: a folder of masks named like the images, a pattern such as "
                        "'masks/{stem}_mask.png', or one mask for all")
    p.add_argument("--reference-dir", default=None, help="clean images named like the inputs: PSNR goes in the manifest")
    p.add_argument("--workers", type=int, default=None,
                   help="local worker processes (default: one per GPU, else one per CPU core)")
    p.add_argument("--threads", type=int, default=None, help="torch threads per local worker (default: cores / workers)")
    p.add_argument("--ray", nargs="?", const=True, default=None, metavar="ADDRESS",
                   help="run each image as a Ray task: on the cluster at ADDRESS, or on a local Ray (needs dip[ray])")
    p.add_argument("--retries", type=int, default=1, help="further attempts for an image that failed (default 1)")
    p.add_argument("--iterations", type=int, default=None, help="fitting steps per image (default: the task's)")
    p.add_argument("--network", default=None, help="network preset: denoise, sr, inpaint or small (default: the task's)")
    p.add_argument("--lr", type=float, default=0.01, help="Adam learning rate (default 0.01)")
    p.add_argument("--reg-noise-std", type=float, default=None, help="std of the input perturbation (default: the task's)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: each worker's GPU when there are GPUs)")
    p.add_argument("--seed", type=int, default=0, help="run seed; each image's seed derives from it and its name")
    p.add_argument("--max-pixels", type=int, default=None, help="refuse images with more pixels than this")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def _batch(args) -> int:
    import dip

    task = Task.parse(args.task)
    options = dict(iterations=args.iterations, network=args.network, lr=args.lr, reg_noise_std=args.reg_noise_std,
                   device=args.device)
    if args.max_pixels is not None:
        options["max_pixels"] = args.max_pixels
    if task == "super_resolution":
        options["factor"] = args.factor
    summary = dip.restore_many(args.inputs, args.output, task, workers=args.workers, threads=args.threads, ray=args.ray, seed=args.seed,
                               masks=args.masks, reference_dir=args.reference_dir, retries=args.retries,
                               progress=not args.quiet, **options)
    print(f"{summary}; manifest: {summary.manifest}")
    for record in summary.records:
        if record["status"] == "failed":
            print(f"dip: failed: {record['input']}: {record['error']}", file=sys.stderr)
    if summary.interrupted:
        print("dip: interrupted; run the same command again to restore the rest", file=sys.stderr)
        return EXIT_INTERRUPTED
    return EXIT_ERROR if summary.failed else 0


def _export_targets(args) -> list:
    """(Restoration method, path) for each --export-* option, checked before the fit starts."""
    targets = []
    for option, method in (("export_torchscript", "export_torchscript"), ("export_program", "export_program"),
                           ("export_onnx", "export_onnx")):
        path = getattr(args, option, None)
        if path is None:
            continue
        check_folder(path)
        targets.append((method, Path(path)))
    return targets


def _render(args) -> int:
    from dip.export import run_exported
    from dip.io import check_output_path, save_image

    output = check_output_path(args.output)
    image = run_exported(args.model)[0].permute(1, 2, 0).float().clamp(0, 1).numpy()
    save_image(image, output)
    print(f"wrote {output} ({image.shape[0]}×{image.shape[1]} from {args.model})")
    return 0


def _check_plot_path(path: str) -> None:
    from dip.plot import _FORMATS

    p = Path(path)
    if p.suffix.lower() not in _FORMATS:
        raise DipError(f"cannot tell the plot format of {p}: use .png, .pdf, .svg or .jpg")
    check_folder(p)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise DipError("--plot needs matplotlib: pip install 'dip[plot]' (or matplotlib)") from None


def _info() -> int:
    import platform

    import numpy
    import torch

    import dip
    from dip._extension import build_info
    from dip.nn import active_path

    info = build_info()
    print(f"dip {dip.__version__}")
    print(f"python {platform.python_version()}, torch {torch.__version__}, numpy {numpy.__version__}")
    if info.get("loaded"):
        cuda = "with CUDA kernels" if info.get("with_cuda") else "CPU kernels only"
        print(f"C++ extension: loaded (built against torch {info['torch_version']}, {cuda}, "
              f"{info['openmp_threads']} threads)")
    else:
        print(f"C++ extension: not loaded ({info.get('reason')}); using the pure-PyTorch path")
    print(f"compute path: {active_path()}")
    if torch.cuda.is_available():
        names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        print(f"CUDA: {torch.version.cuda}, devices: {names}")
    else:
        print("CUDA: no GPU available")
    print(f"CPU threads: {torch.get_num_threads()}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
