#!/usr/bin/env python
"""Build optim's Cython extensions, compiled with -O3 and never with FMA contraction.

The update loops (optim/cpu/_loops.pxi) are built once per SIMD level, one module each:
optim.cpu._loops_baseline (the platform's default target), and for x86-64 targets with a
GCC-style compiler (gcc, clang, Apple clang) also optim.cpu._loops_avx2 and
optim.cpu._loops_avx512, with the flags in ISA_FLAGS. optim picks the best level the CPU
supports at import (docs/cpu.md). A level whose flags the compiler rejects is skipped,
with a message. optim._kernels and optim.bench._roofline get their thread pool
(optim/cpu/_pool.h) where POSIX threads and C11 atomics build; elsewhere (MSVC) they
build single-threaded, with a message. The target is the wheel's platform (sysconfig.get_platform(), ARCHFLAGS
on macOS), not the build machine's, so cross-compiled macOS wheels get the right levels.
"""
import contextlib
import os
import sys
import sysconfig
import tempfile
from pathlib import Path

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

DIRECTIVES = {
    "language_level": 3,
    "boundscheck": False,  # every public entry point validates its arguments first
    "wraparound": False,
    "initializedcheck": False,
    "cdivision": True,
    "embedsignature": True,
}

# Flags per SIMD level; optim/_kernels.pyx (optim_cpu_level) checks the CPU for exactly
# these features before it loads a level. Contraction stays off at every level.
ISA_FLAGS = {
    "avx2": ["-mavx2", "-mfma"],
    "avx512": ["-mavx2", "-mfma", "-mavx512f", "-mavx512vl", "-mavx512bw", "-mavx512dq",
               "-mavx512cd", "-mprefer-vector-width=512"],
}
# A function each level's flags must compile (and assemble), vector width included.
ISA_PROBE = {
    "avx2": "#include <immintrin.h>\n"
            "__m256 f(__m256 a) { return _mm256_sqrt_ps(a); }\n",
    "avx512": "#include <immintrin.h>\n"
              "__m512 f(__m512 a) { return _mm512_sqrt_ps(a); }\n",
}
POOL_FLAGS = ["-pthread"]
POOL_PROBE = ("#include <pthread.h>\n#include <stdatomic.h>\n"
              "static void *run(void *arg) { return arg; }\n"
              "int main(void) { pthread_t t; atomic_int n = 0; atomic_fetch_add(&n, 1);\n"
              "  return pthread_create(&t, 0, run, 0) || pthread_join(t, 0); }\n")
POOL_MODULES = ("optim._kernels", "optim.bench._roofline")

# Optimisation flags: every level, every module. MSVC's /fp:precise never contracts a
# multiply and an add (VS 2022), and the x64 baseline (SSE2) has no FMA to contract to.
GCC_STYLE_ARGS = ["-O3", "-ffp-contract=off", "-fno-math-errno"]
MSVC_ARGS = ["/O2", "/fp:precise"]
# Per compiler family: lift the vectoriser's cap on the runtime alias checks a loop may
# need (Adam with averages and lookahead reads and writes 6 arrays: 15 pairs). Under the
# defaults (gcc 10 checks, clang 8) such a loop stays scalar: clang 14 ran Adam with Thinc's
# defaults 4-6x slower than gcc (docs/cpu.md, "clang"). The checks keep the loops correct
# for arrays that overlap (nothing rejects weights passed as their own gradient), where
# `restrict` would make that undefined; every clang, Apple's too, takes -mllvm. Same bits
# either way.
# Each family's flags are probed; a family is recognised by its macros (clang defines
# __GNUC__ too and accepts --param with only a warning).
ALIAS_CHECK_ARGS = {
    "gcc": ["--param=vect-max-version-for-alias-checks=64"],
    "clang": ["-mllvm", "-runtime-memory-check-threshold=64"],
}
FAMILY_PROBES = {
    "gcc": "#if !defined(__GNUC__) || defined(__clang__)\n#error not gcc\n#endif\nint x;\n",
    "clang": "#ifndef __clang__\n#error not clang\n#endif\nint x;\n",
}


def target_is_x86_64() -> bool:
    """Whether the extensions are built for x86-64 (the SIMD levels are x86-64 code)."""
    archflags = os.environ.get("ARCHFLAGS", "").split()
    archs = {archflags[i + 1] for i, flag in enumerate(archflags[:-1]) if flag == "-arch"}
    if sys.platform == "darwin" and archs:  # cibuildwheel cross-compiles with ARCHFLAGS
        return archs == {"x86_64"}
    return sysconfig.get_platform().rsplit("-", 1)[-1].lower() in ("x86_64", "amd64")


