"""Planning a batch in the calling process: which inputs, their outputs, companions, seeds and settings.

Everything here runs before any worker starts, so that a mistake (no inputs,
an output folder that is the input folder, bad settings, outputs made with
other settings) is one clear error instead of a failure per image.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Optional, Union

from PIL import Image

from dip.batch.records import Job, Record, RecordStatus, image_seed
from dip.errors import DipError
from dip.fit.settings import FitSettings, Objective, is_auto
from dip.io import MAX_PIXELS, pillow_limit
from dip.io import remove_stale_temporaries as io_remove_stale_temporaries
from dip.tasks import Task, task_defaults

PathLike = Union[str, os.PathLike]

OUTPUT_SUFFIX = ".png"  # lossless and keeps an alpha channel, whatever the input format


@dataclass(frozen=True)
class Source:
    """One input file and its name relative to the folder searched (``sub/scan1.tif`` with ``recursive``)."""

    path: Path
    name: str

    @property
    def folder(self) -> str:
        """The sub-folder of the name (``""`` at the top): outputs and companions mirror it."""
        parent = Path(self.name).parent.as_posix()
        return "" if parent == "." else parent


@dataclass(frozen=True)
class Inputs:
    """The inputs of a batch and the folders they were searched in."""

    sources: list[Source]
    roots: list[Path]


def is_image_name(path: Path) -> bool:
    """True for a visible file whose extension Pillow can read."""
    return not path.name.startswith(".") and path.suffix.lower() in Image.registered_extensions()


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _walk(folder: Path, recursive: bool, skip: Optional[Path]) -> list[Path]:
    if not recursive:
        return [p for p in folder.iterdir() if p.is_file() and is_image_name(p)]
    found = []
    for here, dirs, files in os.walk(folder):
        here_path = Path(here)
        dirs[:] = [d for d in dirs if not d.startswith(".")
                   and (skip is None or not _inside((here_path / d).resolve(), skip))]
        found.extend(here_path / f for f in files if is_image_name(here_path / f))
    return found


def _glob_root(pattern: str) -> Path:
    parts = Path(pattern).parts
    fixed = []
    for part in parts:
        if glob.has_magic(part):
            break
        fixed.append(part)
    return Path(*fixed) if fixed else Path(".")


def find_inputs(inputs: Union[PathLike, Iterable[PathLike]], recursive: bool = False,
                out_dir: Optional[PathLike] = None) -> Inputs:
    """The image files of a folder (and its sub-folders with ``recursive``), a glob pattern, or a list of paths.

    A glob may use ``**`` for any depth. Files inside ``out_dir`` are never
    inputs (they are outputs of a batch) unless the folder searched, or a file
    of the list, lies inside ``out_dir`` (``find_inputs("data/in", out_dir="data")``);
    ``out_dir`` must not be a folder searched for inputs, nor hold one where
    an output would land: a :class:`DipError` says so.
    """
    skip = Path(out_dir).resolve() if out_dir is not None else None
    if isinstance(inputs, (str, os.PathLike)):
        path = Path(inputs)
        if path.is_dir():
            # an input folder inside the output folder is walked whole: the outputs are not in it (checked below)
            nested = skip is not None and _inside(path.resolve(), skip)
            root, files = path, _walk(path, recursive, None if nested else skip)
        elif glob.has_magic(str(inputs)):
            root = _glob_root(str(inputs))
            files = [Path(p) for p in glob.glob(str(inputs), recursive=True) if Path(p).is_file()]
        elif path.is_file():
            root, files = path.parent, [path]
        else:
            raise DipError(f"no such folder or file, and not a glob pattern: {inputs}")
        roots = [root]
        sources = [Source(f, f.relative_to(root).as_posix() if _inside(f, root) else f.name) for f in files]
    else:
        files = [Path(p) for p in inputs]
        if not files:
            raise DipError("no inputs given")
        roots = sorted({f.parent for f in files})
        sources = [Source(f, f.name) for f in files]
    if skip is not None:
        sources = _without_outputs(sources, roots, skip, out_dir)
    if not sources:
        raise DipError(f"no image files found in {inputs}")
    return Inputs(sorted(sources, key=lambda s: s.name) if isinstance(inputs, (str, os.PathLike)) else sources, roots)


def _without_outputs(sources: list[Source], roots: list[Path], skip: Path, out_dir: PathLike) -> list[Source]:
    """``sources`` less the files inside the output folder ``skip`` (outputs of an earlier run), unless they were
    searched for there: an input folder inside the output folder (``data/in`` into ``data``) or a file named
    there is the user's; refuse an output folder that is an input folder, or outputs that would land in one."""
    nested = []  # the input folders inside the output folder
    for root in roots:
        where = root.resolve()
        if where == skip:
            raise DipError(f"the output folder {out_dir} is where the inputs are: outputs would replace inputs "
                           "or be taken for them on a re-run; choose another folder (-o)")
        if _inside(where, skip):
            nested.append(where)
    for s in sources:
        landing = (skip / s.folder).resolve()
        inside = next((root for root in nested if _inside(landing, root)), None)
        if inside is not None:
            raise DipError(f"the output of {s.name} would be written to {landing}, inside the input folder {inside} "
                           f"(the output folder {out_dir} holds it), where a re-run would take it for an input; "
                           "choose an output folder outside the inputs (-o)")
    return [s for s in sources if not _inside(s.path.resolve(), skip)
            or any(_inside(s.path.resolve(), root) for root in nested)]


