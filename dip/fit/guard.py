"""The divergence guard: roll a fit back to its last good state when the loss blows up.

DIP fits occasionally diverge: the loss jumps or turns NaN after an Adam step
(the original work backtracked whenever the fit's PSNR fell by more than 5 dB
and warns that fits diverge on some GPUs). The guard keeps a copy of the whole
fit state on the device — weights, optimizer, moving average, history and
every monitor that rolls back — refreshed with in-place copies. It inspects the
losses only every ``check_every`` iterations (the fit's one host sync), so a
bad step is found at the next check: the guard then restores the copy, lowers
the learning rate through the :class:`~dip.fit.monitors.LearningRate`
schedule, and the fit goes on from there.
"""
from __future__ import annotations

import logging
from enum import Enum
from typing import TYPE_CHECKING, Optional

import torch

from dip.fit.monitors import Monitor
from dip.fit.settings import GuardSettings, StopReason

if TYPE_CHECKING:  # pragma: no cover
    from dip.fit.loop import FitLoop, Step

log = logging.getLogger("dip")


class GuardVerdict(Enum):
    """What the guard made of the steps since its last check."""

    SOUND = "sound"  # no bad loss: the fit goes on
    ROLLED_BACK = "rolled back"  # a bad loss: the fit was restored to a sound copy and goes on from there
    GAVE_UP = "gave up"  # a bad loss after max_rollbacks: the fit ends, restored to a sound copy


class DivergenceGuard(Monitor):
    """Rolls the fit back when a loss is not finite or jumps by more than ``max_jump_db``.

    It keeps two copies of the fit state: ``good``, known to be sound, and
    ``pending``, taken at a check and known to be sound only once the next
    loss (computed with its weights) has been seen to be sound.
    """

    name = "guard"
    rolls_back = False

    def __init__(self, settings: GuardSettings, check_every: int = 10):
        self.settings = settings
        self.check_every = check_every
        self._ratio = 10.0 ** (settings.max_jump_db / 10.0)
        self._loop: Optional[FitLoop] = None
        self._good: Optional[dict] = None
        self._pending: Optional[dict] = None
        self._spare: Optional[dict] = None  # buffers of a discarded copy, reused by the next one
        self._checked = 0  # losses up to this iteration were found sound
        self.rollbacks: list = []  # iterations (1-based) of the first bad loss of each rollback

    def on_start(self, loop: FitLoop) -> None:
        self._loop = loop
        self._good = self._copy()
        self._checked = loop.done

    @property
    def checked(self) -> int:
        """The iteration up to which every loss was found sound: the latest state the guard vouches for."""
        return self._checked

    def inspect(self, step: Step) -> GuardVerdict:
        """Called by the loop before the other monitors see the step; checks every ``check_every`` steps."""
        if step.iteration % self.check_every and step.iteration < step.loop.budget:
            return GuardVerdict.SOUND
        return self.check()

    def on_end(self, loop: FitLoop, reason: StopReason) -> None:
        if reason is StopReason.DIVERGED:  # check() restored the sound copy already
            return
        if loop.mid_update:
            # Ctrl-C or an exception cut an update of the state short (an optimizer step, a monitor's, a
            # rollback's load): only the sound copy is known to be whole.
            self._pending = None
            loop.load_state_dict(self._good, only_rollback=True)
            self._checked = loop.done
            return
        # Stopped between checks (a callback, Ctrl-C, an exception): never hand back a state with a bad step in it.
        bad = self._first_bad()
        if bad is not None:
            self.rollbacks.append(bad)
            self._roll_back(bad)

    def check(self) -> GuardVerdict:
        """Inspect the losses since the last check: roll back, give up, or keep a new copy."""
        bad = self._first_bad()
        if bad is None:
            self._checked = self._loop.done
            if self._pending is not None and self._pending["iteration"] < self._loop.done:
                self._spare, self._good, self._pending = self._good, self._pending, None
            if self._loop.done - self._good["iteration"] >= self.settings.snapshot_every:
                self._pending = self._copy()
            return GuardVerdict.SOUND
        self.rollbacks.append(bad)
        self._roll_back(bad)
        if len(self.rollbacks) > self.settings.max_rollbacks:
            log.warning("the loss diverged at iteration %d again; the fit ends with the state of iteration %d",
                        bad, self._loop.done)
            return GuardVerdict.GAVE_UP
        self._loop.learning_rate.scale_by(self.settings.lr_factor)
        log.warning("the loss diverged at iteration %d: rolled back to iteration %d, learning rate × %g",
                    bad, self._loop.done, self.settings.lr_factor)
        return GuardVerdict.ROLLED_BACK

    def _roll_back(self, bad: int) -> None:
        """Restore the newest copy whose weights produced no bad loss (the one at ``bad - 1`` did)."""
        if self._pending is not None and bad > self._pending["iteration"] + 1:
            self._spare, self._good = self._good, self._pending
        self._pending = None
        self._loop.load_state_dict(self._good, only_rollback=True)
        self._checked = self._loop.done

    def _first_bad(self) -> Optional[int]:
        """The iteration of the first bad loss since the last check, or None (one host sync)."""
        start, done = self._checked, self._loop.done
        if done <= start:
            return None
        losses = self._loop.series["loss"][max(start - 1, 0):done]
        bad = ~torch.isfinite(losses)
        if losses.numel() > 1:
            bad[1:] |= losses[1:] > losses[:-1] * self._ratio
        if start > 0:
            bad = bad[1:]  # the loss at the last check only served as the first comparison
        index = torch.nonzero(bad)
        return None if index.numel() == 0 else start + 1 + int(index[0])

    def _copy(self) -> dict:
        copy = copy_state(self._spare, self._loop.state_dict(only_rollback=True))
        self._spare = None
        return copy

    def state_dict(self) -> dict:
        return {"rollbacks": list(self.rollbacks)}

    def load_state_dict(self, state: dict) -> None:
        self.rollbacks = list(state.get("rollbacks", []))


def copy_state(old, new):
    """A private copy of ``new`` (nested dicts/lists of tensors), reusing ``old``'s buffers where shapes match."""
    if isinstance(new, torch.Tensor):
        if isinstance(old, torch.Tensor) and old.shape == new.shape and old.dtype == new.dtype \
                and old.device == new.device:
            return old.copy_(new)
        return new.detach().clone()
    if isinstance(new, dict):
        old = old if isinstance(old, dict) else {}
        return {k: copy_state(old.get(k), v) for k, v in new.items()}
    if isinstance(new, (list, tuple)):
        old = old if isinstance(old, (list, tuple)) and len(old) == len(new) else [None] * len(new)
        return type(new)(copy_state(o, v) for o, v in zip(old, new))
    return new
