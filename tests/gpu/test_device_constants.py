"""The constants the Cython kernels, the Python code and the generated CUDA source share
(non-finite modes, outcomes, statuses, the bits of what a step_many call asks), and the
step_many engine's segmentation (optim/cuda/engine.py), without a device."""
import re

import numpy
import pytest

from optim import _kernels
from optim.cuda import _tables as _device
from optim import _kernels_cuda as kc
from optim.cuda import engine as cupy_many


def hyper(kind="adam", **values):
    h = _kernels.Hyper()
    h.learn_rate, h.eps = 0.01, 1e-8
    h.beta1, h.beta2 = (0.0, 0.0) if kind == "sgd" else (0.9, 0.999)
    h.use_radam = kind == "radam"
    for name, value in values.items():
        setattr(h, name, value)
    return h


def test_nonfinite_modes_and_outcomes_are_plain_ints_with_their_names():
    modes = (_kernels.NONFINITE_APPLY, _kernels.NONFINITE_SKIP, _kernels.NONFINITE_RAISE)
    assert all(type(m) is int for m in modes) and len(set(modes)) == 3
    assert [_kernels.NONFINITE_MODES[m] for m in modes] == ["apply", "skip", "raise"]
    outcomes = (_kernels.OUTCOME_UPDATED, _kernels.OUTCOME_NAN, _kernels.OUTCOME_INF,
                _kernels.OUTCOME_FROZEN)
    assert all(type(o) is int for o in outcomes) and len(set(outcomes)) == 4
    assert _kernels.OUTCOME_UPDATED == 0  # "nothing found" reads as false


@pytest.mark.parametrize("mode", ["apply", "skip", "raise"])
def test_the_optimizer_stores_the_named_mode(mode):
    import optim

    opt = optim.Adam(0.001, nonfinite=mode)
    assert opt._hyper.nonfinite == getattr(_kernels, "NONFINITE_" + mode.upper())


def test_ask_bits_are_distinct_bits_as_device_coef_table_reports_them():
    bits = [_device.HAS_FROZEN, _device.HAS_SKIP, _device.HAS_RAISE, _device.HAS_CLIP,
            _device.HAS_MIXED_KERNELS]
    assert all(type(b) is int and b > 0 and b & (b - 1) == 0 for b in bits)
    assert len(set(bits)) == len(bits)
    cases = [
        ([hyper()], 0),
        ([hyper(frozen=True), hyper()], _device.HAS_FROZEN),
        ([hyper(nonfinite=_kernels.NONFINITE_SKIP)], _device.HAS_SKIP),
        ([hyper(nonfinite=_kernels.NONFINITE_RAISE, grad_clip=1.0)],
         _device.HAS_RAISE | _device.HAS_CLIP),
        ([hyper(), hyper("sgd")], _device.HAS_MIXED_KERNELS),
    ]
    for hypers, want in cases:
        n = len(hypers)
        out = numpy.empty((n, _device.DEVICE_ROW))
        mask = _device.device_coef_table(hypers, list(range(n)), [1] * n, 1.0, out,
                                         numpy.empty(n, numpy.uint8))
        assert mask == want
        check = out[:, kc.SLOT["check"]]
        assert list(check) == [float(h.nonfinite if not h.frozen else
                                     _kernels.NONFINITE_APPLY) for h in hypers]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_the_cuda_source_defines_the_shared_values(dtype):
    source = kc.cuda_source(dtype)
    defines = dict(re.findall(r"^#define (OPTIM_\w+) (\S+)$", source, re.M))
    assert float(defines["OPTIM_CHECK_APPLY"]) == _kernels.NONFINITE_APPLY
    for name, value in (("GO", _device.DEVICE_GO), ("FROZEN", _device.DEVICE_FROZEN),
                        ("NAN", _device.DEVICE_NAN), ("INF", _device.DEVICE_INF),
                        ("OUT", _device.DEVICE_OUT)):
        assert float(defines["OPTIM_" + name]) == value
    for name, slot in kc.SLOT.items():
        if name != "clip":
            assert int(defines["OPTIM_S_" + name.upper()]) == slot
    # the check slot is compared by name only
    assert "check == 0.0" not in source and "check != 0.0" not in source


# ---------------------------------------------------------------- segments

def rows_for(hypers, windows=None):
    n = len(hypers)
    return cupy_many.coefficient_rows(hypers, list(range(n)), [1] * n, 1.0, windows)


def test_one_dtype_and_kernel_make_one_segment_of_everyone():
    rows = rows_for([hyper(), hyper(learn_rate=0.5)])
    assert cupy_many.segments(rows, ["float32"] * 2, None) == [
        cupy_many.Segment("float32", (kc.kernel_code("optim_adam"),), None)]


def test_segments_by_dtype_and_kernel_frozen_tensors_join_the_first_of_their_dtype():
    adam, sgd = kc.kernel_code("optim_adam"), kc.kernel_code("optim_sgd")
    hypers = [hyper(), hyper("sgd"), hyper(frozen=True), hyper(), hyper(frozen=True),
              hyper(frozen=True)]
    dtypes = ["float32", "float32", "float32", "float64", "float64", "float16"]
    rows = rows_for(hypers)
    got = cupy_many.segments(rows, dtypes, None)
    assert got == [cupy_many.Segment("float32", (adam,), [0, 2]),
                   cupy_many.Segment("float32", (sgd,), [1]),
                   cupy_many.Segment("float64", (adam,), [3, 4]),
                   cupy_many.Segment("float16", (sgd,), [5])]  # a frozen dtype's own: sgd
    kernel = rows.table[:, kc.SLOT["kernel"]]
    assert list(kernel[[2, 4, 5]]) == [adam, adam, sgd]  # each names its segment's kernel


def test_a_window_whose_counts_run_two_kernels_is_a_segment_of_both():
    # lookahead every 2 updates: counts 1, 2 of a window run optim_adam and optim_adam_la
    la = hyper(lookahead_k=2, lookahead_alpha=0.5, nonfinite=_kernels.NONFINITE_SKIP)
    plain = hyper(nonfinite=_kernels.NONFINITE_SKIP)
    rows = rows_for([la, plain], windows=[(1, 2, -1), (1, 1, -1)])
    assert rows.first_extra == {0: 2} and rows.counted
    assert len(rows.table) == 3
    got = cupy_many.segments(rows, ["float32"] * 2, [(1, 2, -1), (1, 1, -1)])
    adam, adam_la = kc.kernel_code("optim_adam"), kc.kernel_code("optim_adam_la")
    assert got == [cupy_many.Segment("float32", (adam, adam_la), [0]),
                   cupy_many.Segment("float32", (adam,), [1])]
