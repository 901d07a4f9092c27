"""The same bits under another libm: per-call scalars use no libm transcendental.

glibc's `pow` is not correctly rounded, and on x86-64 it is a different function on CPUs
without FMA; `GLIBC_TUNABLES=glibc.cpu.hwcaps=-AVX2,-FMA` makes this machine pick that
one (docs/numerics.md, "Per-call scalars"). Long float32 and float64 runs (Adam, RAdam,
a `compounding` learning rate, a `plateau`-scaled one) in subprocesses, with and without
the tunable and at every SIMD level this build and CPU have, must hash the same. With
libm's `pow` in Adam's bias correction, float64 Adam differed from update 482 on.
"""
import json
import os
import subprocess
import sys
from fractions import Fraction

from hypothesis import assume, given, settings, strategies as st

from optim import _kernels, cpu

RUN = r"""
import hashlib, json, math, sys
import numpy
import optim

def run(make, dtype, steps=1300, n=4099):
    rng = numpy.random.default_rng(7)
    w = rng.standard_normal(n).astype(dtype)
    grads = rng.standard_normal((16, n)).astype(dtype)
    opt = make()
    for s in range(steps):
        opt(("k", 0), w, grads[s % 16].copy())
        opt.step_schedules()
        if s % 50 == 49:
            opt.last_score = -float(s)  # plateau: a worse score every time
    h = hashlib.sha256(w.tobytes())
    for store in (opt.mom1, opt.mom2, opt.averages or {}):
        for key in sorted(store):
            h.update(store[key].tobytes())
    return h.hexdigest()[:16]

cases = {
    "adam": lambda: optim.Adam(0.001, grad_clip=0.0, use_averages=False),
    "adam-thinc": lambda: optim.Adam(0.001),
    "radam": lambda: optim.RAdam(0.001, beta2=0.999),
    "sgd-compounding": lambda: optim.SGD(optim.compounding(1e-4, 1.0, 1.001)),
    "adam-plateau": lambda: optim.Adam(optim.plateau(1, 0.999, optim.constant(0.001))),
}
out = {f"{name}-{dtype}": run(make, dtype) for name, make in cases.items()
       for dtype in ("float32", "float64")}
for name in ("adam", "radam"):  # the per-call scalars themselves, t = 1 .. 5000
    hyper = cases[name]()._hyper
    out[f"coefs-{name}"] = hashlib.sha256(repr([
        sorted(optim._kernels.coefs(hyper, t).items()) for t in range(1, 5001)
    ]).encode()).hexdigest()[:16]
out["libm-pow"] = hashlib.sha256(b"".join(
    math.pow(0.999, t).hex().encode() for t in range(1, 20001))).hexdigest()[:16]
out["level"] = optim.cpu.config()["isa"]
print(json.dumps(out))
"""


def _run(level: str, tunables: bool) -> dict:
    env = dict(os.environ, OPTIM_ISA=level)
    env.pop("GLIBC_TUNABLES", None)
    if tunables:
        env["GLIBC_TUNABLES"] = "glibc.cpu.hwcaps=-AVX2,-FMA"
    done = subprocess.run([sys.executable, "-c", RUN], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_long_runs_hash_the_same_under_another_libm_at_every_level():
    levels = cpu.config()["isa_available"]
    runs = {(level, tunables): _run(level, tunables)
            for level in levels for tunables in (False, True)}
    for (level, _), out in runs.items():
        assert out.pop("level") == level
    pow_hashes = {key: out.pop("libm-pow") for key, out in runs.items()}
    first = runs[(levels[0], False)]
    for key, out in runs.items():
        assert out == first, f"{key}: {out} != {first}"
    # The two libm variants really differ on an x86-64 CPU with FMA (this machine), so
    # the equality above compares two different `pow`s, not one with itself.
    if "avx2" in cpu.config()["isa_supported"]:
        assert pow_hashes[(levels[0], False)] != pow_hashes[(levels[0], True)]


@settings(max_examples=300, deadline=None)
@given(x=st.floats(0.5, 2.0), n=st.integers(0, 4000))
def test_power_is_correctly_rounded(x, n):
    """`power` (beta**t of the per-call scalars and the schedules) is x**n rounded once
    from the exact value (rational arithmetic here), wherever that value is a normal
    double well clear of underflow and overflow; libm's pow misses some of these."""
    exact = Fraction(x) ** n
    assume(Fraction(10) ** -290 < exact < Fraction(10) ** 290)
    assert _kernels.power(x, n) == float(exact)


def test_power_of_adams_betas_is_correctly_rounded_at_every_step():
    """beta1 = 0.9 and beta2 = 0.999, t = 1 .. 3000: power is the exactly rounded value
    at every t (glibc's pow on x86-64 with FMA misses 0.999**2904, for one)."""
    for beta in (0.9, 0.999):
        exact = Fraction(1)
        for t in range(1, 3001):
            exact *= Fraction(beta)
            assert _kernels.power(beta, t) == float(exact), (beta, t)
