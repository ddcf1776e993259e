r"""Hypothesis strategies for the engine's tests: shapes, and float64 arrays that
keep finite differences honest.

Central differences :math:`(f(x+h) - f(x-h)) / 2h` are only meaningful where
f is smooth on :math:`[x-h, x+h]`, so the strategies keep away from

* illegal domains: log, sqrt, division and a tensor exponent get values
  bounded away from zero (:func:`positive`, :func:`nonzero`);
* kinks: relu gets no values near 0 (:func:`nonzero`);
* ties: max and layer norm get values at least 0.1 apart (:func:`distinct`),
  so no perturbation of 1e-6 can change which entry is the largest.

Arrays are small (at most 3 axes of at most 3), because
:func:`~minipeft.autograd.gradcheck` runs two forward passes per entry.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from minipeft import Tensor, backend

# The `device` fixture is a plain parameter (a string), so sharing it across
# examples is safe; a modest example count keeps the suite fast on 2 cores.
engine = settings(max_examples=40, suppress_health_check=[HealthCheck.function_scoped_fixture])
few = settings(max_examples=8, suppress_health_check=[HealthCheck.function_scoped_fixture])

#: A test of the fast kernels themselves (threads, row blocks, owned buffers), in a
#: file whose tests otherwise run on both engine paths: the fast path only.
fast_only = pytest.mark.parametrize("engine_path", ["fast"], indirect=True)

MAX_SIDE = 3


def shapes(min_dims=0, max_dims=3, min_side=1, max_side=MAX_SIDE):
    """Array shapes, scalars (``()``) included by default."""
    return hnp.array_shapes(min_dims=min_dims, max_dims=max_dims,
                            min_side=min_side, max_side=max_side)


def broadcast_pairs(min_dims=0, max_dims=3):
    """Two shapes that broadcast together (size-1 axes and missing leading axes)."""
    return hnp.mutually_broadcastable_shapes(
        num_shapes=2, min_dims=min_dims, max_dims=max_dims, max_side=MAX_SIDE,
    ).map(lambda bs: bs.input_shapes)


def _floats(lo, hi):
    return st.floats(lo, hi, allow_nan=False, allow_infinity=False, allow_subnormal=False)


def values(shape, lo=-2.0, hi=2.0):
    """float64 arrays with entries in [lo, hi]."""
    return hnp.arrays(np.float64, shape, elements=_floats(lo, hi))


def positive(shape, lo=0.5, hi=2.0):
    """Entries in [lo, hi], lo > 0: the domain of log, sqrt and a^b."""
    return values(shape, lo, hi)


def nonzero(shape, lo=0.2, hi=2.0):
    """Entries with lo <= |x| <= hi: safe to divide by, and away from relu's kink."""
    mags = values(shape, lo, hi)
    signs = hnp.arrays(np.bool_, shape)
    return st.tuples(mags, signs).map(lambda ms: np.where(ms[1], ms[0], -ms[0]))


def distinct(shape, spacing=0.1):
    """Entries pairwise at least ``spacing`` apart (no ties, no near-ties)."""
    n = int(np.prod(shape, dtype=np.int64))
    return st.permutations(range(-n, n)).map(
        lambda p: (np.array(p[:n], dtype=np.float64) * spacing).reshape(shape)
    )


def leaf(array, device, requires_grad=True, dtype=np.float64) -> Tensor:
    """A leaf tensor on ``device`` from a host array."""
    return Tensor(np.array(array, dtype=dtype), requires_grad=requires_grad, device=device)


def axes_for(ndim):
    """An ``axis`` argument for a reduction: None, one axis (maybe negative) or a tuple."""
    if ndim == 0:
        return st.just(None)
    one = st.integers(-ndim, ndim - 1)
    several = st.lists(st.integers(0, ndim - 1), min_size=1, max_size=ndim,
                       unique=True).map(tuple)
    return st.one_of(st.none(), one, several)


def index_array(n, max_len=5):
    """Integer positions into an axis of length n, repeats likely (negative ones too)."""
    return hnp.arrays(np.int64, st.integers(1, max_len), elements=st.integers(-n, n - 1))


def on(device, array):
    """A host array moved to ``device`` (index arrays, masks, targets)."""
    return backend.to_device(np.asarray(array), device)
