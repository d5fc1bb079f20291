"""benchmarks/gpu_check.py runs every GPU path; on a machine without a GPU it runs them on the CPU, so the script
keeps working where no GPU is lent."""

import os
import subprocess
import sys

import pytest

from helpers import ROOT


@pytest.mark.slow
def test_every_gpu_path_runs_on_the_cpu():
    script = os.path.join(ROOT, "benchmarks", "gpu_check.py")
    result = subprocess.run([sys.executable, script, "--device", "cpu"], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert lines[-1] == "10 passed, 0 failed", lines[-15:]
    for check in ("generate float32", "train, 5 steps", "distill", "the live session", "the page's request path"):
        assert any(line.startswith("passed") and check in line for line in lines), check
