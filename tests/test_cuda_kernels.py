"""The GPU kernel strings of optim._kernels_cuda, checked without a GPU.

1. Structure: 16 update kernels + 1 reduction, every parameter used, scalar names are
   fields of the CPU kernels' `Coefs`, CuPy stays optional.
2. nvcc: the CUDA source CuPy would generate for every kernel compiles for sm_75 and
   sm_90, float32 and float64, with every warning an error (skipped only without nvcc).
3. Execution: the same operation strings, compiled for the host with g++
   (tests/cuda_harness.py), against an independent NumPy reference (float64 math) and
   against the Cython CPU kernels, over random shapes and hyperparameters.

Tolerances: vs the float64 reference, float32 results must agree to 2e-5 and float64
to 1e-12, relative to the magnitude of the array (before or after the update; elements
may cancel to ~0). One float32 update rounds each of ~10 operations once (~6e-8 each),
far below 2e-5, while a formula error (a wrong coefficient, a misplaced decay or eps)
shows at 1e-3 or more. Against the Cython kernels, which evaluate the same expressions
in the same order and type with the same FP policy (-ffp-contract=off), results must be
bitwise equal when clipping is off; with clipping the two sums of squares are summed in
a different order, so the clip factor may differ in its last bit: 8 ulps of the scale.
"""
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict

import numpy
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import cuda_harness as ch
from optim import _kernels
from optim import _kernels_cuda as kc

ROOT = Path(__file__).resolve().parents[1]
DTYPES = [numpy.float32, numpy.float64]
NAMES = sorted(kc.KERNELS)
HAVE_NVCC = shutil.which("nvcc") is not None
HAVE_GXX = shutil.which("g++") is not None
needs_gxx = pytest.mark.skipif(not HAVE_GXX, reason="g++ is not on PATH: cannot run the "
                               "CUDA kernel strings on the host")
needs_nvcc = pytest.mark.skipif(not HAVE_NVCC, reason="nvcc is not on PATH: cannot "
                                "compile the CUDA kernels")
# No shrinking: a broken kernel fails 60+ cases, and shrinking each costs minutes.
HYPO = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow],
                phases=[Phase.explicit, Phase.reuse, Phase.generate])


def base_of(name: str) -> str:
    return name[len("optim_"):].replace("_avg", "").replace("_la", "")


# ---------------------------------------------------------------- structure


def test_every_variant_has_a_kernel():
    expected = set()
    for kind, rects in (("sgd", [False]), ("adam", [False]), ("radam", [False, True])):
        for rect in rects:
            for avg in (False, True):
                for la in (False, True):
                    expected.add(kc.kernel_name(kind, rect, avg, la))
    assert set(kc.KERNELS) == expected and len(expected) == 16
    assert kc.kernel_name("radam", True, True, False) == "optim_radam_rect_avg"
    with pytest.raises(ValueError, match="unknown update kind"):
        kc.kernel_name("adagrad", False, False, False)


def coef_fields() -> set:
    text = (ROOT / "optim" / "_loops.pxd").read_text()
    struct = re.search(r"cdef struct Coefs:(.*?)\n\n", text, re.S).group(1)
    return set(re.findall(r"^\s+(?:double|bint)\s+(\w+)", struct, re.M))


@pytest.mark.parametrize("name", NAMES)
def test_kernel_parameters_match_operation(name):
    spec = kc.KERNELS[name]
    used = set(ch.IDENTIFIER.findall(spec.operation))
    declared = [n for _, n in ch.parse_params(spec.in_params) + ch.parse_params(spec.out_params)]
    assert set(spec.scalars) | set(spec.arrays) == set(declared)
    assert set(declared) <= used, "every parameter is used"
    locals_and_builtins = {"const", "T", "g_eff", "w_new", "sqrt"}
    assert used - set(declared) <= locals_and_builtins, "no undeclared names"
    assert set(spec.scalars) <= coef_fields() | set(kc.DERIVED), "scalars come from Coefs"
    assert "i" not in declared  # CuPy reserves it
    for banned in ("?", "min(", "max(", "fabs", "pow(", "double", "float"):
        assert banned not in spec.operation, f"{banned!r} is dtype-ambiguous or mixes types"
    # the variant flags show in the parameters
    assert ("avg" in spec.arrays) == name.endswith(("_avg", "_avg_la"))
    assert ("slow" in spec.arrays) == name.endswith("_la")
    assert ("m" in spec.arrays) == (base_of(name) != "sgd")
    assert ("pre_decay" in spec.scalars) == base_of(name).startswith("radam")
    assert ("eps" in spec.scalars) == (base_of(name) in ("adam", "radam_rect"))


