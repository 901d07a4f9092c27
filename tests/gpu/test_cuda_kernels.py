"""The GPU kernels of optim._kernels_cuda, checked without a GPU.

1. Structure: 16 update variants generated from one set of formula snippets, each a
   `__device__` function used by its one-tensor and its many-tensor entry point; every
   scalar comes from the CPU kernels' `Coefs`; CuPy stays optional.
2. nvcc: the RawModule source for float32 and float64 compiles for sm_75 and sm_90 with
   every warning an error (skipped only without nvcc).
3. Execution: the same source, compiled for the host by g++ with CUDA's execution model
   emulated (tests/cuda_harness.py: threads, warps, shuffles, atomics), against an
   independent NumPy reference (float64 math) and, bitwise, against the Cython kernels
   and the NumPy spelling of the clip norm's summation order - clipping included, on
   two block sizes and several grids.

Tolerances: vs the float64 reference, float32 results must agree to 2e-5 and float64
to 1e-12, relative to the magnitude of the array (before or after the update; elements
may cancel to ~0). One float32 update rounds each of ~10 operations once (~6e-8 each),
far below 2e-5, while a formula error (a wrong coefficient, a misplaced decay or eps)
shows at 1e-3 or more. Against the Cython kernels there is no tolerance: same
expressions, same order, same type, same FP policy (no FMA), and the clip norm in the
same fixed order on both sides.
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
import fake_cupy as fc
import reference
from children import needs_mprotect, run_unreadable
from optim import _kernels
from optim.cuda import _tables as _device
from optim import _kernels_cuda as kc
from optim.cuda import cupy as cupy_backend

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = Path(_kernels.__file__).resolve().parent  # the installed optim/ (it ships .pxd)
DTYPES = [numpy.float32, numpy.float64]
NAMES = sorted(kc.KERNELS)
HAVE_NVCC = shutil.which("nvcc") is not None
HAVE_GXX = shutil.which("g++") is not None
needs_gxx = pytest.mark.skipif(not HAVE_GXX, reason="g++ is not on PATH: cannot run the "
                               "CUDA kernels on the host")
needs_nvcc = pytest.mark.skipif(not HAVE_NVCC, reason="nvcc is not on PATH: cannot "
                                "compile the CUDA kernels")
# No shrinking: a broken kernel fails 60+ cases, and shrinking each costs minutes.
HYPO = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow],
                phases=[Phase.explicit, Phase.reuse, Phase.generate])
# Sizes around the clip norm's chunk (4096) and the 32 lanes.
EDGE_SIZES = [1, 31, 33, 4095, 4096, 4097, 2 * 4096 + 5, 32 * 4096, 32 * 4096 + 1,
              33 * 4096 + 7]


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
    assert set(kc.ENTRY_POINTS) == ({n for n in NAMES} | {n + "_many" for n in NAMES}
                                    | {"optim_clip_norm", "optim_clip_norm_many"})
    for dtype in DTYPES:  # the harness reads the same signatures from the source
        assert ch.entry_points(kc.cuda_source(dtype)) == kc.ENTRY_POINTS
    # device_coefs' variant bits pick the kernel: rectified | lookahead_sync << 1
    assert kc.variant_kernels("radam", True) == (
        "optim_radam_unrect_avg", "optim_radam_rect_avg", "optim_radam_unrect_avg_la",
        "optim_radam_rect_avg_la")


def coef_fields() -> set:
    text = (PACKAGE / "cpu" / "_loops.pxd").read_text()
    struct = re.search(r"cdef struct Coefs:(.*?)\n\n", text, re.S).group(1)
    return set(re.findall(r"^\s+(?:double|bint)\s+(\w+)", struct, re.M))


@pytest.mark.parametrize("name", NAMES)
def test_kernel_parameters_match_operation(name):
    spec = kc.KERNELS[name]
    used = set(ch.IDENTIFIER.findall(spec.operation))
    assert set(spec.scalars) | set(spec.arrays) <= used, "every parameter is used"
    locals_and_builtins = {"const", "T", "g_eff", "w_new", "sqrt"}
    assert used - set(spec.scalars) - set(spec.arrays) <= locals_and_builtins
    assert set(kc.COEFS) <= coef_fields(), "the device coefficients are Coefs fields"
    assert set(spec.scalars) <= set(kc.SCALAR_FORMS)
    for banned in ("?", "min(", "max(", "fabs", "pow(", "double", "float"):
        assert banned not in spec.operation, f"{banned!r} is dtype-ambiguous or mixes types"
    # the variant flags show in the arrays and scalars
    assert ("avg" in spec.arrays) == name.endswith(("_avg", "_avg_la"))
    assert ("slow" in spec.arrays) == name.endswith("_la")
    assert ("m" in spec.arrays) == (base_of(name) != "sgd")
    assert ("pre_decay" in spec.scalars) == base_of(name).startswith("radam")
    assert ("eps" in spec.scalars) == (base_of(name) in ("adam", "radam_rect"))
    # the one-tensor entry point takes every coefficient, the clip factor, its arrays, n
    params = kc.ENTRY_POINTS[name]
    assert [p for _, p in params] == (list(kc.COEFS) + ["clip_factor"]
                                      + ["p_" + a for a in spec.arrays] + ["n"])


def test_formula_snippets_have_one_source():
    """Each formula is written once, in the variant's __device__ function, which both
    entry points call; the scalars are formed from the double coefficients once."""
    source = kc.cuda_source(numpy.float32)
    for snippet in ("const T g_eff = (g + l2 * w) * clip_scale;",
                    "w_new = w_new - post_decay * w_new;",
                    "avg = avg - avg_rate * (avg - w_new);",
                    "const T one_minus_beta2 = T(1.0 - c[OPTIM_C_BETA2]);"):
        users = [n for n in NAMES if snippet in kc.cuda_source(numpy.float32).split(
            f"void {n}_op(")[1].split("\n}\n")[0]]
        assert users, snippet
        assert source.count(snippet) == len(users), "written once per variant function"
    assert source.count("m / (sqrt(v) + eps)") == 8
    for name in NAMES:
        assert source.count(f"{name}_op(c, clip,") == 2, "both entry points use the op"
    assert source.count("__shfl_down_sync") == 1, "one lane tree, for chunks and tensors"
    assert "atomicCAS(" in source and "atomicAdd(" not in source  # integer tickets only


def test_import_does_not_need_cupy():
    code = ("import sys; sys.modules['cupy'] = None\n"
            "import optim, optim.cuda.cupy, optim._kernels_cuda as kc, numpy\n"
            "b = optim.cuda.cupy.CupyBackend()\n"
            "assert not b.is_array(numpy.zeros(3))\n"
            "src = kc.cuda_source('float32')\n"
            "try:\n    b.function('float32', 'optim_adam')\nexcept ImportError as e:\n"
            "    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT / "tests", check=True).stdout
    assert 'pip install "thinc-optim[cuda12x]"' in out


def test_missing_cupy_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)
    monkeypatch.setattr(cupy_backend, "_cupy", None)
    backend = cupy_backend.CupyBackend()
    for call in (lambda: backend.function("float32", "optim_sgd"), backend.ensure_available,
                 lambda: backend.zeros_like(None)):
        with pytest.raises(ImportError, match=r"optim\[cuda12x\]"):
            call()


def test_device_coefs_are_the_cpu_coefs():
    """The doubles the GPU kernels get are exactly the CPU kernels' Coefs."""
    hyper = _kernels.Hyper()
    hyper.learn_rate, hyper.beta1, hyper.beta2, hyper.eps = 0.01, 0.9, 0.99, 1e-7
    hyper.L2, hyper.L2_is_weight_decay, hyper.use_radam = 0.01, False, True
    hyper.weight_decay, hyper.lookahead_k, hyper.lookahead_alpha = 0.02, 3, 0.4
    hyper.grad_clip = 0.7
    table = numpy.zeros((40, kc.ROW))
    variants = numpy.zeros(40, dtype=numpy.uint8)
    ncoefs = len(kc.COEFS)
    for hypers in (hyper, [hyper] * 40):  # one Hyper for all, or one per key
        mask = _device.device_coef_table(hypers, list(range(40)), list(range(1, 41)), 0.5,
                                          table, variants)
        assert mask == 8 | 16  # clipping; several kernels (rectified or not, sync or not)
        for t in range(1, 41):
            coefs = _kernels.coefs(hyper, t, 0.5)
            got = _device.device_coefs(hyper, t, 0.5)
            bits = int(coefs["rectified"]) | 2 * coefs["lookahead_sync"]
            assert got[0] == bits == variants[t - 1]
            assert list(got[1:]) == [coefs[name] for name in kc.COEFS] == list(
                table[t - 1, :ncoefs])
            slots = dict(zip(kc.SLOTS, table[t - 1, ncoefs:]))
            assert slots == {"clip": 1.0, "grad_clip": 0.7, "status": kc.GO, "check": 0.0,
                             "kernel": 2 * 4 + bits, "t": t, "pick": t - 1, "extra": 0.0,
                             "window": 1.0, "counter": -2.0}
            assert kc.code_kernel(int(slots["kernel"]), True) == kc.kernel_name(
                "radam", coefs["rectified"], True, coefs["lookahead_sync"])
    assert set(variants) == {0, 1, 2, 3}
    with pytest.raises(ValueError, match="key 'k': lr_scale"):
        _device.device_coefs(hyper, 1, -1.0, "k")
    with pytest.raises(ValueError, match="key 3: update count"):
        _device.device_coef_table(hyper, [3], [0], 1.0, table[:1], variants[:1])


