"""The fit core's seams: the returned iterate's network, warm start under the guard, host syncs."""
from pathlib import Path

import numpy as np
import pytest
import torch

import dip
from dip._extension import has_op
from dip.fit import EarlyStopping, FitSettings, StopReason
from dip.fit.loop import Series


def test_network_of_an_automatic_stop_is_the_returned_iterate(make_image, noisy):
    """Issue 10 bug 1: render() and exports used the network from the end of the fit, patience steps later."""
    clean = make_image(32)
    result = dip.restore(noisy(clean), network="small", progress=False, max_iterations=400, reg_noise_std=0.0,
                         early_stopping=EarlyStopping(window=20, patience=60, select="best_output"))
    assert result.stop_reason is StopReason.AUTO_STOP and result.stopped_at < result.iterations
    # without input perturbation the network's output at the returned iterate *is* the returned image
    rendered = result.render()[0].permute(1, 2, 0).numpy()
    np.testing.assert_allclose(rendered, result.image, atol=1e-5)
    assert np.abs(result.output - result.image).max() > 1e-3  # the last output is another image


def test_export_after_an_automatic_stop_reproduces_the_returned_iterate(make_image, noisy, tmp_path):
    clean = make_image(32)
    result = dip.restore(noisy(clean), network="small", progress=False, max_iterations=300, reg_noise_std=0.0,
                         early_stopping=EarlyStopping(window=20, patience=50, select="best_output"))
    assert result.stopped_at < result.iterations
    path = result.export_torchscript(tmp_path / "net.pt")
    exported = torch.jit.load(str(path))()[0].permute(1, 2, 0).numpy()
    np.testing.assert_allclose(exported, result.image, atol=1e-4)


def test_warm_start_keeps_the_guards_lower_learning_rate(clean64, noisy):
    """Issue 10 bug 3: the warm-up callback rewrote the full rate every step, undoing the guard's halving."""
    observed = noisy(clean64)
    first = dip.restore(observed, iterations=30, network="small", progress=False)
    rates, fired = [], []

    def corrupt_once_then_record(step):
        rates.append(step.optimizer.param_groups[0]["lr"])
        if step.iteration == 12 and not fired:  # inside the 25-step warm-up
            fired.append(True)
            with torch.no_grad():
                step.network.head.weight.fill_(float("nan"))

    second = dip.restore(observed, iterations=60, network="small", progress=False, init=first,
                         callbacks=[corrupt_once_then_record])
    assert second.stop_reason is StopReason.COMPLETED and second.history.rollbacks == [13]
    after = rates[fired and 20:]  # the steps after the rollback
    assert max(after) <= 0.5 * 0.01 + 1e-12
    assert rates[-1] == pytest.approx(0.005)  # the warm-up ended at the halved rate, not the full one


def test_a_diverging_warm_start_recovers_instead_of_giving_up(clean64, noisy):
    observed = noisy(clean64)
    first = dip.restore(observed, iterations=20, network="small", progress=False)
    jumps = []

    def jump_twice(step):
        if step.iteration in (15, 40) and step.iteration not in jumps:
            jumps.append(step.iteration)
            with torch.no_grad():
                step.network.head.bias.fill_(50.0)

    result = dip.restore(observed, iterations=60, network="small", progress=False, init=first, callbacks=[jump_twice])
    assert result.stop_reason is StopReason.COMPLETED and len(result.history.rollbacks) == 2


def test_history_grows_in_chunks_instead_of_preallocating():
    series = Series("cpu")
    for i in range(1, 3000):
        series.put("loss", i, torch.tensor(float(i)))
    assert series["loss"].numel() < 5000
    assert series.to_lists(2999)["loss"][-1] == 2999.0


def test_absurd_iteration_counts_are_refused_before_anything_is_allocated(clean64):
    with pytest.raises(dip.DipError, match="more than the 10,000,000 a fit may run"):
        dip.restore(clean64, iterations=100_000_000_000, network="small", progress=False)


def test_settings_are_recorded_on_the_result(clean64):
    result = dip.restore(clean64, iterations=3, network="small", progress=False, lr=0.02)
    settings = FitSettings(**{k: v for k, v in result.settings.items() if k in ("iterations", "lr", "seed")})
    assert settings.lr == 0.02 and result.settings["task"] == "denoise" and result.settings["precision"] == "float32"


def test_the_fit_reads_the_device_only_every_check_every_steps(clean64, noisy, monkeypatch):
    """dip's own host reads of tensors (item, bool, float, int, tolist) happen at checks only, not every step.

    (Adam's step counter lives on the host whatever the device, so torch.optim's reads of it are no syncs.)
    """
    import sys

    package = str(Path(dip.__file__).parent)
    calls = []
    for name in ("item", "__bool__", "__float__", "__int__", "tolist"):
        original = getattr(torch.Tensor, name)

        def counting(self, *args, _original=original, **kwargs):
            if sys._getframe(1).f_code.co_filename.startswith(package):
                calls.append(1)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counting)
    result = dip.restore(noisy(clean64), network="small", progress=False, reference=clean64, max_iterations=200,
                         early_stopping=EarlyStopping(window=20, patience=1000), noise_sigma=0.001)
    assert result.iterations == 200
    checks = 200 // 10
    assert len(calls) <= 4 * checks + 40, len(calls)  # a few per check, plus the result's assembly


@pytest.mark.parametrize("precision", ["bfloat16"])
def test_bfloat16_compute_keeps_float32_results(clean64, precision):
    result = dip.restore(clean64[:32, :32], iterations=3, network=dip.build_network("small", fused=False),
                         progress=False, precision=precision)
    assert result.image.dtype == np.float32 and np.isfinite(result.image).all()
    assert result.settings["precision"] == "bfloat16"


@pytest.mark.skipif(not has_op("conv_block"), reason="needs the compiled conv block")
def test_bfloat16_fit_runs_the_fused_net(clean64):
    """Issue 13: under CPU bf16 autocast the fused conv block raised 'expected scalar type Float'."""
    result = dip.restore(clean64[:32, :32], iterations=3, network="small", progress=False, precision="bfloat16")
    assert result.image.dtype == np.float32 and np.isfinite(result.image).all()


def test_rollbacks_are_logged_on_the_dip_logger(clean64, caplog):
    fired = []

    def corrupt_once(step):
        if step.iteration == 12 and not fired:
            fired.append(True)
            with torch.no_grad():
                step.network.head.weight.fill_(float("nan"))

    with caplog.at_level("WARNING", logger="dip"):
        result = dip.restore(clean64, iterations=30, network="small", progress=False, callbacks=[corrupt_once])
    assert result.history.rollbacks == [13]
    assert any("diverged at iteration 13: rolled back" in r.getMessage() for r in caplog.records)


def test_library_calls_draw_no_bar_when_stderr_is_not_a_terminal(clean64, capsys):
    dip.restore(clean64[:16, :16], iterations=12, network="small")
    assert "it/s" not in capsys.readouterr().err


def test_the_fit_steps_with_torchs_fused_adam_where_the_device_has_it():
    from dip.fit.loop import adam

    cpu = adam([torch.nn.Parameter(torch.zeros(3))], 0.01)
    assert cpu.defaults["fused"] is True  # one kernel per parameter, not a dozen small operations
    meta = adam([torch.nn.Parameter(torch.zeros(3, device="meta"))], 0.01)
    assert not meta.defaults["fused"]
