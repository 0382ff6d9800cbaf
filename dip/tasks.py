"""The restoration tasks: one enum, one alias table, the original work's settings per task.

Every module that names a task (the API, the CLI, batch) goes through
:meth:`Task.parse`; nothing else compares task strings.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Optional, Union

from dip.errors import DipError


class Task(str, Enum):
    """What the degradation is. The value is the canonical API spelling."""

    DENOISE = "denoise"
    SUPER_RESOLUTION = "super_resolution"
    INPAINT = "inpaint"
    CUSTOM = "custom"

    @classmethod
    def parse(cls, task: Union[str, Task]) -> Task:
        """The task named ``task`` (any alias, any case); a clear error for an unknown one."""
        if isinstance(task, Task):
            return task
        key = str(task).lower().strip()
        found = _ALIASES.get(key)
        if found is None:
            raise DipError(
                f"unknown task {task!r}; choose one of denoise, super-resolve, inpaint (or custom with operator=)"
            )
        return found

    @property
    def cli_name(self) -> str:
        """The task's name on the command line (``dip super-resolve`` …)."""
        return _CLI_NAMES[self]

    def __str__(self) -> str:
        return self.value


_ALIASES = {
    "denoise": Task.DENOISE, "denoising": Task.DENOISE,
    "super_resolution": Task.SUPER_RESOLUTION, "super-resolution": Task.SUPER_RESOLUTION,
    "super-resolve": Task.SUPER_RESOLUTION, "superresolution": Task.SUPER_RESOLUTION, "sr": Task.SUPER_RESOLUTION,
    "inpaint": Task.INPAINT, "inpainting": Task.INPAINT,
    "custom": Task.CUSTOM,
}
_CLI_NAMES = {Task.DENOISE: "denoise", Task.SUPER_RESOLUTION: "super-resolve", Task.INPAINT: "inpaint",
              Task.CUSTOM: "custom"}


@dataclass(frozen=True)
class TaskDefaults:
    """The original work's settings for a task."""

    iterations: int
    reg_noise_std: float
    network: str


def task_defaults(task: Union[str, Task], factor: Optional[int] = None) -> TaskDefaults:
    """Iterations, input perturbation and network preset used by the original work for ``task``."""
    task = Task.parse(task)
    if task is Task.SUPER_RESOLUTION:
        if factor is not None and factor > 4:
            return TaskDefaults(4000, 0.05, "sr")
        return TaskDefaults(2000, 0.03, "sr")
    if task is Task.INPAINT:
        return TaskDefaults(5000, 0.03, "inpaint")
    return TaskDefaults(3000, 1.0 / 30.0, "denoise")
