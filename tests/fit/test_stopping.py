"""Automatic stopping, the divergence guard, checkpoints and resume, plots (small CPU fits)."""
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import dip
from dip.errors import DipError
from dip.fit import EarlyStopping, FitSettings, GuardSettings, Selection, StopReason
from dip.fit.stopping import VarianceStopper

ROOT = Path(__file__).resolve().parents[2]


# ---- the stopping signal ---------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["ema", "window"])
def test_stopper_finds_the_quietest_stretch(mode):
    """Outputs jitter less and less until step 150, then more: the minimum lies near 150."""
    gen = torch.Generator().manual_seed(0)
    stopper = VarianceStopper(EarlyStopping(window=20, patience=60, mode=mode), check_every=1)
    base = torch.rand(1, 3, 9, 7, generator=gen)
    ema = base.clone()
    stopped = None
    for it in range(1, 400):
        amplitude = 0.01 + abs(it - 150) / 150
        out = base + amplitude * torch.randn(base.shape, generator=gen)
        score = stopper.update(out, ema, it)
        assert math.isinf(float(score)) == (it <= 20)
        if stopper.should_stop(it):
            stopped = it
            break
    assert 125 <= stopper.best() <= 175, stopper.best()
    assert stopped == stopper.best() + 60


def _quiet_at(minimum: int, steps: int, lag: int, select=None):
    """A stopper fed outputs whose jitter is smallest at ``minimum``; the moving average is the iteration number."""
    gen = torch.Generator().manual_seed(0)
    stopper = VarianceStopper(EarlyStopping(window=5, patience=1000, **({"select": select} if select else {})))
    stopper._lag = lag
    for it in range(1, steps + 1):
        out = torch.rand(1, 1, 4, 4, generator=gen) * (0.01 + abs(it - minimum) / 100)
        stopper.update(out, torch.full((1, 1, 4, 4), float(it)), it)
    return stopper


def test_the_default_image_is_the_average_read_a_fifth_later_than_the_minimum():
    """The average trails the outputs: at the minimum it mostly holds older, worse outputs."""
    stopper = _quiet_at(minimum=40, steps=120, lag=30)
    best = stopper.best()
    assert 40 <= best <= 50  # the moving variance trails the quietest output by a few steps
    assert EarlyStopping().select is Selection.CENTRED_EMA
    assert float(stopper.image(torch.full((1, 1, 4, 4), 120.0)).mean()) == best + best // 5
    assert float(stopper.image(None, Selection.BEST_EMA).mean()) == best


def test_the_delay_is_at_most_the_average_lag():
    stopper = _quiet_at(minimum=40, steps=120, lag=3)
    assert float(stopper.image(torch.full((1, 1, 4, 4), 120.0)).mean()) == stopper.best() + 3


def test_a_fit_ending_before_the_delay_returns_its_last_average():
    stopper = _quiet_at(minimum=40, steps=45, lag=30)
    assert stopper.best() + stopper.best() // 5 > 45
    assert float(stopper.image(torch.full((1, 1, 4, 4), 45.0)).mean()) == 45.0


def test_the_average_lag_is_the_mean_age_of_its_terms():
    assert FitSettings().average_lag == 99 and FitSettings(ema_weight=0.9).average_lag == 9
    assert FitSettings(ema_weight=0.0).average_lag == 0


def test_window_variance_is_the_exact_variance_of_the_last_outputs():
    stopper = VarianceStopper(EarlyStopping(window=5, mode="window"))
    outs = [torch.rand(1, 2, 4, 3, generator=torch.Generator().manual_seed(i)) for i in range(8)]
    for it, out in enumerate(outs, 1):
        score = stopper.update(out, out, it)
    expected = torch.stack(outs[-5:]).var(dim=0, unbiased=False).mean()
    torch.testing.assert_close(score, expected)


