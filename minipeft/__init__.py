r"""minipeft: parameter-efficient fine-tuning, built from scratch to be read.

Layers, bottom up (each imports only from those below it):
``backend`` (NumPy / CuPy / strict arrays) -> ``autograd`` (Tensor, Function,
ops, gradient checks) -> ``nn`` (modules, the GPT) -> ``optim`` -> ``peft``
(every method, wrapped around a frozen base) -> ``memory`` / ``train`` /
``io`` / ``data`` -> ``cli``.
"""

from . import backend
from .autograd import Tensor, no_grad, tensor
from .nn import GPT, GPTConfig

__version__ = "0.1.0"

__all__ = ["GPT", "GPTConfig", "Tensor", "__version__", "backend", "no_grad", "tensor"]
