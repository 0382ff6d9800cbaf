"""The memory a fit needs (estimated, so an image too large is refused up front), and how it is held.

A fit allocates and frees the same large tensors every iteration. glibc's
malloc serves blocks above its mmap threshold (at most 32 MiB) with fresh
mappings and returns them to the system when freed, so every iteration pays
a page fault per 4 KiB of them: on a 2-core CPU a third of a 512² iteration of
the ``denoise`` net was the kernel zeroing pages. ``kept_heap()`` keeps freed
memory in the heap for the duration of a fit and gives it back afterwards.
"""
from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import torch

from dip.errors import ImageTooLargeError
from dip.nn.hourglass import Hourglass, HourglassConfig

# Activation elements counted below, times this factor, approximate the tensors
# kept for backward plus the gradients backward holds briefly. Set so the
# estimate for the denoise preset (about 0.65 GiB at 256², 2.4 GiB at 512²)
# tracks its measured growth in peak memory (0.62 GiB and 2.2 GiB on CPU).
_SAVED_TENSORS_PER_BLOCK = 2.6
_BYTES = 4


def estimate_fit_bytes(cfg: HourglassConfig, height: int, width: int, passes: int = 1) -> int:
    """Approximate peak bytes of one fitting iteration of ``cfg`` on a ``height``×``width`` input.

    ``passes``: forward passes kept for one backward (2 for ``Objective.SURE``'s probe).
    """
    elements = cfg.in_channels * height * width
    h, w = height, width
    for i in range(cfg.scales):
        down, up, skip = cfg.channels_down[i], cfg.channels_up[i], cfg.channels_skip[i]
        deep_out = cfg.channels_up[i + 1] if i + 1 < cfg.scales else down
        top = h * w
        h, w = (h + 1) // 2, (w + 1) // 2
        low = h * w
        # skip block, two down blocks, merge BN + up block + 1×1 block at this scale
        elements += skip * top + 2 * down * low + (skip + deep_out) * top * 2 + up * top * 2
    elements += cfg.channels_up[0] * height * width + cfg.out_channels * height * width
    params = _parameter_count(cfg)
    # weights, gradients and Adam's two moments
    return int(passes * elements * _SAVED_TENSORS_PER_BLOCK * _BYTES + params * 4 * _BYTES)


def _parameter_count(cfg: HourglassConfig) -> int:
    with torch.device("meta"):  # shapes only: nothing is allocated
        return sum(p.numel() for p in Hourglass(cfg).parameters())


def available_bytes(device: torch.device) -> Optional[int]:
    """Free memory on ``device`` (bytes), or None when it cannot be told.

    On the CPU: the system's available memory, capped by what this process's
    cgroup (a container's memory limit) has left.
    """
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type != "cpu":
        return None
    system = _system_available_bytes()
    cgroup = cgroup_memory_left()
    if system is None or cgroup is None:
        return cgroup if system is None else system
    return min(system, cgroup)


