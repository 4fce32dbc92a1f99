"""The thread pool's start-up when an allocation fails: pool_init reports ENOMEM and
pool_free (which the module calls on any error) joins exactly the threads that started,
never a thread that does not exist. Built with the C compiler Python was built with, the
allocator and pthreads wrapped by the linker (tests/kernels/pool_alloc_failure.c)."""

from __future__ import annotations

import errno
import shlex
import subprocess
import sysconfig
from pathlib import Path

import pytest

CSRC = Path(__file__).parents[2] / "src" / "bitserve" / "kernels" / "csrc"
HARNESS = Path(__file__).with_name("pool_alloc_failure.c")


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory) -> Path:
    exe = tmp_path_factory.mktemp("pool") / "pool_alloc_failure"
    cc = shlex.split(sysconfig.get_config_var("CC") or "cc")
    wrap = "-Wl,--wrap=calloc,--wrap=malloc,--wrap=pthread_create,--wrap=pthread_join"
    cmd = [*cc, "-O1", "-std=c11", "-pthread", f"-I{CSRC}", str(HARNESS), str(CSRC / "pool.c")]
    subprocess.run([*cmd, wrap, "-o", str(exe)], check=True, capture_output=True, text=True)
    return exe


def run(harness: Path, fail_at: int) -> tuple[int, int, int]:
    done = subprocess.run([str(harness), str(fail_at)], capture_output=True, text=True, timeout=30)
    failing = f"allocation {fail_at} failing"
    assert done.returncode == 0, f"{failing}: exit {done.returncode}, {done.stdout}"
    err, started, joined = (int(v) for v in done.stdout.split())
    return err, started, joined


def test_a_pool_starts_and_stops_its_threads(harness: Path) -> None:
    assert run(harness, -1) == (0, 3, 3)  # 4 threads: the caller's and 3 workers


@pytest.mark.parametrize("fail_at", [0, 1, 2, 3])
def test_a_failed_allocation_is_enomem_and_joins_only_started_threads(
    harness: Path, fail_at: int
) -> None:
    """Allocation 0 is the worker table; 1-3 are the workers' arguments."""
    err, started, joined = run(harness, fail_at)
    assert err == errno.ENOMEM
    assert started == joined == max(fail_at - 1, 0)
