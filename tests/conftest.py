"""Shared fixtures: small natural test images made from scikit-image's bundled data."""
import signal

import numpy as np
import pytest
import torch
from PIL import Image

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


def _astronaut(size):
    from skimage import data

    face = Image.fromarray(data.astronaut()[30:250, 120:340])
    if isinstance(size, int):
        size = (size, size)
    return np.asarray(face.resize((size[1], size[0]), Image.LANCZOS), dtype=np.float32) / 255.0


@pytest.fixture
def clean64():
    """A 64×64 RGB crop of a natural photograph, float32 in [0, 1]."""
    return _astronaut(64)


@pytest.fixture
def make_image():
    """Factory: a natural RGB image of the given (H, W), float32 in [0, 1]."""
    return _astronaut


def add_noise(img, sigma=25 / 255, seed=0):
    rng = np.random.default_rng(seed)
    return np.clip(img + rng.normal(0, sigma, img.shape), 0, 1).astype(np.float32)


@pytest.fixture
def noisy():
    return add_noise


def _sigint_as_default():
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture
def interruptible():
    """``Popen`` keywords for a child that SIGINT reaches even when the test runner was started with SIGINT
    ignored (a background job of a non-interactive shell: the child would inherit the ignore)."""
    return {"preexec_fn": _sigint_as_default}
