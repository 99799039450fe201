"""Fixtures shared by every hcext test: the device parametrisation (the suite's one device
fixture), a fixed seed, and a fresh torch.compile state for the compile tests.

HCEXT_REQUIRE_CUDA=1 (make gpu-check sets it) makes a missing GPU or a CPU-only build an
error instead of a skip: the session stops at once, and a test skipped for want of CUDA
counts as failed, so a GPU machine with a broken driver cannot pass silently.
"""

import os
import zlib

import pytest
import torch

import hcext  # noqa: F401  (registers torch.ops.hcext.* and their fake kernels)
from helpers import CUDA_SKIP_REASON, cuda_usable, requires_cuda

REQUIRE_CUDA = os.environ.get("HCEXT_REQUIRE_CUDA") == "1"


def pytest_configure(config):
    if REQUIRE_CUDA and not cuda_usable():
        raise pytest.UsageError(
            "HCEXT_REQUIRE_CUDA=1 but CUDA is not usable: torch.cuda.is_available() = "
            f"{torch.cuda.is_available()}, hcext built with CUDA kernels = {hcext.has_cuda()}"
        )


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if REQUIRE_CUDA and report.skipped and CUDA_SKIP_REASON in str(report.longrepr):
        report.outcome = "failed"
        report.longrepr = f"HCEXT_REQUIRE_CUDA=1, but the test was skipped: {report.longrepr}"


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=requires_cuda)])
def device(request):
    """Every test that takes ``device`` runs on the CPU and, when a GPU and hcext's CUDA kernels
    are present, on CUDA."""
    return request.param


@pytest.fixture(autouse=True)
def _fixed_seed(request):
    # A fixed seed per test, different between tests (derived from the test id), so that a
    # failure reproduces when the test is run alone.
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
    yield


@pytest.fixture
def fresh_dynamo():
    """A clean dynamo cache before and after the test (torch.compile tests count frames)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
