"""The ``dip`` command line: restore an image, report the installation, run the demo.

Nothing heavy is imported at module level: ``dip --help``, ``dip --version``
and errors found in the arguments (a missing file, ``-o`` equal to the input,
a folder that cannot be written) answer before torch loads.

Everything a user can get wrong is checked before the fit starts, so that an
hour of fitting is never thrown away for a typo; if the final write still
fails, the result is saved under a clear name in the working directory (or the
system temp folder) and the command says where.
"""
from __future__ import annotations

import argparse
import io
import math
import os
import re
import signal
import sys
import tempfile
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

from dip import __version__
from dip.errors import DipError
from dip.tasks import Task

EXIT_ERROR = 1
#: the fit diverged: the output holds the last good image, but a script should not take it as a success
EXIT_DIVERGED = 3
EXIT_INTERRUPTED = 130  # 128 + SIGINT
EXIT_TERMINATED = 143  # 128 + SIGTERM
#: ``-`` as the input or ``-o`` means standard input / standard output
STDIO = "-"
RESTORE_COMMANDS = ("denoise", "super-resolve", "inpaint")


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so that a fit stops as it does on Ctrl-C (best image kept)."""


# ----------------------------------------------------------------------------------------------------------------
# Parser


def _number_or_auto(text: str, convert, expected: str):
    """An argparse type: 'auto' (any case), or ``convert(text)``; ``expected`` names the number in the error."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return convert(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected} or 'auto', got {text!r}") from None


def _iterations(text: str):
    return _number_or_auto(text, int, "a whole number")


def _sigma(text: str):
    return _number_or_auto(text, float, "a noise std in 0–255 units")


def _color(text: str) -> tuple:
    parts = text.replace(" ", "").split(",")
    try:
        rgb = tuple(int(p) for p in parts)
    except ValueError:
        rgb = ()
    if len(rgb) not in (1, 3) or not all(0 <= c <= 255 for c in rgb):
        raise argparse.ArgumentTypeError(f"expected R,G,B (each 0–255) or one gray level, got {text!r}")
    return rgb


def _sigma_option(p: argparse.ArgumentParser, what: str = "the input's") -> None:
    p.add_argument("--sigma", type=_sigma, default=None, metavar="S",
                   help=f"std of {what} noise in 0–255 units (the API's noise_sigma=S/255), if known, or 'auto' "
                        "to estimate it from the image: the fit stops once it fits the image to that level")


def _ensemble_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ensemble", type=int, default=1, metavar="K",
                   help="fit K networks of consecutive seeds together and average their images (default 1), "
                        "fitted as one grouped network")
    # No argparse choices: listing the enums here would load torch for --help; restore() checks both words.
    p.add_argument("--objective", default=None,
                   help="mse (default): the original random input and misfit; sure (denoise only): the network "
                        "sees the noisy image and minimises an unbiased estimate of its error (σ: --sigma, best when "
                        "known, else estimated), two passes per step")
    p.add_argument("--precision", default=None,
                   help="float32 (default), bfloat16 (bf16 compute, float32 weights and output) or auto (bf16 "
                        "where the hardware runs it fast)")


def _method_options(args) -> dict:
    """restore()'s keywords for --ensemble, --objective and --precision (left out when not given)."""
    options = {} if args.ensemble == 1 else {"ensemble": args.ensemble}
    options.update({k: getattr(args, k) for k in ("objective", "precision") if getattr(args, k) is not None})
    return options


def _common(p: argparse.ArgumentParser, *, output: bool = True) -> None:
    if output:
        p.add_argument("-o", "--output", required=True,
                       help="where to write the restored image (.png, .jpg, .tif …); '-' for standard output")
        p.add_argument("--format", default=None, metavar="EXT",
                       help="image format for '-o -' (png, tif, jpg …; default: the input's)")
    p.add_argument("--iterations", type=_iterations, default="auto",
                   help="'auto' (default): stop when the outputs settle, without ground truth; "
                        "N: exactly N fitting steps")
    p.add_argument("--max-iterations", type=int, default=None,
                   help="cap of the automatic stop (default: the task's original count)")
    p.add_argument("--checkpoint", default=None, help="write the fit's state to this file every --checkpoint-every steps")
    p.add_argument("--checkpoint-every", type=int, default=None, metavar="N",
                   help="iterations between checkpoints (default 100 when --checkpoint is given)")
    p.add_argument("--resume", default=None, metavar="PATH", help="continue the fit saved in this checkpoint")
    p.add_argument("--overwrite-checkpoint", action="store_true",
                   help="let --checkpoint replace the saved state of another run (refused otherwise)")
    p.add_argument("--plot", default=None, metavar="PATH",
                   help="draw loss (and PSNR with --reference) against iterations to this .png/.pdf/.svg")
    p.add_argument("--network", default=None, help="network preset: denoise, sr, inpaint or small (default: the task's)")
    p.add_argument("--lr", type=float, default=0.01, help="Adam learning rate (default 0.01)")
    p.add_argument("--reg-noise-std", type=float, default=None, help="std of the input perturbation (default: the task's)")
    p.add_argument("--reference", default=None, help="clean image, if known: PSNR (and SSIM) are reported")
    _ensemble_option(p)
    p.add_argument("--uncertainty", default=None, metavar="MAP.png",
                   help="write where the restoration is unsure (the ensemble's spread, or the automatic stop's "
                        "moving std) as a colour map with its scale; needs --ensemble K ≥ 2 or --iterations auto")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 … (default: CUDA when available)")
    p.add_argument("--seed", type=int, default=0, help="random seed, 0 ≤ seed < 2^64 (default 0)")
    p.add_argument("--max-pixels", type=int, default=None, help="refuse images with more pixels than this")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads of the fit (default: the free cores, counting CPU affinity, container quota "
                        "and other running processes, and one thread while another process competes)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def _export_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--export-torchscript", metavar="FILE", default=None,
                   help="also write the fitted network, with its input baked in, as TorchScript (.pt)")
    p.add_argument("--export-program", metavar="FILE", default=None,
                   help="also write it as a torch.export program (.pt2)")
    p.add_argument("--export-onnx", metavar="FILE", default=None, help="also write it as ONNX (.onnx)")