def find_companion(source: Optional[PathLike], image: Source, what: str) -> Optional[str]:
    """The mask or reference of ``image`` from ``source``.

    ``source`` is a folder (a file of the same name, or of the same stem with
    any image extension, in the same sub-folder as the image's), a pattern
    with ``{stem}``, ``{name}`` or ``{folder}``, or one file used for every image.
    """
    if source is None:
        return None
    text = str(source)
    if "{stem}" in text or "{name}" in text or "{folder}" in text:
        candidate = Path(text.format(stem=image.path.stem, name=image.path.name, folder=image.folder))
        if not candidate.is_file():
            raise DipError(f"{what} for {image.name} not found: {candidate}")
        return str(candidate)
    folder = Path(source)
    if folder.is_dir():
        here = folder / image.folder
        same = here / image.path.name
        if same.is_file():
            return str(same)
        matches = sorted(p for p in here.glob(glob.escape(image.path.stem) + ".*") if is_image_name(p))
        if not matches:
            raise DipError(f"{what} for {image.name} not found in {here}")
        return str(matches[0])
    if folder.is_file():
        return str(folder)
    raise DipError(f"{what} source {source} is neither a folder, a file, nor a pattern with {{stem}}")


def output_path(out_dir: Path, image: Source) -> Path:
    """Where the output of ``image`` goes: ``OUT_DIR/<sub-folder>/<stem>.png``."""
    return out_dir / image.folder / (image.path.stem + OUTPUT_SUFFIX)


def plan_jobs(sources: Sequence[Source], out_dir: Path, run_seed: int, masks: Optional[PathLike] = None,
              references: Optional[PathLike] = None, settings: Optional[str] = None) -> list[Job]:
    """One :class:`Job` per input; a missing mask becomes the job's ``problem`` (it fails without a fit)."""
    by_output: dict[Path, list[Path]] = {}
    for s in sources:
        by_output.setdefault(output_path(out_dir, s), []).append(s.path)
    clashes = [paths for paths in by_output.values() if len(paths) > 1]
    if clashes:
        names = ", ".join(" and ".join(str(p) for p in paths) for paths in clashes[:3])
        raise DipError(f"inputs would write the same output file: {names}; rename them or run them separately")
    inputs = {s.path.resolve() for s in sources}
    overwritten = [p for p in by_output if p.resolve() in inputs]
    if overwritten:
        raise DipError(f"the output {overwritten[0]} would replace an input; choose another folder (-o)")
    jobs = []
    for s in sources:
        mask = reference = problem = None
        try:
            mask = find_companion(masks, s, "mask")
        except DipError as exc:
            problem = str(exc)
        try:
            reference = find_companion(references, s, "reference")
        except DipError:
            pass  # a reference only adds a PSNR to the manifest; the image is restored without one
        jobs.append(Job(name=s.name, input=str(s.path), output=str(output_path(out_dir, s)),
                        seed=image_seed(run_seed, s.name), mask=mask, reference=reference, problem=problem,
                        settings=settings))
    _refuse_outputs_over_companions(jobs)
    return jobs


def _refuse_outputs_over_companions(jobs: Sequence[Job]) -> None:
    """A mask or reference where an output goes would be replaced by it, or taken for it as done: refuse."""
    companions = {Path(p).resolve(): what for job in jobs
                  for what, p in (("mask", job.mask), ("reference", job.reference)) if p is not None}
    for job in jobs:
        what = companions.get(Path(job.output).resolve())
        if what is not None:
            raise DipError(f"the output {job.output} would replace a {what} (an input of the batch); "
                           "choose another output folder (-o)")


# --- settings --------------------------------------------------------------------------------------------------

_FIT_FIELDS = frozenset(f.name for f in fields(FitSettings))


def fit_settings(options: dict, run_seed: int) -> FitSettings:
    """The :class:`FitSettings` of a batch's options, validated here, before any worker starts.

    ``noise_sigma="auto"`` is left out (None): each image's own estimate is made by its fit.
    """
    values = {k: v for k, v in options.items() if k in _FIT_FIELDS}
    if is_auto(values.get("noise_sigma")):
        values["noise_sigma"] = None
    return FitSettings(**values, seed=run_seed)


