"""The returned image: the moving average is bias-corrected, so an early stop does not return the grey start."""
import pytest
import torch
from torch import nn

from dip.fit import FitSettings
from dip.fit.loop import FitLoop


def _loop(weight: float) -> FitLoop:
    net = nn.Conv2d(1, 1, 1)
    z = torch.zeros(1, 1, 4, 4)
    return FitLoop(net, z, lambda x: x, z, FitSettings(iterations=500, ema_weight=weight), [])


@pytest.mark.parametrize("steps", [2, 30, 100])
def test_moving_average_forgets_the_first_output(steps):
    """One grey output then a constant one: the average weighs the grey one (1-w)·w^(k-1)/(1-w^k), not w^(k-1)."""
    w = 0.99
    loop = _loop(w)
    loss = torch.zeros(())
    loop._record(loss, torch.full((1, 1, 4, 4), 0.5))
    for _ in range(steps - 1):
        loop._record(loss, torch.ones(1, 1, 4, 4))
    first = (1 - w) * w ** (steps - 1) / (1 - w ** steps)
    torch.testing.assert_close(loop.ema, torch.full((1, 1, 4, 4), 1 - 0.5 * first))
    if steps == 100:  # the uncorrected average kept 0.5·0.99^99 ≈ 0.18 of grey here
        assert float(loop.ema.min()) > 0.99


def test_moving_average_is_the_weighted_mean_of_all_outputs():
    w = 0.9
    loop = _loop(w)
    outs = [torch.rand(1, 1, 4, 4, generator=torch.Generator().manual_seed(i)) for i in range(12)]
    for out in outs:
        loop._record(torch.zeros(()), out.clone())
    weights = torch.tensor([w ** (len(outs) - 1 - j) for j in range(len(outs))])
    expected = sum(wj * o for wj, o in zip(weights, outs)) / weights.sum()
    torch.testing.assert_close(loop.ema, expected)


def test_zero_weight_returns_the_last_output():
    loop = _loop(0.0)
    for i in range(3):
        loop._record(torch.zeros(()), torch.full((1, 1, 4, 4), float(i)))
    torch.testing.assert_close(loop.ema, torch.full((1, 1, 4, 4), 2.0))
