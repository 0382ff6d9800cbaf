"""Inference of the exported `denoise` net at 256²: PyTorch (live and exported graph), TorchScript, ONNX Runtime.

Run: ``pytest benchmarks/test_export_bench.py --benchmark-only``. File sizes go in
each row's ``extra_info`` (``--benchmark-json`` keeps them).
"""
import os

import pytest
import torch

from dip.export import export_module, to_onnx, to_program, to_torchscript
from dip.nn import build_network

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

SIZE = 256
ROUNDS = int(os.environ.get("DIP_BENCH_ROUNDS", "10"))
THREADS = torch.get_num_threads()  # set by benchmarks/conftest.py (DIP_BENCH_THREADS)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The denoise net after one fitting step at 256², and its three exported files."""
    torch.manual_seed(0)
    net = build_network("denoise")
    z = torch.rand(1, 32, SIZE, SIZE) * 0.1
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    net.train()
    torch.mean((net(z) - torch.rand(1, 3, SIZE, SIZE)) ** 2).backward()
    opt.step()
    folder = tmp_path_factory.mktemp("export")
    paths = {"torchscript": to_torchscript(net, z, folder / "m.pt"), "program": to_program(net, z, folder / "m.pt2"),
             "onnx": to_onnx(net, z, folder / "m.onnx"),
             "torchscript_z_input": to_torchscript(net, z, folder / "z.pt", z_as_input=True),
             "onnx_z_input": to_onnx(net, z, folder / "z.onnx", z_as_input=True)}
    sizes = {f"{k}_bytes": p.stat().st_size for k, p in paths.items()}
    sizes["parameters"] = sum(p.numel() for p in net.parameters())
    return net, z, paths, sizes


def _run(benchmark, fn, sizes, name):
    benchmark.group = f"export inference denoise {SIZE}x{SIZE}"
    benchmark.name = name
    for _ in range(2):  # warm-up: allocator, oneDNN / ORT kernel selection
        fn()
    benchmark.pedantic(fn, rounds=ROUNDS, iterations=1)
    benchmark.extra_info.update(sizes, threads=THREADS)


def test_pytorch_live_network(benchmark, exported):
    net, z, _, sizes = exported

    def run():
        with torch.no_grad():
            return net(z)  # training mode: BatchNorm on batch statistics, as the fit renders

    _run(benchmark, run, sizes, "pytorch live network (train-mode BN)")


def test_pytorch_export_graph(benchmark, exported):
    net, z, _, sizes = exported
    module = export_module(net, z, z_as_input=True)

    def run():
        with torch.no_grad():
            return module(z)

    _run(benchmark, run, sizes, "pytorch export graph (folded BN), z input")


def test_torchscript(benchmark, exported):
    _, z, paths, sizes = exported
    module = torch.jit.load(str(paths["torchscript_z_input"]))

    def run():
        with torch.no_grad():
            return module(z)

    _run(benchmark, run, sizes, "torchscript, z input")


def _session(path):
    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def test_onnxruntime(benchmark, exported):
    _, z, paths, sizes = exported
    session = _session(paths["onnx_z_input"])
    feed = {"z": z.numpy()}
    _run(benchmark, lambda: session.run(None, feed), sizes, "onnxruntime, z input")


def test_onnxruntime_baked_load_and_run(benchmark, exported):
    # With z baked in, every tensor is a constant and ONNX Runtime folds the whole
    # graph while creating the session; a run then only copies the result out. So
    # the cost that counts is session creation plus one run.
    _, _, paths, sizes = exported
    _run(benchmark, lambda: _session(paths["onnx"]).run(None, {}), sizes, "onnxruntime, z baked: load + run")
