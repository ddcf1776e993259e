r"""Training memory, per category: estimated, accounted and measured, side by side.

Training holds far more than the weights. For every parameter that trains,
fp32 AdamW keeps the weight (4 bytes), its gradient (4) and two moments (8):
16 bytes a parameter before a single activation is stored. On top come the
activations the forward pass saves for backward, which grow with the batch
and the sequence (the attention scores with its square), and the gradients of
those activations while backward runs. PEFT shrinks the first group with the
trainable count; the second only where the engine need not keep an input.

This package looks at one training step three ways and puts them side by side:

1. **Estimated** (:func:`estimate`): a closed form from the model config, the
   method and its knobs, the optimizer, the batch, the sequence length and
   the dtype. It builds no arrays, so it answers for the reference model and
   for 7B or 65B alike. It copies neither the model nor the methods: it
   builds the GPT's own module tree shape-only (every parameter a zero-stride
   array), asks the method to plan itself into it (``Method.plan``: which
   parameters train, what it adds and copies, by the selection its
   ``inject`` uses), and derives the activations from what *this* engine
   saves: each layer's ``trace``, beside its ``forward``, makes the same calls
   over abstract tensors, and each operator's saving rule (``MatMul`` keeps
   its left input only if the weight trains, ``LayerNorm`` keeps
   :math:`\hat x` and :math:`1/\sigma`, ``Softmax`` its output...) applies to
   buffers that know only their size.
2. **Accounted** (:func:`profile_step`): the engine's own books during a real
   step: parameter arrays, gradient buffers, optimizer state arrays, the
   activation ledger (``save_for_backward``, deduplicated by buffer), and the
   arrays backward creates, followed from the moment they appear to the
   moment they are freed (``weakref.finalize``). The accounted peak is the
   largest total of these live arrays at any point of the step.
3. **Measured**: the allocator itself. On the CPU, ``tracemalloc`` (NumPy
   reports every data buffer to it, in its own domain); on the GPU, a
   ``cupy.cuda.MemoryHook`` that sees every allocation and free of CuPy's pool.

Categories (the rows of every table):

* ``weights_frozen``, ``weights_trainable``: the parameters' arrays;
* ``gradients``: the ``.grad`` buffers (a masked weight's is full size);
* ``optimizer``: moments, and the flat indices of masked parameters;
* ``bookkeeping``: boolean gradient masks, and copies a PEFT method keeps to
  switch adapters exactly (a selective method's original values, a mask's
  indices);
* ``batch``: the token ids and targets;
* ``activations``: arrays saved for backward (the ledger) at their peak,
  split by owner (``activation_split``): the backbone's, or the method's own
  modules' (a wrapper's forward, LST's side network, a soft prompt's encoder).
  The ledger also holds parameter arrays (a MatMul keeps a frozen weight to
  compute its input's gradient; LayerNorm keeps its gain): those are weights,
  already counted above, so they are left out of this row;
* ``other``: other arrays the engine owns during the step: the outputs the
  caller holds (logits, loss), activation gradients in flight in backward,
  and the optimizer's scratch array (AdamW's in-place update works in one
  array the size of its largest parameter; it holds nothing between steps,
  so it is not state).

Why the views differ, and by how much, is part of the lesson:
estimated and accounted agree *exactly* on the first six rows (they count the
same arrays two ways), and so do the activations (the traces state what
each op saves, and the tests hold them to the ledger byte for byte).
Between operators (at the end of forward, of backward, of the optimizer
step) the allocator's NumPy bytes equal the books' total, byte for byte.
The measured peak is higher than the accounted one because operators
work in temporaries that no book holds while they run (GELU's backward in
two scratch arrays of its input's size, attention's backward in one of the
scores' size), and because Python objects (graph nodes, tensor wrappers)
take memory too; on the GPU the pool rounds every allocation up to 512 bytes.

Use::

    from minipeft import memory
    print(memory.estimate("7b", "lora", dtype="mixed", batch_size=1, seq_len=512))
    report = memory.profile_step(model, optimizer, (idx, targets))   # one real step
    print(report)                      # the three views and the gaps, with reasons
    memory.plot([report], "step.png")  # stacked bars (matplotlib)

or ``minipeft memory --method lora --r 8`` (``--method all``, ``--config 7b``,
``--fit``, ``--checkpointing``, ``--png PATH``).

All sizes are bytes; tables print MiB or GiB (binary: 1 GiB = 2**30 bytes,
which is also how GPU memory is sold: a "24 GB" card holds 24 GiB).

The package, one job a module:

* :mod:`~minipeft.memory.presets`: the categories, model presets, precisions, optimizers;
* :mod:`~minipeft.memory.estimate`: the closed form (:func:`estimate`);
* :mod:`~minipeft.memory.trace`: the engine's saving rules over shapes (the walk the
  layers' ``trace`` methods call);
* :mod:`~minipeft.memory.books`: the engine's books (accounted);
* :mod:`~minipeft.memory.measure`: the allocator (measured);
* :mod:`~minipeft.memory.report`: one real step, three views (:func:`profile_step`);
* :mod:`~minipeft.memory.tables`: the rule of thumb at scale, and what fits on a card;
* :mod:`~minipeft.memory.plot`: the stacked bars;
* :mod:`~minipeft.memory.checkpointing`: a step with and without gradient checkpointing;
* :mod:`~minipeft.memory.activations`: the levers that cut activations side by side, each
  step's activations split into the backbone's and the method's.
"""

from __future__ import annotations

from .books import _method_arrays, _optimizer_arrays
from .checkpointing import checkpointing_tradeoff, format_checkpointing
from .estimate import Estimate, base_parameters, estimate, full_finetuning_activations
from .plot import COLORS, plot
from .presets import CATEGORIES, DTYPES, LABELS, OPTIMIZERS, PRESETS, GiB, MiB, Precision, preset
from .report import PHASES, StepReport, profile_step
from .tables import fit_table, format_fit_table, format_rule_of_thumb, rule_of_thumb

__all__ = [
    "CATEGORIES", "COLORS", "DTYPES", "Estimate", "GiB", "LABELS", "MiB", "OPTIMIZERS", "PHASES",
    "PRESETS", "Precision", "StepReport", "base_parameters", "checkpointing_tradeoff", "estimate",
    "fit_table", "format_checkpointing", "format_fit_table", "format_rule_of_thumb",
    "full_finetuning_activations", "plot", "preset", "profile_step", "rule_of_thumb",
    "_method_arrays", "_optimizer_arrays",
]