# ---------------------------------------------------------------- nvcc

def _nvcc(tmp_path: Path, source: str, tag: str) -> subprocess.CompletedProcess:
    cu = tmp_path / f"{tag}.cu"
    cu.write_text(source)
    return subprocess.run(ch.nvcc_command(cu, tmp_path / f"{tag}.o", [75, 90]),
                          capture_output=True, text=True)


@needs_nvcc
def test_nvcc_compiles_every_kernel(tmp_path):
    """The RawModule source for each dtype, both compiled in parallel."""
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda d: _nvcc(tmp_path, ch.cuda_module(d), d.__name__),
                                DTYPES))
    for dtype, res in zip(DTYPES, results):
        assert res.returncode == 0, f"nvcc failed for {dtype.__name__}:\n{res.stderr}"
    source = ch.cuda_module(numpy.float32)
    assert source.count('extern "C" __global__ void optim_') == len(kc.ENTRY_POINTS) == 34
    assert "typedef float T;" in source and "typedef double T;" in ch.cuda_module(
        numpy.float64)


@needs_nvcc
def test_nvcc_check_catches_broken_kernels(tmp_path):
    """The compile check fails on a type error and on a warning (an unused variable)."""
    source = ch.cuda_module(numpy.float32)
    undeclared = source.replace("m / (sqrt(v) + eps)", "m / (sqrt(v) + epsilon)", 1)
    unused = source.replace("T w_new = w;", "T w_new = w; T spare = w;", 1)
    for i, bad in enumerate((undeclared, unused)):
        assert bad != source
        assert _nvcc(tmp_path, bad, f"bad{i}").returncode != 0


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


