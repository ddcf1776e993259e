r"""The op profiler (``minipeft bench --profile``) and the log of matrix products.

The engine tells one observer, ``Function.observer``, when each op starts
and ends: :meth:`Function.apply` around an op's forward, the backward walk
around its backward. Off (the default) it is None and the engine pays one
``is None`` test per op. :func:`profile_ops` puts an :class:`OpProfile` there.

:data:`matmul_log` is the FLOP count's source: when it is a list, each
matrix product a fast kernel forms appends its shape.
"""

from __future__ import annotations

import collections
import contextlib
import time

from .function import Function

#: When set to a list, every matrix product the fast kernels form appends its
#: shape ``(batch, m, k, n)`` here: ``minipeft bench`` reads it to count a
#: step's matmul FLOPs (2 batch m k n each). ``None`` (the default) costs one test.
matmul_log: list | None = None


class OpProfile:
    """Seconds spent in each op, by op name, forward and backward.

    Forward time is all of :meth:`Function.apply` (checks and bookkeeping
    included); backward time is the op's ``backward``. A :class:`Checkpoint`'s
    time includes the ops of the block it runs, which are also counted on
    their own. ``(gradient accumulation)`` is the engine's summing of
    gradients and releasing of saved arrays between backwards. ``matmul``
    holds, per op, the part of its time spent in matrix products (the fast
    kernels note them); the rest is elementwise work and bookkeeping.
    """

    def __init__(self):
        self.seconds = collections.defaultdict(float)   # (name, "forward"|"backward") -> s
        self.calls = collections.Counter()              # (name, "forward"|"backward") -> n
        self.matmul = collections.defaultdict(float)    # name -> s in matrix products
        self.current = None                             # the op running now
        self._open = []                                 # (name, start, op around it), innermost last

    # -- what the engine calls -------------------------------------------------------
    def enter(self, name: str) -> None:
        """Op ``name`` starts its forward or backward."""
        self._open.append((name, time.perf_counter(), self.current))
        self.current = name

    def leave(self, phase: str) -> None:
        """The op entered last ends its ``phase`` ("forward" or "backward")."""
        name, start, self.current = self._open.pop()
        self.add(name, phase, time.perf_counter() - start)

    def matmul_time(self, seconds: float) -> None:
        """A matrix product of the op running now took ``seconds``."""
        self.matmul[self.current] += seconds

    # -- the books ---------------------------------------------------------------------
    def add(self, name: str, phase: str, seconds: float) -> None:
        """Book one call of op ``name``'s ``phase`` ("forward" or "backward")."""
        self.seconds[name, phase] += seconds
        self.calls[name, phase] += 1

    def rows(self) -> list[tuple[str, float, float, int, float]]:
        """(name, forward s, backward s, calls, matmul s), the most expensive first."""
        names = {name for name, _ in self.seconds}
        out = [(n, self.seconds.get((n, "forward"), 0.0), self.seconds.get((n, "backward"), 0.0),
                self.calls.get((n, "forward"), 0) or self.calls.get((n, "backward"), 0),
                self.matmul.get(n, 0.0))
               for n in names]
        return sorted(out, key=lambda r: -(r[1] + r[2]))


@contextlib.contextmanager
def profile_ops():
    """``with profile_ops() as prof:`` times every op's forward and backward inside."""
    prev = Function.observer
    Function.observer = prof = OpProfile()
    try:
        yield prof
    finally:
        Function.observer = prev
