"""A fit's result survives what can go wrong around it: checkpoints, raising callbacks, resumes, ensembles."""
import math
import sys

import numpy as np
import pytest
import torch

import dip
from dip.fit import EarlyStopping, StopReason


@pytest.fixture
def small(make_image, noisy):
    """A 16×16 noisy image and its clean version: fits of a few dozen steps take a second."""
    clean = make_image(16)
    return noisy(clean), clean


def _corrupt_at(iteration):
    fired = []

    def hook(step):  # once: after a rollback the fit passes this iteration again
        if step.iteration == iteration and not fired:
            fired.append(iteration)
            with torch.no_grad():
                step.network.head.weight.fill_(float("nan"))
    return hook


def _sound(state) -> bool:
    weights = [v for v in state["net"].values() if v.is_floating_point()]
    return all(torch.isfinite(v).all() for v in weights) and bool(torch.isfinite(state["series"]["loss"]).all())


# ---- 1. periodic checkpoints hold only states the guard has checked ------------------------------


def test_a_periodic_checkpoint_never_holds_a_step_the_guard_has_not_checked(small, tmp_path):
    # checkpoint_every=15 with the guard checking every 10: the checkpoint of step 15 held the NaN weights of
    # step 14 (and the NaN loss of step 15); a process killed then left a checkpoint whose resume rolled back
    # to those same weights again and again.
    observed, _ = small
    ckpt, seen = tmp_path / "fit.ckpt", {}

    def snapshot(step):  # what a process killed before this step would have left on disk
        if ckpt.exists():
            state = torch.load(ckpt, weights_only=True)
            seen[int(state["iteration"])] = _sound(state)

    result = dip.restore(observed, iterations=40, network="small", progress=False, checkpoint=ckpt,
                         checkpoint_every=15, callbacks=[_corrupt_at(14), snapshot])
    assert result.history.rollbacks == [15] and result.stop_reason is StopReason.COMPLETED
    assert seen and all(seen.values()), seen
    assert all(i % 10 == 0 for i in seen)  # written at the guard's checks only


def test_checkpoints_come_at_the_first_check_after_each_multiple(small, tmp_path):
    observed, _ = small
    ckpt, written = tmp_path / "fit.ckpt", []

    def watch(step):
        if ckpt.exists():
            i = int(torch.load(ckpt, weights_only=True)["iteration"])
            if not written or written[-1] != i:
                written.append(i)

    dip.restore(observed, iterations=70, network="small", progress=False, checkpoint=ckpt, checkpoint_every=15,
                callbacks=[watch])
    assert written == [20, 30, 50, 60]  # the first checks at or after 15, 30, 45, 60


# ---- 2. an exception escaping the fit leaves its state in the checkpoint --------------------------


class Boom(RuntimeError):
    pass


def test_a_callback_that_raises_leaves_a_checkpoint_and_the_exception_propagates(small, tmp_path, caplog):
    observed, _ = small
    ckpt = tmp_path / "fit.ckpt"
    opts = dict(iterations=20, network="small", progress=False, seed=3)

    def broken(step):
        if step.iteration == 7:
            raise Boom("the user's bug")

    with pytest.raises(Boom, match="the user's bug") as caught:
        dip.restore(observed, checkpoint=ckpt, checkpoint_every=100, callbacks=[broken], **opts)
    # a note on the exception (Python 3.11+), else a warning on the dip logger
    told = getattr(caught.value, "__notes__", []) if sys.version_info >= (3, 11) else [caplog.text]
    assert any("resume=" in note for note in told)
    state = torch.load(ckpt, weights_only=True)
    assert state["iteration"] == 7 and _sound(state)
    resumed = dip.restore(observed, resume=ckpt, **opts)
    whole = dip.restore(observed, **opts)
    assert resumed.iterations == 20 and resumed.stop_reason is StopReason.COMPLETED
    np.testing.assert_array_equal(resumed.image, whole.image)  # the exception lost nothing


