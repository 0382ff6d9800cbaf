"""Export of fitted networks to TorchScript (and its lite format), torch.export (.pt2) and ONNX; `dip render`; warm start.

Exported files are checked in a subprocess where importing dip fails, so
they are shown to run on plain torch / onnxruntime. Run this file with and
without ``DIP_DISABLE_EXTENSION=1`` to cover the fused and the pure path.
"""
import copy
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import dip
from dip.errors import DipError
from dip.export import export_module, read_metadata, run_exported, to_onnx, to_program, to_torchscript
from dip.nn import FusedConvBlock, build_network
from dip.nn.blocks import LanczosDownsample

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

TOL_TORCH = 1e-5
TOL_ORT = 1e-4
TINY = dict(in_channels=4, channels_down=(8, 16), channels_up=(8, 16), channels_skip=(4, 4))


def _image(h, w, channels, seed=0):
    """A smooth pattern plus noise: something a few fitting steps make progress on."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    base = np.stack([0.5 + 0.4 * np.sin(6 * x + 2 * k) * np.cos(4 * y - k) for k in range(channels)], axis=2)
    return np.clip(base + rng.normal(0, 0.08, base.shape), 0, 1).astype(np.float32)


@pytest.fixture(scope="module", params=[3, 1], ids=["rgb", "gray"])
def fitted(request):
    """A few fitting steps of the small preset on an odd-sized image."""
    channels = request.param
    size = (37, 29) if channels == 3 else (27, 35)
    return dip.restore(_image(*size, channels), "denoise", network="small", iterations=3,
                       device="cpu", seed=1, progress=False)


def _trained(cfg_overrides, z_shape, steps=2, seed=0):
    """A tiny net after a few Adam steps on a random target, with random BatchNorm gains of both signs."""
    torch.manual_seed(seed)
    net = build_network("small", **{**TINY, **cfg_overrides})
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.copy_(torch.randn_like(m.weight))
                m.bias.copy_(0.1 * torch.randn_like(m.bias))
    z = torch.rand(z_shape) * 0.1
    target = torch.rand(1, net.config.out_channels, *z_shape[2:])
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    net.train()
    for _ in range(steps):
        opt.zero_grad()
        torch.mean((net(z) - target) ** 2).backward()
        opt.step()
    with torch.no_grad():
        reference = net(z)
    return net, z, reference


# --------------------------------------------------------------------------- in process

def test_export_module_matches_render(fitted):
    reference = fitted.render()
    baked = export_module(fitted.network, fitted.net_input, crop=fitted.crop)
    with torch.no_grad():
        assert baked().shape == reference.shape == (1, fitted.image.shape[2], *fitted.image.shape[:2])
        assert (baked() - reference).abs().max() <= TOL_TORCH
        free = export_module(fitted.network, fitted.net_input, crop=fitted.crop, z_as_input=True)
        assert (free(fitted.net_input) - reference).abs().max() <= TOL_TORCH


def test_export_freezes_a_pure_copy_and_leaves_the_live_network_alone(fitted):
    net = fitted.network
    before = {k: v.clone() for k, v in net.state_dict().items()}
    block_types = [type(m) for m in net.modules()]
    rng = torch.random.get_rng_state()
    module = export_module(net, fitted.net_input, crop=fitted.crop)
    assert torch.equal(torch.random.get_rng_state(), rng)
    assert not any(isinstance(m, FusedConvBlock) for m in module.modules())
    assert all(not m.use_op for m in module.modules() if isinstance(m, LanczosDownsample))
    # Every block's BatchNorm is folded into its convolution; the merges after the concatenations stay, in eval mode.
    norms = {name.rsplit(".", 1)[-1] for name, m in module.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    assert norms == {"merge_bn"} and not module.training
    program = torch.export.export(module, ())
    targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert not any(t.startswith("dip.") for t in targets), targets
    assert [type(m) for m in net.modules()] == block_types
    for key, value in net.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_fused_and_pure_networks_export_the_same():
    fused, z, reference = _trained({}, (1, 4, 24, 20))
    pure = build_network("small", fused=False, **TINY)
    pure.load_state_dict(fused.state_dict())
    with torch.no_grad():
        a = export_module(fused, z)()
        b = export_module(pure, z)()
    assert (a - reference).abs().max() <= TOL_TORCH
    assert (a - b).abs().max() <= TOL_TORCH


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_export_of_a_cuda_network(tmp_path):
    net, z, _ = _trained({}, (1, 4, 24, 20))
    on_cpu = copy.deepcopy(net).train()
    net, z = net.cuda(), z.cuda()
    with torch.no_grad():
        reference = on_cpu(z.cpu())
    assert (export_module(net, z)() - reference).abs().max() <= TOL_TORCH
    to_program(net, z, tmp_path / "m.pt2")
    with torch.no_grad():
        assert (torch.export.load(str(tmp_path / "m.pt2")).module()() - reference).abs().max() <= TOL_TORCH
    assert next(net.parameters()).is_cuda


# Every padding, upsampling, activation and downsampling option appears in at least one net.
OPTIONS = {
    "reflect-bilinear-leaky-stride": {},
    "zero-nearest-relu-avg": dict(pad="zero", upsample="nearest", act="ReLU", downsample="avg"),
    "swish-max-no-skip-sigmoid-1x1": dict(act="Swish", downsample="max", channels_skip=(0, 0), sigmoid=False,
                                          up_1x1=False),
    "elu-lanczos2-zero": dict(act="ELU", downsample="lanczos2", pad="zero"),
    "no-act-lanczos3-no-bn-no-bias": dict(act="none", downsample="lanczos3", batch_norm=False, bias=False),
    "filters-5-3-lanczos3-gray": dict(filter_size_down=5, filter_size_skip=3, downsample="lanczos3", out_channels=1),
}


@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
def test_every_option_torchscript_and_onnx(options, tmp_path):
    net, z, reference = _trained(options, (1, 4, 24, 20))
    module = export_module(net, z)
    with torch.no_grad():
        assert (module() - reference).abs().max() <= TOL_TORCH
    to_torchscript(net, z, tmp_path / "m.pt")
    scripted = torch.jit.load(str(tmp_path / "m.pt"))
    with torch.no_grad():
        assert (scripted() - reference).abs().max() <= TOL_TORCH
    assert "dip::" not in str(scripted.inlined_graph)
    to_onnx(net, z, tmp_path / "m.onnx")
    onnx.checker.check_model(str(tmp_path / "m.onnx"), full_check=True)
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    assert np.abs(session.run(None, {})[0] - reference.numpy()).max() <= TOL_ORT


def test_odd_input_size_torchscript(tmp_path):
    # TorchScript keeps every size dynamic, odd ones included (stride 2 rounds up, upsampling is cropped).
    net, z, _ = _trained({}, (1, 4, 24, 20))
    to_torchscript(net, z, tmp_path / "m.pt", z_as_input=True)
    odd = torch.rand(1, 4, 29, 23) * 0.1
    exact = export_module(net, z, z_as_input=True)
    with torch.no_grad():
        out = torch.jit.load(str(tmp_path / "m.pt"))(odd)
        assert out.shape == (1, 3, 29, 23)
        assert (out - exact(odd)).abs().max() <= TOL_TORCH


def test_z_as_input_dynamic_size(fitted, tmp_path):
    fitted.export_onnx(tmp_path / "m.onnx", z_as_input=True)
    fitted.export_program(tmp_path / "m.pt2", z_as_input=True)
    fitted.export_torchscript(tmp_path / "m.pt", z_as_input=True)
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["z"]
    assert [o.name for o in session.get_outputs()] == ["image"]
    top, left, h, w = fitted.crop
    z = fitted.net_input
    bigger = torch.rand(1, z.shape[1], z.shape[2] + 8, z.shape[3] + 16) * 0.1
    margins = (z.shape[2] - h, z.shape[3] - w)
    with torch.no_grad():
        by_script = torch.jit.load(str(tmp_path / "m.pt"))(bigger)
        by_program = torch.export.load(str(tmp_path / "m.pt2")).module()(bigger)
    by_ort = session.run(None, {"z": bigger.numpy()})[0]
    assert by_script.shape[2:] == (bigger.shape[2] - margins[0], bigger.shape[3] - margins[1])
    assert (by_program - by_script).abs().max() <= TOL_TORCH
    assert np.abs(by_ort - by_script.numpy()).max() <= TOL_ORT


def test_onnx_standard_operators_and_metadata(fitted, tmp_path):
    path = fitted.export_onnx(tmp_path / "m.onnx")
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    assert [i.name for i in model.graph.input] == []
    assert [o.name for o in model.graph.output] == ["image"]
    domains = {n.domain for n in model.graph.node} | {f.domain for f in model.functions}
    assert domains <= {"", "ai.onnx"}
    ops = [n.op_type for n in model.graph.node]
    # Only the BatchNorm after each scale's concatenation is left; the blocks' are folded into their convolutions.
    assert "Conv" in ops and ops.count("BatchNormalization") == fitted.network.config.scales
    meta = read_metadata(path)
    assert meta["crop"] == list(fitted.crop) and meta["network"]["channels_down"] == [16, 32, 64]


def test_onnx_opset_is_honoured_or_refused(fitted, tmp_path):
    for opset in (18, 21):
        path = fitted.export_onnx(tmp_path / f"m{opset}.onnx", opset_version=opset)
        model = onnx.load(str(path))
        assert {o.domain: o.version for o in model.opset_import}[""] == opset
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        assert np.abs(session.run(None, {})[0] - fitted.render().numpy()).max() <= TOL_ORT
    for opset in (17, 7, onnx.defs.onnx_opset_version() + 1, "18", True):
        with pytest.raises(DipError, match="opset_version must be an integer from 18"):
            to_onnx(fitted.network, fitted.net_input, tmp_path / "bad.onnx", opset_version=opset)
    with pytest.raises(DipError, match="opset_version"):
        fitted.export_onnx(tmp_path / "bad.onnx", opset_version=12)
    assert not (tmp_path / "bad.onnx").exists()


def test_lite_interpreter_file(fitted, tmp_path):
    from torch.jit.mobile import _load_for_lite_interpreter

    path = to_torchscript(fitted.network, fitted.net_input, tmp_path / "m.ptl", crop=fitted.crop, lite=True)
    with torch.no_grad():
        assert (_load_for_lite_interpreter(str(path))() - fitted.render()).abs().max() <= TOL_TORCH
    assert (run_exported(path) - fitted.render()).abs().max() <= TOL_TORCH


# --------------------------------------------------------------------------- in a process without dip

_RUNNER = textwrap.dedent("""
    import importlib.abc, json, sys

    class NoDip(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name == "dip" or name.startswith("dip."):
                raise ImportError("dip must not be imported here")

    sys.meta_path.insert(0, NoDip())
    import numpy as np
    import onnxruntime
    import torch
    import torch.jit.mobile

    reference = torch.load("reference.pt")
    diffs = {}
    with torch.no_grad():
        diffs["torchscript"] = (torch.jit.load("m.pt")() - reference).abs().max().item()
        diffs["program"] = (torch.export.load("m.pt2").module()() - reference).abs().max().item()
        lite = torch.jit.mobile._load_for_lite_interpreter("m.ptl")
        diffs["lite"] = (lite() - reference).abs().max().item()
    session = onnxruntime.InferenceSession("m.onnx", providers=["CPUExecutionProvider"])
    diffs["onnx"] = float(np.abs(session.run(None, {})[0] - reference.numpy()).max())
    diffs["dip_imported"] = any(m == "dip" or m.startswith("dip.") for m in sys.modules)
    print(json.dumps(diffs))
""")


def test_files_run_without_dip(fitted, tmp_path):
    fitted.export_torchscript(tmp_path / "m.pt")
    fitted.export_program(tmp_path / "m.pt2")
    fitted.export_onnx(tmp_path / "m.onnx")
    to_torchscript(fitted.network, fitted.net_input, tmp_path / "m.ptl", crop=fitted.crop, lite=True)
    torch.save(fitted.render(), tmp_path / "reference.pt")
    (tmp_path / "runner.py").write_text(_RUNNER)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "DIP_DISABLE_EXTENSION")}
    done = subprocess.run([sys.executable, "runner.py"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    diffs = json.loads(done.stdout.strip().splitlines()[-1])
    assert diffs["dip_imported"] is False
    assert diffs["torchscript"] <= TOL_TORCH
    assert diffs["program"] <= TOL_TORCH
    assert diffs["lite"] <= TOL_TORCH
    assert diffs["onnx"] <= TOL_ORT


# --------------------------------------------------------------------------- errors

def test_export_before_fitting_is_refused(tmp_path):
    net = build_network("small")
    z = torch.rand(1, 8, 32, 32) * 0.1
    for export in (to_torchscript, to_onnx, to_program):
        with pytest.raises(DipError, match="not been fitted"):
            export(net, z, tmp_path / "m.bin")
    assert list(tmp_path.iterdir()) == []


def test_export_refuses_bad_inputs(fitted, tmp_path):
    with pytest.raises(DipError, match="Hourglass"):
        to_torchscript(torch.nn.Conv2d(8, 3, 1), fitted.net_input, tmp_path / "m.pt")
    with pytest.raises(DipError, match="z must be"):
        to_torchscript(fitted.network, fitted.net_input[:, :2], tmp_path / "m.pt")
    with pytest.raises(DipError, match="crop"):
        to_torchscript(fitted.network, fitted.net_input, tmp_path / "m.pt", crop=(0, 0, 999, 5))
    with pytest.raises(DipError, match="does not exist"):
        fitted.export_torchscript(tmp_path / "missing" / "m.pt")


def test_restoration_without_a_step_is_refused(fitted, tmp_path):
    from dataclasses import replace

    with pytest.raises(DipError, match="no fitting step"):
        replace(fitted, iterations=0).export_onnx(tmp_path / "m.onnx")


# --------------------------------------------------------------------------- CLI

def test_cli_export_and_render(tmp_path):
    from PIL import Image

    from dip.cli import main

    Image.fromarray((_image(30, 26, 3) * 255).astype(np.uint8)).save(tmp_path / "in.png")
    args = ["denoise", str(tmp_path / "in.png"), "-o", str(tmp_path / "out.png"), "--network", "small",
            "--iterations", "2", "--device", "cpu", "-q", "--export-torchscript", str(tmp_path / "m.pt"),
            "--export-program", str(tmp_path / "m.pt2"), "--export-onnx", str(tmp_path / "m.onnx")]
    assert main(args) == 0
    rendered = []
    for name in ("m.pt", "m.pt2", "m.onnx"):
        assert main(["render", str(tmp_path / name), "-o", str(tmp_path / f"{name}.png")]) == 0
        rendered.append(np.asarray(Image.open(tmp_path / f"{name}.png"), dtype=np.int16))
    assert rendered[0].shape == (30, 26, 3)
    assert all(np.abs(r - rendered[0]).max() <= 1 for r in rendered)


def test_cli_render_errors(tmp_path, capsys):
    from dip.cli import main

    assert main(["render", str(tmp_path / "none.pt"), "-o", str(tmp_path / "x.png")]) == 1
    assert "no such file" in capsys.readouterr().err
    net, z, _ = _trained({}, (1, 4, 24, 20))
    to_torchscript(net, z, tmp_path / "free.pt", z_as_input=True)
    assert main(["render", str(tmp_path / "free.pt"), "-o", str(tmp_path / "x.png")]) == 1
    assert "z_as_input" in capsys.readouterr().err


# --------------------------------------------------------------------------- warm start

def test_warm_start_reaches_the_first_loss_in_half_the_iterations():
    n = 24
    clean = _image(24, 24, 3, seed=3)
    rng = np.random.default_rng(5)
    frame1 = np.clip(clean + rng.normal(0, 0.05, clean.shape), 0, 1).astype(np.float32)
    frame2 = np.clip(clean + rng.normal(0, 0.05, clean.shape), 0, 1).astype(np.float32)  # the "next frame"
    options = dict(network="small", device="cpu", progress=False, seed=0)
    first = dip.restore(frame1, "denoise", iterations=n, **options)
    target = first.history.loss[-1]
    second = dip.restore(frame2, "denoise", iterations=n // 2, init=first, **options)
    reached = [i + 1 for i, loss in enumerate(second.history.loss) if loss <= target]
    assert reached, f"warm start never reached {target:.4g} in {n // 2} iterations: {second.history.loss}"
    assert reached[0] <= n // 2


def test_warm_start_copies_weights_and_refuses_other_architectures(fitted, tmp_path):
    from dip.warm_start import warm_start

    net = build_network("small", out_channels=fitted.network.config.out_channels)
    z = warm_start(net, fitted)
    assert z is fitted.net_input
    for (k, a), b in zip(net.state_dict().items(), fitted.network.state_dict().values()):
        assert torch.equal(a, b), k
    with pytest.raises(DipError, match="different architecture"):
        warm_start(build_network("small", out_channels=fitted.network.config.out_channels, act="ReLU"), fitted)
    with pytest.raises(DipError, match="different architecture"):
        warm_start(build_network("small", channels_down=(16, 32, 32)), fitted.network.state_dict())
    with pytest.raises(DipError, match="exported files"):
        warm_start(net, tmp_path / "m.pt")


# --------------------------------------------------------------------------- degradation operators

def test_lanczos_operator_exports_as_standard_onnx(tmp_path):
    from dip.export import operator_to_onnx
    from dip.ops.lanczos import lanczos_downsample_reference
    from dip.physics import Downsample

    path = operator_to_onnx(Downsample(3, 2), torch.rand(1, 3, 50, 47), tmp_path / "down.onnx")
    model = onnx.load(str(path))
    assert {n.domain for n in model.graph.node} <= {"", "ai.onnx"}
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for h, w in [(50, 47), (31, 64)]:
        x = torch.rand(1, 3, h, w)
        expected = lanczos_downsample_reference(x, 3, 2).numpy()
        assert np.abs(session.run(None, {"image": x.numpy()})[0] - expected).max() <= TOL_ORT


@pytest.mark.parametrize("opset_version", [None, 18])
def test_onnx_exports_say_what_to_install_without_onnx(fitted, tmp_path, monkeypatch, opset_version):
    """Bug: operator_to_onnx (and the opset check) imported onnx bare: ModuleNotFoundError, no install hint."""
    from dip.export import operator_to_onnx
    from dip.physics import Downsample

    monkeypatch.setitem(sys.modules, "onnx", None)  # what a process without onnx sees
    with pytest.raises(DipError, match="pip install onnx onnxscript"):
        operator_to_onnx(Downsample(3, 2), torch.rand(1, 3, 20, 20), tmp_path / "down.onnx",
                         opset_version=opset_version)
    with pytest.raises(DipError, match="pip install onnx onnxscript"):
        to_onnx(fitted.network, fitted.net_input, tmp_path / "m.onnx", opset_version=opset_version)
    assert not list(tmp_path.iterdir())
