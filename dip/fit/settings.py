"""The vocabulary of a fit: why it stopped, which image it returns, its precision, and its settings.

:class:`FitSettings` is the one frozen, validated description of everything a
fit takes; its :meth:`FitSettings.to_dict` is what a checkpoint and
``Restoration.settings`` store, and what a batch manifest fingerprints.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, field, replace
from enum import Enum
from typing import Optional, Union

from dip.errors import DipError
from dip.guard import GuardSettings
from dip.stopping import EarlyStopping


class StopReason(str, Enum):
    """Why a fit ended. Compare by identity (``r.stop_reason is StopReason.DIVERGED``)."""

    COMPLETED = "completed"  # ran every iteration asked for
    AUTO_STOP = "auto stop"  # the moving variance of the outputs stopped improving
    NOISE_LEVEL = "noise level reached"  # the misfit fell to noise_sigma² (discrepancy principle)
    CALLBACK = "callback"  # a callback returned True
    INTERRUPTED = "interrupted"  # Ctrl-C / SIGTERM
    DIVERGED = "diverged"  # the loss blew up and the guard gave up (or no guard)

    def __str__(self) -> str:
        return self.value


class Selection(str, Enum):
    """Which image an automatic stop returns (``EarlyStopping.select``)."""

    BEST_EMA = "best_ema"  # moving average of outputs at the variance minimum
    BEST_OUTPUT = "best_output"  # raw network output at the variance minimum
    BLEND = "blend"  # mean of those two
    EMA = "ema"  # moving average when the fit stops

    def __str__(self) -> str:
        return self.value


class Precision(str, Enum):
    """Arithmetic of the network's forward and backward passes (weights, loss, EMA stay float32)."""

    AUTO = "auto"  # bfloat16 where the hardware runs it fast, else float32
    FLOAT32 = "float32"
    BFLOAT16 = "bfloat16"

    @classmethod
    def parse(cls, value: Union[str, Precision]) -> Precision:
        try:
            return cls(str(value).lower().strip()) if not isinstance(value, Precision) else value
        except ValueError:
            raise DipError(f"precision must be 'auto', 'float32' or 'bfloat16', got {value!r}") from None

    def __str__(self) -> str:
        return self.value


AUTO = "auto"


def _positive_int(name: str, value, *, allow_none: bool = False) -> Optional[int]:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < 1:
        raise DipError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _real(name: str, value, *, low: float, high: float = math.inf, low_open: bool = False,
          high_open: bool = True, allow_none: bool = False) -> Optional[float]:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise DipError(f"{name} must be a finite number, got {value!r}")
    v = float(value)
    if (v < low or (low_open and v == low)) or (v > high or (high_open and v == high and high != math.inf)):
        lo, hi = ("(" if low_open else "["), (")" if high_open else "]")
        raise DipError(f"{name} must be in {lo}{low:g}, {high:g}{hi}, got {value!r}")
    return v


@dataclass(frozen=True)
class FitSettings:
    """Everything a fit takes, validated on construction.

    ``iterations``: ``"auto"`` (stop without ground truth, see
    :mod:`dip.stopping`, after at most ``max_iterations``) or a number of
    Adam steps. ``None`` values of ``max_iterations`` and ``reg_noise_std``
    mean "the task's default" and are filled by :meth:`for_task`.
    ``noise_sigma`` is the noise std in [0, 1] units (stop at the discrepancy
    level). ``guard=None`` turns the divergence guard off.
    """

    iterations: Union[int, str] = AUTO
    max_iterations: Optional[int] = None
    lr: float = 0.01
    reg_noise_std: Optional[float] = None
    ema_weight: float = 0.99
    input_scale: float = 0.1
    noise_sigma: Optional[float] = None
    early_stopping: EarlyStopping = field(default_factory=EarlyStopping)
    guard: Optional[GuardSettings] = field(default_factory=GuardSettings)
    checkpoint_every: Optional[int] = None
    precision: Precision = Precision.FLOAT32
    seed: int = 0

    def __post_init__(self):
        it = self.iterations
        if it is None or (isinstance(it, str) and it.lower().strip() == AUTO):
            object.__setattr__(self, "iterations", AUTO)
        else:
            object.__setattr__(self, "iterations", _positive_int("iterations", it))
        object.__setattr__(self, "max_iterations", _positive_int("max_iterations", self.max_iterations,
                                                                 allow_none=True))
        object.__setattr__(self, "lr", _real("learning rate (lr)", self.lr, low=0, low_open=True))
        object.__setattr__(self, "reg_noise_std", _real("reg_noise_std", self.reg_noise_std, low=0, allow_none=True))
        object.__setattr__(self, "ema_weight", _real("ema_weight", self.ema_weight, low=0, high=1))
        object.__setattr__(self, "input_scale", _real("input_scale", self.input_scale, low=0, low_open=True))
        object.__setattr__(self, "noise_sigma", _real("noise_sigma", self.noise_sigma, low=0, low_open=True,
                                                      allow_none=True))
        object.__setattr__(self, "checkpoint_every", _positive_int("checkpoint_every", self.checkpoint_every,
                                                                   allow_none=True))
        object.__setattr__(self, "precision", Precision.parse(self.precision))
        if self.early_stopping is not None and not isinstance(self.early_stopping, EarlyStopping):
            raise DipError(f"early_stopping must be a dip.stopping.EarlyStopping, got {self.early_stopping!r}")
        if self.guard is not None and not isinstance(self.guard, GuardSettings):
            raise DipError(f"guard must be a dip.guard.GuardSettings, True or False, got {self.guard!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, numbers.Integral) or not (
                -(2 ** 63) <= int(self.seed) < 2 ** 64):
            raise DipError(f"seed must be an integer that fits in 64 bits, got {self.seed!r}")
        object.__setattr__(self, "seed", int(self.seed))

    @property
    def auto(self) -> bool:
        """True when the fit stops by itself (``iterations="auto"``)."""
        return self.iterations == AUTO

    @property
    def budget(self) -> int:
        """The most iterations the fit may run (needs the task's defaults filled in: :meth:`for_task`)."""
        n = self.max_iterations if self.auto else self.iterations
        if n is None:
            raise DipError("the settings have no iteration count yet; call for_task() first")
        return int(n)

    def for_task(self, defaults) -> FitSettings:
        """These settings with the task's defaults (a :class:`dip.tasks.TaskDefaults`) filled in."""
        return replace(
            self,
            max_iterations=self.max_iterations if self.max_iterations is not None else defaults.iterations,
            reg_noise_std=self.reg_noise_std if self.reg_noise_std is not None else defaults.reg_noise_std,
        )

    def to_dict(self) -> dict:
        """Plain values only (numbers, strings, None, dicts): checkpoints, results and manifests store this."""
        d = asdict(self)
        d["precision"] = self.precision.value
        d["early_stopping"] = self.early_stopping.to_dict() if self.early_stopping is not None else None
        d["guard"] = self.guard.to_dict() if self.guard is not None else None
        return d