def _system_available_bytes() -> Optional[int]:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def cgroup_memory_left(root: Path = Path("/sys/fs/cgroup")) -> Optional[int]:
    """Bytes this process's cgroup may still use (v2 ``memory.max`` − ``memory.current``, or v1's limit − usage),
    or None when it has no limit or none can be read."""
    for limit_file, usage_file in (("memory.max", "memory.current"),
                                   ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes")):
        try:
            limit = (root / limit_file).read_text().strip()
            usage = int((root / usage_file).read_text())
        except (OSError, ValueError):
            continue
        if limit == "max" or int(limit) >= 2**60:  # v1 writes "no limit" as a page-rounded 2⁶³ − 1
            return None
        return max(0, int(limit) - usage)
    return None


def format_bytes(n: float) -> str:
    """``n`` bytes in the largest unit that keeps a leading digit (``512 bytes``, ``3.2 MiB``, ``1.5 GiB``)."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} bytes"


def check_fits_in_memory(cfg: HourglassConfig, height: int, width: int, device: torch.device,
                         limit: Optional[int] = None, *, image_size: Optional[tuple] = None,
                         passes: int = 1) -> int:
    """Raise :class:`ImageTooLargeError` when the fit's estimate exceeds the free (or given) memory.

    ``height``×``width`` is the network's (padded) input; ``image_size`` the
    user's image, which the message names.
    """
    need = estimate_fit_bytes(cfg, height, width, passes)
    have = limit if limit is not None else available_bytes(device)
    if have is not None and need > have:
        h, w = image_size or (height, width)
        raise ImageTooLargeError(
            f"restoring a {h}×{w} image needs about {format_bytes(need)} on {device}, "
            f"but only {format_bytes(have)} is available. Crop the image or restore it in tiles, "
            "use a smaller network (network='small' or fewer channels), or run on a device with more memory"
        )
    return need


# mallopt parameters and glibc's defaults (malloc.h), restored when the last fit ends.
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_DEFAULT_TRIM_THRESHOLD, _DEFAULT_MMAP_MAX = 128 * 1024, 65536
_INT_MAX = 2**31 - 1
# A user's own malloc tuning (environment variables read when the process started) is theirs to keep.
_USER_MALLOC_SETTINGS = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_")
#: A kept heap fragments: a fit of the denoise net then peaked at 1.9× (256²) and 2.3× (512²) the memory it
#: needs under glibc's default policy. The heap is kept only when this many times the fit's estimate is free.
HEAP_ROOM = 3

_heap_lock = threading.Lock()
_heap_fits = 0  # fits running inside kept_heap() now, in this process
_processes_sharing = 1  # processes (this one included) that run fits side by side on this machine's memory


def share_memory_with(processes: int) -> None:
    """Say that ``processes`` processes, this one included, run fits side by side (a batch pool's workers): a
    fit then keeps its heap only with room for every one of them to do the same."""
    global _processes_sharing
    _processes_sharing = max(1, int(processes))


def _tunable_malloc() -> Optional[ctypes.CDLL]:
    """The C library, when it is glibc and the user has not tuned its malloc; else None."""
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc"):
            return None
    except (ValueError, OSError, AttributeError):  # not glibc (musl, macOS, Windows)
        return None
    if any(name in os.environ for name in _USER_MALLOC_SETTINGS) or "glibc.malloc" in os.environ.get(
            "GLIBC_TUNABLES", ""):
        return None
    libc = ctypes.CDLL(None)
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


@contextmanager
def kept_heap(need: Optional[int]) -> Iterator[bool]:
    """Within the block, memory freed by the process stays in its heap for reuse instead of going back to the system.

    On glibc: no block is served by its own mapping, and the top of the heap is
    not trimmed, so the tensors an iteration frees are the next one's, without
    page faults. Leaving the last such block (blocks nest, and may overlap
    across threads) gives the free memory back (``malloc_trim``) and restores
    glibc's default thresholds. ``need``: the bytes the fit needs on the CPU
    (None: unknown, or not a CPU fit); the heap is kept only when
    :data:`HEAP_ROOM` times that is free, for each process that
    :func:`share_memory_with` counts. Yields whether the policy applies: not
    on other C libraries, nor when the user tuned malloc (``MALLOC_*_``
    variables, ``GLIBC_TUNABLES``), nor without the room.
    """
    global _heap_fits
    libc = _tunable_malloc()
    free = available_bytes(torch.device("cpu")) if libc is not None and need is not None else None
    if free is None or free < HEAP_ROOM * need * _processes_sharing:
        yield False
        return
    with _heap_lock:
        if _heap_fits == 0:
            libc.mallopt(_M_MMAP_MAX, 0)
            libc.mallopt(_M_TRIM_THRESHOLD, _INT_MAX)
        _heap_fits += 1
    try:
        yield True
    finally:
        with _heap_lock:
            _heap_fits -= 1
            if _heap_fits == 0:
                libc.mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX)
                libc.mallopt(_M_TRIM_THRESHOLD, _DEFAULT_TRIM_THRESHOLD)
                libc.malloc_trim(0)