@pytest.mark.parametrize("bad", [dict(window=0), dict(patience=-1), dict(mode="median"), dict(select="last")])
def test_bad_early_stopping_settings(bad):
    with pytest.raises(DipError):
        EarlyStopping(**bad)


def test_auto_stop_halts_near_the_psnr_peak(make_image, noisy):
    """On a noisy image the automatic stop halts before the cap, within 1 dB of the run's oracle peak."""
    # A small image: the small net starts fitting the noise within the cap. One thread: under load the
    # automatic thread count changes mid-fit, and with it the trajectory (the pure path stopped at 596 of 700
    # with one thread, at 545 with two).
    cap, clean = 1000, make_image(32)
    result = dip.restore(noisy(clean), network="small", reference=clean, progress=False, max_iterations=cap,
                         early_stopping=EarlyStopping(window=50, patience=150), threads=1)
    assert result.stop_reason is StopReason.AUTO_STOP and result.iterations <= cap  # stopped by itself
    assert result.settings["iterations"] == "auto"
    assert 50 < result.stopped_at <= result.iterations - 150
    assert len(result.history.variance) == result.iterations
    oracle = max(max(result.history.psnr_ema), max(result.history.psnr))
    assert result.psnr > oracle - 1.0, (result.psnr, oracle)
    assert result.psnr == pytest.approx(dip.psnr(result.image, clean), abs=1e-4)
    assert result.psnr > dip.psnr(noisy(clean), clean) + 3
    assert set(result.candidates) == {"centred_ema", "best_ema", "best_output", "blend", "ema"}
    torch.testing.assert_close(torch.from_numpy(result.image), torch.from_numpy(result.candidates["centred_ema"]))


def test_integer_iterations_mean_exactly_that_many(clean64):
    result = dip.restore(clean64, iterations=30, network="small", progress=False)
    assert result.iterations == result.stopped_at == 30 and result.stop_reason is StopReason.COMPLETED
    assert result.history.variance == [] and result.candidates == {}


@pytest.mark.parametrize("value", ["fast", 2.5, -3])
def test_bad_iterations(clean64, value):
    with pytest.raises(DipError, match="iterations"):
        dip.restore(clean64, iterations=value, network="small", progress=False)


# ---- divergence guard --------------------------------------------------------------------------


def _corrupt_at(iteration, how):
    fired = []

    def hook(step):  # once: after a rollback the fit passes this iteration again
        if step.iteration == iteration and not fired:
            fired.append(iteration)
            with torch.no_grad():
                head = step.network.head
                if how == "nan":
                    head.weight.fill_(float("nan"))
                else:  # saturate the sigmoid: every pixel white, a jump of the loss
                    head.bias.fill_(50.0)
    return hook


@pytest.mark.parametrize("how", ["nan", "jump"])
def test_guard_rolls_back_a_corrupted_fit(clean64, noisy, how):
    observed = noisy(clean64)
    result = dip.restore(observed, iterations=80, network="small", progress=False, reference=clean64,
                         callbacks=[_corrupt_at(40, how)])
    assert result.history.rollbacks == [41]
    assert result.stop_reason is StopReason.COMPLETED and result.iterations == 80
    assert np.isfinite(result.image).all() and all(math.isfinite(v) for v in result.history.loss)
    # the fit went on from the snapshot and kept improving
    assert result.history.loss[-1] < result.history.loss[39]


def test_without_the_guard_a_nan_stops_the_fit(clean64):
    result = dip.restore(clean64, iterations=80, network="small", progress=False, guard=False,
                         callbacks=[_corrupt_at(10, "nan")])
    # the NaN weights came from step 10's update: the fit hands back the last state known to be sound
    assert result.stop_reason is StopReason.DIVERGED and result.iterations <= 10
    assert result.history.rollbacks == [11]
    assert np.isfinite(result.image).all()


