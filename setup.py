#!/usr/bin/env python
"""Build optim's Cython extensions: every optim/*.pyx, compiled with -O3.

Set OPTIM_NATIVE=1 to add -march=native (faster on the build machine, not portable).
"""
import os
import sys
import sysconfig
from pathlib import Path

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup

DIRECTIVES = {
    "language_level": 3,
    "boundscheck": False,  # every public entry point validates its arguments first
    "wraparound": False,
    "initializedcheck": False,
    "cdivision": True,
    "embedsignature": True,
}


def compile_args() -> list:
    if sys.platform == "win32":
        return ["/O2"]
    args = ["-O3", "-ffp-contract=off", "-fno-math-errno"]
    compiler = sysconfig.get_config_var("CC") or ""
    if "clang" not in compiler:  # gcc: allow the alias checks a 6-array loop needs
        args.append("--param=vect-max-version-for-alias-checks=64")
    if os.environ.get("OPTIM_NATIVE") == "1":
        args.append("-march=native")
    return args


def extensions() -> list:
    root = Path(__file__).parent
    return [
        Extension(
            "optim." + pyx.stem,
            [str(pyx.relative_to(root))],
            include_dirs=[numpy.get_include()],
            extra_compile_args=compile_args(),
            define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
        )
        for pyx in sorted((root / "optim").glob("*.pyx"))
    ]


setup(ext_modules=cythonize(extensions(), compiler_directives=DIRECTIVES))