def random_arrays(arrays, shape, dtype, seed: int, gscale: float):
    rng = numpy.random.default_rng(seed)
    out = {}
    for a in arrays:
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
       gscale=st.sampled_from([1e-3, 0.1, 1.0, 10.0]), grid=st.integers(1, 3))
def test_update_kernel_matches_numpy_reference(name, dtype, shape, coefs, seed, gscale,
                                               grid):
    """The one-tensor entry point, launched as CupyBackend launches it."""
    spec = kc.KERNELS[name]
    arrays = random_arrays(spec.arrays, shape, dtype, seed, gscale)
    before = {k: x.copy() for k, x in arrays.items()}
    want = reference_update(name, coefs, before)
    n = int(numpy.prod(shape))
    args = ([float(coefs[c]) for c in kc.COEFS] + [numpy.array([coefs["clip_scale"]])]
            + [arrays[a] for a in spec.arrays] + [n])
    ch.harness(dtype).launch(name, grid, 32, args)
    tol = 2e-5 if dtype is numpy.float32 else 1e-12
    for a in spec.arrays:
        assert arrays[a].dtype == dtype and arrays[a].shape == shape
        assert_close(arrays[a], want[a], before[a], tol, f"{name}/{a}")
    assert not arrays["g"].any(), "the kernel zeroes the gradient"