def test_a_raising_callback_after_a_bad_step_checkpoints_the_rolled_back_state(small, tmp_path):
    observed, _ = small
    ckpt = tmp_path / "fit.ckpt"

    def broken(step):
        if step.iteration == 25:
            raise Boom("late")

    with pytest.raises(Boom):
        dip.restore(observed, iterations=40, network="small", progress=False, checkpoint=ckpt, checkpoint_every=100,
                    callbacks=[_corrupt_at(22), broken])
    state = torch.load(ckpt, weights_only=True)
    assert state["iteration"] == 20 and _sound(state) and state["monitors"]["guard"]["rollbacks"] == [23]


def test_an_exception_that_cuts_an_update_short_keeps_the_last_sound_checkpoint(small, tmp_path, monkeypatch):
    # Out of memory halfway through Adam's update: the weights are half-written. The checkpoint of the failure
    # must not hold them: the guard restores its sound copy first (iteration 0 here), which is older than the
    # periodic checkpoint of iteration 20, so that one stays.
    observed, _ = small
    ckpt, calls = tmp_path / "fit.ckpt", []
    step = torch.optim.Adam.step

    def failing_step(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 25:
            with torch.no_grad():
                self.param_groups[0]["params"][0].fill_(float("nan"))
            raise RuntimeError("out of memory (simulated)")
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", failing_step)
    with pytest.raises(RuntimeError, match="out of memory"):
        dip.restore(observed, iterations=40, network="small", progress=False, checkpoint=ckpt, checkpoint_every=10)
    state = torch.load(ckpt, weights_only=True)
    assert state["iteration"] == 20 and _sound(state)


def test_an_exception_without_a_checkpoint_propagates_unchanged(small):
    observed, _ = small

    def broken(step):
        raise Boom("first step")

    with pytest.raises(Boom, match="first step"):
        dip.restore(observed, iterations=5, network="small", progress=False, callbacks=[broken])


# ---- 3. a finished fit's checkpoint resumes to its result, taking no steps -----------------------


@pytest.mark.parametrize("stop", ["auto", "noise"])
def test_resuming_a_finished_fit_returns_its_result_without_steps(small, tmp_path, stop):
    observed, _ = small
    ckpt = tmp_path / "fit.ckpt"
    if stop == "auto":  # stops by itself well before the cap (70 fused, 150 on the pure path)
        opts = dict(max_iterations=300, early_stopping=EarlyStopping(window=10, patience=20))
        reason = StopReason.AUTO_STOP
    else:
        opts = dict(iterations=100, noise_sigma=0.2)
        reason = StopReason.NOISE_LEVEL
    opts.update(network="small", progress=False)
    first = dip.restore(observed, checkpoint=ckpt, checkpoint_every=10, **opts)
    assert first.stop_reason is reason  # ended by itself, before its cap
    steps = []
    again = dip.restore(observed, resume=ckpt, callbacks=[lambda s: steps.append(s.iteration)], **opts)
    assert steps == []
    assert again.stop_reason is reason and again.iterations == first.iterations
    assert again.stopped_at == first.stopped_at
    np.testing.assert_array_equal(again.image, first.image)
    assert again.history.loss == first.history.loss


def test_a_callback_stop_leaves_a_checkpoint_that_resumes_to_the_end(small, tmp_path):
    observed, _ = small
    ckpt = tmp_path / "fit.ckpt"
    opts = dict(iterations=30, network="small", progress=False)
    cut = dip.restore(observed, checkpoint=ckpt, checkpoint_every=100,
                      callbacks=[lambda s: s.iteration == 13], **opts)
    assert cut.stop_reason is StopReason.CALLBACK and torch.load(ckpt, weights_only=True)["iteration"] == 13
    resumed = dip.restore(observed, resume=ckpt, **opts)
    assert resumed.stop_reason is StopReason.COMPLETED and resumed.iterations == 30


# ---- 4. ensembles: what callbacks see, and the PSNR of the returned mean -------------------------


def test_an_ensembles_psnr_history_is_that_of_the_returned_mean(small):
    # The history recorded the members' pooled-MSE PSNR, 0.1 dB (raw outputs: 0.7 dB) below the mean image's.
    observed, clean = small
    shapes = []
    result = dip.restore(observed, iterations=30, network="small", progress=False, ensemble=2, reference=clean,
                         callbacks=[lambda s: shapes.append((tuple(s.output.shape), tuple(s.ema.shape)))])
    assert shapes[-1] == ((2, 3, 16, 16), (2, 3, 16, 16))  # Step: one image per member
    assert result.history.psnr_ema[-1] == pytest.approx(result.psnr, abs=1e-3)
    assert result.history.psnr[-1] == pytest.approx(dip.psnr(result.output, clean), abs=1e-3)
    assert all(math.isfinite(v) for v in result.history.psnr)


# ---- checkpoint files that cannot be written ----------------------------------------------------


def test_a_checkpoint_in_a_missing_folder_is_refused_before_the_fit(small, tmp_path):
    # The first write, checkpoint_every steps into the fit, raised and lost the fit so far.
    observed, _ = small
    steps = []
    with pytest.raises(dip.DipError, match="does not exist"):
        dip.restore(observed, iterations=30, network="small", progress=False, checkpoint=tmp_path / "no" / "fit.ckpt",
                    checkpoint_every=10, callbacks=[lambda s: steps.append(s.iteration)])
    assert steps == []


def _stand_in_loop():
    """What Checkpointer.write reads of a fit: its iteration and state (a real network and Adam, one step taken)."""
    from types import SimpleNamespace

    net = torch.nn.Conv2d(3, 3, 3)
    optimizer = torch.optim.Adam(net.parameters(), lr=0.01)
    net(torch.ones(1, 3, 8, 8)).square().mean().backward()
    optimizer.step()
    loop = SimpleNamespace(done=10, net=net, optimizer=optimizer)
    loop.state_dict = lambda: {"iteration": loop.done, "net": net.state_dict(), "optimizer": optimizer.state_dict()}
    return loop


@pytest.mark.parametrize("corrupt, what", [
    (lambda loop: loop.net.weight.data.view(-1)[3].fill_(float("nan")), "weight.weight"),
    (lambda loop: loop.net.bias.data.fill_(float("inf")), "weight.bias"),
    (lambda loop: next(iter(loop.optimizer.state.values()))["exp_avg_sq"].fill_(float("nan")), "optimizer state"),
])
def test_a_checkpoint_of_non_finite_weights_is_not_written(tmp_path, caplog, corrupt, what):
    # The guard vets a state by the next loss, which a checkpoint write does not wait for: NaN weights (or a NaN
    # in Adam's moments) were written over the last good checkpoint, and a resume started from them.
    from dip.fit.monitors import Checkpointer

    ckpt, loop = tmp_path / "fit.ckpt", _stand_in_loop()
    writer = Checkpointer(ckpt, every=10)
    writer.write(loop)
    assert writer.written_at == 10 and torch.load(ckpt, weights_only=True)["iteration"] == 10
    loop.done = 20
    corrupt(loop)
    with caplog.at_level("WARNING", logger="dip"):
        writer.write(loop)
    assert writer.written_at == 10 and torch.load(ckpt, weights_only=True)["iteration"] == 10  # the previous kept
    message = " ".join(r.getMessage() for r in caplog.records if r.name == "dip")
    assert f"at iteration 20: {what}" in message and "not finite" in message, message
    assert "the checkpoint of iteration 10 is kept" in message
    assert [p.name for p in tmp_path.iterdir()] == ["fit.ckpt"]


def test_a_full_disk_keeps_the_previous_checkpoint_and_the_fit(small, tmp_path, monkeypatch, caplog):
    # A checkpoint write that failed (no space left) raised out of the fit: the result of a long run was lost.
    import errno

    observed, _ = small
    ckpt, save, calls = tmp_path / "fit.ckpt", torch.save, []

    def full_disk(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) > 1:
            with open(f, "wb") as out:
                out.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    with caplog.at_level("WARNING", logger="dip"):
        result = dip.restore(observed, iterations=40, network="small", progress=False, checkpoint=ckpt,
                             checkpoint_every=10)
    assert result.stop_reason is StopReason.COMPLETED and result.iterations == 40
    assert len(calls) == 4  # at 10 (written), 20, 30 and the end (failed)
    state = torch.load(ckpt, weights_only=True)
    assert state["iteration"] == 10 and _sound(state)
    assert [p.name for p in tmp_path.iterdir()] == ["fit.ckpt"]  # no temporaries left behind
    assert any("iteration 10" in r.getMessage() and "No space left" in r.getMessage() for r in caplog.records)