def build_parser() -> argparse.ArgumentParser:
    """The ``dip`` argument parser (imports nothing heavy)."""
    parser = argparse.ArgumentParser(prog="dip", description="Deep Image Prior: restore an image with no training data.")
    parser.add_argument("--version", action="version", version=f"dip {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("denoise", help="remove noise from an image")
    p.add_argument("input", help="the noisy image ('-' for standard input)")
    _sigma_option(p)
    _common(p)
    _export_options(p)

    p = sub.add_parser("super-resolve", help="upscale an image by an integer factor")
    p.add_argument("input", help="the low-resolution image ('-' for standard input)")
    p.add_argument("--factor", type=int, required=True, help="upscaling factor (2–32)")
    _sigma_option(p, "the low-resolution image's")
    _common(p)
    _export_options(p)

    p = sub.add_parser("inpaint", help="fill in missing pixels")
    p.add_argument("input", help="the image with missing pixels ('-' for standard input)")
    p.add_argument("--mask", default=None,
                   help="mask image of the same size: white (non-zero) = known pixel, black = missing; "
                        "or 'alpha': the input's transparent pixels are the missing ones")
    p.add_argument("--mask-color", type=_color, default=None, metavar="R,G,B",
                   help="the input's pixels of exactly this colour (0–255) are the missing ones")
    _sigma_option(p)
    _common(p)
    _export_options(p)

    _batch_parser(sub)

    sub.add_parser("info", help="versions, compiled extension, devices")

    p = sub.add_parser("render", help="run an exported network (.pt, .pt2 or .onnx) and write its image (it runs "
                                      "the code contained in the file: render only exports you trust)",
                       description="Run an exported network (.pt, .ptl, .pt2 or .onnx) and write its image. An export "
                                   "is a program, not data: dip render runs the code contained in the file, so "
                                   "render only exports you trust.")
    p.add_argument("model", help="a file written by --export-torchscript, --export-program or --export-onnx "
                                 "(it is run: only one you trust)")
    p.add_argument("-o", "--output", required=True, help="where to write the image (.png, .jpg, .tif …)")

    p = sub.add_parser("demo", help="restore a built-in noisy example and write a before/after picture")
    p.add_argument("-o", "--output", default="dip-demo.png", help="before/after picture (default dip-demo.png)")
    p.add_argument("--size", type=int, default=None, help="side of the example image in pixels")
    p.add_argument("--iterations", type=int, default=None, help="fitting steps")
    p.add_argument("--sigma", type=float, default=None, metavar="S",
                   help="std of the noise added to the example, 0–255 units (default 25)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: CUDA when available)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: automatic, as for a fit)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    return parser


# ----------------------------------------------------------------------------------------------------------------
# Entry point


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``dip`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    # A single fit (and the demo) treat SIGTERM, what schedulers and containers send, like Ctrl-C.
    # Batch has its own handling for its worker pool.
    catch_term = args.command in (*RESTORE_COMMANDS, "demo")
    with _sigterm_as_interrupt(catch_term) as term:
        try:
            status = _dispatch(args)
        except DipError as exc:
            return _fail(cli_message(str(exc)))
        except KeyboardInterrupt as exc:
            terminated = isinstance(exc, Terminated)
            print(f"dip: {'terminated' if terminated else 'interrupted'}", file=sys.stderr)
            return EXIT_TERMINATED if terminated else EXIT_INTERRUPTED
        except (OSError, RuntimeError, MemoryError) as exc:
            return _fail(f"{type(exc).__name__}: {cli_message(str(exc))}")
    if status == EXIT_INTERRUPTED and term.received:
        return EXIT_TERMINATED
    return status


def _dispatch(args) -> int:
    if args.command == "info":
        return _info()
    if args.command == "batch":
        return _batch(args)
    if args.command == "render":
        return _render(args)
    if args.command == "demo":
        return _demo(args)
    return _restore(args)


def _fail(message: str) -> int:
    one_line = " ".join(line.strip() for line in message.strip().splitlines())
    print(f"dip: error: {one_line}", file=sys.stderr)
    return EXIT_ERROR


class _TermState:
    """What SIGTERM did: ``received`` once one came; it raises :class:`Terminated` only while ``armed``."""

    def __init__(self):
        self.received = False
        self.armed = True

    def handler(self, signum, frame):
        first = not self.received
        self.received = True
        if first and self.armed:
            raise Terminated()


#: the state of the handler installed by :func:`_sigterm_as_interrupt` (one per process: signals are)
_term = _TermState()


@contextmanager
def _sigterm_as_interrupt(enabled: bool = True):
    """Within the block, the first SIGTERM raises :class:`Terminated` in the main thread while the fit runs;
    later ones, and any once the fit is over (:func:`_fit_over`), are noted but cannot abort writing the image."""
    global _term
    _term = _TermState()
    previous = None
    if enabled:
        try:
            previous = signal.signal(signal.SIGTERM, _term.handler)
        except ValueError:  # not the main thread (dip.cli.main called from a worker thread)
            previous = None
    try:
        yield _term
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _fit_over() -> None:
    _term.armed = False


# The library speaks Python (keyword arguments); the command line names its own flags. noise_sigma is not
# here: its unit differs (API [0, 1], CLI 0–255) and the CLI checks --sigma itself; only its value-less form
# ("give noise_sigma=") becomes --sigma.
_FLAGS = {
    "device": "--device", "mask": "--mask", "masks": "--mask", "factor": "--factor", "iterations": "--iterations",
    "max_iterations": "--max-iterations", "checkpoint_every": "--checkpoint-every", "checkpoint": "--checkpoint",
    "resume": "--resume", "max_pixels": "--max-pixels", "reg_noise_std": "--reg-noise-std", "network": "--network",
    "reference": "--reference", "seed": "--seed", "lr": "--lr", "ensemble": "--ensemble",
    "objective": "--objective", "precision": "--precision", "threads": "--threads", "workers": "--workers",
    "retries": "--retries", "ray": "--ray", "ray_timeout": "--ray-timeout", "reference_dir": "--reference-dir",
}
_KEYWORD = "|".join(sorted(_FLAGS, key=len, reverse=True))
_SNAKE = "|".join(k for k in _FLAGS if "_" in k)


def cli_message(message: str) -> str:
    """A library message with its Python keywords (``mask=``, ``device='cpu'`` …) replaced by the CLI's flags."""
    message = re.sub(rf"\b({_KEYWORD})='([^']*)'", lambda m: f"{_FLAGS[m[1]]} {m[2]}", message)  # device='cpu'
    message = re.sub(rf"\b({_KEYWORD})=(?=[\w.+-])", lambda m: f"{_FLAGS[m[1]]} ", message)  # factor=3
    message = re.sub(rf"\b({_KEYWORD})=", lambda m: _FLAGS[m[1]], message)  # "needs mask="
    message = re.sub(r"\bnoise_sigma=(?![\w.'+-])", "--sigma", message)  # "give noise_sigma=", with no value
    # a keyword as the subject of a sentence ("iterations must be …", "objective must be one of …") or named in
    # parentheses ("learning rate (lr) must …")
    message = re.sub(rf"(?:^|(?<=[:;] ))({_KEYWORD})(?= (?:must|is|has|needs|cannot)\b)", lambda m: _FLAGS[m[1]],
                     message)
    message = re.sub(rf"\(({_KEYWORD})\)", lambda m: f"({_FLAGS[m[1]]})", message)
    return re.sub(rf"\b({_SNAKE})\b", lambda m: _FLAGS[m[1]], message)  # bare max_pixels, reg_noise_std …


# ----------------------------------------------------------------------------------------------------------------
# A single fit: denoise, super-resolve, inpaint


@dataclass
class _Output:
    """Where the restored image goes: a file, or standard output in ``suffix``'s format."""

    path: Optional[Path]  # None for standard output
    suffix: str

    @property
    def to_stdout(self) -> bool:
        return self.path is None

    @property
    def name(self) -> str:
        return "standard output" if self.path is None else str(self.path)


def _restore(args) -> int:
    task = Task.parse(args.command)
    _check_arguments(args, task)  # before torch loads: a typo is answered at once
    image, input_format = _read_input(args.input, _max_pixels(args))
    output = _output_target(args, input_format)
    image = _load_input(image, args)
    image, mask = _inpaint_mask(args, task, image)
    _check_output_format(output, image, mask)
    exports = _export_targets(args)
    if args.plot is not None:
        _check_plot_path(args.plot)
    if args.uncertainty is not None:
        from dip.io import check_output_path

        check_output_path(args.uncertainty)  # its format (the folder is checked with the other outputs)
    options = _restore_options(args, task, mask)
    info = sys.stderr if output.to_stdout else sys.stdout

    import dip

    result = dip.restore(image, task, **options)
    _fit_over()
    written = _write_result(result, output)
    _report(result, written, info, blind=args.sigma == "auto")
    for method, path in exports:
        getattr(result, method)(path)
        print(f"wrote {path}", file=info)
    if args.plot is not None and result.history.loss:
        print(f"wrote {result.plot(args.plot)}", file=info)
    status = _exit_status(result, written, args)
    if args.uncertainty is not None and not _write_uncertainty(result, args.uncertainty, info) and status == 0:
        return EXIT_ERROR
    return status


def _write_uncertainty(result, path: str, info) -> bool:
    """Write the uncertainty map; False, with a line on stderr, when the fit ended before it had one."""
    if result.uncertainty is None:  # an automatic stop that ended before its window filled
        window = (result.settings.get("early_stopping") or {}).get("window")
        print(f"dip: error: no uncertainty map to write to {path}: the fit ended after {result.iterations} "
              f"iterations, before the automatic stop's window of {window} outputs filled; allow more "
              "iterations (--max-iterations) or use --ensemble K", file=sys.stderr)
        return False
    print(f"wrote {result.save_uncertainty(path)}", file=info)
    return True


def _check_arguments(args, task: Task) -> None:
    """Everything about the command line that needs no torch: files, folders, numbers, combinations."""
    _check_input_file(args.input, "input image", "input")
    if task is Task.INPAINT:
        _check_mask_options(args)
    if args.reference is not None:
        _check_input_file(args.reference, "reference image", "--reference")
    if args.resume is not None:
        _check_resume_file(args.resume)
    _check_numbers(args, task)
    _check_written_paths(args)


def _check_input_file(path: str, what: str, flag: str) -> None:
    if path == STDIO and flag == "input":
        if sys.stdin is None or sys.stdin.isatty():
            raise DipError("input '-' reads the image from standard input, but nothing is piped in "
                           "(use: cat in.png | dip … - -o out.png)")
        return
    p = Path(path)
    if not p.exists():
        raise DipError(f"{what} not found: {p}")
    if p.is_dir():
        raise DipError(f"{what} {p} is a folder, not a file")
    if not os.access(p, os.R_OK):
        raise DipError(f"{what} {p} cannot be read (permission denied)")


def _check_mask_options(args) -> None:
    if args.mask is None and args.mask_color is None:
        raise DipError("inpaint needs --mask MASK.png (white = known, black = missing), --mask alpha "
                       "(the input's transparent pixels are missing) or --mask-color R,G,B")
    if args.mask is not None and args.mask_color is not None:
        raise DipError("give --mask or --mask-color, not both")
    if args.mask is not None and args.mask != "alpha":
        _check_input_file(args.mask, "mask", "--mask")


def _check_resume_file(path: str) -> None:
    import zipfile

    p = Path(path)
    if not p.exists():
        raise DipError(f"--resume: checkpoint not found: {p}")
    if p.is_dir():
        raise DipError(f"--resume: {p} is a folder, not a checkpoint file")
    if p.stat().st_size == 0:
        raise DipError(f"--resume: {p} is empty, not a dip checkpoint (was its writing interrupted?)")
    if not zipfile.is_zipfile(p):  # what torch.save writes
        raise DipError(f"--resume: {p} is not a dip checkpoint (files written by --checkpoint); it was not loaded")


#: (flag, attribute, test, what it must be)
_NUMBER_RULES = [
    ("--iterations", "iterations", lambda v: v == "auto" or v >= 1, "a positive whole number or 'auto'"),
    ("--max-iterations", "max_iterations", lambda v: v >= 1, "a positive whole number"),
    ("--checkpoint-every", "checkpoint_every", lambda v: v >= 1, "a positive number of iterations"),
    ("--lr", "lr", lambda v: math.isfinite(v) and v > 0, "a positive number"),
    ("--reg-noise-std", "reg_noise_std", lambda v: math.isfinite(v) and v >= 0, "a number ≥ 0"),
    ("--sigma", "sigma", lambda v: v == "auto" or (math.isfinite(v) and 0 < v < 255),
     "a noise std in 0–255 units, above 0, or 'auto'"),
    ("--max-pixels", "max_pixels", lambda v: v >= 1, "a positive number of pixels"),
    ("--seed", "seed", lambda v: 0 <= v < 2 ** 64, "a whole number from 0 to 2^64 − 1"),
]


def _check_number_rules(args, flags: Optional[Sequence[str]] = None) -> None:
    """The rules of :data:`_NUMBER_RULES` (those of ``flags``, or all) for the options ``args`` has."""
    for flag, attr, ok, what in _NUMBER_RULES:
        value = getattr(args, attr, None)
        if value is not None and (flags is None or flag in flags) and not ok(value):
            raise DipError(f"{flag} must be {what}, got {value}")


def _check_factor(args, task: Task) -> None:
    """--factor of a super-resolution (a single restore's and a batch's)."""
    if task is not Task.SUPER_RESOLUTION:
        return
    if args.factor is None:
        raise DipError("super-resolve needs --factor (an integer from 2 to 32)")
    if not 2 <= args.factor <= 32:
        raise DipError(f"--factor must be a whole number from 2 to 32, got {args.factor}")


def _check_numbers(args, task: Task) -> None:
    _check_number_rules(args)
    _check_factor(args, task)
    if args.checkpoint is None:
        for flag, given in (("--checkpoint-every", args.checkpoint_every is not None),
                            ("--overwrite-checkpoint", args.overwrite_checkpoint)):
            if given:
                raise DipError(f"{flag} needs --checkpoint PATH")
    if args.max_iterations is not None and args.iterations != "auto":
        raise DipError("--max-iterations caps the automatic stop; with --iterations N the fit runs exactly N steps")
    # --ensemble itself is checked by restore() (dip.pipeline.ensemble_size), before the fit.
    if args.uncertainty is not None and args.iterations != "auto" and args.ensemble < 2:
        raise DipError("--uncertainty needs a map: the spread of --ensemble K (K ≥ 2), or the moving std of "
                       "--iterations auto; a single fit of a fixed count has none")


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet)
        return os.path.realpath(a) == os.path.realpath(b)


def _check_written_paths(args) -> None:
    """No file dip writes may be one it reads (or another it writes); every folder must take a new file."""
    reads = {"the input image": args.input, "--mask": getattr(args, "mask", None), "--reference": args.reference}
    reads = {k: v for k, v in reads.items() if v not in (None, STDIO, "alpha")}
    writes = {"-o": args.output, "--plot": args.plot, "--uncertainty": args.uncertainty, "--checkpoint": args.checkpoint,
              "--export-torchscript": args.export_torchscript, "--export-program": args.export_program,
              "--export-onnx": args.export_onnx}
    writes = {k: v for k, v in writes.items() if v is not None and v != STDIO}
    for flag, path in writes.items():
        for what, source in reads.items():
            if _same_file(path, source):
                raise DipError(f"{flag} {path} is {what}; dip never overwrites what it reads: choose another file name")
    seen = {}
    for flag, path in writes.items():
        key = os.path.realpath(path)
        if key in seen:
            raise DipError(f"{seen[key]} and {flag} both name {path}; give each output its own file")
        seen[key] = flag
        _check_writable(path, flag)
    _check_export_suffixes(args)


def _check_writable(path: str, flag: str) -> None:
    p = Path(path)
    if p.is_dir():
        raise DipError(f"{flag} {p} is a folder; give a file name such as {p / ('restored' + '.png')}")
    folder = p.parent
    if not folder.is_dir():
        raise DipError(f"cannot write {flag} {p}: folder {folder} does not exist")
    # os.access says yes to root on a read-only folder of a read-only file system: try for real.
    try:
        with tempfile.TemporaryFile(dir=folder, prefix=".dip-probe-"):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise DipError(f"cannot write {flag} {p}: folder {folder} is not writable ({reason.lower()}); "
                       "choose another folder") from None


_EXPORT_SUFFIXES = {
    "export_torchscript": ({".pt", ".pth", ".ts"}, ".pt", "TorchScript"),
    "export_program": ({".pt2"}, ".pt2", "a torch.export program"),
    "export_onnx": ({".onnx"}, ".onnx", "ONNX"),
}


def _check_export_suffixes(args) -> None:
    # `dip render` and dip.export pick the reader by the extension: a mismatched one makes an unreadable file.
    for attr, (suffixes, usual, what) in _EXPORT_SUFFIXES.items():
        path = getattr(args, attr, None)
        if path is not None and Path(path).suffix.lower() not in suffixes:
            flag = "--" + attr.replace("_", "-")
            raise DipError(f"{flag} {path}: {what} files end in {usual}; name it {Path(path).with_suffix(usual).name}")


def _read_input(source: str, max_pixels: int):
    """(image for restore(), its PIL format name or None).

    Standard input is decoded here, from a temporary copy, by the same reader as a file: a stream of a
    16-bit PNG or TIFF keeps its depth (Pillow alone would decode it at 8 bits).
    """
    if source != STDIO:
        from PIL import Image

        return source, Image.registered_extensions().get(Path(source).suffix.lower())
    data = sys.stdin.buffer.read()
    if not data:
        raise DipError("no image data on standard input")
    if data.startswith(b"\x93NUMPY"):
        fmt = "NPY"
    else:
        from PIL import Image, UnidentifiedImageError

        from dip.io import pillow_limit

        try:  # the header only, for the format; the size is checked by load_image, under --max-pixels
            with pillow_limit(None), Image.open(io.BytesIO(data)) as img:
                fmt = img.format
        except (UnidentifiedImageError, OSError):
            raise DipError("standard input is not an image file PIL can decode") from None
    import dataclasses

    from dip.io import load_image

    with tempfile.TemporaryDirectory(prefix="dip-stdin-") as folder:
        path = Path(folder) / ("stdin" + _suffix_of_format(fmt))
        path.write_bytes(data)
        try:
            loaded = load_image(path, max_pixels=max_pixels)
        except DipError as exc:
            raise DipError(str(exc).replace(str(path), "from standard input")) from None
    return dataclasses.replace(loaded, source="standard input"), fmt


def _output_target(args, input_format: Optional[str]) -> _Output:
    from dip.io import check_output_path

    if args.output != STDIO:
        if args.format is not None:
            raise DipError("--format sets the format of '-o -' (standard output); a file's format follows "
                           "its extension")
        return _Output(check_output_path(args.output), Path(args.output).suffix.lower())
    if sys.stdout is None or sys.stdout.isatty():
        raise DipError("-o - writes the image to standard output, which is a terminal; redirect it "
                       "(dip … -o - > out.png) or give a file name")
    if args.format is not None:
        suffix = "." + args.format.lower().lstrip(".")
    elif input_format is not None:
        suffix = _suffix_of_format(input_format)
    else:
        suffix = ".png"
    try:
        check_output_path(Path("stdout" + suffix))
    except DipError:
        raise DipError(f"cannot write {suffix} images to standard output; choose another with --format "
                       "png|tif|jpg") from None
    return _Output(None, suffix)


def _suffix_of_format(fmt: str) -> str:
    from PIL import Image

    usual = {"PNG": ".png", "JPEG": ".jpg", "TIFF": ".tif", "NPY": ".npy"}
    if fmt in usual:
        return usual[fmt]
    return next((ext for ext, f in Image.registered_extensions().items() if f == fmt), ".png")


def _inpaint_mask(args, task: Task, image):
    """(image, mask) for restore(): --mask PATH as is; --mask alpha and --mask-color through dip.io."""
    if task is not Task.INPAINT:
        return image, None
    if args.mask is not None and args.mask != "alpha":
        return image, args.mask
    if args.mask == "alpha":
        return image, "alpha"  # restore() reads the transparent pixels as the missing ones
    from dip.io import resolve_mask

    return image, resolve_mask(None, image, mask_color=args.mask_color, max_pixels=_max_pixels(args))


def _load_input(image, args):
    """The input decoded once, under --max-pixels; restore() and the checks before it take this LoadedImage."""
    from dip.io import load_image

    return load_image(image, max_pixels=_max_pixels(args))


def _max_pixels(args) -> int:
    from dip.io import MAX_PIXELS

    return MAX_PIXELS if args.max_pixels is None else args.max_pixels


def _check_output_format(output: _Output, image, mask) -> None:
    """Refuse, before the fit, an output format that cannot hold the result (alpha or 16 bits into JPEG …)."""
    import dataclasses

    from dip.io import check_output_format

    meta = image.meta
    if isinstance(mask, str) and mask == "alpha":  # the transparent holes are filled: no alpha comes back
        meta = dataclasses.replace(meta, alpha=False)
    check_output_format(output.path or Path("stdout" + output.suffix), meta)


def _restore_options(args, task: Task, mask) -> dict:
    options = dict(
        iterations=args.iterations, max_iterations=args.max_iterations, network=args.network, lr=args.lr,
        reg_noise_std=args.reg_noise_std, reference=args.reference, device=_device(args.device), seed=args.seed,
        progress=not args.quiet,
    )
    if args.max_pixels is not None:
        options["max_pixels"] = args.max_pixels
    if args.checkpoint is not None:
        options.update(checkpoint=args.checkpoint,
                       checkpoint_every=100 if args.checkpoint_every is None else args.checkpoint_every)
    if args.resume is not None:
        options["resume"] = args.resume
    if args.sigma is not None:
        options["noise_sigma"] = _noise_sigma(args.sigma)
    options.update(_method_options(args))
    if task is Task.SUPER_RESOLUTION:
        options["factor"] = args.factor
    if mask is not None:
        options["mask"] = mask
    options.update(description=f"dip {task.cli_name}", overwrite_checkpoint=args.overwrite_checkpoint,
                   threads=_threads(args.threads))
    return options


def _noise_sigma(sigma):
    """--sigma (0–255 units, or 'auto') as restore()'s noise_sigma ([0, 1] units, or 'auto')."""
    return sigma if sigma == "auto" else sigma / 255.0


def _threads(threads: Optional[int]) -> Union[int, str]:
    """--threads, or "auto": the cores free now, fewer while another process competes (dip.threads' policy)."""
    from dip.threads import AUTO

    if threads is not None and threads < 1:
        raise DipError(f"--threads must be at least 1, got {threads}")
    return AUTO if threads is None else threads


def _device(name: Optional[str]) -> Optional[str]:
    """The --device value checked before any work, by the library's one rule (dip.pipeline.resolve_device)."""
    if name is None:
        return None
    from dip.pipeline import resolve_device

    return str(resolve_device(name))


def _write_result(result, output: _Output) -> Path | str:
    """Write the restored image; if that fails, save it elsewhere and raise an error that says where."""
    try:
        if output.to_stdout:
            _write_stdout(result, output.suffix)
            return output.name
        return result.save(output.path)
    except (DipError, OSError) as exc:
        reason = cli_message(str(exc))
        rescued = _rescue(result, output)
        raise DipError(f"could not write {output.name} ({reason}); the restored image was saved to {rescued} "
                       "instead") from None


def _write_stdout(result, suffix: str) -> None:
    with tempfile.TemporaryDirectory(prefix="dip-stdout-") as folder:
        path = Path(folder) / ("restored" + suffix)
        result.save(path)
        data = path.read_bytes()
    sys.stdout.flush()
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()


def _rescue(result, output: _Output) -> Path:
    stem = "stdout" if output.path is None else output.path.stem
    suffixes = list(dict.fromkeys([output.suffix, ".png"]))
    folders = [Path.cwd(), Path(tempfile.gettempdir())]
    for folder in folders:
        for suffix in suffixes:
            target = _free_name(folder, f"{stem}.dip-rescued", suffix)
            try:
                return Path(result.save(target))
            except (DipError, OSError):
                continue
    raise DipError(f"could not write {output.name}, nor save the restored image in {folders[0]} or {folders[1]}")


def _free_name(folder: Path, stem: str, suffix: str) -> Path:
    target, n = folder / f"{stem}{suffix}", 1
    while target.exists():
        target, n = folder / f"{stem}-{n}{suffix}", n + 1
    return target


def _report(result, written, info, *, blind: bool = False) -> None:
    summary = f"wrote {written} ({result.iterations} iterations, {result.stop_reason}"
    if result.stopped_at != result.iterations:
        summary += f", image of iteration {result.stopped_at}"
    summary += f", {result.seconds:.1f} s"
    if blind and result.noise_sigma_estimate is not None:
        summary += f", estimated σ {result.noise_sigma_estimate * 255:.1f}"  # in --sigma's 0–255 units
    if result.psnr is not None:
        summary += f", PSNR {result.psnr:.2f} dB"
    if result.ssim is not None:
        summary += f", SSIM {result.ssim:.3f}"
    print(summary + ")", file=info)
    if result.history.rollbacks:
        print(f"dip: the loss diverged {len(result.history.rollbacks)} time(s); the fit was rolled back "
              "with a lower learning rate", file=sys.stderr)


def _exit_status(result, written, args) -> int:
    from dip.fit.settings import StopReason

    if result.stop_reason is StopReason.INTERRUPTED:
        print(f"dip: interrupted after {result.iterations} iterations; {written} holds the best image so far "
              f"(iteration {result.stopped_at})", file=sys.stderr)
        if args.checkpoint is not None and result.checkpoint_at is not None and Path(args.checkpoint).is_file():
            print(f"dip: continue from iteration {result.checkpoint_at} with --checkpoint {args.checkpoint} "
                  f"--resume {args.checkpoint}", file=sys.stderr)
        elif args.checkpoint is not None:
            earlier = "; the file holds an earlier run's state" if Path(args.checkpoint).is_file() else ""
            print(f"dip: this run wrote no checkpoint to {args.checkpoint}{earlier}", file=sys.stderr)
        return EXIT_INTERRUPTED
    if result.stop_reason is StopReason.DIVERGED:
        print(f"dip: error: the fit diverged after {result.iterations} iterations; {written} holds the last good "
              f"image (iteration {result.stopped_at}); try a lower --lr", file=sys.stderr)
        return EXIT_DIVERGED
    return 0


# ----------------------------------------------------------------------------------------------------------------
# Batch (owned by the batch engineer)


def _batch_parser(sub) -> None:
    p = sub.add_parser("batch", help="restore every image of a folder or glob, locally or on a Ray cluster")
    p.add_argument("inputs", metavar="IN_DIR_OR_GLOB",
                   help="a folder of images, or a quoted glob such as 'scans/*.tif' or 'scans/**/*.tif'")
    p.add_argument("-o", "--output", required=True, metavar="OUT_DIR",
                   help="folder for <name>.png outputs and manifest.jsonl, not the input folder "
                        "(images already done with the same settings are skipped)")
    p.add_argument("--task", required=True, choices=["denoise", "super-resolve", "inpaint"])
    p.add_argument("--factor", type=int, default=None, help="upscaling factor for super-resolve (2–32)")
    p.add_argument("--masks", "--mask-dir", "--mask", dest="masks", default=None, metavar="MASKS",
                   help="for inpaint: a folder of masks named like the images, a pattern such as "
                        "'masks/{stem}_mask.png', or one mask for all")
    p.add_argument("--reference-dir", default=None,
                   help="clean images named like the inputs: PSNR and SSIM go in the manifest")
    p.add_argument("-r", "--recursive", action="store_true",
                   help="also restore the images of sub-folders; outputs mirror the folder tree in OUT_DIR")
    p.add_argument("--force", action="store_true",
                   help="redo images whose output in OUT_DIR was made with other settings (refused otherwise)")
    p.add_argument("--workers", type=int, default=None,
                   help="local worker processes (default: one per GPU, else one per CPU core)")
    p.add_argument("--threads", type=int, default=None, help="torch threads per local worker (default: cores / workers)")
    p.add_argument("--ray", nargs="?", const=True, default=None, metavar="ADDRESS",
                   help="run each image as a Ray task: on the cluster at ADDRESS, or on a local Ray (needs dip[ray])")
    p.add_argument("--ray-timeout", type=float, default=None, metavar="SECONDS",
                   help="how long to wait for the cluster at ADDRESS to answer (default 20)")
    p.add_argument("--retries", type=int, default=1,
                   help="further attempts for an image that failed, a diverged one with a new seed (default 1)")
    p.add_argument("--iterations", type=_iterations, default="auto",
                   help="'auto' (default): each fit stops when its outputs settle; N: exactly N fitting steps")
    p.add_argument("--max-iterations", type=int, default=None,
                   help="cap of the automatic stop (default: the task's original count)")
    p.add_argument("--network", default=None, help="network preset: denoise, sr, inpaint or small (default: the task's)")
    p.add_argument("--lr", type=float, default=0.01, help="Adam learning rate (default 0.01)")
    p.add_argument("--reg-noise-std", type=float, default=None, help="std of the input perturbation (default: the task's)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: each worker's GPU when there are GPUs)")
    p.add_argument("--seed", type=int, default=0, help="run seed; each image's seed derives from it and its name")
    p.add_argument("--max-pixels", type=int, default=None, help="refuse images with more pixels than this")
    _sigma_option(p, "every input's")
    _ensemble_option(p)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def _batch(args) -> int:
    import dip
    from dip.batch import RecordStatus

    task = Task.parse(args.task)
    options = dict(iterations=args.iterations, max_iterations=args.max_iterations, network=args.network, lr=args.lr,
                   reg_noise_std=args.reg_noise_std, device=args.device)
    if args.max_pixels is not None:
        options["max_pixels"] = args.max_pixels
    _check_number_rules(args)  # the fit settings are checked again by restore_many, before any worker
    if args.sigma is not None:
        options["noise_sigma"] = _noise_sigma(args.sigma)
    options.update(_method_options(args))
    _check_factor(args, task)
    if task is Task.SUPER_RESOLUTION:
        options["factor"] = args.factor
    summary = dip.restore_many(args.inputs, args.output, task, workers=args.workers, threads=args.threads,
                               ray=args.ray, ray_timeout=args.ray_timeout, seed=args.seed, masks=args.masks,
                               reference_dir=args.reference_dir, retries=args.retries, recursive=args.recursive,
                               force=args.force, progress=not args.quiet, **options)
    print(f"{summary}; manifest: {summary.manifest}")
    for record in summary.records:
        if record.status is RecordStatus.FAILED:
            print(f"dip: failed: {record.input}: {cli_message(record.error or '')}", file=sys.stderr)
    if summary.interrupted:
        print("dip: interrupted; run the same command again to restore the rest", file=sys.stderr)
        return EXIT_INTERRUPTED
    return EXIT_ERROR if summary.failed else 0


# ----------------------------------------------------------------------------------------------------------------
# Exports, plot, render, demo, info


def _export_targets(args) -> list:
    """(Restoration method, path) for each --export-* option (checked in :func:`_check_written_paths`)."""
    return [(attr, Path(getattr(args, attr))) for attr in _EXPORT_SUFFIXES if getattr(args, attr, None) is not None]


def _render(args) -> int:
    from dip.export import run_exported
    from dip.io import check_output_path, save_image

    output = check_output_path(args.output)
    image = run_exported(args.model)[0].permute(1, 2, 0).float().clamp(0, 1).numpy()
    save_image(image, output)
    print(f"wrote {output} ({image.shape[0]}×{image.shape[1]} from {args.model})")
    return 0


def _demo(args) -> int:
    from dip.demo import check_size, run_demo

    if args.sigma is not None and not (math.isfinite(args.sigma) and 0 < args.sigma < 255):
        raise DipError(f"--sigma must be a noise std in 0–255 units, above 0, got {args.sigma}")
    if args.size is not None:
        check_size(args.size, "--size")
    _check_writable(args.output, "-o")
    return run_demo(output=args.output, size=args.size, iterations=args.iterations,
                    device=_device(args.device), progress=not args.quiet,
                    sigma=25.0 if args.sigma is None else args.sigma, threads=_threads(args.threads))


def _check_plot_path(path: str) -> None:
    from dip.plot import _FORMATS

    p = Path(path)
    if p.suffix.lower() not in _FORMATS:
        raise DipError(f"--plot {p}: cannot tell the plot format; use .png, .pdf, .svg or .jpg")
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
    print(f"compute path: {active_path()} (ensembles too: their convolutions are grouped)")
    if torch.cuda.is_available():
        names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        print(f"CUDA: {torch.version.cuda}, devices: {names}")
    else:
        print("CUDA: no GPU available")
    print(f"CPU threads: {torch.get_num_threads()}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