def launch_norm(dtype, g, w, l2, grad_clip, grid, block):
    """optim_clip_norm on the host; returns (clip factor, ticket after)."""
    n = g.size
    partials = numpy.full(max(kc.n_chunks(n), 1), numpy.nan)
    ticket = numpy.zeros(1, dtype=numpy.uint64)
    clip = numpy.full(1, numpy.nan)
    ch.harness(dtype).launch("optim_clip_norm", grid, block,
                             [g, w, float(l2), float(grad_clip), n, partials, ticket, 1, clip])
    return clip[0], int(ticket[0])


@needs_gxx
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
@pytest.mark.parametrize("n", EDGE_SIZES)
def test_clip_norm_kernel_is_the_cpu_order(dtype, n):
    """The device clip factor is the CPU's bit for bit, on any grid and block size,
    and the counter is left at 0 for the next launch."""
    rng = numpy.random.default_rng(n)
    g = (rng.standard_normal(n) * rng.uniform(0.01, 3.0, n)).astype(dtype)
    w = rng.standard_normal(n).astype(dtype)
    l2 = 0.03
    sumsq = _kernels.clip_sum_squares(g, w, l2)
    assert sumsq == reference.clip_sum_squares(g, w, l2)
    for grad_clip in (0.5, 2.0 * numpy.sqrt(sumsq)):  # clips; does not clip
        want = _kernels.clip_scale(sumsq, grad_clip)
        for grid, block in ((1, 32), (2, 64), (3, 96)):
            got, counter = launch_norm(dtype, g, w, l2, grad_clip, grid, block)
            assert got == want, (grid, block, got, want)
            assert counter == 0
    assert want == 1.0 and _kernels.clip_scale(sumsq, 0.5) < 1.0


@needs_gxx
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
@HYPO
@given(n=st.integers(1, 3 * 4096 + 100), l2=st.one_of(st.just(0.0), st.floats(0.0, 1.0)),
       seed=st.integers(0, 2**32 - 1), scale=st.sampled_from([1e-20, 1e-3, 1.0, 1e3]),
       grid=st.integers(1, 3))
def test_clip_norm_kernel_random(dtype, n, l2, seed, scale, grid):
    rng = numpy.random.default_rng(seed)
    g = (rng.standard_normal(n) * scale).astype(dtype)
    w = rng.standard_normal(n).astype(dtype)
    want = _kernels.clip_scale(_kernels.clip_sum_squares(g, w, l2), 1e-3 * scale * n)
    got, counter = launch_norm(dtype, g, w, l2, 1e-3 * scale * n, grid, 32)
    assert got == want and counter == 0


