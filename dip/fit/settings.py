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


class StopReason(str, Enum):
    """Why a fit ended. Compare by identity (``r.stop_reason is StopReason.DIVERGED``)."""

    COMPLETED = "completed"  # ran every iteration asked for
    AUTO_STOP = "auto stop"  # the moving variance of the outputs stopped improving
    NOISE_LEVEL = "noise level reached"  # the misfit fell to noise_sigma² (discrepancy principle)
    CALLBACK = "callback"  # a callback returned True
    INTERRUPTED = "interrupted"  # Ctrl-C / SIGTERM
    DIVERGED = "diverged"  # the loss blew up and the guard gave up (or no guard)
    #: An exception escaped the fit (a callback's, out of memory): the monitors' ``on_end`` see it (the state
    #: is rolled back and checkpointed as on Ctrl-C), then the exception propagates; no result carries it.
    FAILED = "failed"

    @property
    def final(self) -> bool:
        """True when the fit judged itself done: a resume of its checkpoint hands back the result, taking no steps.

        (A completed fit resumes up to a larger ``iterations``; an interrupted, failed or callback-stopped one
        goes on.)
        """
        return self in (StopReason.AUTO_STOP, StopReason.NOISE_LEVEL, StopReason.DIVERGED)

    def __str__(self) -> str:
        return self.value


class Selection(str, Enum):
    """Which image an automatic stop returns (``EarlyStopping.select``)."""

    CENTRED_EMA = "centred_ema"  # moving average of outputs read a delay after the variance minimum (centred on it)
    BEST_EMA = "best_ema"  # moving average of outputs at the variance minimum
    BEST_OUTPUT = "best_output"  # raw network output at the variance minimum
    BLEND = "blend"  # mean of those two
    EMA = "ema"  # moving average when the fit stops
    WEIGHT_EMA = "weight_ema"  # network output with the moving average of the weights at the variance minimum

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


class Objective(str, Enum):
    """What a fit minimises, and what its network sees (``restore(objective=...)``)."""

    #: The original work's: a fixed random input z, the misfit ‖A(f(z)) − y‖²; any task.
    MSE = "mse"
    #: Denoising only: the network sees the noisy image y and minimises Stein's unbiased estimate of its
    #: error to the clean image, ‖f(y) − y‖² + 2σ²·div f(y) (see :mod:`dip.fit.sure`); needs σ.
    SURE = "sure"

    @classmethod
    def parse(cls, value: Union[str, Objective]) -> Objective:
        return _enum(cls, value.strip().lower() if isinstance(value, str) else value, "objective")

    @property
    def forward_passes(self) -> int:
        """Network passes one step keeps for its backward: SURE's divergence probe is a second one."""
        return 2 if self is Objective.SURE else 1

    def __str__(self) -> str:
        return self.value


AUTO = "auto"


def is_auto(value) -> bool:
    """True for the word ``"auto"`` (any case, surrounding spaces allowed): iterations, noise_sigma."""
    return isinstance(value, str) and value.strip().lower() == AUTO


#: Iteration counts above this are refused (a typo, not a fit: 10⁷ steps of the smallest net take days).
MAX_ITERATIONS = 10_000_000


class StopMode(str, Enum):
    """How the automatic stop estimates the variance of recent outputs."""

    EMA = "ema"  # exponentially weighted moving variance: two images of memory
    WINDOW = "window"  # plain variance over the last ``window`` outputs: a ring buffer

    def __str__(self) -> str:
        return self.value


def _enum(kind, value, what: str):
    try:  # any case, surrounding spaces allowed, as Task, Precision and Objective parse
        return kind(value.value if isinstance(value, Enum) else str(value).strip().lower())
    except ValueError:
        choices = ", ".join(m.value for m in kind)
        raise DipError(f"{what} must be one of {choices}, got {value!r}") from None


def _iteration_count(name: str, value, *, allow_none: bool = False) -> Optional[int]:
    n = _positive_int(name, value, allow_none=allow_none)
    if n is not None and n > MAX_ITERATIONS:
        raise DipError(f"{name}={n:,} is more than the {MAX_ITERATIONS:,} a fit may run; "
                       "DIP needs a few thousand iterations (or use iterations='auto')")
    return n


