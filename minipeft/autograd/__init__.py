r"""The autograd engine: Tensor, Function, the operators and gradient checks.

Read in this order: :mod:`.tensor` (the Tensor and backward's topological
walk), :mod:`.function` (Function, Context, the activation ledger, no_grad),
:mod:`.ops` (every operator with its derivative), :mod:`.gradcheck`.
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
from .gradcheck import gradcheck, vjp_check
from .tensor import Tensor, tensor

__all__ = [
    "LEDGER", "Context", "Function", "Tensor", "gradcheck", "is_grad_enabled", "no_grad",
    "ops", "set_grad_enabled", "tensor", "vjp_check",
]
