"""Fixtures shared by every hcext test: the device parametrisation (the suite's one device
fixture), a fixed seed, and a fresh torch.compile state for the compile tests."""

import zlib

import pytest
import torch

import hcext  # noqa: F401  (registers torch.ops.hcext.* and their fake kernels)
from helpers import requires_cuda


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
