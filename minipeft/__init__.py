r"""minipeft: parameter-efficient fine-tuning, built from scratch to be read.

Three tiers, each importing only from those below it (and, within the core,
each layer only from the layers before it):

* the core: ``backend`` (NumPy / CuPy / strict arrays) and ``validate`` (the
  knobs' rules) -> ``autograd`` (Tensor, Function, the reference ops; the
  fast path beside them) -> ``nn`` (modules, the GPT, quantized storage) ->
  ``optim`` -> ``io`` (safetensors files, atomic commits) -> ``data`` ->
  ``peft`` (every method, wrapped around a frozen base) -> ``memory``
  (estimated, accounted, measured);
* ``workflows``, each importing the core and the workflows before it:
  training, scoring, the shipped base, a fine-tuning run, the comparison of
  every method, the forgetting sweep, the storage formats' cost;
* ``tools``: the ``minipeft`` command, the benchmark, Hugging Face interop,
  the docs builder, the lessons' helpers.
"""

from . import backend
from .autograd import Tensor, no_grad, tensor
from .nn import GPT, GPTConfig

__version__ = "0.1.0"

__all__ = ["GPT", "GPTConfig", "Tensor", "__version__", "backend", "no_grad", "tensor"]
