"""Fixtures shared by every hcext test: the device parametrisation (the suite's one device
fixture), a fixed seed, and a fresh torch.compile state for the compile tests.

HCEXT_EMU_BUILD=<folder> (make test-emu sets it) adds the emulated CUDA backend: the device
fixture gains ``emu`` (CPU tensors, hcext's CUDA glue and kernels in the emulated grid, see
tests/emu/emulated.py), and tests/emu/ is collected. Without it tests/emu/ is not collected
(its tests need the sanitizer build and its runtime preloaded).

HCEXT_REQUIRE_CUDA=1 (make gpu-check sets it) makes a missing GPU or a CPU-only build an
error instead of a skip: the session stops at once, and a test skipped for want of CUDA
counts as failed, so a GPU machine with a broken driver cannot pass silently.
"""

import os
import sys
import zlib

import pytest
import torch

import hcext  # noqa: F401  (registers torch.ops.hcext.* and their fake kernels)
from helpers import CUDA_SKIP_REASON, cuda_usable, requires_cuda

REQUIRE_CUDA = os.environ.get("HCEXT_REQUIRE_CUDA") == "1"
EMULATED = bool(os.environ.get("HCEXT_EMU_BUILD"))

collect_ignore = [] if EMULATED else ["emu"]
if EMULATED:
    # libtriton raises C++ exceptions at import, which the AddressSanitizer runtime that the
    # emulated backend needs preloaded cannot intercept (a CHECK failure ends the process):
    # the emulated run has no triton (torch then treats it as absent, as on a CPU-only install).
    sys.modules["triton"] = None


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


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=requires_cuda)] + (["emu"] if EMULATED else []))
def device(request):
    """Every test that takes ``device`` runs on the CPU and, when a GPU and hcext's CUDA kernels
    are present, on CUDA; with HCEXT_EMU_BUILD also on ``emu``: the test sees "cpu" while
    hcext's ops run their CUDA path in the emulated grid."""
    if request.param != "emu":
        yield request.param
        return
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "emu"))
    from emulated import emulated

    with emulated():
        yield "cpu"


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