def test_guard_gives_up_after_max_rollbacks(clean64):
    def poison(step):  # corrupt after every step: every rollback fails again
        with torch.no_grad():
            step.network.head.weight.fill_(float("nan"))

    result = dip.restore(clean64, iterations=50, network="small", progress=False,
                         guard=GuardSettings(max_rollbacks=3, snapshot_every=1), callbacks=[poison])
    assert result.stop_reason is StopReason.DIVERGED and len(result.history.rollbacks) == 4
    assert np.isfinite(result.image).all()


# ---- checkpoints and resume --------------------------------------------------------------------


def _interrupt_at(iteration):
    def hook(step):
        if step.iteration == iteration:
            raise KeyboardInterrupt
    return hook


@pytest.mark.parametrize("select", [None, "best_ema", "weight_ema"])  # None: a fixed iteration count
def test_resume_equals_the_uninterrupted_run_bit_for_bit(clean64, noisy, tmp_path, select):
    observed = noisy(clean64)
    ckpt = tmp_path / "fit.ckpt"
    if select:  # a patience longer than the cap: the stopper's state (and weight average) crosses the checkpoint
        opts = dict(iterations="auto", max_iterations=60,
                    early_stopping=EarlyStopping(window=10, patience=500, select=select))
    else:
        opts = dict(iterations=60)
    opts.update(network="small", progress=False, seed=5, reference=clean64,
                guard=GuardSettings(snapshot_every=7))
    whole = dip.restore(observed, **opts)
    cut = dip.restore(observed, checkpoint=ckpt, checkpoint_every=20, callbacks=[_interrupt_at(47)], **opts)
    assert cut.interrupted and cut.iterations == 47 and ckpt.exists()
    assert not list(tmp_path.glob(".*tmp*"))
    resumed = dip.restore(observed, resume=ckpt, **opts)
    assert resumed.iterations == whole.iterations == 60
    np.testing.assert_array_equal(resumed.image, whole.image)
    np.testing.assert_array_equal(resumed.output, whole.output)
    assert resumed.history.loss == whole.history.loss
    assert resumed.history.psnr_ema == whole.history.psnr_ema
    assert resumed.history.variance == whole.history.variance
    assert resumed.stopped_at == whole.stopped_at
    assert resumed.candidates.keys() == whole.candidates.keys()
    for name in whole.candidates:
        np.testing.assert_array_equal(resumed.candidates[name], whole.candidates[name])
    for a, b in zip(resumed.network.state_dict().values(), whole.network.state_dict().values()):
        assert torch.equal(a, b)


def test_checkpoint_loads_with_weights_only(clean64, tmp_path):
    ckpt = tmp_path / "fit.ckpt"
    dip.restore(clean64, iterations=15, network="small", progress=False, checkpoint=ckpt, checkpoint_every=5)
    state = torch.load(ckpt, weights_only=True)
    assert state["iteration"] == 15 and state["meta"]["task"] == "denoise"  # the final state
    assert {"net", "optimizer", "z", "generator", "ema", "series", "monitors"} <= set(state)
    assert state["series"]["loss"].shape == (15,) and "guard" in state["monitors"]


def test_checkpoint_of_another_architecture_or_image_is_refused(clean64, make_image, tmp_path):
    ckpt = tmp_path / "fit.ckpt"
    dip.restore(clean64, iterations=12, network="small", progress=False, checkpoint=ckpt, checkpoint_every=2)
    other = dip.preset("small", channels_down=(8, 16, 32), channels_up=(8, 16, 32))
    with pytest.raises(DipError, match="different network architecture"):
        dip.restore(clean64, iterations=8, network=other, progress=False, resume=ckpt)
    with pytest.raises(DipError, match="64×64 image, this one is 48×64"):
        dip.restore(make_image((48, 64)), iterations=8, network="small", progress=False, resume=ckpt)
    with pytest.raises(DipError, match="different image"):
        dip.restore(clean64[::-1].copy(), iterations=8, network="small", progress=False, resume=ckpt)


