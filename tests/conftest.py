"""Shared test settings: hypothesis profiles and the backend parametrisation.

Every suite that takes the ``device`` fixture runs on NumPy (``cpu``), on the
strict stand-in that refuses what CuPy refuses (``strict``), and on CuPy
(``gpu``) where a CUDA device is present; elsewhere the gpu cases are
reported as skipped, with the reason.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, settings

from minipeft import backend

# No deadline: a deadline is a timing assertion, and flakes on 2 cores and on
# CuPy's first-call kernel compilation. CI is derandomised so a red run
# reproduces exactly.
settings.register_profile(
    "dev", deadline=None, max_examples=40,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "ci", deadline=None, max_examples=40, derandomize=True, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))

GPU_REASON = "CuPy with a CUDA device is not available on this machine"

DEVICES = [
    "cpu",
    "strict",
    pytest.param("gpu", marks=[pytest.mark.gpu,
                               pytest.mark.skipif(not backend.gpu_available(), reason=GPU_REASON)]),
]


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    """The device a test runs on: 'cpu', 'strict' or 'gpu'."""
    return request.param
