"""The divergence guard: roll a fit back to its last good state when the loss blows up.

DIP fits occasionally diverge: the loss jumps or turns NaN after an Adam step
(the original work backtracked whenever the PSNR against the observation fell
by more than 5 dB and warns that fits diverge on some GPUs). The guard keeps a
copy of the weights and the optimizer state on the fit's device, refreshed
every ``snapshot_every`` good iterations with in-place copies, and on a bad
loss restores it and lowers the learning rate.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

import torch
from torch import nn

from dip.errors import DipError


@dataclass(frozen=True)
class GuardSettings:
    """When to roll back and what to do then.

    A loss is bad when it is not finite or exceeds the previous accepted loss
    by more than ``max_jump_db`` decibels (10·log10 of the ratio; 5 dB is the
    original work's backtracking rule). After ``max_rollbacks`` rollbacks the
    fit gives up with stop reason ``"diverged"``.
    """

    max_jump_db: float = 5.0
    snapshot_every: int = 25
    lr_factor: float = 0.5
    max_rollbacks: int = 20

    def __post_init__(self):
        if not self.max_jump_db > 0:
            raise DipError(f"max_jump_db must be positive, got {self.max_jump_db}")
        if not isinstance(self.snapshot_every, int) or self.snapshot_every < 1:
            raise DipError(f"snapshot_every must be a positive integer, got {self.snapshot_every!r}")
        if not 0 < self.lr_factor <= 1:
            raise DipError(f"lr_factor must be in (0, 1], got {self.lr_factor}")

    def to_dict(self) -> dict:
        return asdict(self)


class DivergenceGuard:
    """Watches the loss of each iteration before its update is applied."""

    def __init__(self, settings: GuardSettings, net: nn.Module, optimizer: torch.optim.Optimizer):
        self.settings = settings
        self.net = net
        self.optimizer = optimizer
        self._ratio = 10.0 ** (settings.max_jump_db / 10.0)
        self._params = [p for g in optimizer.param_groups for p in g["params"]]
        self.last_loss: Optional[torch.Tensor] = None  # previous accepted loss (device)
        self.snapshot_loss: Optional[torch.Tensor] = None
        self.snapshot_iteration = -1
        self._net_state: Optional[dict] = None
        self._opt_state: Optional[list] = None
        self.rollbacks: list = []  # iterations (1-based) whose loss was rejected

    def is_bad(self, loss: torch.Tensor) -> bool:
        """True when ``loss`` is not finite or jumped; one device sync."""
        bad = ~torch.isfinite(loss)
        if self.last_loss is not None:
            bad = bad | (loss.detach() > self.last_loss * self._ratio)
        return bool(bad)

    def accept(self, loss: torch.Tensor, done: int) -> None:
        """Record a good loss of the weights that produced it; snapshot them every ``snapshot_every``."""
        loss = loss.detach()
        if self.last_loss is None:
            self.last_loss = loss.clone()
        else:
            self.last_loss.copy_(loss)
        if done % self.settings.snapshot_every == 0:
            self._snapshot(loss, done)

    def _snapshot(self, loss: torch.Tensor, done: int) -> None:
        if self._net_state is None:
            self._net_state = {k: v.detach().clone() for k, v in self.net.state_dict().items()}
            self.snapshot_loss = loss.clone()
        else:
            for k, v in self.net.state_dict().items():
                self._net_state[k].copy_(v)
            self.snapshot_loss.copy_(loss)
        opt = []
        old = self._opt_state or [{} for _ in self._params]
        for p, saved in zip(self._params, old):
            state = {k: v for k, v in self.optimizer.state.get(p, {}).items() if isinstance(v, torch.Tensor)}
            if saved.keys() == state.keys():
                for k, v in state.items():
                    saved[k].copy_(v)
                opt.append(saved)
            else:
                opt.append({k: v.detach().clone() for k, v in state.items()})
        self._opt_state = opt
        self.snapshot_iteration = done

    def rollback(self, iteration: int) -> bool:
        """Restore the last snapshot and lower the learning rate; False once ``max_rollbacks`` is spent."""
        self.rollbacks.append(iteration)
        if len(self.rollbacks) > self.settings.max_rollbacks or self._net_state is None:
            return False
        with torch.no_grad():
            self.net.load_state_dict(self._net_state)
            for p, saved in zip(self._params, self._opt_state):
                if not saved:
                    self.optimizer.state.pop(p, None)
                    continue
                state = self.optimizer.state[p]
                for k, v in saved.items():
                    if k in state and isinstance(state[k], torch.Tensor):
                        state[k].copy_(v)
                    else:
                        state[k] = v.clone()
        for group in self.optimizer.param_groups:
            group["lr"] *= self.settings.lr_factor
        self.last_loss.copy_(self.snapshot_loss)
        return True

    def state_dict(self) -> dict:
        """Snapshot, reference losses and rollback record (for checkpoints)."""
        if self._net_state is None:
            return {"rollbacks": list(self.rollbacks)}
        return {
            "net": self._net_state, "opt": self._opt_state, "last_loss": self.last_loss,
            "snapshot_loss": self.snapshot_loss, "snapshot_iteration": self.snapshot_iteration,
            "rollbacks": list(self.rollbacks),
        }

    def load_state_dict(self, state: dict, device=None) -> None:
        def to(t):
            return t.to(device) if device is not None else t

        self.rollbacks = list(state.get("rollbacks", []))
        if "net" not in state:
            return
        self._net_state = {k: to(v) for k, v in state["net"].items()}
        self._opt_state = [{k: to(v) for k, v in d.items()} for d in state["opt"]]
        self.last_loss, self.snapshot_loss = to(state["last_loss"]), to(state["snapshot_loss"])
        self.snapshot_iteration = int(state["snapshot_iteration"])

