"""The tests that compare split work with whole work, under more than one BLAS kernel.

OpenBLAS picks a kernel for the CPU it finds, and a machine may force another
(``OPENBLAS_CORETYPE=Haswell`` is set for every process on some). Kernels
differ in the order they sum a product's terms, and may sum a slice of rows in
another order than the whole: a test that compares threaded work with one
call must hold a product to a float32 bound, never to its bits. These tests
rerun those comparisons in a child process under the kernel OpenBLAS picks
here and under Haswell's, so a bit-identity claim that only one kernel keeps
cannot come back. The variable is set for the child only: the rest of the
suite runs under whatever the machine sets, as users' machines do.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: the comparisons of split work (threads, row blocks, pieces) with whole work
SPLIT_TESTS = ["tests/test_ops.py", "-k", "split or parts_cover"]

#: kernels to run them under: None is OpenBLAS's own choice for this CPU
KERNELS = [None, "Haswell"]


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((x for x in text.splitlines() if x.startswith("flags")), "")
    return set(line.partition(":")[2].split())


def _openblas() -> bool:
    from minipeft.autograd.parallel import blas_threads
    return blas_threads() is not None


@pytest.mark.parametrize("kernel", KERNELS, ids=lambda k: k or "default")
def test_split_work_equals_whole_work_under_the_kernel(kernel):
    if kernel is not None and not _openblas():
        pytest.skip("NumPy's BLAS is not OpenBLAS: OPENBLAS_CORETYPE chooses nothing")
    if kernel == "Haswell" and not {"avx2", "fma"} <= _cpu_flags():
        pytest.skip("this CPU lacks AVX2/FMA, which the Haswell kernel needs")
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_CORETYPE"}
    if kernel is not None:
        env["OPENBLAS_CORETYPE"] = kernel
        # the variable reached OpenBLAS: asked to, it names its kernel as it loads
        probe = subprocess.run([sys.executable, "-c", "import numpy"], env={
            **env, "OPENBLAS_VERBOSE": "2"}, capture_output=True, text=True, timeout=120)
        assert f"Core: {kernel}" in probe.stdout + probe.stderr, (
            f"OpenBLAS did not take {kernel}'s kernel: {probe.stdout + probe.stderr!r}")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider",
                           *SPLIT_TESTS], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    # the test may carry the engine path's id ("[fast]"): it must have run, and passed
    assert re.search(r"test_ops_split_over_threads_equal_one_block(\[\w+\])? PASSED", out), out[-4000:]
