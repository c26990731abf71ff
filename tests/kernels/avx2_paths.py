"""Some of a test file's tests run again, in a process of their own with PALM_CPU_AVX512=0,
which keeps every CPU kernel to the AVX2 path it takes on CPUs without AVX-512."""

from __future__ import annotations

import os
import subprocess
import sys


def run_on_the_avx2_paths(test_file: str, selection: str, passed: int) -> None:
    """Runs the tests of test_file that pytest's -k `selection` picks; asserts that exactly
    `passed` of them ran and passed."""
    script = (
        "import sys, pytest\n"
        "from palm_serve.kernels import cpu\n"
        "assert cpu.available(), cpu.unavailable_reason()\n"
        f"sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', '-k', {selection!r}, "
        f"{test_file!r}]))\n"
    )
    env = {**os.environ, "PALM_CPU_AVX512": "0"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=env, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert f"{passed} passed" in done.stdout, done.stdout[-2000:]