def test_formula_snippets_have_one_source():
    """Each formula is written once and shared by every variant that uses it."""
    for snippet in ("const T g_eff = (g + l2 * w) * clip_scale;",
                    "w_new = w_new - post_decay * w_new;",
                    "avg = avg - avg_rate * (avg - w_new);"):
        users = [n for n in NAMES if snippet in kc.KERNELS[n].operation]
        assert users and all(kc.KERNELS[n].operation.count(snippet) == 1 for n in users)
    assert sum("m / (sqrt(v) + eps)" in kc.KERNELS[n].operation for n in NAMES) == 8


def test_import_does_not_need_cupy():
    code = ("import sys; sys.modules['cupy'] = None\n"
            "import optim, optim._kernels_cuda as kc, numpy\n"
            "b = kc.CupyBackend()\n"
            "assert not b.is_array(numpy.zeros(3))\n"
            "try:\n    b.kernel('optim_adam')\nexcept ImportError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, check=True).stdout
    assert 'pip install "optim[cuda12x]"' in out


def test_missing_cupy_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)
    monkeypatch.setattr(kc, "_cupy", None)
    backend = kc.CupyBackend()
    for call in (lambda: backend.kernel("optim_sgd"), backend.reduction,
                 lambda: backend.zeros_like(None)):
        with pytest.raises(ImportError, match=r"optim\[cuda12x\]"):
            call()


def test_plan_update_arguments():
    w = numpy.ones(4, numpy.float32)
    g, m, v, avg = (numpy.zeros(4, numpy.float32) for _ in range(4))
    coefs = dict(lr=0.1, beta1=0.9, beta2=0.999, eps=1e-8, l2=0.0, clip_scale=1.0,
                 pre_decay=0.0, post_decay=0.0, rectified=True, avg_keep=0.5, la_alpha=0.5)
    spec, args = kc.plan_update("radam", coefs, w, g, m, v, avg, None)
    assert spec.name == "optim_radam_rect_avg"
    assert all(type(a) is numpy.float32 for a in args[:len(spec.scalars)])
    assert args[0] == numpy.float32(0.1)
    # 1 - beta is formed in double, then rounded (a float32 subtraction is biased)
    one_minus_beta1 = args[spec.scalars.index("one_minus_beta1")]
    assert one_minus_beta1 == numpy.float32(1.0 - 0.9) != numpy.float32(1) - numpy.float32(0.9)
    assert args[spec.scalars.index("avg_rate")] == numpy.float32(0.5)
    assert args[len(spec.scalars):] == [w, g, m, v, avg]
    with pytest.raises(TypeError, match="float32 or float64"):
        kc.plan_update("sgd", coefs, w.astype(numpy.float16), g, None, None, None, None)
    with pytest.raises(ValueError, match="needs array 'm'"):
        kc.plan_update("adam", coefs, w, g, None, None, None, None)


# ---------------------------------------------------------------- nvcc

def _nvcc(tmp_path: Path, source: str, tag: str) -> subprocess.CompletedProcess:
    cu = tmp_path / f"{tag}.cu"
    cu.write_text(source)
    return subprocess.run(ch.nvcc_command(cu, tmp_path / f"{tag}.o", [75, 90]),
                          capture_output=True, text=True)


@needs_nvcc
def test_nvcc_compiles_every_kernel(tmp_path):
    """One .cu per dtype (every kernel in its own namespace), both compiled in parallel."""
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda d: _nvcc(tmp_path, ch.cuda_module(d), d.__name__),
                                DTYPES))
    for dtype, res in zip(DTYPES, results):
        assert res.returncode == 0, f"nvcc failed for {dtype.__name__}:\n{res.stderr}"
    source = ch.cuda_module(numpy.float32)
    assert source.count('extern "C" __global__ void optim_') == 17
    assert "T &w = _raw_w[_ind.get()];" in source and "const T lr," in source
    assert "const T g = _raw_g[_in_ind.get()];" in source


@needs_nvcc
def test_nvcc_check_catches_broken_kernels(tmp_path):
    """The compile check fails on a type error and on a warning (an unused variable)."""
    spec = kc.KERNELS["optim_adam"]
    undeclared = spec.__class__(**{**spec.__dict__, "operation":
                                   spec.operation.replace("eps", "epsilon")})
    unused = spec.__class__(**{**spec.__dict__, "operation": spec.operation + "\nT spare = w;"})
    for i, bad in enumerate((undeclared, unused)):
        source = ch.CUDA_PRELUDE + ch.cuda_elementwise_source(bad, "float")
        res = _nvcc(tmp_path, source, f"bad{i}")
        assert res.returncode != 0


