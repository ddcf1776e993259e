r"""A GPT-2, exactly: the configuration, attention, MLP, block, model and generation.

Read top to bottom: :class:`GPTConfig` (GPT-2's field names), :class:`KVCache`
(keys and values of earlier positions), :class:`CausalSelfAttention`,
:class:`MLP`, :class:`Block`, :class:`GPT`, then :func:`sample_next_token`.

The architecture is GPT-2's (Radford et al., 2019, as in Hugging Face's
``GPT2LMHeadModel``): learned position embeddings, pre-norm residual blocks,
one fused ``c_attn`` projection for queries, keys and values, attention scaled
by :math:`1/\sqrt{d_{head}}`, a 4x MLP with the tanh approximation of GELU, a
final LayerNorm and an LM head tied to the token embedding. Parameter names
and shapes are GPT-2's without the ``transformer.`` prefix, so a GPT-2
checkpoint maps one to one.

PEFT methods never edit this file. They reach in through three doors, the
same ones Hugging Face's GPT-2 offers peft:

* modules found by name (``h.0.attn.c_attn``) that they wrap;
* ``inputs_embeds``: embeddings used instead of looking ids up in ``wte``
  (prompt tuning prepends its virtual tokens there);
* ``kv_cache``: keys and values placed before the sequence's own in every
  layer (prefix tuning's trainable prefixes; generation's cache).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .. import backend
from ..autograd import ops
from ..autograd.function import is_grad_enabled, no_grad
from ..autograd.tensor import Tensor
from ..validate import Bool, Float, Int, check_fields, knob
from .checkpoint import checkpoint
from .layers import Dropout, Embedding, LayerNorm, Linear
from .module import Module, ModuleList

# ---------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------


@dataclass
class GPTConfig:
    """GPT-2's hyperparameters, by GPT-2's names; the defaults are minipeft's reference model.

    Attributes:
        n_layer: number of transformer blocks.
        n_head: attention heads per block (n_embd must divide evenly).
        n_embd: width C of the residual stream.
        vocab_size: number of token ids V (96: printable ASCII and newline).
        n_positions: longest sequence the model can see (learned positions).
        dropout: probability for the embedding, attention and residual dropouts
            (GPT-2's embd_pdrop, attn_pdrop and resid_pdrop, here one value).
        layer_norm_epsilon: the eps of every LayerNorm.
        gradient_checkpointing: recompute each block's forward in backward
            instead of keeping its activations (training only).
    """

    n_layer: int = knob(4, Int(low=1))
    n_head: int = knob(4, Int(low=1))
    n_embd: int = knob(128, Int(low=1))
    vocab_size: int = knob(96, Int(low=1))
    n_positions: int = knob(128, Int(low=1))
    dropout: float = knob(0.0, Float(low=0.0, high=1.0, high_open=True))
    layer_norm_epsilon: float = knob(1e-5, Float(low=0.0, low_open=True,
                                                 expect="positive (a finite number > 0)"))
    gradient_checkpointing: bool = knob(False, Bool())

    def __post_init__(self):
        try:
            check_fields(self)              # each field's rule (minipeft.validate)
        except ValueError as exc:           # KnobTypeError is one too
            raise type(exc)(f"GPTConfig.{exc}") from None
        if self.n_embd % self.n_head != 0:
            raise ValueError(
                f"GPTConfig: n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}), "
                "so that every head gets n_embd // n_head channels"
            )

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head


# ---------------------------------------------------------------------------
# The key/value cache
# ---------------------------------------------------------------------------


class KVCache:
    r"""Keys and values of P earlier positions, one optional (k, v) pair per layer.

    Each stored k and v is a Tensor shaped (B, nh, P, hs), or (1, nh, P, hs),
    which is broadcast over the batch. Attention in layer ``i`` calls
    :meth:`update`, which puts the layer's stored pair *before* the keys and
    values of the new tokens; every query may look at all P of them. The new
    tokens take positions P .. P+T-1 (Hugging Face's and peft's convention),
    so P + T may not exceed ``n_positions``.

    The cache serves two purposes, told apart by ``append``:

    * **generation** (``append=True``): the cache starts empty (or holding a
      prefix) and every forward appends the new tokens' keys and values,
      detached from the graph, so the next forward feeds only the newest
      token. Used under ``no_grad``.
    * **prefix tuning** (``append=False``, :meth:`from_prefix`): the pairs are
      trainable tensors (or computed from them); forward reads them, gradients
      flow back into them, and the cache never changes, so one cache serves
      every training step.
    """

    def __init__(self, n_layer: int, append: bool = True):
        self.layers: list[tuple[Tensor, Tensor] | None] = [None] * int(n_layer)
        self.append = bool(append)

    @classmethod
    def from_prefix(cls, pairs, append: bool = False) -> KVCache:
        """A cache holding ``pairs``: one (k, v) per layer (or None), each (B or 1, nh, P, hs)."""
        pairs = list(pairs)
        cache = cls(len(pairs), append=append)
        lengths = set()
        for i, pair in enumerate(pairs):
            if pair is None:
                continue
            if not (isinstance(pair, (tuple, list)) and len(pair) == 2
                    and all(isinstance(t, Tensor) for t in pair)):
                raise TypeError(f"KVCache: layer {i} must be a (k, v) pair of Tensors or None")
            k, v = pair
            if k.ndim != 4 or k.shape != v.shape:
                raise ValueError(
                    f"KVCache: layer {i} needs k and v of one shape (B, n_head, P, head_size), "
                    f"got {k.shape} and {v.shape}"
                )
            lengths.add(k.shape[2])
            cache.layers[i] = (k, v)
        if len(lengths) > 1:
            raise ValueError(f"KVCache: every layer must hold the same length P, got {sorted(lengths)}")
        return cache

    def copy(self, append: bool | None = None) -> KVCache:
        """A new cache holding the same pairs (the tensors are shared, not copied)."""
        out = KVCache(len(self.layers), self.append if append is None else append)
        out.layers = list(self.layers)
        return out

    @property
    def length(self) -> int:
        """P: how many positions the cache holds (0 when empty)."""
        for pair in self.layers:
            if pair is not None:
                return pair[0].shape[2]
        return 0

    def __len__(self) -> int:
        return self.length

    def update(self, layer_idx: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Keys and values of the past and the new tokens, each (B, nh, P+T, hs).

        Appends them to the cache when ``append`` is set (detached: the cache
        never keeps a graph alive).
        """
        past = self.layers[layer_idx]
        if past is not None:
            pk, pv = past
            B, nh, _, hs = k.shape
            if pk.shape[1] != nh or pk.shape[3] != hs or pk.shape[0] not in (1, B):
                raise ValueError(
                    f"KVCache: layer {layer_idx} holds keys of shape {pk.shape}; this model "
                    f"needs ({B} or 1, {nh}, P, {hs}) = (batch, n_head, P, head_size)"
                )
            if pk.shape[0] != B:  # one prefix shared by the whole batch
                pk = ops.broadcast_to(pk, (B,) + pk.shape[1:])            # (B, nh, P, hs)
                pv = ops.broadcast_to(pv, (B,) + pv.shape[1:])            # (B, nh, P, hs)
            k = ops.concatenate([pk, k], axis=2)                          # (B, nh, P+T, hs)
            v = ops.concatenate([pv, v], axis=2)                          # (B, nh, P+T, hs)
        if self.append:
            self.layers[layer_idx] = (_stored(k), _stored(v))
        return k, v

    def __repr__(self):
        return f"KVCache(n_layer={len(self.layers)}, length={self.length}, append={self.append})"


def _stored(t: Tensor) -> Tensor:
    """A detached tensor for the cache that owns its memory: the first keys of a
    prefill are a strided view into the (B, T, 3C) projection, which would
    otherwise stay alive with them."""
    data = t.data
    if data.base is not None:
        data = t.xp.ascontiguousarray(data)
    return Tensor(data, _copy=False)


# ---------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------


class CausalSelfAttention(Module):
    r"""Multi-head causal self-attention, GPT-2's.

    .. math::
        q, k, v = x W_{attn} + b_{attn} \ \text{(split in three, then into heads)},\qquad
        y = \mathrm{softmax}\!\Big(\frac{q k^\top}{\sqrt{d}} + M\Big)\, v,

    with :math:`M_{ij} = -\infty` where key j lies in query i's future, and
    d the head size. Heads are concatenated and projected by ``c_proj``.
    """

    def __init__(self, config: GPTConfig, layer_idx: int, rng=None, dropout_seeds=(None, None)):
        super().__init__()
        C = config.n_embd
        self.n_head = config.n_head
        self.n_embd = C
        self.layer_idx = layer_idx
        # q, k and v for all heads in one product; GPT-2 scales the init of the
        # projections that write into the residual stream by 1/sqrt(2 n_layer)
        self.c_attn = Linear(C, 3 * C, rng=rng)
        self.c_proj = Linear(C, C, rng=rng, std=0.02 / math.sqrt(2 * config.n_layer))
        self.attn_dropout = Dropout(config.dropout, seed=dropout_seeds[0])
        self.resid_dropout = Dropout(config.dropout, seed=dropout_seeds[1])

    def forward(self, x: Tensor, kv_cache: KVCache | None = None) -> Tensor:
        B, T, C = x.shape
        nh, hs = self.n_head, C // self.n_head

        # Queries, keys and values for every head, from one fused projection.
        qkv = self.c_attn(x)                                              # (B, T, 3C)

        # Without a cache, the whole computation below is one op with a
        # hand-written backward (ops.CausalAttention): the same maths without
        # the copies and zero-padded slice gradients the general ops make.
        if kv_cache is None:
            keep = self.attn_dropout.keep_mask((B, nh, T, T), qkv)         # None: no dropout
            y = ops.causal_attention(qkv, nh, keep, self.attn_dropout.p)  # (B, T, C)
            return self.resid_dropout(self.c_proj(y))

        # With a cache, step by step. The fused projection is split along its
        # last axis, then each part into nh heads of hs.
        q, k, v = qkv[..., :C], qkv[..., C:2 * C], qkv[..., 2 * C:]       # each (B, T, C)
        q = q.reshape(B, T, nh, hs).transpose(1, 2)                       # (B, nh, T, hs)
        k = k.reshape(B, T, nh, hs).transpose(1, 2)                       # (B, nh, T, hs)
        v = v.reshape(B, T, nh, hs).transpose(1, 2)                       # (B, nh, T, hs)

        # Keys and values of earlier positions (a prefix, or generation's
        # cache) go before the new ones: P + T keys in all.
        k, v = kv_cache.update(self.layer_idx, k, v)                      # (B, nh, P+T, hs)
        P = k.shape[2] - T

        # Scores, scaled by 1/sqrt(hs) so their variance does not grow with
        # the head size (scaling q is cheaper than scaling the T x (P+T) scores).
        q = q * (1.0 / math.sqrt(hs))
        att = q @ k.transpose(-2, -1)                                     # (B, nh, T, P+T)

        # Causal mask: query i (at position P+i) sees the P past keys and the
        # new keys j <= i. exp(-inf) = 0 exactly; every row keeps at least its
        # own key, so no row is all -inf and softmax stays finite.
        if T > 1:
            mask = att.xp.triu(att.xp.ones((T, P + T), dtype=bool), k=P + 1)  # (T, P+T)
            att = ops.masked_fill(att, mask, -math.inf)
        att = ops.softmax(att, axis=-1)
        att = self.attn_dropout(att)

        # Weighted sum of values, heads side by side again, output projection.
        y = att @ v                                                       # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(B, T, C)                            # (B, T, C)
        return self.resid_dropout(self.c_proj(y))

    def trace(self, walk, x, past=None):
        """:meth:`forward` over shapes (see :mod:`minipeft.memory.trace`); ``past`` is this
        layer's (k, v) pair of the cache, when there is one."""
        B, T, C = x.shape
        nh, hs, i = self.n_head, C // self.n_head, self.layer_idx
        qkv = self.c_attn.trace(walk, x)                                  # (B, T, 3C)
        if past is None:
            keep = walk.keep_mask((B, nh, T, T), self.attn_dropout.p if self.training else 0.0)
            y = walk.causal_attention(qkv, nh, keep, f"h.{i} attention")   # (B, T, C)
        else:
            q, k, v = (walk.view(qkv, (B, nh, T, hs)) for _ in range(3))   # views of qkv
            k, v = (walk.concatenate([walk.view(p, (B, nh) + p.shape[2:]), t], axis=2)
                    for p, t in zip(past, (k, v)))                         # (B, nh, P+T, hs)
            q = walk.mul(q, walk.scalar(), f"h.{i} q scale")              # q / sqrt(hs)
            att = walk.matmul(q, walk.transpose(k), f"h.{i} q@k")          # (B, nh, T, P+T)
            if T > 1:
                att = walk.masked_fill(att, walk.new(att.shape[-2:], itemsize=1),
                                       f"h.{i} causal mask")
            att = walk.softmax(att, f"h.{i} softmax")
            att = self.attn_dropout.trace(walk, att)
            y = walk.matmul(att, v, f"h.{i} att@v")                       # (B, nh, T, hs)
            y = walk.new((B, T, C), y.req)   # transpose(1, 2).reshape: a copy, kept by nobody
        return self.resid_dropout.trace(walk, self.c_proj.trace(walk, y))


# ---------------------------------------------------------------------------
# MLP and block
# ---------------------------------------------------------------------------


class MLP(Module):
    r"""The position-wise feed-forward network, 4x wide.

    .. math:: y = \mathrm{GELU}(x W_{fc} + b_{fc})\, W_{proj} + b_{proj}
    """

    def __init__(self, config: GPTConfig, rng=None, dropout_seed=None):
        super().__init__()
        C = config.n_embd
        self.c_fc = Linear(C, 4 * C, rng=rng)
        self.c_proj = Linear(4 * C, C, rng=rng, std=0.02 / math.sqrt(2 * config.n_layer))
        self.dropout = Dropout(config.dropout, seed=dropout_seed)

    def forward(self, x: Tensor) -> Tensor:
        h = ops.gelu(self.c_fc(x))                                        # (B, T, 4C)
        return self.dropout(self.c_proj(h))                               # (B, T, C)

    def trace(self, walk, x):
        """:meth:`forward` over shapes."""
        h = walk.gelu(self.c_fc.trace(walk, x), walk.label(self, " gelu"))   # (B, T, 4C)
        return self.dropout.trace(walk, self.c_proj.trace(walk, h))


class Block(Module):
    """One pre-norm transformer block: attention, then MLP, each added to the residual stream."""

    def __init__(self, config: GPTConfig, layer_idx: int, rng=None, dropout_seeds=(None,) * 3):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = CausalSelfAttention(config, layer_idx, rng, dropout_seeds[:2])
        self.ln_2 = LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config, rng, dropout_seeds[2])

    def forward(self, x: Tensor, kv_cache: KVCache | None = None) -> Tensor:
        x = x + self.attn(self.ln_1(x), kv_cache=kv_cache)
        x = x + self.mlp(self.ln_2(x))
        return x

    def trace(self, walk, x, past=None):
        """:meth:`forward` over shapes."""
        x = walk.add(x, self.attn.trace(walk, self.ln_1.trace(walk, x), past))
        x = walk.add(x, self.mlp.trace(walk, self.ln_2.trace(walk, x)))
        return x