@dataclass(frozen=True)
class EarlyStopping:
    """Settings of the no-reference stopping rule (see :mod:`dip.fit.stopping`).

    ``window``: outputs the variance is taken over (the effective window of the
    exponential average in ``mode="ema"``). ``patience``: iterations without a
    new variance minimum before the fit stops. ``select``: the returned image
    (a :class:`Selection`: ``centred_ema``, ``best_ema``, ``best_output``,
    ``blend``, ``ema`` or ``weight_ema``; only ``weight_ema`` makes the fit keep a moving average of
    the weights, see :class:`~dip.fit.stopping.VarianceStopper`).
    """

    window: int = 100
    patience: int = 500
    mode: StopMode = StopMode.EMA
    select: Selection = Selection.CENTRED_EMA

    def __post_init__(self):
        for name in ("window", "patience"):
            object.__setattr__(self, name, _positive_int(f"early stopping {name}", getattr(self, name)))
        object.__setattr__(self, "mode", _enum(StopMode, self.mode, "early stopping mode"))
        object.__setattr__(self, "select", _enum(Selection, self.select, "early stopping select"))

    def to_dict(self) -> dict:
        return {"window": self.window, "patience": self.patience, "mode": self.mode.value,
                "select": self.select.value}


@dataclass(frozen=True)
class GuardSettings:
    """When the divergence guard rolls a fit back (see :mod:`dip.fit.guard`).

    A loss is bad when it is not finite or exceeds the previous loss by more
    than ``max_jump_db`` decibels (10·log10 of the ratio; 5 dB is the original
    work's backtracking rule). The guard then restores the last good state
    (copied about every ``snapshot_every`` iterations, at the fit's checks) and multiplies the learning rate
    by ``lr_factor``; after ``max_rollbacks`` rollbacks the fit ends
    :attr:`StopReason.DIVERGED` with the last good state.
    """

    max_jump_db: float = 5.0
    snapshot_every: int = 20
    lr_factor: float = 0.5
    max_rollbacks: int = 20

    def __post_init__(self):
        if isinstance(self.max_jump_db, bool) or not isinstance(self.max_jump_db, numbers.Real) \
                or not float(self.max_jump_db) > 0:
            raise DipError(f"max_jump_db must be a positive number, got {self.max_jump_db!r}")
        object.__setattr__(self, "snapshot_every", _positive_int("snapshot_every", self.snapshot_every))
        object.__setattr__(self, "lr_factor", _real("lr_factor", self.lr_factor, low=0, high=1, low_open=True,
                                                    high_open=False))
        if isinstance(self.max_rollbacks, bool) or not isinstance(self.max_rollbacks, numbers.Integral) \
                or self.max_rollbacks < 0:
            raise DipError(f"max_rollbacks must be a non-negative integer, got {self.max_rollbacks!r}")

    @classmethod
    def off(cls) -> GuardSettings:
        """No rollbacks: the first non-finite loss ends the fit (with the last good state)."""
        return cls(max_jump_db=math.inf, max_rollbacks=0)

    def to_dict(self) -> dict:
        return asdict(self)


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
    :mod:`dip.fit.stopping`, after at most ``max_iterations``) or a number of
    Adam steps. ``None`` values of ``max_iterations`` and ``reg_noise_std``
    mean "the task's default" and are filled by :meth:`for_task`.
    ``noise_sigma`` is the noise std in [0, 1] units: with the ``mse``
    objective the fit stops at the discrepancy level; with ``sure`` it is the
    σ of the estimate and there is no discrepancy stop (None: ``restore``
    fills in the estimated σ). ``objective``: an :class:`Objective`; ``sure``
    computes in float32 (``precision="auto"`` resolves to it, ``"bfloat16"``
    is refused: its divergence probe is below bf16's resolution).
    ``guard=None`` (or False) turns the rollbacks off (a non-finite loss still
    ends the fit with the last good state). ``check_every``: how often the
    host reads the device (stopping, guard, progress): the only syncs a fit makes.
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
    check_every: int = 10
    objective: Objective = Objective.MSE

    def __post_init__(self):
        it = self.iterations
        if it is None or is_auto(it):
            object.__setattr__(self, "iterations", AUTO)
        else:
            object.__setattr__(self, "iterations", _iteration_count("iterations", it))
        object.__setattr__(self, "max_iterations", _iteration_count("max_iterations", self.max_iterations,
                                                                    allow_none=True))
        object.__setattr__(self, "lr", _real("learning rate (lr)", self.lr, low=0, low_open=True))
        object.__setattr__(self, "reg_noise_std", _real("reg_noise_std", self.reg_noise_std, low=0, allow_none=True))
        object.__setattr__(self, "ema_weight", _real("ema_weight", self.ema_weight, low=0, high=1))
        object.__setattr__(self, "input_scale", _real("input_scale", self.input_scale, low=0, low_open=True))
        # [0, 1] units: a σ above 1 is a 0–255 value (25, not 25/255), whose discrepancy stop would end the fit
        # at its first check
        object.__setattr__(self, "noise_sigma", _real("noise_sigma (in [0, 1] units, e.g. 25/255)", self.noise_sigma,
                                                      low=0, high=1, low_open=True, high_open=False, allow_none=True))
        object.__setattr__(self, "checkpoint_every", _positive_int("checkpoint_every", self.checkpoint_every,
                                                                   allow_none=True))
        object.__setattr__(self, "precision", Precision.parse(self.precision))
        object.__setattr__(self, "objective", Objective.parse(self.objective))
        self._check_objective()
        object.__setattr__(self, "check_every", _positive_int("check_every", self.check_every))
        if self.early_stopping is None:  # restore()'s None: the default rule
            object.__setattr__(self, "early_stopping", EarlyStopping())
        if self.guard is True or self.guard is False:  # restore()'s guard=True/False
            object.__setattr__(self, "guard", GuardSettings() if self.guard else None)
        if not isinstance(self.early_stopping, EarlyStopping):
            raise DipError(f"early_stopping must be a dip.fit.EarlyStopping, got {self.early_stopping!r}")
        if self.guard is not None and not isinstance(self.guard, GuardSettings):
            raise DipError(f"guard must be a dip.fit.GuardSettings, True or False, got {self.guard!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, numbers.Integral) or not (
                -(2 ** 63) <= int(self.seed) < 2 ** 64):
            raise DipError(f"seed must be an integer that fits in 64 bits, got {self.seed!r}")
        object.__setattr__(self, "seed", int(self.seed))

    def _check_objective(self) -> None:
        if self.objective is not Objective.SURE:
            return
        if self.precision is Precision.BFLOAT16:
            raise DipError("objective='sure' computes in float32 (its divergence probe is finer than bfloat16 "
                           "resolves); use precision='float32' or 'auto'")
        if self.precision is Precision.AUTO:
            object.__setattr__(self, "precision", Precision.FLOAT32)

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

    @property
    def average_lag(self) -> int:
        """How many iterations the moving average of the outputs trails the network: the mean age of its terms.

        Once the average has many terms, the output of j iterations ago weighs
        (1 − w)·w^j, so their mean age is w / (1 − w): 99 iterations at the
        default w = 0.99: the latest :attr:`Selection.CENTRED_EMA` reads the
        average after the variance minimum.
        """
        w = self.ema_weight
        return round(w / (1.0 - w)) if w < 1 else 0

    def average_keep(self, count: int) -> float:
        """The share of its old value the moving average keeps when its ``count``-th value (1-based) arrives.

        Bias-corrected like Adam's moments: after k values the average is
        their mean with weights ∝ w^(k-j) (w = ``ema_weight``), so it keeps
        w·(1 − w^(k−1)) / (1 − w^k) — 0 for the first value, not w: an early
        stop does not return a blend with the first, grey outputs. The average
        of the outputs and the average of the weights both use this.
        """
        w = self.ema_weight
        return w * (1.0 - w ** (count - 1)) / (1.0 - w ** count) if w > 0 else 0.0

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
        d["objective"] = self.objective.value
        d["early_stopping"] = self.early_stopping.to_dict() if self.early_stopping is not None else None
        d["guard"] = self.guard.to_dict() if self.guard is not None else None
        return d
