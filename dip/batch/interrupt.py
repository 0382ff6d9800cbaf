"""Stopping a batch on SIGTERM or Ctrl-C at a point the runner chooses.

A Python signal handler runs in the main thread between any two bytecodes:
inside ``concurrent.futures``' locks, Ray's client, tqdm, a manifest write.
An exception raised there can leave a lock half-taken (a pool's manager
thread then waits on it forever) or a pipe half-written. So the handler only
records the request, and the runners, which wait for their fits in slices of
:data:`POLL_SECONDS`, call :meth:`StopRequest.check` between two of them.

Both runners (the local pool and Ray) use it; it depends on nothing else in :mod:`dip.batch`.
"""
from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Optional

#: how long a runner waits for a fit before it looks at the stop request again
POLL_SECONDS = 0.1

_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class BatchInterrupted(Exception):
    """The batch was asked to stop (SIGTERM or Ctrl-C); raised by :meth:`StopRequest.check`."""


class StopRequest:
    """Whether a stop signal came; set by the signal handler, read by the runner."""

    def __init__(self) -> None:
        self.signal: Optional[str] = None  # the name of the first signal that came

    @property
    def requested(self) -> bool:
        """True once a stop signal came."""
        return self.signal is not None

    def handler(self, signum, frame) -> None:
        """The signal handler: note the first signal, never raise."""
        if self.signal is None:
            self.signal = signal.Signals(signum).name

    def check(self) -> None:
        """Raise :class:`BatchInterrupted` if a stop was requested."""
        if self.signal is not None:
            raise BatchInterrupted(self.signal)


@contextmanager
def stop_on_signals() -> Iterator[StopRequest]:
    """Within the block, SIGTERM and SIGINT set the yielded :class:`StopRequest` instead of acting.

    The caller's handlers come back when the block ends. Away from the main
    thread (where Python cannot catch signals) the request is never set and
    the signals keep their usual effect.
    """
    stop = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    saved = {s: signal.getsignal(s) for s in _SIGNALS}
    for s in _SIGNALS:
        signal.signal(s, stop.handler)
    try:
        yield stop
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)
