"""Operator tests: every test that runs on CUDA carries the ``cuda`` marker; TF32 is off while they run.

A test parametrized with a ``"cuda"`` device (as ``base.DEVICES`` or a file's
own ``DEVICES`` list gives) is marked here, so ``pytest -m cuda`` selects every
CUDA test whichever way its file spells the parameter. The fused kernels are
compared with references at float32 tolerances; cuDNN's default TF32
convolutions would make both sides round to 10 bits, differently.
"""
import pytest
import torch


def _runs_on_cuda(item) -> bool:
    callspec = getattr(item, "callspec", None)
    if callspec is None:
        return False
    return any((isinstance(v, str) and v == "cuda") or (isinstance(v, torch.device) and v.type == "cuda")
               for v in callspec.params.values())


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    for item in items:
        if "tests/ops/" in item.nodeid.replace("\\", "/") and _runs_on_cuda(item):
            item.add_marker(pytest.mark.cuda)


@pytest.fixture(autouse=True)
def _no_tf32():
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn
