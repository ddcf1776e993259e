r"""Measured: the allocator itself (``tracemalloc`` on the CPU, CuPy's pool on the GPU)."""

from __future__ import annotations

import gc
import tracemalloc

import numpy as np

from .. import backend
from ..nn.quant import QuantLinear
from .books import _method_arrays, _optimizer_arrays

# ---------------------------------------------------------------------------
# Measured: the allocator
# ---------------------------------------------------------------------------


def _numpy_traced_bytes() -> int:
    """Bytes of NumPy data buffers alive now, as tracemalloc saw them allocated."""
    snap = tracemalloc.take_snapshot().filter_traces(
        [tracemalloc.DomainFilter(True, np.lib.tracemalloc_domain)])
    return sum(t.size for t in snap.traces)


class _TraceMalloc:
    """CPU (NumPy and strict): tracemalloc, restarted so it sees only this step's arrays.

    tracemalloc only knows memory allocated while it traces, and the model
    was built before. So it is (re)started here and the arrays the step will
    find already alive (parameters, gradient masks, optimizer state, a
    method's copies, the batch) are replaced by copies with the same values,
    made under tracing. From then on the traced total is exactly this step's
    memory plus the Python objects made meanwhile. Its peak counts every
    domain; the NumPy domain alone is read from snapshots at the phase
    boundaries.
    """

    source = "tracemalloc"

    def __init__(self):
        self.was_tracing = tracemalloc.is_tracing()
        self.peak = 0
        self.rounding = None

    def start(self, model, optimizer):
        if self.was_tracing:
            tracemalloc.stop()
        tracemalloc.start()
        for p in model.parameters():
            if p.data.base is None:
                p.data = p.data.copy()
            if p.grad_mask is not None:
                p.grad_mask = p.grad_mask.copy()
        for m in model.modules():          # a quantized Linear's codes and constants
            if isinstance(m, QuantLinear):
                for name, a in list(m._buffers.items()):
                    if a is not None:
                        m.register_buffer(name, a.copy())
        for state in optimizer.state.values():
            for key, a in list(state.items()):
                if key != "step" and backend.is_array(a):
                    state[key] = a.copy()
        for holder, key, a in _method_arrays(model) + _optimizer_arrays(optimizer):
            if isinstance(holder, dict):
                holder[key] = a.copy()
            elif holder is not None:
                setattr(holder, key, a.copy())

    def phase(self) -> tuple[int, int]:
        """(NumPy-domain bytes now, all traced bytes now); the peak so far is kept."""
        total, peak = tracemalloc.get_traced_memory()
        self.peak = max(self.peak, peak)
        arrays = _numpy_traced_bytes()
        gc.collect()
        tracemalloc.reset_peak()
        return arrays, total

    def stop(self):
        if not self.was_tracing:
            tracemalloc.stop()


class _CupyHook:
    """GPU: a ``cupy.cuda.MemoryHook`` that sees every malloc and free of CuPy's pool.

    The pool keeps no peak of its own, so the hook keeps one: the bytes in
    use when it starts (``used_bytes()``: every array already on the device)
    plus the running sum of what was handed out (``mem_size``: the request
    rounded up to a multiple of 512 bytes) minus what was given back.
    """

    source = "cupy MemoryHook"

    def __init__(self):
        cupy = backend.require_gpu()
        from cupy.cuda import memory_hook

        books = self

        class Hook(memory_hook.MemoryHook):
            name = "minipeft.memory"

            def malloc_postprocess(self, **kw):
                books.now += kw["mem_size"]
                books.requested += kw["size"]
                books.rounded += kw["mem_size"]
                books.peak = max(books.peak, books.now)

            def free_postprocess(self, **kw):
                books.now -= kw["mem_size"]

        self.pool = cupy.get_default_memory_pool()
        self.hook = Hook()
        self.now = self.peak = self.requested = self.rounded = 0
        self.started = False

    def start(self, model, optimizer):
        backend.synchronize()
        self.now = self.peak = self.pool.used_bytes()
        self.hook.__enter__()
        self.started = True

    def phase(self) -> tuple[int, int]:
        backend.synchronize()
        return self.pool.used_bytes(), self.pool.used_bytes()

    def stop(self):
        if self.started:
            self.hook.__exit__(None, None, None)
            self.started = False

    @property
    def rounding(self) -> int:
        """Bytes the pool added by rounding each allocation up to 512 bytes."""
        return self.rounded - self.requested