@needs_gxx
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
def test_clip_norm_kernel_reads_the_weights_only_when_l2_is_coupled(dtype):
    """l2 == 0: weights all NaN give the factor of finite weights (the kernel does not
    fold w into the terms); l2 != 0: one inf weight gives 0, one NaN 1 (a NaN norm never
    clips). Each is the CPU's factor on the same arrays."""
    n = 2 * 4096 + 5
    rng = numpy.random.default_rng(n)
    g = rng.standard_normal(n).astype(dtype)  # norm ~ 90: clipped
    w = rng.standard_normal(n).astype(dtype)
    nan_w = numpy.full(n, numpy.nan, dtype=dtype)
    inf_w = w.copy()
    inf_w[n - 3] = numpy.inf
    one_nan_w = w.copy()
    one_nan_w[7] = numpy.nan
    cases = [(w, 0.0, None), (nan_w, 0.0, None), (inf_w, 0.0, None), (w, 0.03, None),
             (inf_w, 0.03, 0.0), (one_nan_w, 0.03, 1.0)]
    clean = _kernels.clip_scale(_kernels.clip_sum_squares(g, w, 0.0), 1.0)
    assert clean < 1.0
    for weights, l2, special in cases:
        want = _kernels.clip_scale(_kernels.clip_sum_squares(g, weights, l2), 1.0)
        got, counter = launch_norm(dtype, g, weights, l2, 1.0, 2, 64)
        assert got == want and counter == 0, (l2, got, want)
        if l2 == 0.0:
            assert got == clean
        if special is not None:
            assert got == special


@needs_gxx
@needs_mprotect
def test_clip_norm_kernels_do_not_read_the_weights_when_l2_is_0():
    """optim_clip_norm and optim_clip_norm_many (beside a tensor with l2 != 0) on the
    emulated device, the l2 == 0 tensor's weights on pages that fault on any access:
    the factors are the CPU's."""
    done = run_unreadable(f"""
        import sys
        sys.path.insert(0, {str(ROOT / "tests")!r})
        import cuda_harness as ch
        from optim import _kernels
        from optim import _kernels_cuda as kc
        for dtype in (numpy.float32, numpy.float64):
            rng = numpy.random.default_rng(1)
            sizes = (2 * kc.NORM_CHUNK + 5, 300)
            gs = [rng.standard_normal(n).astype(dtype) for n in sizes]
            ws = [unreadable(sizes[0], dtype), rng.standard_normal(sizes[1]).astype(dtype)]
            l2s = (0.0, 0.03)
            want = [_kernels.clip_scale(_kernels.clip_sum_squares(
                        g, numpy.zeros_like(g) if l2 == 0.0 else w, l2), 1.0)
                    for g, w, l2 in zip(gs, ws, l2s)]
            assert want[0] < 1.0 and want[1] < 1.0
            h = ch.harness(dtype)
            chunks = [kc.n_chunks(n) for n in sizes]
            clip = numpy.full(1, numpy.nan)
            h.launch("optim_clip_norm", 2, 64, [gs[0], ws[0], 0.0, 1.0, sizes[0],
                     numpy.zeros(chunks[0]), numpy.zeros(1, numpy.uint64), 1, clip])
            assert clip[0] == want[0], (clip, want)
            tensors = numpy.zeros((2, len(kc.TENSOR_FIELDS)), numpy.int64)
            tensors[:, 0] = [w.ctypes.data for w in ws]
            tensors[:, 1] = [g.ctypes.data for g in gs]
            tensors[:, 6] = sizes
            tensors[:, 7] = [0, chunks[0]]
            chunk_tensor = numpy.repeat(numpy.arange(2, dtype=numpy.int32), chunks)
            rows = numpy.full((2, kc.ROW), numpy.nan)
            rows[:, kc.COEFS.index("l2")] = l2s
            rows[:, kc.SLOT["grad_clip"]] = 1.0  # each tensor's grad_clip is in its row
            rows[:, kc.SLOT["status"]] = kc.GO
            rows[:, kc.SLOT["check"]] = 0.0
            h.launch("optim_clip_norm_many", 2, 64, [tensors, chunk_tensor, rows,
                     numpy.zeros(2), sum(chunks), numpy.zeros(sum(chunks)),
                     numpy.zeros(2, numpy.uint64), 1, 1])
            assert list(rows[:, kc.CLIP_SLOT]) == want, (rows, want)
        print("ok")
    """)
    assert done.returncode == 0 and done.stdout.split() == ["ok"], done


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
BACKENDS = {block: fc.HarnessBackend(block=block, max_grid=2) for block in (32, 64)}


