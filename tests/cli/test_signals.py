"""SIGTERM, what schedulers and containers send, stops a single fit like Ctrl-C: best image written, exit 143."""
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")


def _wait_for_fit(proc, checkpoint, deadline: float) -> None:
    """Wait until the fit has run an iteration (its first checkpoint is on disk)."""
    while time.monotonic() < deadline:
        if checkpoint.exists():
            return
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    proc.kill()
    pytest.fail(f"the fit did not start in time: {proc.communicate()[1].decode(errors='replace')[-2000:]}")


@pytest.mark.parametrize("sig,status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_stops_the_fit_and_keeps_the_best_image(tmp_path, make_image, sig, status, interruptible):
    src, out, checkpoint = tmp_path / "in.png", tmp_path / "out.png", tmp_path / "fit.ckpt"
    Image.fromarray((make_image((24, 20)) * 255).astype(np.uint8)).save(src)
    before = src.read_bytes()
    proc = subprocess.Popen(
        [sys.executable, "-m", "dip.cli", "denoise", str(src), "-o", str(out), "--iterations", "100000",
         "--network", "small", "--device", "cpu", "-q", "--checkpoint", str(checkpoint), "--checkpoint-every", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, **interruptible)
    try:
        _wait_for_fit(proc, checkpoint, time.monotonic() + 240)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    err = err.decode(errors="replace")
    assert proc.returncode == status, err
    assert "interrupted after" in err and "holds the best image so far" in err and "Traceback" not in err
    assert f"--resume {checkpoint}" in err
    assert Image.open(out).size == (20, 24)
    assert src.read_bytes() == before


@pytest.mark.parametrize("disk", ["full", "fine"])
def test_interrupt_points_at_a_checkpoint_only_when_this_run_wrote_one(tmp_path, make_image, monkeypatch, capsys,
                                                                       disk):
    # After Ctrl-C the CLI said "continue with --resume CKPT" even when every checkpoint write had failed (a
    # failed write is a warning and the fit goes on): the file named did not exist, or held an older state.
    import torch

    import dip
    from dip.cli import main

    src, checkpoint = tmp_path / "in.png", tmp_path / "fit.ckpt"
    Image.fromarray((make_image((16, 16)) * 255).astype(np.uint8)).save(src)
    restore = dip.restore

    def interrupted_at_3(image, task, **options):
        def interrupt(step):
            if step.iteration == 3:
                raise KeyboardInterrupt
        return restore(image, task, **{**options, "callbacks": [*(options.get("callbacks") or []), interrupt]})

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(dip, "restore", interrupted_at_3)
    if disk == "full":
        monkeypatch.setattr(torch, "save", full_disk)
    code = main(["denoise", str(src), "-o", str(tmp_path / "out.png"), "--iterations", "50", "--network", "small",
                 "--device", "cpu", "-q", "--checkpoint", str(checkpoint), "--checkpoint-every", "100"])
    err = capsys.readouterr().err
    assert code == 130 and "interrupted after 3 iterations" in err, err
    if disk == "full":
        assert not checkpoint.exists() and "--resume" not in err, err
        assert f"this run wrote no checkpoint to {checkpoint}" in err
    else:
        assert f"continue from iteration 3 with --checkpoint {checkpoint} --resume {checkpoint}" in err, err
        assert torch.load(checkpoint, weights_only=True)["iteration"] == 3
