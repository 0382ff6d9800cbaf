"""The shared vocabulary: tasks, stop reasons, settings, and module names that nothing shadows."""
import importlib

import pytest

import dip
from dip.errors import DipError
from dip.fit import FitSettings, Precision, StopReason
from dip.tasks import Task, task_defaults


def test_documented_spellings_resolve():
    # dip.fit used to be the function `fit`, hiding the module and dip.fit.Step (issue 10, bug 5).
    assert importlib.import_module("dip.fit") is dip.fit
    assert dip.fit.Step.__name__ == "Step"
    assert callable(dip.fit.fit)
    assert callable(dip.restore) and dip.restore.__module__ == "dip.pipeline"


@pytest.mark.parametrize("name, task", [("sr", Task.SUPER_RESOLUTION), ("super-resolve", Task.SUPER_RESOLUTION),
                                        ("Denoising", Task.DENOISE), (" inpaint ", Task.INPAINT),
                                        (Task.CUSTOM, Task.CUSTOM)])
def test_task_aliases(name, task):
    assert Task.parse(name) is task


def test_unknown_task_is_one_clear_line():
    with pytest.raises(DipError, match="unknown task 'deblur'; choose one of"):
        Task.parse("deblur")


def test_task_defaults_follow_the_original_work():
    assert task_defaults("sr", 8).iterations == 4000 and task_defaults(Task.SUPER_RESOLUTION, 4).iterations == 2000
    assert task_defaults("inpaint").network == "inpaint"


def test_settings_validate_and_fill_defaults():
    s = FitSettings(iterations="auto").for_task(task_defaults("denoise"))
    assert s.auto and s.budget == 3000 and s.reg_noise_std == pytest.approx(1 / 30)
    assert FitSettings(iterations=7).budget == 7
    assert FitSettings(precision="BFLOAT16").precision is Precision.BFLOAT16
    d = s.to_dict()
    assert d["precision"] == "float32" and d["early_stopping"]["window"] == 100


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(iterations=0), "iterations must be a positive integer"),
    (dict(lr="0.01"), "learning rate"),
    (dict(lr=-1.0), "learning rate"),
    (dict(ema_weight=1.0), "ema_weight"),
    (dict(reg_noise_std=float("nan")), "reg_noise_std"),
    (dict(noise_sigma=-0.1), "noise_sigma"),
    (dict(noise_sigma=25), r"noise_sigma \(in \[0, 1\] units, e.g. 25/255\) must be in \(0, 1\], got 25"),
    (dict(input_scale=0), "input_scale"),
    (dict(seed=2 ** 70), "64 bits"),
    (dict(seed=1.5), "seed"),
    (dict(precision="half"), "precision"),
])
def test_settings_refuse_bad_values(kwargs, fragment):
    with pytest.raises(DipError, match=fragment):
        FitSettings(**kwargs)


def test_a_noise_sigma_in_0_255_units_is_refused_not_a_fit_that_stops_at_once(clean64):
    # noise_sigma=25 (0–255 units) was accepted: its discrepancy stop (loss ≤ 625) ended the fit at iteration 10.
    with pytest.raises(DipError, match=r"noise_sigma .* must be in \(0, 1\], got 25"):
        dip.restore(clean64[:16, :16], noise_sigma=25, network="small", iterations=20, progress=False)
    assert FitSettings(noise_sigma=1).noise_sigma == 1.0


def test_early_stopping_words_parse_in_any_case():
    # EarlyStopping(select="BEST_EMA") was refused while precision, objective and task parse in any case.
    from dip.fit import EarlyStopping, Selection, StopMode

    es = EarlyStopping(select=" Best_EMA ", mode="WINDOW")
    assert es.select is Selection.BEST_EMA and es.mode is StopMode.WINDOW
    with pytest.raises(DipError, match="early stopping select must be one of"):
        EarlyStopping(select="last")


def test_numpy_integers_are_integers():
    np = pytest.importorskip("numpy")
    assert FitSettings(iterations=np.int64(5)).budget == 5


def test_stop_reason_is_an_enum_with_the_old_values():
    assert StopReason("diverged") is StopReason.DIVERGED
    assert str(StopReason.AUTO_STOP) == "auto stop"