def setup_case(name, h, b2, t_early):
    base = base_of(name)
    if base == "radam_rect":
        h["beta2"], t = 0.7 + 0.29 * b2, 500  # rho_inf > 5, rho_t ~ rho_inf: rectified
    elif base == "radam_unrect":
        h["beta2"], t = b2, 1  # rho_1 = 1 < 5 for every beta2
    else:
        h["beta2"], t = max(b2, 1e-3), t_early  # both betas 0 would select SGD
    return base.split("_")[0], t


@needs_gxx
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
@pytest.mark.parametrize("name", NAMES)
@HYPO
@given(shape=st.one_of(shapes, st.sampled_from([(4097,), (2, 4096)])), h=hyper_draws,
       seed=st.integers(0, 2**32 - 1), grad_clip=st.sampled_from([0.0, 0.5, 5.0, 50.0]),
       lr_scale=st.floats(0.1, 2.0), t_early=st.integers(1, 4), b2=st.floats(0.0, 0.9999),
       block=st.sampled_from([32, 64]))
def test_backend_launch_matches_cython_kernels(name, dtype, shape, h, seed, grad_clip,
                                               lr_scale, t_early, b2, block):
    """CupyBackend.plan + launch (clip norm, then the update, on the emulated device)
    against optim._kernels.step on the same arrays: bitwise, clipping included."""
    kind, t = setup_case(name, h, b2, t_early)
    lookahead, averages = name.endswith("_la"), "_avg" in name
    hyper = make_hyper(base_of(name), h, lookahead, grad_clip)
    spec = kc.KERNELS[name]
    cpu = random_arrays(spec.arrays, shape, dtype, seed, 1.0)
    dev = {k: fc.to_fake_device(x) for k, x in cpu.items()}
    _kernels.step(hyper, "key", cpu["w"], cpu["g"], cpu.get("m"), cpu.get("v"),
                  cpu.get("avg"), cpu.get("slow"), t, lr_scale)

    backend = BACKENDS[block]
    before = len(backend.launches)
    reads = backend.moved_to_host
    plan = backend.plan("key", kind, averages, dev["w"], dev.get("m"), dev.get("v"),
                        dev.get("avg"), dev.get("slow"))
    backend.launch(plan, hyper, "key", dev["w"], dev["g"], t, lr_scale)
    launched = backend.launches[before:]
    assert launched == (["optim_clip_norm"] if grad_clip else []) + [name]
    assert backend.moved_to_host == reads, "nothing is read back"
    for a in spec.arrays:
        numpy.testing.assert_array_equal(dev[a].view(numpy.ndarray), cpu[a],
                                         err_msg=f"{name}/{a}")


@needs_gxx
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
@pytest.mark.parametrize("kind", ["sgd", "adam", "radam"])
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow],
          phases=[Phase.explicit, Phase.reuse, Phase.generate])
@given(sizes=st.lists(st.one_of(st.integers(1, 300), st.sampled_from(EDGE_SIZES[:6])),
                      min_size=1, max_size=6),
       h=hyper_draws, grad_clip=st.sampled_from([0.0, 0.5, 50.0]), seed=st.integers(0, 2**31),
       ts=st.lists(st.integers(1, 12), min_size=6, max_size=6), averages=st.booleans(),
       lookahead_k=st.sampled_from([0, 2, 3]), block=st.sampled_from([32, 64]))
