"""Batch restoration as Ray tasks (skipped, saying so, when Ray is not installed; CI installs dip[ray])."""
import os
import socket
import sys
import time

import pytest
from batch_helpers import SIZES, TINY, CrashOnce, write_images

import dip
from dip.errors import DipError

NO_RAY = "Ray is not installed (pip install 'dip[ray]'): the Ray runner is not tested"


def _outputs(out_dir):
    return {p.name: p.read_bytes() for p in sorted(out_dir.glob("*.png"))}


def test_ray_missing_says_how_to_install(tmp_path, make_image, monkeypatch):
    write_images(tmp_path / "in", make_image, SIZES[:1])
    monkeypatch.setitem(sys.modules, "ray", None)  # makes `import ray` fail
    with pytest.raises(DipError, match=r"pip install 'dip\[ray\]'"):
        dip.restore_many(tmp_path / "in", tmp_path / "out", "denoise", ray=True, progress=False, **TINY)


@pytest.mark.parametrize("address", ["host:notaport", ":6379", "ray://:10001"])
def test_unreadable_ray_address_is_worded_for_the_caller_and_refused_up_front(tmp_path, make_image, monkeypatch,
                                                                                capsys, address):
    # restore_many(ray=...) raised the command line's words ("--ray: cannot read the address …") to library
    # callers, and only after the batch was planned and its output folder made; Ray need not be installed.
    from dip.cli import main

    write_images(tmp_path / "in", make_image, SIZES[:1])
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(DipError, match=rf"^ray='{address}' is not an address dip can read; give ray='HOST:PORT'") \
            as caught:
        dip.restore_many(tmp_path / "in", tmp_path / "out", "denoise", ray=address, progress=False, **TINY)
    assert "--ray" not in str(caught.value) and not (tmp_path / "out").exists()
    assert main(["batch", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--task", "denoise", "--ray", address,
                 "-q"]) == 1
    err = capsys.readouterr().err
    assert f"--ray {address} is not an address dip can read; give --ray HOST:PORT or --ray ray://HOST:PORT" in err


def _stand_in_ray(constants):
    """A stand-in for the ray module that records ray.init's keywords and whether Ray would take 127.0.0.1 as the
    node address then (what Ray does when its ENABLE_RAY_CLUSTER, read from the environment on import, is off)."""
    from types import SimpleNamespace

    calls = {}

    def init(**kwargs):
        calls.update(kwargs, loopback=constants is None or not constants.ENABLE_RAY_CLUSTER)

    return calls, SimpleNamespace(
        _private=SimpleNamespace(ray_constants=constants), init=init, is_initialized=lambda: False,
        shutdown=lambda: calls.update(shutdown=True), cluster_resources=lambda: {},
        remote=lambda fn: SimpleNamespace(options=lambda **kw: None),
        util=SimpleNamespace(get_node_ip_address=lambda: "127.0.0.1" if calls["loopback"] else "192.0.2.2"))


def test_local_ray_listens_on_loopback_only_even_when_ray_was_imported_first(monkeypatch):
    # Regression: dip made a local Ray listen on 127.0.0.1 by setting RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, which Ray
    # reads once, on import; in a program that had imported ray already (on Linux) the local Ray took the machine's
    # address and listened on every interface. No dashboard either way.
    LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
    from types import SimpleNamespace

    from dip.batch.ray import run_on_ray

    for name in (LOOPBACK_ENV, "RAY_USAGE_STATS_ENABLED"):
        monkeypatch.delenv(name, raising=False)
    constants = SimpleNamespace(ENABLE_RAY_CLUSTER=True)  # what Ray read on import, on Linux
    calls, fake = _stand_in_ray(constants)
    monkeypatch.setitem(sys.modules, "ray", fake)
    run_on_ray([], dip.Task.DENOISE, {}, 0, True, 0, report=None, stop=None)
    assert calls["include_dashboard"] is False and calls["loopback"] and "address" not in calls
    assert constants.ENABLE_RAY_CLUSTER is True and os.environ[LOOPBACK_ENV] == "0"  # Ray's own copy put back
    # A Ray whose setting dip cannot reach, and that would be reachable from other machines: refused.
    calls, fake = _stand_in_ray(None)
    fake.init = lambda **kwargs: calls.update(kwargs, loopback=False)
    monkeypatch.setitem(sys.modules, "ray", fake)
    with pytest.raises(DipError, match="would listen on 192.0.2.2, beyond this machine"):
        run_on_ray([], dip.Task.DENOISE, {}, 0, True, 0, report=None, stop=None)
    assert calls["shutdown"]
    monkeypatch.setenv(LOOPBACK_ENV, "1")  # the user asks for a reachable local Ray
    run_on_ray([], dip.Task.DENOISE, {}, 0, True, 0, report=None, stop=None)


def _unused_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ray_address_where_nothing_listens_times_out_with_a_clear_error(tmp_path, make_image, capsys):
    pytest.importorskip("ray", reason=NO_RAY)
    from dip.cli import main

    write_images(tmp_path / "in", make_image, SIZES[:1])
    address = f"127.0.0.1:{_unused_port()}"
    start = time.monotonic()
    code = main(["batch", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--task", "denoise",
                 "--ray", address, "--ray-timeout", "2", "-q"])
    took = time.monotonic() - start
    err = capsys.readouterr().err
    assert code == 1 and f"no Ray cluster answers at {address}" in err, err
    assert 1.5 <= took < 30


@pytest.fixture(scope="module")
def ray_local():
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # listen on 127.0.0.1 only (read on import)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray = pytest.importorskip("ray", reason=NO_RAY)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, ray_local):
    """The same small batch on the local pool (two one-thread workers) and on Ray."""
    from conftest import _astronaut

    root = tmp_path_factory.mktemp("ray")
    write_images(root / "in", _astronaut, SIZES[:3])
    (root / "in" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    write_images(root / "ref", _astronaut, SIZES[:3])
    runs = {}
    for name, how in (("local", dict(workers=2, threads=1)), ("ray", dict(ray=True))):
        runs[name] = (root / name, dip.restore_many(root / "in", root / name, "denoise", seed=7,
                                                    reference_dir=root / "ref", progress=False, **how, **TINY))
    return runs


def test_ray_gives_the_same_results_as_the_local_pool(two_runs):
    (out_local, local), (out_ray, on_ray) = two_runs["local"], two_runs["ray"]
    assert (on_ray.ok, on_ray.failed, on_ray.skipped) == (local.ok, local.failed, local.skipped) == (3, 1, 0)
    assert _outputs(out_ray) == _outputs(out_local)  # byte-identical, whichever process fitted which image
    for a, b in zip(local.records, on_ray.records):
        for key in ("status", "iterations", "stop_reason", "seed", "psnr", "settings"):
            assert getattr(a, key) == getattr(b, key), (a.input, key)


def test_ray_task_whose_worker_dies_is_retried(tmp_path, make_image, ray_local):
    import batch_helpers
    from ray import cloudpickle

    write_images(tmp_path / "in", make_image, SIZES[:3])
    marker = tmp_path / "crashed"
    # Ray workers cannot import the tests' helper module: ship it by value.
    cloudpickle.register_pickle_by_value(batch_helpers)
    try:
        summary = dip.restore_many(tmp_path / "in", tmp_path / "out", "denoise", ray=True, progress=False,
                                   callbacks=[CrashOnce(marker)], **TINY)
    finally:
        cloudpickle.unregister_pickle_by_value(batch_helpers)
    assert marker.exists()
    assert (summary.ok, summary.failed) == (3, 0)
    assert len(list((tmp_path / "out").glob("img*.png"))) == 3
