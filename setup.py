#!/usr/bin/env python
"""Build optim's Cython extensions, compiled with -O3 and never with FMA contraction.

The update loops (optim/_loops.pxi) are built once per SIMD level, one module each:
optim._loops_baseline (the platform's default target), and on x86-64 (gcc or clang) also
optim._loops_avx2 and optim._loops_avx512, with the flags in ISA_FLAGS. optim picks the
best level the CPU supports at import (docs/cpu.md). A level whose flags the compiler
rejects is skipped, with a message. optim._kernels and optim._roofline get their thread
pool (optim/_pool.h) where POSIX threads and C11 atomics build; elsewhere they build
single-threaded, with a message.
"""
import os
import platform
import sys
import sysconfig
import tempfile

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
POOL_MODULES = ("optim._kernels", "optim._roofline")


def compile_args() -> list:
    if sys.platform == "win32":
        return ["/O2", "/fp:precise"]
    args = ["-O3", "-ffp-contract=off", "-fno-math-errno"]
    compiler = sysconfig.get_config_var("CC") or ""
    if "clang" not in compiler:  # gcc: allow the alias checks a 6-array loop needs
        args.append("--param=vect-max-version-for-alias-checks=64")
    return args


def simd_levels() -> list:
    """The levels above baseline worth trying here: x86-64 with gcc-style flags."""
    machine = platform.machine().lower()
    return list(ISA_FLAGS) if machine in ("x86_64", "amd64") and sys.platform != "win32" else []


def extensions() -> list:
    names = ["_kernels", "_device", "_roofline", "_loops_baseline"]
    names += [f"_loops_{level}" for level in simd_levels()]
    return [
        Extension(
            "optim." + name,
            [f"optim/{name}.pyx"],
            include_dirs=[numpy.get_include()],
            extra_compile_args=compile_args(),
            define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
        )
        for name in names
    ]


class BuildExt(build_ext):
    """Probe the compiler: drop the SIMD levels it cannot build; threads if it can."""

    def probe(self, source: str, flags: list, link: bool = False) -> bool:
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "probe.c")
            with open(path, "w") as f:
                f.write(source)
            try:
                objects = self.compiler.compile([path], output_dir=tmp, extra_postargs=flags)
                if link:
                    self.compiler.link_executable(objects, os.path.join(tmp, "probe"),
                                                  extra_postargs=flags)
            except Exception:  # CompileError, LinkError: the compiler lacks the flags
                return False
        return True

    def build_extensions(self) -> None:
        pool = sys.platform != "win32" and self.probe(POOL_PROBE, POOL_FLAGS, link=True)
        if not pool:
            print("optim: no POSIX threads with C11 atomics; building single-threaded")
        kept = []
        for ext in self.extensions:
            level = ext.name.partition("._loops_")[2]
            if level in ISA_FLAGS:
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
