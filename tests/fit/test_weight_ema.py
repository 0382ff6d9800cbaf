"""select="weight_ema": the network's output with the moving average of its weights at the variance minimum."""
import numpy as np
import pytest
import torch

import dip
from dip.fit import EarlyStopping, FitSettings, Selection, default_monitors, fit
from dip.fit.stopping import VarianceStopper

RULE = dict(window=10, patience=30)


def _fit(observed, select, callbacks=(), **options):
    return dip.restore(observed, network="small", progress=False, max_iterations=150, reg_noise_std=0.0,
                       early_stopping=EarlyStopping(select=select, **RULE), callbacks=callbacks, **options)


def test_weight_ema_is_a_selection_that_settings_accept():
    assert EarlyStopping(select="weight_ema").select is Selection.WEIGHT_EMA
    settings = FitSettings(early_stopping=EarlyStopping(select=Selection.WEIGHT_EMA))
    assert settings.to_dict()["early_stopping"]["select"] == "weight_ema"
    with pytest.raises(dip.DipError, match="weight_ema"):  # the choices named in the refusal
        EarlyStopping(select="weights")


@pytest.fixture
def observed(make_image, noisy):
    return noisy(make_image(32))


def test_the_image_is_the_averaged_network_and_render_and_export_reproduce_it(observed, tmp_path):
    """The returned weights are the bias-corrected EMA of the weights after steps 1…stopped_at; render() is image."""
    after = []  # the weights after every step (callbacks run after the optimizer step)
    result = _fit(observed, "weight_ema", callbacks=[
        lambda step: after.append({k: v.detach().clone() for k, v in step.network.named_parameters()})])
    assert result.history.rollbacks == [] and RULE["window"] < result.stopped_at < result.iterations
    w, expected = 0.99, None
    for k, weights in enumerate(after[: result.stopped_at], 1):
        kept = w * (1 - w ** (k - 1)) / (1 - w ** k)
        expected = weights if expected is None else {n: kept * expected[n] + (1 - kept) * weights[n] for n in weights}
    returned = {n: p.detach() for n, p in result.network.named_parameters()}
    for name, value in expected.items():
        torch.testing.assert_close(returned[name], value, rtol=1e-5, atol=1e-6)
    # neither the weights of the minimum's own step nor the last ones
    assert max(float((returned[n] - after[result.stopped_at - 1][n]).abs().max()) for n in returned) > 1e-3
    assert max(float((returned[n] - after[-1][n]).abs().max()) for n in returned) > 1e-3
    rendered = result.render()[0].permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(rendered, result.image)
    assert set(result.candidates) == {s.value for s in Selection}
    np.testing.assert_array_equal(result.candidates["weight_ema"], result.image)
    assert np.abs(result.candidates["best_output"] - result.image).max() > 1e-3
    exported = torch.jit.load(str(result.export_torchscript(tmp_path / "net.pt")))()[0].permute(1, 2, 0).numpy()
    np.testing.assert_allclose(exported, result.image, atol=1e-4)

    best = _fit(observed, "best_output")  # the same trajectory and minimum; the minimum's own weights returned
    assert best.stopped_at == result.stopped_at and best.iterations == result.iterations
    np.testing.assert_array_equal(result.candidates["best_output"], best.image)
    assert max(float((returned[n] - p).abs().max()) for n, p in best.network.state_dict().items() if n in returned) > 1e-3


def _stopper_after_a_fit(select):
    torch.manual_seed(0)
    net = dip.build_network("small", out_channels=1)
    z = torch.rand(1, net.config.in_channels, 32, 32) * 0.1
    target = torch.rand(1, 1, 32, 32)
    settings = FitSettings(max_iterations=40, reg_noise_std=0.0,
                           early_stopping=EarlyStopping(window=5, patience=100, select=select))
    monitors = default_monitors(settings)
    result = fit(net, z, lambda x: x, target, settings, monitors=monitors, progress=False)
    return next(m for m in monitors if isinstance(m, VarianceStopper)), result


@pytest.mark.parametrize("select", ["best_ema", "best_output", "blend", "ema"])
def test_other_selections_keep_no_weight_average(select):
    stopper, result = _stopper_after_a_fit(select)
    assert stopper.best_output is not None
    assert stopper.weight_average is None and stopper.best_weight_average is None
    assert "weight_average" not in stopper.state_dict() and "weight_ema" not in result.candidates


def test_weight_ema_keeps_no_per_step_copy_of_the_weights():
    stopper, result = _stopper_after_a_fit("weight_ema")
    assert stopper._previous is None and stopper.best_weights == {}
    assert set(stopper.weight_average) == set(stopper.best_weight_average) == {
        n for n, _ in stopper._net.named_parameters()}
    assert "weight_ema" in result.candidates


def test_a_rollback_restores_the_weight_average(observed):
    """A NaN step entered the average until the guard's copy carried it: the image was NaN."""
    fired = []

    def poison_once(step):
        if step.iteration == 40 and not fired:
            fired.append(1)
            with torch.no_grad():
                step.network.head.weight.fill_(float("nan"))

    result = _fit(observed, "weight_ema", callbacks=[poison_once])
    assert result.history.rollbacks == [41]
    assert np.isfinite(result.image).all() and np.isfinite(result.candidates["weight_ema"]).all()
    assert all(torch.isfinite(v).all() for v in result.network.state_dict().values())


def test_an_ensemble_averages_each_members_weights_at_its_own_minimum(observed):
    result = _fit(observed, "weight_ema", ensemble=2)
    assert len(result.member_iterations) == 2 and "weight_ema" in result.candidates
    rendered = result.render()[0].permute(1, 2, 0).numpy()  # member 0's network: the grouped one's first slice
    np.testing.assert_allclose(rendered, result.members[0], atol=1e-5)