# ---------------------------------------------------------------- execution on the host


def reference_update(name: str, c: Dict[str, float], arrays: Dict[str, numpy.ndarray]
                     ) -> Dict[str, numpy.ndarray]:
    """docs/numerics.md, per element, in float64 NumPy; returns the updated arrays."""
    a = {k: x.astype(numpy.float64) for k, x in arrays.items()}
    base = base_of(name)
    w, g = a["w"], a["g"]
    g_eff = (g + c["l2"] * w) * c["clip_scale"]
    w_new = w.copy()
    if base != "sgd":
        a["m"] = c["beta1"] * a["m"] + (1 - c["beta1"]) * g_eff
        a["v"] = c["beta2"] * a["v"] + (1 - c["beta2"]) * g_eff ** 2
    if base.startswith("radam"):
        w_new = w_new - c["pre_decay"] * w
    if base == "sgd":
        w_new = w_new - c["lr"] * g_eff
    elif base == "radam_unrect":
        w_new = w_new - c["lr"] * a["m"]
    else:
        w_new = w_new - c["lr"] * (a["m"] / (numpy.sqrt(a["v"]) + c["eps"]))
    w_new = w_new - c["post_decay"] * w_new
    a["g"] = numpy.zeros_like(g)
    if "slow" in a:
        a["slow"] = a["slow"] + c["la_alpha"] * (w_new - a["slow"])
        w_new = a["slow"].copy()
    a["w"] = w_new
    if "avg" in a:
        a["avg"] = a["avg"] - (1 - c["avg_keep"]) * (a["avg"] - w_new)
    return a


shapes = st.lists(st.integers(0, 9), min_size=1, max_size=3).map(tuple)
unit = st.floats(0.0, 1.0)
coef_draws = st.fixed_dictionaries({
    "lr": st.one_of(st.just(0.0), st.floats(1e-4, 1.0)),
    "beta1": st.floats(0.0, 0.999), "beta2": st.floats(0.0, 0.9999),
    "eps": st.floats(1e-8, 0.1), "l2": st.one_of(st.just(0.0), st.floats(0.0, 0.5)),
    "clip_scale": st.floats(1e-3, 1.0), "pre_decay": st.floats(0.0, 0.2),
    "post_decay": st.floats(0.0, 0.2), "avg_keep": st.floats(0.1, 0.9999), "la_alpha": unit,
})


def random_arrays(spec: kc.KernelSpec, shape, dtype, seed: int, gscale: float):
    rng = numpy.random.default_rng(seed)
    out = {}
    for a in spec.arrays:
        x = rng.standard_normal(shape) * (gscale if a == "g" else 1.0)
        if a == "v":
            x = x * x * gscale * gscale
        out[a] = numpy.ascontiguousarray(x, dtype=dtype)
    return out


def assert_close(got: numpy.ndarray, want: numpy.ndarray, before: numpy.ndarray,
                 tol: float, what: str) -> None:
    scale = max(float(numpy.abs(want).max(initial=0)), float(numpy.abs(before).max(initial=0)),
                1e-30)
    err = float(numpy.abs(got.astype(numpy.float64) - want).max(initial=0))
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol:g} * {scale:.3g}"


@needs_gxx
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
@pytest.mark.parametrize("name", NAMES)
@HYPO
@given(shape=shapes, coefs=coef_draws, seed=st.integers(0, 2**32 - 1),
       gscale=st.sampled_from([1e-3, 0.1, 1.0, 10.0]))
def test_harness_matches_numpy_reference(name, dtype, shape, coefs, seed, gscale):
    spec = kc.KERNELS[name]
    arrays = random_arrays(spec, shape, dtype, seed, gscale)
    before = {k: x.copy() for k, x in arrays.items()}
    want = reference_update(name, coefs, before)
    coefs["rectified"] = base_of(name) == "radam_rect"
    kind = base_of(name).split("_")[0]
    got_spec, args = kc.plan_update(kind, coefs, arrays["w"], arrays["g"], arrays.get("m"),
                                    arrays.get("v"), arrays.get("avg"), arrays.get("slow"))
    assert got_spec is spec
    ch.harness(dtype).update(spec, args)
    tol = 2e-5 if dtype is numpy.float32 else 1e-12
    for a in spec.arrays:
        assert arrays[a].dtype == dtype and arrays[a].shape == shape
        assert_close(arrays[a], want[a], before[a], tol, f"{name}/{a}")
    assert not arrays["g"].any(), "the kernel zeroes the gradient"


