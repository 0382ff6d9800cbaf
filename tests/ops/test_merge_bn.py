"""The fused merge (cat along channels + BatchNorm2d) against its reference (``torch.cat`` + ``F.batch_norm``)."""
from __future__ import annotations

import pytest
import torch
from base import check_fake_rejects, run_isolated
from torch import nn

from dip._extension import has_op
from dip.ops.merge_bn import concat_members, merge_bn, merge_bn_reference

pytestmark = pytest.mark.skipif(
    not has_op("merge_bn"),
    reason="compiled dip ops not loaded (run `python setup.py build_ext --inplace`; unset DIP_DISABLE_EXTENSION)",
)

TOL = {torch.float64: 1e-10, torch.float32: 2e-4}
# (N, skip channels, upsampled channels, H, W[, groups]): odd sizes, a 1-channel part, the hourglass's 4 + 128,
# and grouped merges (seed ensembles: K members' channels side by side, concatenated member by member).
CASES = [(1, 4, 128, 9, 7), (2, 1, 5, 3, 5), (2, 3, 2, 1, 1), (2, 4, 16, 6, 11),
         (1, 16, 64, 9, 7, 4), (2, 2, 6, 5, 3, 2), (2, 3, 3, 4, 5, 3)]


def _inputs(case, dtype, layout="channels_last"):
    n, ca, cb, h, w = case[:5]
    g = torch.Generator().manual_seed(sum(case))
    a = torch.randn(n, ca, h, w, generator=g, dtype=dtype) * 3 + 1
    b = torch.randn(n, cb, h, w, generator=g, dtype=dtype) - 2
    if layout == "channels_last":
        a, b = (t.contiguous(memory_format=torch.channels_last) for t in (a, b))
    elif layout == "sliced":  # views with gaps between channels
        a = torch.repeat_interleave(a, 2, dim=1)[:, ::2]
        b = torch.cat([b, b], dim=3)[..., :w]
    bn = nn.BatchNorm2d(ca + cb).to(dtype)
    with torch.no_grad():
        bn.weight.copy_(torch.rand(ca + cb, generator=g, dtype=dtype) + 0.5)
        bn.bias.copy_(torch.randn(ca + cb, generator=g, dtype=dtype))
    return a, b, bn


def _run(fn, a, b, bn, training=True, groups=1):
    return fn(a, b, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.num_batches_tracked, training,
              bn.momentum, bn.eps, groups)


def _groups(case):
    return case[5] if len(case) > 5 else 1