def test_launch_many_matches_cython_kernels(dtype, kind, sizes, h, grad_clip, seed, ts,
                                            averages, lookahead_k, block):
    """step_many's group launches (tensor and chunk tables, coefficient rows, the clip
    norm per tensor) against the Cython kernels: bitwise, one launch per group (+1 norm)."""
    h["beta2"] = 0.9 if kind == "radam" else 0.999  # radam: rectified from t = 6
    hyper = make_hyper(kind, h, False, grad_clip)
    hyper.lookahead_k = lookahead_k
    rng = numpy.random.default_rng(seed)
    arrays = ("w", "g") + (("m", "v") if kind != "sgd" else ()) + (
        ("avg",) if averages else ()) + (("slow",) if lookahead_k else ())
    cpu = [random_arrays(arrays, (n,), dtype, int(rng.integers(2**31)), 1.0) for n in sizes]
    dev = [{k: fc.to_fake_device(x) for k, x in c.items()} for c in cpu]
    keys = list(range(len(sizes)))
    counts = ts[:len(sizes)]
    for key, c, t in zip(keys, cpu, counts):
        _kernels.step(hyper, key, c["w"], c["g"], c.get("m"), c.get("v"), c.get("avg"),
                      c.get("slow"), t, 0.7)
    backend = BACKENDS[block]
    plans = [backend.plan(key, kind, averages, d["w"], d.get("m"), d.get("v"), d.get("avg"),
                          d.get("slow")) for key, d in zip(keys, dev)]
    before, reads = len(backend.launches), backend.moved_to_host
    backend.launch_many({}, hyper, keys, [d["w"] for d in dev], [d["g"] for d in dev],
                        plans, counts, 0.7)
    groups = {_device.device_coefs(hyper, t, 0.7)[0] for t in counts}
    assert len(backend.launches) - before == len(groups) * (2 if grad_clip else 1)
    assert backend.moved_to_host == reads
    for key, c, d in zip(keys, cpu, dev):
        for a in arrays:
            numpy.testing.assert_array_equal(d[a].view(numpy.ndarray), c[a],
                                             err_msg=f"key {key} {a}")


@needs_gxx
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
@pytest.mark.parametrize("coupled", [False, True])
def test_launch_many_with_inf_and_nan_weights_matches_cython_kernels(dtype, coupled):
    """step_many on the emulated device (optim_clip_norm_many, then the update) for
    tensors holding an inf or a NaN weight: bitwise the CPU's. With L2 decoupled only
    the poisoned element differs from an update of finite weights; with coupled L2 the
    tensor's clip factor changes, so its other elements do too."""
    hyper = make_hyper("adam", {"lr": 0.01, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8,
                                "L2": 1e-3, "decoupled": not coupled, "weight_decay": 0.0,
                                "la_alpha": 0.5}, False, 0.5)
    sizes, poison, where = [4097, 300, 9000], [numpy.inf, numpy.nan, None], [4000, 5, 0]
    rng = numpy.random.default_rng(3)
    arrays = ("w", "g", "m", "v")
    clean = [random_arrays(arrays, (n,), dtype, int(rng.integers(2**31)), 1.0) for n in sizes]
    cpu = [{a: x.copy() for a, x in c.items()} for c in clean]
    for c, value, k in zip(cpu, poison, where):
        if value is not None:
            c["w"][k] = value
    dev = [{a: fc.to_fake_device(x) for a, x in c.items()} for c in cpu]
    keys = list(range(len(sizes)))
    for c, c_clean in zip(cpu, clean):
        for arrs in (c, c_clean):
            _kernels.step(hyper, "k", arrs["w"], arrs["g"], arrs["m"], arrs["v"], None, None,
                          3, 1.0)
    backend = BACKENDS[64]
    plans = [backend.plan(key, "adam", False, d["w"], d["m"], d["v"], None, None)
             for key, d in zip(keys, dev)]
    backend.launch_many({}, hyper, keys, [d["w"] for d in dev], [d["g"] for d in dev], plans,
                        [3] * len(sizes), 1.0)
    for key, c, c_clean, d, value, k in zip(keys, cpu, clean, dev, poison, where):
        for a in arrays:
            numpy.testing.assert_array_equal(d[a].view(numpy.ndarray), c[a],
                                             err_msg=f"key {key} {a}")
        if value is not None:
            keep = numpy.arange(sizes[key]) != k
            same = all(numpy.array_equal(c[a][keep], c_clean[a][keep]) for a in arrays)
            assert same != coupled, (key, coupled)
