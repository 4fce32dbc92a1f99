"""Build configuration for the C kernels (the rest of the metadata lives in pyproject.toml).

The kernels are one extension module, ``bitserve.kernels._native``. It is compiled without
``-march=native``: the AVX2/FMA code carries ``__attribute__((target(...)))`` and is chosen at
import time from the CPU's features, so one build runs on every x86-64 machine.
``-ffp-contract=off``: no compiler fuses a multiply and an add into one FMA behind the
code's back (clang would by default), so the float steps stay numpy's, bit for bit.
"""

from __future__ import annotations

from pathlib import Path

from setuptools import Extension, setup

CSRC = Path("src/bitserve/kernels/csrc")
SOURCES = sorted(str(p) for p in CSRC.glob("*.c"))

ext_modules = []
if SOURCES:
    ext_modules.append(
        Extension(
            "bitserve.kernels._native",
            sources=SOURCES,
            extra_compile_args=["-O3", "-std=c11", "-Wall", "-Wextra", "-Wno-missing-field-initializers", "-fno-strict-aliasing", "-ffp-contract=off", "-pthread"],
            extra_link_args=["-pthread"],
        )
    )

setup(ext_modules=ext_modules)