@pytest.mark.parametrize("layout", ["channels_last", "nchw", "sliced"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_matches_reference_forward_backward_and_running_stats(case, dtype, layout):
    a, b, bn = _inputs(case, dtype, layout)
    bn_ref = nn.BatchNorm2d(bn.num_features).to(dtype)
    bn_ref.load_state_dict(bn.state_dict())
    a1, b1 = a.detach().requires_grad_(), b.detach().requires_grad_()
    a2, b2 = a.detach().requires_grad_(), b.detach().requires_grad_()
    out = _run(merge_bn, a1, b1, bn, groups=_groups(case))
    expected = _run(merge_bn_reference, a2, b2, bn_ref, groups=_groups(case))
    tol = TOL[dtype]
    torch.testing.assert_close(out, expected, rtol=tol, atol=tol)
    grad = torch.randn_like(expected)
    got = torch.autograd.grad(out, (a1, b1, bn.weight, bn.bias), grad)
    want = torch.autograd.grad(expected, (a2, b2, bn_ref.weight, bn_ref.bias), grad)
    scale = max(1.0, max(w.abs().max().item() for w in want))
    for name, x, y in zip(("a", "b", "weight", "bias"), got, want):
        torch.testing.assert_close(x, y, rtol=tol, atol=tol * scale, msg=name)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(bn, name), getattr(bn_ref, name), rtol=tol, atol=tol, msg=name)


@pytest.mark.parametrize("case", [CASES[0], CASES[4]], ids=["single", "grouped"])
def test_eval_mode_uses_running_stats(case):
    a, b, bn = _inputs(case, torch.float64)
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    before = bn.running_mean.clone()
    groups = _groups(case)
    out = _run(merge_bn, a, b, bn, training=False, groups=groups)
    expected = _run(merge_bn_reference, a, b, bn, training=False, groups=groups)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    assert torch.equal(bn.running_mean, before)


def test_concat_members_puts_each_members_channels_together():
    a, b = torch.arange(6.0).view(1, 6, 1, 1), 100 + torch.arange(4.0).view(1, 4, 1, 1)
    order = concat_members(a, b, 2).flatten().tolist()
    assert order == [0, 1, 2, 100, 101, 3, 4, 5, 102, 103]
    assert torch.equal(concat_members(a, b), torch.cat([a, b], dim=1))


@pytest.mark.parametrize("groups", [1, 2])
def test_gradcheck_training_and_eval(groups):
    a, b, bn = _inputs((1, 2, 4, 3, 4), torch.float64)
    args = [t.detach().requires_grad_() for t in (a, b, bn.weight, bn.bias)]
    rm, rv = torch.rand(6, dtype=torch.float64), torch.rand(6, dtype=torch.float64) + 0.5
    for training in (True, False):
        def f(a, b, w, bias, training=training):
            return torch.ops.dip.merge_bn(a, b, w, bias, rm, rv, training, 1e-5, groups)[0]

        assert torch.autograd.gradcheck(f, tuple(args))


@pytest.mark.parametrize("case", [CASES[1], CASES[5]], ids=["single", "grouped"])
def test_opcheck(case):
    a, b, bn = _inputs(case, torch.float32)
    groups = _groups(case)
    args = (a, b, bn.weight.detach(), bn.bias.detach(), bn.running_mean, bn.running_var, True, 1e-5, groups)
    torch.library.opcheck(torch.ops.dip.merge_bn.default, args)
    grad_args = (a.requires_grad_(), b, bn.weight.detach().requires_grad_(), bn.bias.detach()) + args[4:]
    torch.library.opcheck(torch.ops.dip.merge_bn.default, grad_args)
    out, mean, var = torch.ops.dip.merge_bn(*args)
    back = (torch.randn_like(out), a.detach(), b, mean, var, bn.weight.detach(), True, 1e-5, groups)
    torch.library.opcheck(torch.ops.dip.merge_bn_backward.default, back)


def test_torch_compile_fullgraph():
    a, b, bn = _inputs(CASES[3], torch.float32)
    a.requires_grad_()

    def f(a, b, w, bias):
        return torch.ops.dip.merge_bn(a, b, w, bias, None, None, True, 1e-5)[0]

    out = torch.compile(f, fullgraph=True)(a, b, bn.weight, bn.bias)
    torch.testing.assert_close(out, f(a, b, bn.weight, bn.bias))
    out.square().sum().backward()
    assert a.grad is not None and bn.weight.grad is not None


def test_bad_arguments():
    a, b, bn = _inputs(CASES[1], torch.float32)
    with pytest.raises(RuntimeError, match="spatial size"):
        torch.ops.dip.merge_bn(a, b[..., :2], bn.weight, bn.bias, None, None, True, 1e-5)
    with pytest.raises(RuntimeError, match="elements"):
        torch.ops.dip.merge_bn(a, b, bn.weight[:3], bn.bias[:3], None, None, True, 1e-5)
    with pytest.raises(RuntimeError, match="eval mode"):
        torch.ops.dip.merge_bn(a, b, bn.weight, bn.bias, None, None, False, 1e-5)
    with pytest.raises(RuntimeError, match="groups"):  # 2 groups do not divide a's 1 channel
        torch.ops.dip.merge_bn(a, b, bn.weight, bn.bias, None, None, True, 1e-5, 2)


def test_backward_with_mismatched_or_channelless_inputs_does_not_crash():
    """Bug: merge_bn_backward checked grad_out's shape against a only. A b with a smaller batch than a was read
    past its end (SIGSEGV), and an a with no channels divided by zero (pixels = numel / 0: SIGFPE). Now the first
    is a RuntimeError and the second gives the reference's gradients (a merge with an empty part is defined)."""
    code = """if True:
        import torch
        from dip.ops.merge_bn import merge_bn_reference  # loads the op and registers its autograd
        back, d = torch.ops.dip.merge_bn_backward, torch.float64
        a, b = torch.randn(2, 3, 4, 5, dtype=d), torch.randn(2, 3, 4, 5, dtype=d)
        go, mean, var, gamma = torch.randn(2, 6, 4, 5, dtype=d), torch.zeros(6, dtype=d), torch.ones(6, dtype=d), \\
            torch.ones(6, dtype=d)
        try:
            back(go, a, b[:1], mean, var, gamma, True, 1e-5, 1)
        except RuntimeError as e:
            assert "inputs must agree in batch and spatial size" in str(e), str(e)
        else:
            raise AssertionError("no error")
        for training in (True, False):
            a0 = torch.randn(2, 0, 4, 5, dtype=d, requires_grad=True)
            b1 = torch.randn(2, 3, 4, 5, dtype=d, requires_grad=True)
            w = (torch.rand(3, dtype=d) + 0.5).requires_grad_()
            rm, rv = torch.randn(3, dtype=d), torch.rand(3, dtype=d) + 0.5
            out = torch.ops.dip.merge_bn(a0, b1, w, torch.zeros(3, dtype=d), rm, rv, training, 1e-5, 1)[0]
            ref = merge_bn_reference(a0, b1, w, torch.zeros(3, dtype=d), rm.clone(), rv.clone(), None, training,
                                     0.0, 1e-5)
            grad = torch.randn_like(ref)
            got, expected = torch.autograd.grad(out, (b1, w), grad), torch.autograd.grad(ref, (b1, w), grad)
            assert (out - ref).abs().max() < 1e-12
            assert all((g - e).abs().max() < 1e-12 for g, e in zip(got, expected))
        print("ok")
    """
    res = run_isolated(code)
    assert res.returncode == 0 and res.stdout.strip() == "ok", (res.returncode, res.stderr[-2000:])


@pytest.mark.parametrize("shape", [(0, 4, 5), (2, 0, 5), (2, 4, 0)], ids=["N=0", "H=0", "W=0"])
def test_empty_inputs_give_the_empty_result_in_eval_mode_and_a_clear_error_in_training(shape):
    """Bug: every empty input was refused with "merge_bn: empty input", though in eval mode (running statistics)
    the merge of no pixels is defined; training mode, whose batch statistics of no pixels are not, now says so."""
    n, h, w = shape
    a = torch.randn(n, 3, h, w, dtype=torch.float64, requires_grad=True)
    b = torch.randn(n, 4, h, w, dtype=torch.float64, requires_grad=True)
    gamma, beta = torch.rand(7, dtype=torch.float64) + 0.5, torch.randn(7, dtype=torch.float64)
    rm, rv = torch.randn(7, dtype=torch.float64), torch.rand(7, dtype=torch.float64) + 0.5
    out, mean, var = torch.ops.dip.merge_bn(a, b, gamma, beta, rm, rv, False, 1e-5, 1)
    assert out.shape == (n, 7, h, w) and torch.equal(mean, rm) and torch.equal(var, rv)
    ga, gb = torch.autograd.grad(out.sum(), (a, b))
    assert ga.shape == a.shape and gb.shape == b.shape
    with pytest.raises(RuntimeError, match=r"training mode \(batch statistics\) needs at least one pixel"):
        torch.ops.dip.merge_bn(a, b, gamma, beta, None, None, True, 1e-5, 1)


def test_backward_rejects_statistics_and_inputs_that_do_not_match():
    """Bug: the backward never checked mean, var and the BatchNorm weight: shorter ones were read past their end
    (garbage gradients, no error), b of another spatial size or batch gave gradients silently, and dtype mismatches
    failed as "expected scalar type Double but found Float" or "not implemented for 'Long'"."""
    d = torch.float64
    a, b = torch.randn(2, 3, 4, 5, dtype=d), torch.randn(2, 3, 4, 5, dtype=d)
    good = [torch.randn(2, 6, 4, 5, dtype=d), a, b, torch.zeros(6, dtype=d), torch.ones(6, dtype=d),
            torch.ones(6, dtype=d), True, 1e-5, 1]
    bad_cases = [
        (3, torch.zeros(2, dtype=d), "mean must be a 1-D tensor of 6 elements"),
        (4, torch.ones(2, dtype=d), "var must be a 1-D tensor of 6 elements"),
        (5, torch.ones(3, dtype=d), "BatchNorm weight must be a 1-D tensor of 6 elements"),
        (3, torch.zeros(6), "mean must have the inputs' dtype"),
        (0, good[0].float(), "grad_out must have the inputs' dtype"),
        (2, torch.randn(2, 3, 4, 9, dtype=d), "inputs must agree in batch and spatial size"),
        (2, torch.randn(9, 3, 4, 5, dtype=d), "inputs must agree in batch and spatial size"),
        (2, b.float(), "both inputs must have one dtype"),
        (1, a.long(), "only float32 and float64"),
        (1, a[0], "inputs must be N x C x H x W"),
    ]
    for index, value, match in bad_cases:
        bad = list(good)
        bad[index] = value
        with pytest.raises(RuntimeError, match=match):
            torch.ops.dip.merge_bn_backward(*bad)


def test_one_value_per_channel_in_training_raises_the_value_error_of_batch_norm():
    """Bug: with one pixel (N=1, 1x1) in training mode the op normalised by a variance of 0 and returned the
    BatchNorm bias, where F.batch_norm (the reference) raises ValueError "Expected more than 1 value per channel
    when training". Now the op raises the same ValueError, so merge_bn does with or without the extension; and its
    backward in training mode refuses the one-pixel and the empty batch the forward refuses (it returned gradients)."""
    d = torch.float64
    gamma, beta = torch.rand(7, dtype=d) + 0.5, torch.randn(7, dtype=d)
    rm, rv = torch.randn(7, dtype=d), torch.rand(7, dtype=d) + 0.5
    a, b = torch.randn(1, 3, 1, 1, dtype=d), torch.randn(1, 4, 1, 1, dtype=d)
    for fn in (merge_bn, merge_bn_reference):
        with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
            fn(a, b, gamma, beta, rm.clone(), rv.clone(), None, True, 0.1, 1e-5)
    with pytest.raises(ValueError, match="merge_bn: Expected more than 1 value per channel when training"):
        torch.ops.dip.merge_bn(a, b, gamma, beta, None, None, True, 1e-5, 1)
    for n, error, pattern in [(1, ValueError, "Expected more than 1 value"), (0, RuntimeError, "at least one pixel")]:
        a, b = torch.randn(n, 3, 1, 1, dtype=d), torch.randn(n, 4, 1, 1, dtype=d)
        out, mean, var = torch.ops.dip.merge_bn(a, b, gamma, beta, rm, rv, False, 1e-5, 1)  # eval: defined
        torch.ops.dip.merge_bn_backward(out, a, b, mean, var, gamma, False, 1e-5, 1)
        with pytest.raises(error, match="merge_bn_backward: .*" + pattern):
            torch.ops.dip.merge_bn_backward(out, a, b, mean, var, gamma, True, 1e-5, 1)


def test_fake_kernels_reject_what_the_kernels_reject():
    """Bug: the fake kernels checked nothing, so torch.compile and torch.export traced bad arguments and only the
    real kernel refused them (or a wrong shape propagated). Now they make the kernels' checks, in the same words."""
    d = torch.float64
    a, b = torch.randn(2, 3, 4, 5, dtype=d), torch.randn(2, 4, 4, 5, dtype=d)
    g, bt, rm, rv = torch.ones(7, dtype=d), torch.zeros(7, dtype=d), torch.zeros(7), torch.ones(7)
    fwd = [a, b, g, bt, rm, rv, False, 1e-5, 1]
    cases = []
    for index, value, error, pattern in [
        (0, a[0], RuntimeError, "inputs must be N x C x H x W"),
        (1, b[:, :, :3], RuntimeError, "inputs must agree in batch and spatial size"),
        (0, a.long(), RuntimeError, "only float32 and float64"),
        (1, b.float(), RuntimeError, "both inputs must have one dtype"),
        (8, 2, RuntimeError, r"groups \(2\) must be positive and divide"),
        (2, g[:6], RuntimeError, "the BatchNorm weight must be a 1-D tensor of 7 elements"),
        (3, bt.float(), RuntimeError, "the BatchNorm bias must have the inputs' dtype"),
        (4, None, RuntimeError, "eval mode needs running_mean and running_var"),
        (5, rv.long(), RuntimeError, "running_var must be floating point"),
    ]:
        args = list(fwd)
        args[index] = value
        cases.append((args, error, pattern))
    one = [a[:1, :, :1, :1], b[:1, :, :1, :1], g, bt, None, None, True, 1e-5, 1]
    cases.append((one, ValueError, "merge_bn: Expected more than 1 value per channel when training"))
    empty = [a[:0], b[:0], g, bt, None, None, True, 1e-5, 1]
    cases.append((empty, RuntimeError, r"merge_bn: training mode \(batch statistics\) needs at least one pixel"))
    check_fake_rejects(torch.ops.dip.merge_bn.default, cases)
    back = [torch.randn(2, 7, 4, 5, dtype=d), a, b, torch.zeros(7, dtype=d), torch.ones(7, dtype=d), g, True, 1e-5, 1]
    cases = []
    for index, value, pattern in [(0, torch.randn(2, 6, 4, 5, dtype=d), "grad_out must be N x 7 x H x W"),
                                  (0, back[0].float(), "grad_out must have the inputs' dtype"),
                                  (3, torch.zeros(6, dtype=d), "mean must be a 1-D tensor of 7 elements"),
                                  (4, torch.ones(7), "var must have the inputs' dtype")]:
        args = list(back)
        args[index] = value
        cases.append((args, RuntimeError, pattern))
    check_fake_rejects(torch.ops.dip.merge_bn_backward.default, cases)
