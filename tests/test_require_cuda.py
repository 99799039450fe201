"""HCEXT_REQUIRE_CUDA=1 turns "no GPU" into an error (make gpu-check sets it), so that a GPU
machine with a broken driver or a CPU-only build cannot pass by skipping its CUDA tests."""

import os
import subprocess
import sys

import pytest

from helpers import cuda_usable

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(cuda_usable(), reason="this machine has CUDA: the requirement is met")
def test_require_cuda_fails_without_a_gpu():
    env = dict(os.environ, HCEXT_REQUIRE_CUDA="1")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_double_backward.py", "-k", "static"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode != 0
    assert "HCEXT_REQUIRE_CUDA=1 but CUDA is not usable" in proc.stdout + proc.stderr


def test_without_the_requirement_cuda_tests_skip():
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_double_backward.py", "-k", "static"],
        cwd=REPO_ROOT, env={k: v for k, v in os.environ.items() if k != "HCEXT_REQUIRE_CUDA"}, capture_output=True,
        text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