@needs_gxx
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
@HYPO
@given(shape=shapes, l2=st.one_of(st.just(0.0), st.floats(0.0, 1.0)),
       seed=st.integers(0, 2**32 - 1))
def test_harness_sum_squares(dtype, shape, l2, seed):
    rng = numpy.random.default_rng(seed)
    g = rng.standard_normal(shape).astype(dtype)
    w = rng.standard_normal(shape).astype(dtype)
    got = ch.harness(dtype).sum_squares(g, w, l2)
    terms = (g + dtype(l2) * w).astype(numpy.float64)  # each term formed in T
    want = float((terms * terms).sum())
    assert abs(got - want) <= 1e-12 * max(want, 1e-300)
    assert (got == 0.0) == (want == 0.0)


# ---------------------------------------------------------------- vs the Cython kernels


def make_hyper(kind: str, h: dict, lookahead: bool, grad_clip: float) -> "_kernels.Hyper":
    hyper = _kernels.Hyper()
    hyper.learn_rate = h["lr"]
    hyper.beta1 = 0.0 if kind == "sgd" else h["beta1"]
    hyper.beta2 = 0.0 if kind == "sgd" else h["beta2"]
    hyper.eps = h["eps"]
    hyper.L2 = h["L2"]
    hyper.L2_is_weight_decay = h["decoupled"]
    hyper.grad_clip = grad_clip
    hyper.weight_decay = h["weight_decay"]
    hyper.lookahead_alpha = h["la_alpha"]
    hyper.lookahead_k = 1 if lookahead else 0
    hyper.use_radam = kind.startswith("radam")
    return hyper


hyper_draws = st.fixed_dictionaries({
    "lr": st.floats(1e-4, 0.5), "beta1": st.floats(0.0, 0.99), "eps": st.floats(1e-8, 1e-2),
    "L2": st.one_of(st.just(0.0), st.floats(1e-4, 0.1)), "decoupled": st.booleans(),
    "weight_decay": st.one_of(st.just(0.0), st.floats(1e-4, 0.1)), "la_alpha": unit,
})


@needs_gxx
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
@pytest.mark.parametrize("name", NAMES)
@HYPO
@given(shape=shapes, h=hyper_draws, seed=st.integers(0, 2**32 - 1),
       grad_clip=st.sampled_from([0.0, 0.5, 5.0]), lr_scale=st.floats(0.1, 2.0),
       t_early=st.integers(1, 4), b2=st.floats(0.0, 0.9999))
def test_harness_matches_cython_kernels(name, dtype, shape, h, seed, grad_clip, lr_scale,
                                        t_early, b2):
    """Same arrays, same per-call scalars (from optim._kernels.coefs): same numbers."""
    base = base_of(name)
    kind = base.split("_")[0]
    if base == "radam_rect":
        h["beta2"], t = 0.7 + 0.29 * b2, 500  # rho_inf > 5, rho_t ~ rho_inf: rectified
    elif base == "radam_unrect":
        h["beta2"], t = b2, 1  # rho_1 = 1 < 5 for every beta2
    else:
        h["beta2"], t = max(b2, 1e-3), t_early  # both betas 0 would select SGD
    lookahead, averages = name.endswith("_la"), "_avg" in name
    hyper = make_hyper(base, h, lookahead, grad_clip)
    spec = kc.KERNELS[name]
    cpu = random_arrays(spec, shape, dtype, seed, 1.0)
    dev = {k: x.copy() for k, x in cpu.items()}

    _kernels.step(hyper, "key", cpu["w"], cpu["g"], cpu.get("m"), cpu.get("v"),
                  cpu.get("avg"), cpu.get("slow"), t, lr_scale)

    coefs = _kernels.coefs(hyper, t, lr_scale)
    assert coefs["kind"] == kind and coefs["lookahead_sync"] == lookahead
    if grad_clip > 0:
        sumsq = ch.harness(dtype).sum_squares(dev["g"], dev["w"], coefs["l2"])
        coefs["clip_scale"] = _kernels.clip_scale(sumsq, grad_clip)
    got_spec, args = kc.plan_update(kind, coefs, dev["w"], dev["g"], dev.get("m"),
                                    dev.get("v"), dev.get("avg") if averages else None,
                                    dev.get("slow") if lookahead else None)
    assert got_spec is spec, (got_spec.name, name)
    ch.harness(dtype).update(spec, args)
    for a in spec.arrays:
        if grad_clip == 0:
            numpy.testing.assert_array_equal(dev[a], cpu[a], err_msg=f"{name}/{a}")
        else:
            assert_close(dev[a], cpu[a].astype(numpy.float64), cpu[a],
                         8 * float(numpy.finfo(dtype).eps), f"{name}/{a}")