def _network_key(network: Any) -> Any:
    if network is None or isinstance(network, str):
        return network
    to_dict = getattr(network, "to_dict", None)
    if callable(to_dict):
        return to_dict()
    return f"{type(network).__module__}.{type(network).__qualname__}"  # a user's module: its class


def settings_fingerprint(task: Task, factor: Optional[int], network: Any, settings: FitSettings, *,
                         ensemble: int = 1, blind_sigma: bool = False) -> str:
    """A short hash of what decides an output: task, factor, network and the fit settings (with task defaults),
    the ensemble size and whether the noise level is estimated (``noise_sigma="auto"``)."""
    defaults = task_defaults(task, factor)
    description = dict(task=task.value, factor=factor,
                       network=_network_key(network if network is not None else defaults.network),
                       fit=settings.for_task(defaults).to_dict())
    if settings.objective is Objective.MSE:  # as before objectives existed
        del description["fit"]["objective"]
    # Only when they differ from a single fit without an estimated noise level, so that outputs made before
    # these options existed keep their fingerprint.
    if ensemble != 1:
        description["ensemble"] = ensemble
    if blind_sigma:
        description["noise_sigma"] = "auto"
    text = json.dumps(description, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# --- existing outputs ------------------------------------------------------------------------------------------

def expected_size(job: Job, factor: Optional[int], max_pixels: int = MAX_PIXELS) -> Optional[tuple[int, int]]:
    """(width, height) the output of ``job`` must have, read from the input's header; None if unreadable, or
    larger than ``max_pixels`` (its fit refuses it, in dip's words)."""
    try:
        with pillow_limit(None), Image.open(job.input) as img:  # the header only, checked against dip's limit
            w, h = img.size
    except (OSError, SyntaxError, ValueError):
        return None
    if w * h > max_pixels:
        return None
    scale = factor or 1
    return w * scale, h * scale


def output_is_valid(path: PathLike, size: Optional[tuple[int, int]]) -> bool:
    """True when ``path`` is an image that decodes completely and has the given (width, height)."""
    if size is None or not os.path.isfile(path):
        return False
    try:  # Pillow's bomb check set to the expected size: it fires only for a file that is not the output
        with pillow_limit(size[0] * size[1]), Image.open(path) as img:
            if img.size != tuple(size):
                return False
            img.load()  # a truncated file fails here
        return True
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return False


@dataclass
class Triage:
    """The jobs of a batch sorted by what they need: ``records`` are final already, ``todo`` need a fit."""

    records: list[Record]
    todo: list[Job]
    other_settings: list[Job]  # valid outputs made with other settings (redone only with ``force``)


def triage(jobs: Sequence[Job], previous: dict[str, Record], factor: Optional[int], force: bool,
           max_pixels: int = MAX_PIXELS) -> Triage:
    """Decide, for each job, whether it fails at once (a planning problem), is skipped as done, or is fitted.

    An output is done when it decodes, has the right size, and its manifest
    record (if any) was made with the same settings and did not fail. An output whose record
    names other settings is listed in ``other_settings``, and redone only with
    ``force``; an output with no record (a manifest from an older dip, or none)
    is taken as done. ``max_pixels``: the fits' limit (an input above it is never done).
    """
    result = Triage([], [], [])
    for job in jobs:
        before = previous.get(job.input)
        if job.problem is not None:
            result.records.append(Record.for_job(job, RecordStatus.FAILED, error=job.problem))
        elif not output_is_valid(job.output, expected_size(job, factor, max_pixels)) or (before is not None and before.failed):
            # A failed fit writes nothing: an output beside its record is an older one (e.g. of other settings).
            result.todo.append(job)
        elif before is not None and before.settings is not None and before.settings != job.settings:
            result.other_settings.append(job)
            result.todo.append(job)
        else:
            carried = {} if before is None else dict(
                iterations=before.iterations, stop_reason=before.stop_reason, seconds=before.seconds,
                psnr=before.psnr, ssim=before.ssim, seed=before.seed if before.seed is not None else job.seed,
                attempts=before.attempts, settings=before.settings or job.settings)
            result.records.append(replace(Record.for_job(job, RecordStatus.SKIPPED), **carried))
    if result.other_settings and not force:
        first = result.other_settings[0].output
        raise DipError(f"{len(result.other_settings)} output(s) in this folder were made with other settings "
                       f"(e.g. {first}); use another output folder, or --force (force=True) to redo them")
    return result


def remove_stale_temporaries(jobs: Iterable[Job]) -> None:
    """Remove temporary files left by a killed writer (see :func:`dip.io.remove_stale_temporaries`): not those
    of a writer still running, such as another batch writing into the same folder."""
    for job in jobs:
        if Path(job.output).parent.is_dir():
            io_remove_stale_temporaries(job.output)
