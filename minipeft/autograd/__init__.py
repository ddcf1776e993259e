r"""The autograd engine: Tensor, Function, the operators and gradient checks.

Read in this order: :mod:`.tensor` (the Tensor and backward's topological
walk), :mod:`.function` (Function, Context, the activation ledger, no_grad),
:mod:`.ops` (every operator in its plainest form, with its derivative),
:mod:`.gradcheck`. That is the reference engine.

The fast path sits beside it: :mod:`.parallel` (the engine's threads, BLAS
held to one), :mod:`.fused` (in-place and blocked kernels, and the backward
walk that tells them which gradient buffers they own) and :mod:`.profile`
(the op profiler). The fast kernels replace the reference ops by one switch,
on by default: ``with reference_ops():`` runs the reference inside, and
``MINIPEFT_REFERENCE=1`` runs it for a whole process.
"""

from . import ops
from .function import (
    LEDGER,
    Context,
    Function,
    is_grad_enabled,
    no_grad,
    set_grad_enabled,
)
from .fused import fast_path_on, reference_ops, use_fast_path
from .gradcheck import gradcheck, vjp_check
from .tensor import Tensor, tensor

__all__ = [
    "LEDGER", "Context", "Function", "Tensor", "fast_path_on", "gradcheck", "is_grad_enabled",
    "no_grad", "ops", "reference_ops", "set_grad_enabled", "tensor", "use_fast_path", "vjp_check",
]
