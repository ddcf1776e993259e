r"""Gradient checkpointing: trade compute for activation memory.

A transformer block's backward needs the activations its forward computed
(attention probabilities, the MLP's hidden layer, ...): for L blocks that is
L blocks' worth of saved arrays alive at once, the largest single item in a
training step's memory. Checkpointing keeps only each block's *input*. The
forward runs without recording a graph; when backward reaches the block, it
runs the block's forward again, this time recording, and back-propagates
through that fresh graph. Peak activation memory drops from L blocks' worth to
L block inputs plus one block's worth, at the price of one extra forward per
block (about a third more compute).

:func:`checkpoint` is a :class:`~minipeft.autograd.function.Function` like any
operator, so it takes part in the graph and in the activation ledger:

* its forward saves the inputs (through ``save_for_backward``, so the ledger
  sees them) plus the dropout masks the block drew (see
  :func:`~minipeft.nn.layers.record_dropout_masks`), which the recomputation
  replays, so the gradients are exactly those of the plain run;
* its backward rebuilds the block's graph with gradients on and calls
  ``backward`` on it. The block's parameters are leaves of that inner graph,
  so they receive their gradients directly into ``.grad``; the inputs'
  gradients are returned to the outer graph as any op's would be.

The trainable parameters are passed in as extra (gradient-less) inputs for
one reason: an op is only recorded when one of its inputs requires a
gradient. With frozen embeddings the block input does not, yet the block's
own trainable parameters (a LoRA matrix injected later, say) still need
their gradients, so the node must exist.
"""

from __future__ import annotations

from ..autograd.function import Function, is_grad_enabled, no_grad, set_grad_enabled
from ..autograd.tensor import Tensor
from .layers import record_dropout_masks, replay_dropout_masks


class Checkpoint(Function):
    r"""y = fn(*inputs), recomputed in backward instead of remembered.

    Inputs are ``n_inputs`` tensors handed to ``fn``, followed by the trainable
    parameters ``fn`` uses (listed only so that the node is recorded; their
    gradients are accumulated by the inner backward, and this node returns
    None for them).
    """

    @staticmethod
    def forward(ctx, *arrays, fn, n_inputs):
        inputs = [Tensor(a, _copy=False) for a in arrays[:n_inputs]]
        # No graph inside: the block's activations are freed as soon as used.
        with no_grad(), record_dropout_masks() as tape:
            out = fn(*inputs)
        ctx.run = fn  # (ctx.fn is this Function class)
        ctx.n_inputs = n_inputs
        ctx.save_for_backward(*arrays[:n_inputs], *tape.masks)
        return out.data

    @staticmethod
    def backward(ctx, g):
        saved = ctx.saved
        n = ctx.n_inputs
        # Fresh leaves for the inputs: the inner graph ends at them, and their
        # .grad is what this node passes on to the outer graph.
        leaves = [Tensor(a, requires_grad=need, _copy=False)
                  for a, need in zip(saved[:n], ctx.needs_input_grad[:n])]
        with set_grad_enabled(True), replay_dropout_masks(saved[n:]):
            out = ctx.run(*leaves)
        if out.requires_grad:
            out.backward(g)  # parameters inside fn receive their .grad here
        n_params = len(ctx.needs_input_grad) - n
        return tuple(t.grad for t in leaves) + (None,) * n_params


def checkpoint(fn, *inputs: Tensor, params=()) -> Tensor:
    """``fn(*inputs)`` with its activations recomputed in backward rather than saved.

    Args:
        fn: a function of the input tensors returning one tensor, e.g. a block's
            forward. It must run the same layers in the same order each time.
        inputs: the tensors ``fn`` is applied to (block input, prefix keys and
            values, ...); those that require grad receive their gradients.
        params: every parameter ``fn`` may use (``block.parameters()``); the ones
            that require grad at call time receive their gradients, including
            parameters that were injected into the block after it was built.

    Without gradient recording (``no_grad``) it is simply ``fn(*inputs)``.
    """
    if not is_grad_enabled():
        return fn(*inputs)
    seen = {id(t) for t in inputs}
    trainable = []
    for p in params:
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            trainable.append(p)
    return Checkpoint.apply(*inputs, *trainable, fn=fn, n_inputs=len(inputs))
