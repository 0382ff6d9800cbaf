"""Run the fits of :func:`dip.restore_many` as Ray tasks.

Each image is one task that reserves one CPU, or one GPU when the cluster has
GPUs. The task writes its output into the output folder itself (storage that
every node must see) and returns only its small manifest record, so no image
goes through the object store. Ray retries a task whose worker process died
(``max_retries``); a fit that failed inside a living worker comes back as a
failed record and is resubmitted here, as in the local pool.
"""
from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Optional, Union
from urllib.parse import urlsplit

from dip.batch.interrupt import POLL_SECONDS, StopRequest
from dip.batch.records import Job, Record, RecordStatus
from dip.batch.worker import cpu_count, restore_one
from dip.errors import DipError
from dip.tasks import Task

INSTALL_HINT = "running a batch on Ray needs Ray: pip install 'dip[ray]'"
#: "0": a Ray started in this process takes 127.0.0.1 as its node address, so it listens on loopback only
#: (Ray's default on Windows and macOS); Ray reads it on import. Set it to "1" to ask for a reachable local Ray.
LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
LOOPBACK = ("127.0.0.1", "::1", "localhost")
CONNECT_TIMEOUT = 20.0  # seconds to wait for a cluster's address to answer
GCS_PORT = 6379  # Ray's default head port
CLIENT_PORT = 10001  # Ray Client's default port (ray://)


def import_ray(local: bool):
    """Import Ray, or raise a :class:`DipError` that says how to install it.

    For a local Ray the environment is set first (Ray reads it on import) so
    that it listens on 127.0.0.1 only and sends no usage statistics.
    """
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if local:  # Ray imported already has read it: start_local_ray() sees to that case
        os.environ.setdefault(LOOPBACK_ENV, "0")
    try:
        import ray
    except ImportError:
        raise DipError(INSTALL_HINT) from None
    return ray


def start_local_ray(ray) -> None:
    """``ray.init`` of a local Ray with no dashboard that listens on 127.0.0.1 only (unless ``LOOPBACK_ENV`` is
    set to "1" by the user).

    Ray reads :data:`LOOPBACK_ENV` once, on import: when the program imported Ray before dip set it, Ray's
    copy is set to what the variable now says for the call, and the node address is checked after the start
    (a Ray that would be reachable from other machines is shut down and refused).
    """
    loopback = os.environ.get(LOOPBACK_ENV) == "0"
    constants = getattr(getattr(ray, "_private", None), "ray_constants", None)
    before = getattr(constants, "ENABLE_RAY_CLUSTER", None)
    if loopback and before is not None:
        constants.ENABLE_RAY_CLUSTER = False
    try:
        ray.init(num_cpus=cpu_count(), include_dashboard=False)
    finally:
        if before is not None:
            constants.ENABLE_RAY_CLUSTER = before
    host = ray.util.get_node_ip_address()
    if loopback and host not in LOOPBACK:
        ray.shutdown()
        raise DipError(f"the local Ray started for this batch would listen on {host}, beyond this machine; dip "
                       "starts it on 127.0.0.1 only: set RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 before Ray is imported, "
                       "or start Ray yourself (ray start --head) and give its address as ray='HOST:PORT'")


def worker_runtime_env() -> dict:
    """Let Ray workers import the same ``dip`` as this process (a source checkout as well as an install)."""
    root = str(Path(__file__).resolve().parent.parent)
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    return {"env_vars": {"PYTHONPATH": path}}


def parse_address(address: str) -> tuple[str, int]:
    """(host, port) of a Ray ``address`` (``HOST:PORT`` or ``ray://HOST:PORT``; Ray's default port when none is
    given); a :class:`DipError` in the library's words (``ray=``) when it is not one. Needs no Ray."""
    client = address.startswith("ray://")
    parts = urlsplit(address if client else "//" + address)
    try:
        host, port = parts.hostname, parts.port or (CLIENT_PORT if client else GCS_PORT)
    except ValueError:
        host = None
    if not host:
        raise DipError(f"ray={address!r} is not an address dip can read; give ray='HOST:PORT' or "
                       "ray='ray://HOST:PORT'")
    return host, port


def wait_for_address(address: str, timeout: float = CONNECT_TIMEOUT) -> None:
    """Return once something accepts connections at the Ray ``address``; a :class:`DipError` after ``timeout`` s.

    Ray itself keeps retrying an address where nothing listens, for ever; this
    check bounds the wait and says what is wrong. ``"auto"`` (find the local
    cluster) is left to Ray.
    """
    if address == "auto":
        return
    host, port = parse_address(address)
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=max(0.1, min(2.0, deadline - time.monotonic()))):
                return
        except OSError as exc:
            if time.monotonic() + 0.5 >= deadline:
                raise DipError(f"no Ray cluster answers at {address} (waited {timeout:g} s: {exc.strerror or exc}); "
                               "check the address, or start one with `ray start --head`") from None
        time.sleep(0.5)


def run_on_ray(jobs: Sequence[Job], task: Task, options: dict, run_seed: int, ray_arg: Union[bool, str],
               retries: int, report: Callable[[Record], None], stop: StopRequest,
               timeout: Optional[float] = None) -> None:
    """Run ``jobs`` as Ray tasks and ``report`` each final record.

    ``ray_arg`` is ``True`` (the Ray runtime this process is connected to, or a
    new local one) or the address of a cluster, which must answer within
    ``timeout`` seconds (default 20). A Ray started here is shut down at the end.
    A request on ``stop`` cancels the tasks in flight and raises.
    """
    address = ray_arg if isinstance(ray_arg, str) and ray_arg else None
    ray = import_ray(local=address is None)
    started = False
    if not ray.is_initialized():
        if address is None:
            start_local_ray(ray)
        else:
            wait_for_address(address, CONNECT_TIMEOUT if timeout is None else timeout)
            ray.init(address=address)
        started = True
    pending: dict = {}
    try:
        per_task = {"num_gpus": 1, "num_cpus": 1} if ray.cluster_resources().get("GPU", 0) else {"num_cpus": 1}
        remote = ray.remote(restore_one).options(
            max_retries=retries, retry_exceptions=False, runtime_env=worker_runtime_env(), **per_task)

        def submit(job: Job) -> None:
            # One thread per fit: the task holds one CPU, and the thread count
            # must match the local pool's for byte-identical outputs.
            pending[remote.remote(job, task, options, 1)] = job

        for job in jobs:
            submit(job)
        while pending:
            stop.check()
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=POLL_SECONDS)
            for ref in ready:
                job = pending.pop(ref)
                try:
                    record = ray.get(ref)
                except ray.exceptions.RayError as exc:  # Ray's own retries are spent
                    error = f"Ray task failed: {type(exc).__name__}: {_first_line(exc)}"
                    report(replace(Record.for_job(job, RecordStatus.FAILED, error=error),
                                   attempts=job.attempt + 1 + retries))
                    continue
                if record.failed and job.attempt < retries:
                    submit(job.retry(record, run_seed))
                else:
                    report(record)
    except BaseException:
        for ref in pending:
            # Not forced: the task gets a KeyboardInterrupt, its fit stops, and it writes nothing.
            ray.cancel(ref)
        raise
    finally:
        if started:
            ray.shutdown()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""