def test_not_a_checkpoint(clean64, tmp_path):
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(DipError, match="not a readable dip checkpoint"):
        dip.restore(clean64, iterations=2, network="small", progress=False, resume=bad)
    with pytest.raises(DipError, match="not found"):
        dip.restore(clean64, iterations=2, network="small", progress=False, resume=tmp_path / "none.ckpt")


# ---- curves ------------------------------------------------------------------------------------


def test_plot_is_a_valid_png(clean64, noisy, tmp_path):
    pytest.importorskip("matplotlib")
    result = dip.restore(noisy(clean64), network="small", reference=clean64, progress=False, max_iterations=80,
                         early_stopping=EarlyStopping(window=10, patience=30), callbacks=[_corrupt_at(20, "nan")])
    path = result.plot(tmp_path / "curves.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as img:
        img.verify()
    with Image.open(path) as img:
        assert img.size[0] > 300 and img.size[1] > 300
    with pytest.raises(DipError, match="plot format"):
        result.plot(tmp_path / "curves.xyz")


# ---- the command line --------------------------------------------------------------------------


@pytest.fixture
def noisy_png(tmp_path, clean64, noisy):
    path = tmp_path / "noisy.png"
    Image.fromarray(dip.io.to_uint8(noisy(clean64))).save(path)
    return path


def test_cli_auto_plot_checkpoint_and_resume(noisy_png, tmp_path, capsys):
    from dip.cli import main

    out, ckpt, plot = tmp_path / "out.png", tmp_path / "fit.ckpt", tmp_path / "curves.png"
    args = ["denoise", str(noisy_png), "-o", str(out), "--network", "small", "-q", "--iterations", "auto",
            "--max-iterations", "30", "--checkpoint", str(ckpt), "--checkpoint-every", "10"]
    assert main(args + ["--plot", str(plot), "--reference", str(noisy_png)]) == 0
    text = capsys.readouterr().out
    assert "30 iterations" in text and "PSNR" in text and "curves.png" in text
    assert Image.open(out).size == (64, 64) and plot.read_bytes()[:4] == b"\x89PNG"
    assert torch.load(ckpt, weights_only=True)["iteration"] == 30  # the end of the fit is checkpointed too
    assert main(args + ["--resume", str(ckpt)]) == 0


def test_cli_rejects_bad_iterations_and_plot(noisy_png, tmp_path, capsys):
    from dip.cli import main

    with pytest.raises(SystemExit):
        main(["denoise", str(noisy_png), "-o", str(tmp_path / "o.png"), "--iterations", "soon"])
    assert main(["denoise", str(noisy_png), "-o", str(tmp_path / "o.png"), "--plot", str(tmp_path / "p.xyz")]) == 1
    assert "plot format" in capsys.readouterr().err


def test_sigint_writes_the_image_so_far_and_exits_130(noisy_png, tmp_path, interruptible):
    out, ckpt = tmp_path / "out.png", tmp_path / "fit.ckpt"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    # the progress bar stays on: tqdm's monitor thread must not swallow the signal
    proc = subprocess.Popen(
        [sys.executable, "-m", "dip.cli", "denoise", str(noisy_png), "-o", str(out), "--network", "small",
         "--iterations", "100000", "--checkpoint", str(ckpt), "--checkpoint-every", "5"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **interruptible)
    try:
        deadline = time.monotonic() + 240
        while not ckpt.exists():  # the fit has done at least 5 iterations once the checkpoint is there
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no checkpoint written in time"
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr
    assert "interrupted after" in stderr and "best image so far" in stderr
    assert "Traceback" not in stderr
    with Image.open(out) as img:
        img.verify()
    with Image.open(out) as img:
        assert img.size == (64, 64)
        assert np.asarray(img).std() > 0


def test_empty_and_unsafe_checkpoints_are_refused_with_a_reason(clean64, tmp_path):
    empty = tmp_path / "empty.ckpt"
    empty.write_bytes(b"")
    with pytest.raises(DipError, match="is empty, not a dip checkpoint"):
        dip.restore(clean64, iterations=2, network="small", progress=False, resume=empty)
    unsafe = tmp_path / "unsafe.ckpt"
    torch.save({"meta": {}, "payload": Path("x")}, unsafe)  # a foreign Python object inside
    with pytest.raises(DipError, match="holds Python objects other than tensors") as info:
        dip.restore(clean64, iterations=2, network="small", progress=False, resume=unsafe)
    assert "weights_only=False" not in str(info.value)


def test_an_existing_checkpoint_is_not_overwritten_unless_asked(clean64, tmp_path):
    ckpt = tmp_path / "fit.ckpt"
    dip.restore(clean64, iterations=12, network="small", progress=False, checkpoint=ckpt, checkpoint_every=2)
    before = ckpt.read_bytes()
    with pytest.raises(DipError, match="already holds a checkpoint; continue that fit with resume="):
        dip.restore(clean64, iterations=4, network="small", progress=False, checkpoint=ckpt, checkpoint_every=2)
    assert ckpt.read_bytes() == before
    dip.restore(clean64, iterations=4, network="small", progress=False, checkpoint=ckpt, checkpoint_every=2,
                overwrite_checkpoint=True)


def test_interrupt_writes_a_final_checkpoint(clean64, tmp_path):
    ckpt = tmp_path / "fit.ckpt"
    cut = dip.restore(clean64, iterations=50, network="small", progress=False, checkpoint=ckpt,
                      checkpoint_every=20, callbacks=[_interrupt_at(27)])
    assert cut.interrupted and torch.load(ckpt, weights_only=True)["iteration"] == 27


def test_the_interrupt_checkpoint_holds_the_sound_state_the_result_is_made_of(clean64, tmp_path):
    # Ctrl-C between two guard checks, after a step that corrupted the weights: the result was rolled back, but
    # the checkpoint was written before the rollback, with the NaN weights; resuming it rolled back to them again
    # and again and ended DIVERGED with a NaN image.
    ckpt, observed = tmp_path / "fit.ckpt", clean64[:16, :16]
    opts = dict(iterations=40, network="small", progress=False, checkpoint=ckpt, checkpoint_every=30)
    cut = dip.restore(observed, callbacks=[_corrupt_at(23, "nan"), _interrupt_at(25)], **opts)
    assert cut.interrupted and cut.history.rollbacks == [24] and np.isfinite(cut.image).all()
    state = torch.load(ckpt, weights_only=True)
    assert state["iteration"] == cut.iterations == 20
    assert all(torch.isfinite(v).all() for v in state["net"].values() if v.is_floating_point())
    assert state["monitors"]["guard"]["rollbacks"] == [24]
    resumed = dip.restore(observed, resume=ckpt, **opts)
    assert resumed.stop_reason is StopReason.COMPLETED and resumed.iterations == 40
    assert resumed.history.rollbacks == [24] and np.isfinite(resumed.image).all()


def test_a_checkpoint_of_other_fit_settings_is_refused(clean64, tmp_path):
    # resume= with another lr ran on at the checkpoint's lr (its optimizer state) while r.settings recorded the new
    # one; another seed or input_scale was ignored the same way (z and the generator come from the checkpoint).
    ckpt, observed = tmp_path / "fit.ckpt", clean64[:16, :16]
    opts = dict(iterations=8, network="small", progress=False)
    dip.restore(observed, checkpoint=ckpt, checkpoint_every=4, callbacks=[_interrupt_at(6)], **opts)
    with pytest.raises(DipError, match=r"written by a fit with lr=0.01 \(here 0.001\); resume with the same"):
        dip.restore(observed, resume=ckpt, lr=0.001, **opts)
    with pytest.raises(DipError, match=r"seed=0 \(here 3\)"):
        dip.restore(observed, resume=ckpt, seed=3, **opts)
    assert dip.restore(observed, resume=ckpt, **opts).iterations == 8