def simd_levels() -> list:
    """The levels above baseline worth trying: x86-64 targets (BuildExt drops MSVC's)."""
    return list(ISA_FLAGS) if target_is_x86_64() else []


def extensions() -> list:
    # Every .pyx under optim/ (a module each, named by its path); of the per-level loop
    # modules, baseline and what this machine type can build.
    root = Path(__file__).parent
    paths = [p.relative_to(root) for p in sorted((root / "optim").rglob("*.pyx"))
             if not p.stem.startswith("_loops_")]
    paths += [Path("optim/cpu") / f"_loops_{level}.pyx"
              for level in ["baseline"] + simd_levels()]
    return [
        Extension(
            ".".join(path.with_suffix("").parts),
            [path.as_posix()],
            include_dirs=[numpy.get_include(), "optim/cpu"],  # (optim/cpu/_pool.h)
            define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
        )
        for path in paths
    ]


@contextlib.contextmanager
def quiet(output):
    """Send what this process and its children write to stdout and stderr to `output`."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    try:
        os.dup2(output.fileno(), 1)
        os.dup2(output.fileno(), 2)
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        os.close(saved[0])
        os.close(saved[1])


class BuildExt(build_ext):
    """Pick the flags for this compiler; drop the SIMD levels it cannot build; threads
    if it can."""

    def probe(self, source: str, flags: list, link: bool = False) -> bool:
        """Whether `source` compiles (and links) with `flags`. Quiet: the compiler's
        output goes to a file, so the probes that fail by design (another compiler's
        family, a flag it lacks) print no error lines into the build log."""
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "probe.c")
            with open(path, "w") as f:
                f.write(source)
            with open(os.path.join(tmp, "output.txt"), "w") as output, quiet(output):
                try:
                    objects = self.compiler.compile([path], output_dir=tmp,
                                                    extra_postargs=flags)
                    if link:
                        self.compiler.link_executable(objects, os.path.join(tmp, "probe"),
                                                      extra_postargs=flags)
                except Exception:  # CompileError, LinkError: the compiler lacks the flags
                    return False
        return True

    def alias_check_args(self) -> list:
        """The flags that let this compiler's vectoriser make enough alias checks."""
        for family, flags in ALIAS_CHECK_ARGS.items():
            if self.probe(FAMILY_PROBES[family], []):
                if self.probe("int x;\n", flags + ["-Werror"]):  # not even a warning
                    return flags
                print(f"optim: {family} rejects {' '.join(flags)}; loops over 5-6 arrays "
                      f"may stay scalar")
        return []

    def build_extensions(self) -> None:
        msvc = self.compiler.compiler_type == "msvc"
        if msvc:
            args = MSVC_ARGS
        else:
            args = GCC_STYLE_ARGS + self.alias_check_args()
        pool = not msvc and sys.platform != "win32" and self.probe(POOL_PROBE, POOL_FLAGS,
                                                                    link=True)
        if not pool:
            print("optim: no POSIX threads with C11 atomics; building single-threaded")
        kept = []
        for ext in self.extensions:
            ext.extra_compile_args = args + ext.extra_compile_args
            level = ext.name.partition("._loops_")[2]
            if level in ISA_FLAGS:
                if msvc:  # optim detects AVX2/AVX-512 with GCC/clang builtins only
                    print(f"optim: MSVC; skipping the {level} SIMD level (baseline only)")
                    continue
                if not self.probe(ISA_PROBE[level], ISA_FLAGS[level]):
                    print(f"optim: the compiler lacks {' '.join(ISA_FLAGS[level])}; "
                          f"skipping the {level} SIMD level")
                    continue
                ext.extra_compile_args = ext.extra_compile_args + ISA_FLAGS[level]
            if ext.name in POOL_MODULES:
                if pool:
                    ext.extra_compile_args = ext.extra_compile_args + POOL_FLAGS
                    ext.extra_link_args = ext.extra_link_args + POOL_FLAGS
                else:
                    ext.define_macros = ext.define_macros + [("OPTIM_NO_POOL", "1")]
            kept.append(ext)
        self.extensions = kept
        super().build_extensions()


setup(ext_modules=cythonize(extensions(), compiler_directives=DIRECTIVES),
      cmdclass={"build_ext": BuildExt})
