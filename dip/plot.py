"""Curves of a fit: loss, the stopping signal and (with a reference) PSNR against iterations.

matplotlib is an optional extra (``pip install 'dip[plot]'``); it is imported
only here, with the non-interactive Agg canvas, so no display is needed.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Optional, Union

from dip.errors import DipError
from dip.fit import History
from dip.io import atomic_write

_FORMATS = {".png": "png", ".pdf": "pdf", ".svg": "svg", ".jpg": "jpg", ".jpeg": "jpg"}


def plot_history(history: History, path: Union[str, os.PathLike], *, stopped_at: int = 0,
                 iterations: Optional[int] = None, title: str = "dip", psnr: Optional[float] = None) -> Path:
    """Write the curves of ``history`` to ``path`` (.png, .pdf, .svg or .jpg), atomically.

    Top panel: the loss (log scale) and, when recorded, the moving variance
    of the outputs; bottom panel (with a reference): PSNR of the raw output
    and of the moving average, with the peak marked. A vertical line marks
    ``stopped_at``, the iteration of the returned image, and a square its
    ``psnr`` (default: the average's at ``stopped_at``; the automatic stop's
    image is the average read later, centred there); crosses on the loss
    mark the divergence guard's rollbacks.
    """
    path = Path(path)
    fmt = _FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise DipError(f"cannot tell the plot format of {path}: use .png, .pdf, .svg or .jpg")
    if not history.loss:
        raise DipError("nothing to plot: the fit recorded no iteration")
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise DipError("plotting needs matplotlib: pip install 'dip[plot]' (or matplotlib)") from None

    steps = list(range(1, len(history.loss) + 1))
    has_psnr = bool(history.psnr_ema)
    fig = Figure(figsize=(7.0, 6.0 if has_psnr else 3.6), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2 if has_psnr else 1, 1, sharex=True, squeeze=False)[:, 0]
    ax = axes[0]
    ax.plot(steps, history.loss, color="tab:blue", lw=0.8, label="loss ‖A(x) − y‖²")
    ax.set_yscale("log")
    ax.set_ylabel("loss")
    for it in history.rollbacks:
        if 1 <= it <= len(steps):
            ax.plot([it], [history.loss[it - 1]], "x", color="tab:red", ms=7)
    if history.rollbacks:
        ax.plot([], [], "x", color="tab:red", label=f"rollbacks ({len(history.rollbacks)})")
    variance = [(s, v) for s, v in zip(steps, history.variance) if math.isfinite(v) and v > 0]
    if variance:
        twin = ax.twinx()
        twin.plot(*zip(*variance), color="tab:orange", lw=0.8, label="output variance")
        twin.set_yscale("log")
        twin.set_ylabel("moving variance", color="tab:orange")
        ax.plot([], [], color="tab:orange", lw=0.8, label="output variance (right)")
    ax.set_title(title)
    if has_psnr:
        ax2 = axes[1]
        ax2.plot(steps, history.psnr, color="0.6", lw=0.6, label="PSNR output")
        ax2.plot(steps, history.psnr_ema, color="tab:green", lw=1.0, label="PSNR average")
        peak = max(range(len(history.psnr_ema)), key=history.psnr_ema.__getitem__)
        ax2.plot([peak + 1], [history.psnr_ema[peak]], "o", color="tab:green",
                 label=f"peak {history.psnr_ema[peak]:.2f} dB @ {peak + 1}")
        if 1 <= stopped_at <= len(steps):
            ax2.plot([stopped_at], [history.psnr_ema[stopped_at - 1] if psnr is None else psnr], "s", color="black",
                     ms=5)
        ax2.set_ylabel("PSNR (dB)")
        ax2.legend(loc="lower right", fontsize=8)
    for a in axes:
        if stopped_at:
            a.axvline(stopped_at, color="black", ls="--", lw=0.9)
        if iterations and iterations != stopped_at:
            a.axvline(iterations, color="0.4", ls=":", lw=0.9)
    ax.plot([], [], color="black", ls="--", lw=0.9, label=f"returned image @ {stopped_at}")
    axes[-1].set_xlabel("iteration")
    ax.legend(loc="upper right", fontsize=8)
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format=fmt))
