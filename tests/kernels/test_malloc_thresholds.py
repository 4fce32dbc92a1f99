"""Importing the native module keeps prompt-sized arrays on the heap (csrc/module.c,
keep_arrays_on_the_heap): a 4 MB numpy array comes from [heap], not from a fresh mmap
whose pages fault in on every call, unless the user chose glibc's threshold."""

from __future__ import annotations

import os
import subprocess
import sys

ARRAY_REGION = r"""
import numpy as np
from bitserve.kernels import _native
a = np.empty(4 << 20, dtype=np.uint8)
a[:] = 1
for line in open("/proc/self/maps"):
    fields = line.split()
    lo, hi = (int(x, 16) for x in fields[0].split("-"))
    if lo <= a.ctypes.data < hi:
        print(fields[5] if len(fields) > 5 else "anonymous")
"""


def region(**malloc_env: str) -> str:
    """Where a fresh process's 4 MB array lives, after importing the native module."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env.update(malloc_env)
    done = subprocess.run(
        [sys.executable, "-c", ARRAY_REGION], env=env, capture_output=True, text=True, check=True
    )
    return done.stdout.strip()


def test_prompt_sized_arrays_come_from_the_heap_unless_the_user_says_otherwise() -> None:
    assert region() == "[heap]"
    assert region(MALLOC_MMAP_THRESHOLD_="131072") == "anonymous"  # glibc's own default
