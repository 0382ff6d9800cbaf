"""A fit's result survives what can go wrong around it: checkpoints, raising callbacks, resumes, ensembles."""
import pytest
import torch

import dip
from dip.fit import StopReason


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