# ---------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------


def _derived_seed(seed: int, k: int) -> int:
    """An independent integer seed for the k-th dropout layer, from the model's seed."""
    return int(np.random.SeedSequence([seed, k]).generate_state(1)[0])


class GPT(Module):
    r"""GPT-2 language model with its LM head tied to the token embedding.

    Parameters (GPT-2's names): ``wte.weight`` (V, C), ``wpe.weight``
    (n_positions, C), ``h.{i}.ln_1``, ``h.{i}.attn.c_attn`` (C, 3C),
    ``h.{i}.attn.c_proj`` (C, C), ``h.{i}.ln_2``, ``h.{i}.mlp.c_fc`` (C, 4C),
    ``h.{i}.mlp.c_proj`` (4C, C), ``ln_f``. The LM head is ``wte.weight``
    itself (logits = x wte^T): one parameter, listed and counted once.

    Initialisation is GPT-2's and depends only on ``seed``: weights and
    embeddings :math:`\mathcal N(0, 0.02^2)`, the two residual projections
    (``c_proj``) :math:`\mathcal N(0, (0.02/\sqrt{2 n_{layer}})^2)` so the
    residual stream's variance does not grow with depth, biases 0, LayerNorm
    weights 1. Drawn on the host in construction order, created float32 on the
    CPU; move and cast with ``.to(device, dtype)``.
    """

    def __init__(self, config: GPTConfig | None = None, seed: int = 0):
        super().__init__()
        config = GPTConfig() if config is None else config
        if not isinstance(config, GPTConfig):
            raise TypeError(f"GPT expects a GPTConfig, got {type(config).__name__}")
        self.config = config
        rng = np.random.default_rng(seed)
        seeds = iter(_derived_seed(seed, k) for k in range(1 + 3 * config.n_layer))

        self.wte = Embedding(config.vocab_size, config.n_embd, rng=rng)     # token embedding
        self.wpe = Embedding(config.n_positions, config.n_embd, rng=rng)    # position embedding
        self.drop = Dropout(config.dropout, seed=next(seeds))
        self.h = ModuleList(
            Block(config, i, rng, (next(seeds), next(seeds), next(seeds)))
            for i in range(config.n_layer)
        )
        self.ln_f = LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)

    # -- input checks ------------------------------------------------------
    def _token_ids(self, idx, what="idx"):
        """Validate token ids (B, T) and move them to the model's device."""
        if isinstance(idx, Tensor):
            idx = idx.data
        if isinstance(idx, (list, tuple)):
            idx = np.asarray(idx)
        if not backend.is_array(idx):
            raise TypeError(
                f"{what}: expected an integer array of token ids shaped (B, T), "
                f"got {type(idx).__name__}"
            )
        if idx.ndim != 2:
            raise ValueError(
                f"{what}: expected token ids shaped (B, T) = (batch, sequence), got shape "
                f"{tuple(idx.shape)}; add a batch axis with idx[None] for one sequence"
            )
        if idx.dtype.kind not in "iu":
            raise TypeError(f"{what}: expected integer token ids, got dtype {idx.dtype}")
        if idx.size and (int(idx.min()) < 0 or int(idx.max()) >= self.config.vocab_size):
            raise ValueError(
                f"{what}: token ids must lie in [0, {self.config.vocab_size}) (vocab_size), "
                f"got ids from {int(idx.min())} to {int(idx.max())}"
            )
        return backend.to_device(idx, self.device)

    def _targets(self, targets, B, T, ignore_index):
        """Validate targets (B, T): ids in [0, V) or ignore_index; move to the model's device."""
        if isinstance(targets, Tensor):
            targets = targets.data
        if isinstance(targets, (list, tuple)):
            targets = np.asarray(targets)
        if tuple(targets.shape) != (B, T):
            raise ValueError(
                f"targets: expected shape (B, T) = {(B, T)} like the input, got "
                f"{tuple(targets.shape)} (targets are already shifted: targets[:, t] is the "
                "token that should follow position t)"
            )
        if targets.dtype.kind not in "iu":
            raise TypeError(f"targets: expected integer token ids, got dtype {targets.dtype}")
        bad = (targets != ignore_index) & ((targets < 0) | (targets >= self.config.vocab_size))
        if bool(bad.any()):
            raise ValueError(
                f"targets: ids must lie in [0, {self.config.vocab_size}) or equal ignore_index "
                f"({ignore_index}); found {int(bad.sum())} that do not"
            )
        # the loss is a mean over the positions not ignored: with none, there is nothing to
        # average (0/0), and reporting 0.0 would look like a perfect fit
        if not (targets != ignore_index).any():
            raise ValueError(
                f"targets: every one of the {B}x{T} targets equals ignore_index "
                f"({ignore_index}), so the loss has nothing to average: a batch needs at least "
                "one position to predict (is the prompt as long as the sequence?)"
            )
        return backend.to_device(targets, self.device)

    # -- forward -------------------------------------------------------------
    def forward(self, idx=None, targets=None, *, inputs_embeds: Tensor | None = None,
                kv_cache: KVCache | None = None, ignore_index: int = -100):
        r"""Logits for every position, and the loss when ``targets`` are given.

        Args:
            idx: token ids (B, T), an integer array on any device (moved to the model's).
            targets: token ids (B, T) the positions should predict, already
                shifted by the caller; positions equal to ``ignore_index`` are
                left out of the loss (padding, prompts).
            inputs_embeds: a Tensor (B, T, C) used instead of ``wte(idx)``
                (prompt tuning prepends its virtual tokens here). Give either
                this or ``idx``.
            kv_cache: a :class:`KVCache` of P earlier positions; the new tokens
                take positions P .. P+T-1.
            ignore_index: the target value that is not predicted.

        Returns:
            logits (B, T, V), or ``(logits, loss)`` when targets are given, with
            loss the mean cross-entropy over the positions not ignored.
        """
        cfg = self.config
        # Token embeddings: looked up, or handed in.
        if (idx is None) == (inputs_embeds is None):
            raise ValueError("GPT.forward: give exactly one of idx (token ids) and inputs_embeds")
        if inputs_embeds is None:
            idx = self._token_ids(idx)
            tok = self.wte(idx)                                           # (B, T, C)
        else:
            if not isinstance(inputs_embeds, Tensor) or inputs_embeds.ndim != 3 \
                    or inputs_embeds.shape[2] != cfg.n_embd:
                got = inputs_embeds.shape if isinstance(inputs_embeds, Tensor) \
                    else type(inputs_embeds).__name__
                raise ValueError(
                    f"inputs_embeds: expected a Tensor shaped (B, T, {cfg.n_embd}) = "
                    f"(batch, sequence, n_embd), got {got}"
                )
            if inputs_embeds.device != self.device or inputs_embeds.dtype != self.dtype:
                raise TypeError(
                    f"inputs_embeds: expected {self.dtype} on device {self.device!r} like the "
                    f"model, got {inputs_embeds.dtype} on {inputs_embeds.device!r}"
                )
            tok = inputs_embeds
        B, T, _ = tok.shape
        if B == 0 or T == 0:
            raise ValueError(
                f"GPT.forward: the batch is empty (B={B} sequences of T={T} tokens): give at "
                "least one sequence of at least one token"
            )

        # Positions continue after the cache: P .. P+T-1.
        if kv_cache is not None and not isinstance(kv_cache, KVCache):
            raise TypeError(f"kv_cache: expected a KVCache, got {type(kv_cache).__name__}")
        if kv_cache is not None and len(kv_cache.layers) != cfg.n_layer:
            raise ValueError(
                f"kv_cache: holds {len(kv_cache.layers)} layers, the model has {cfg.n_layer}"
            )
        P = 0 if kv_cache is None else kv_cache.length
        if P + T > cfg.n_positions:
            raise ValueError(
                f"sequence too long: {T} tokens" + (f" after {P} cached positions" if P else "")
                + f" exceed n_positions={cfg.n_positions}, the longest context this model has "
                "position embeddings for"
            )
        pos = self.wpe.weight.xp.arange(P, P + T)                         # (T,)
        x = self.drop(tok + self.wpe(pos))                                # (B, T, C) + (T, C)

        # The blocks; with gradient checkpointing each keeps only its input
        # and recomputes the rest in backward. (A cache being appended to is
        # generation's, which records no graph: nothing to checkpoint.)
        ckpt = (cfg.gradient_checkpointing and self.training and is_grad_enabled()
                and (kv_cache is None or not kv_cache.append))
        for i, block in enumerate(self.h):
            if not ckpt:
                x = block(x, kv_cache=kv_cache)
                continue
            past = kv_cache.layers[i] if kv_cache is not None else None
            x = checkpoint(self._block_fn(i), x, *(past or ()), params=block.parameters())

        # Final norm, then the tied LM head: a score for every vocabulary entry.
        x = self.ln_f(x)
        logits = x @ self.wte.weight.T                                    # (B, T, V)
        if targets is None:
            return logits

        targets = self._targets(targets, B, T, ignore_index)
        loss = ops.cross_entropy(logits.reshape(B * T, cfg.vocab_size),   # (B*T, V)
                                 targets.reshape(B * T), ignore_index=ignore_index)
        return logits, loss

    def trace(self, walk, idx=None, inputs_embeds=None, past=None):
        r""":meth:`forward` with targets, over shapes: what each op of a training step's
        forward saves for backward (see :mod:`minipeft.memory.trace`).

        ``idx`` is the ids' abstract tensor (B, T), or ``inputs_embeds`` one of
        (B, T, C); ``past`` a (k, v) pair per layer, each (1 or B, nh, P, hs).
        """
        cfg = self.config
        tok = self.wte.trace(walk, idx) if inputs_embeds is None else inputs_embeds  # (B, T, C)
        B, T, _ = tok.shape
        pos = walk.new((T,), itemsize=8)                                  # arange: int64
        x = self.drop.trace(walk, walk.add(tok, self.wpe.trace(walk, pos)))   # (B, T, C)
        ckpt = cfg.gradient_checkpointing and self.training
        for i, block in enumerate(self.h):
            pair = tuple(past[i]) if past is not None else ()
            if not ckpt:
                x = block.trace(walk, x, pair or None)
                continue
            x = walk.checkpoint(lambda w, x, *kv, block=block: block.trace(w, x, kv or None),
                                x, *pair, params=list(block.parameters()), label=f"h.{i} checkpoint")
        x = self.ln_f.trace(walk, x)
        logits = walk.matmul(x, walk.transpose(walk.param(self.wte.weight)), "lm head")  # (B, T, V)
        return logits, walk.cross_entropy(logits, "cross entropy")

    def _block_fn(self, i: int):
        """Block i as a function of (x, past k, past v) tensors, for :func:`checkpoint`.

        The past pair, if any, comes in as explicit inputs so that a trainable
        prefix receives its gradient through the checkpoint node.
        """
        block, n_layer = self.h[i], self.config.n_layer

        def run(x, *past):
            cache = None
            if past:
                cache = KVCache(n_layer, append=False)
                cache.layers[i] = tuple(past)
            return block(x, kv_cache=cache)

        return run

    # -- generation ------------------------------------------------------------
    def generate(self, idx, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 seed: int | None = None, stop_token: int | None = None, *, use_cache: bool = True,
                 kv_cache: KVCache | None = None, prompt_embeds: Tensor | None = None) -> np.ndarray:
        r"""Continue each row of ``idx`` (B, T) by up to ``max_new_tokens`` tokens.

        The prompt is run once (prefill) to fill a :class:`KVCache`; then each
        step feeds only the newest token, whose attention reads the cached
        keys and values: one position of work per step instead of the whole
        sequence. ``use_cache=False`` recomputes the whole sequence every step
        (the same tokens, for comparison).

        Args:
            idx: prompt token ids (B, T), any device.
            max_new_tokens: how many tokens to add; T + max_new_tokens (plus
                any prefix) must fit in ``n_positions``.
            temperature: divides the logits before sampling; 0 means greedy
                (always the most likely token).
            top_k: sample only among the k most likely tokens.
            seed: seeds the sampling generator (host NumPy), for repeatable output.
            stop_token: once a row produces it, the row keeps producing it
                (as padding) and generation ends when every row has.
            kv_cache: a prefix to start from (prefix tuning); it is not modified.
            prompt_embeds: a Tensor (1 or B, Pv, C) of embeddings put before
                the prompt's (prompt tuning's virtual tokens).

        Returns:
            a host NumPy int64 array (B, T + number of new tokens) (the prompt
            followed by the new tokens; no virtual tokens).

        Runs in eval mode (no dropout) under ``no_grad``; the model's mode is
        restored afterwards.
        """
        cfg = self.config
        prompt = backend.asnumpy(self._token_ids(idx)).astype(np.int64)  # (B, T) on the host
        B, T = prompt.shape
        # NaN passes every comparison (nan < 0 is False), so the rules ask for finiteness by
        # name; 2.5 tokens is refused, not rounded down.
        max_new_tokens = Int(low=0, expect="an integer >= 0").check("max_new_tokens", max_new_tokens)
        temperature = Float(low=0.0, expect="a finite number >= 0 (0 is greedy)") \
            .check("temperature", temperature)
        top_k = Int(low=1, optional=True, expect="a positive integer or None (all tokens)") \
            .check("top_k", top_k)
        stop_token = Int(low=0, high=cfg.vocab_size - 1, optional=True,
                         expect=f"a token id in [0, {cfg.vocab_size})").check("stop_token", stop_token)
        P = 0 if kv_cache is None else kv_cache.length
        Pv = 0 if prompt_embeds is None else prompt_embeds.shape[1]
        if P + Pv + T + max_new_tokens > cfg.n_positions:
            raise ValueError(
                f"generate: {P + Pv} prefix + {T} prompt + {max_new_tokens} new tokens = "
                f"{P + Pv + T + max_new_tokens} exceed n_positions={cfg.n_positions}; "
                f"shorten the prompt or ask for at most {max(cfg.n_positions - P - Pv - T, 0)} "
                "new tokens (max_new_tokens; --max-new-tokens on the command line)"
            )
        rng = np.random.default_rng(seed)
        out = prompt
        if max_new_tokens == 0:
            return out

        def embed(tokens):
            """Inputs for a forward over ``tokens``: ids, or virtual tokens + embeddings."""
            if prompt_embeds is None:
                return {"idx": tokens}
            pe = prompt_embeds
            if pe.shape[0] != tokens.shape[0]:
                pe = ops.broadcast_to(pe, (tokens.shape[0],) + pe.shape[1:])  # (B, Pv, C)
            tok = self.wte(self._token_ids(tokens))                           # (B, T, C)
            return {"inputs_embeds": ops.concatenate([pe, tok], axis=1)}     # (B, Pv+T, C)

        was_training = self.training
        self.eval()
        try:
            with no_grad():
                cache = None
                if use_cache:
                    cache = KVCache(cfg.n_layer) if kv_cache is None else kv_cache.copy(append=True)
                    logits = self(kv_cache=cache, **embed(prompt))        # prefill: (B, Pv+T, V)
                done = np.zeros(B, dtype=bool)
                for step in range(max_new_tokens):
                    if not use_cache:  # the whole sequence again, every step
                        base = None if kv_cache is None else kv_cache.copy(append=False)
                        logits = self(kv_cache=base, **embed(out))        # (B, Pv+T+step, V)
                    last = backend.asnumpy(logits.data[:, -1, :])         # (B, V) on the host
                    nxt = sample_next_token(last, temperature, top_k, rng)  # (B,)
                    if stop_token is not None:
                        nxt = np.where(done, stop_token, nxt)
                        done |= nxt == stop_token
                    out = np.concatenate([out, nxt[:, None]], axis=1)     # (B, T+step+1)
                    if stop_token is not None and done.all():
                        break
                    if use_cache and step + 1 < max_new_tokens:
                        logits = self(nxt[:, None], kv_cache=cache)       # (B, 1, V)
        finally:
            self.train(was_training)
        return out


# ---------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------


def sample_next_token(logits: np.ndarray, temperature: float = 1.0, top_k: int | None = None,
                      rng: np.random.Generator | None = None) -> np.ndarray:
    r"""One token id per row of host ``logits`` (B, V).

    Greedy (arg-max) when ``temperature`` is 0; otherwise sample from
    :math:`\mathrm{softmax}(z / \tau)` restricted to the ``top_k`` largest
    logits. Runs on the host: B x V numbers, small next to the forward pass.
    """
    z = np.asarray(logits, dtype=np.float64)
    if temperature == 0:
        return z.argmax(axis=-1)
    z = z / temperature
    if top_k is not None and top_k < z.shape[-1]:
        kth = np.sort(z, axis=-1)[:, -int(top_k)][:, None]                # (B, 1)
        z = np.where(z < kth, -np.inf, z)
    p = np.exp(z - z.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    rng = np.random.default_rng() if rng is None else rng
    # inverse-CDF sampling, one uniform draw per row
    u = rng.random((z.shape[0], 1))
    return np.minimum((p.cumsum(axis=-1) < u).sum(axis=-1), z.shape[-1] - 1)
