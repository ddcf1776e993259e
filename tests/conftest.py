"""Shared test settings: hypothesis profiles and the backend parametrisation.

Every suite that takes the ``device`` fixture runs on NumPy (``cpu``), on the
strict stand-in that refuses what CuPy refuses (``strict``), and on CuPy
(``gpu``) where a CUDA device is present; elsewhere the gpu cases are
reported as skipped, with the reason.

The op, autograd, model and PEFT suites also run on both paths of the engine
(``pytestmark = pytest.mark.usefixtures("engine_path")``): the fast kernels
and the reference ops.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, settings

from minipeft import backend
from minipeft.autograd import reference_ops

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


#: The reference path runs this share of a hypothesis test's examples (at least
#: REFERENCE_MIN): its ops are the plain formulas, the fast path's are held to
#: them example by example in the other half of the run.
REFERENCE_SHARE, REFERENCE_MIN = 4, 4


@pytest.fixture(params=["fast", "reference"])
def engine_path(request):
    """The engine path a test runs on: 'fast' (the default kernels) or 'reference'."""
    if request.param == "fast":
        yield "fast"
        return
    # A hypothesis test reads its settings from this attribute when it runs.
    fn = request.function
    own = getattr(fn, "_hypothesis_internal_use_settings", None)
    if own is not None:
        fn._hypothesis_internal_use_settings = settings(
            own, max_examples=max(REFERENCE_MIN, own.max_examples // REFERENCE_SHARE))
    try:
        with reference_ops():
            yield "reference"
    finally:
        if own is not None:
            fn._hypothesis_internal_use_settings = own
