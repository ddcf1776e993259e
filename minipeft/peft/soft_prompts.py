r"""Soft prompts (additive): prompt tuning and prefix tuning.

Neither method touches a weight of the base. Both add P *virtual tokens*
that exist only as vectors:

* **prompt tuning** (Lester et al.) learns P input embeddings
  :math:`E \in \mathbb R^{P\times C}` and prepends them to the embedded
  input: the base sees ``[E; wte(idx)]`` (P + T positions), through
  ``inputs_embeds``. P·C parameters (2,560 for P = 20, C = 128).
* **prefix tuning** (Li and Liang) learns, for every layer, P keys and P
  values that every real token can attend to, through the base's key/value
  cache (``kv_cache``). P·n_layer·2·C parameters (20,480 here), optionally
  produced during training by a small MLP from P embeddings (the
  reparameterisation that stabilises training); only the produced prefixes
  are saved.

Positions follow Hugging Face peft: the real tokens take positions
P .. P+T-1, so P + T may not exceed ``n_positions``; the loss covers the real
tokens only.

What they cost: they train very few parameters, but the gradient still has
to flow back through *every* layer to reach the first positions (prompt
tuning) or each layer's attention (prefix tuning), so activations are saved
almost as in full fine-tuning; and every forward pass, at inference too,
attends over P more positions. Nothing here merges into the weights, so that
cost stays (``minipeft compare`` counts it as :math:`2 \cdot 2\,P\,C` FLOPs per
token per layer: each query meets P more keys and mixes P more values).
"""

from __future__ import annotations

import zlib

import numpy as np

from .. import backend
from ..autograd import Tensor, no_grad, ops
from ..data.tokenizer import IGNORE_INDEX, CharTokenizer
from ..nn.gpt import KVCache
from ..nn.layers import shaped
from ..nn.module import Module, Parameter
from .model import register_method
from .tuner import AdapterParams, Method, MethodPlan


def _init_rng(seed: int, method: str) -> np.random.Generator:
    """The generator of a soft prompt's initial values, salted with the method's name.

    A bare ``default_rng(seed)`` would replay the stream that built the base
    (``GPT(seed=0)`` draws ``wte`` first, from N(0, 0.02^2) too), so a
    "random" prompt or prefix would be a copy of the first rows of ``wte``.
    """
    return np.random.default_rng([seed, zlib.crc32(method.encode())])


def _holder(pm) -> Module:
    """The PeftModel's ``prompt_encoder`` holder (one child per adapter name)."""
    if "prompt_encoder" not in pm._modules:
        pm.prompt_encoder = AdapterParams()
    return pm.prompt_encoder


class PromptEncoder(Module):
    r"""The trainable part of a soft prompt: P vectors, optionally through an MLP.

    ``embedding`` is (P, D) with D = C (prompt tuning, prefix tuning without
    projection: D = n_layer·2·C). With a projection, ``embedding`` is (P, C)
    and the output is :math:`\tanh(E W_1 + b_1) W_2 + b_2` of width
    n_layer·2·C.
    """

    def __init__(self, embedding: np.ndarray, projection=None, device="cpu"):
        super().__init__()
        self.embedding = Parameter(embedding, device=device)
        if projection is not None:
            w1, b1, w2, b2 = projection
            self.mlp_w1 = Parameter(w1, device=device)
            self.mlp_b1 = Parameter(b1, device=device)
            self.mlp_w2 = Parameter(w2, device=device)
            self.mlp_b2 = Parameter(b2, device=device)
        self.has_projection = projection is not None

    @classmethod
    def shape_only(cls, shapes: dict, dtype) -> PromptEncoder:
        """An encoder of these parameter shapes (:func:`prefix_shapes`) holding no memory."""
        arrays = {k: shaped(s, dtype) for k, s in shapes.items()}
        projection = None
        if "mlp_w1" in arrays:
            projection = tuple(arrays[k] for k in ("mlp_w1", "mlp_b1", "mlp_w2", "mlp_b2"))
        return cls(arrays["embedding"], projection)

    def forward(self):
        if not self.has_projection:
            return self.embedding
        h = ops.tanh(ops.matmul(self.embedding, self.mlp_w1) + self.mlp_b1)   # (P, hidden)
        return ops.matmul(h, self.mlp_w2) + self.mlp_b2                        # (P, L*2*C)

    def trace(self, walk):
        """:meth:`forward` over shapes, for the memory estimate."""
        E = walk.param(self.embedding)
        if not self.has_projection:
            return E
        h = walk.add(walk.matmul(E, walk.param(self.mlp_w1), "prefix mlp"),
                     walk.param(self.mlp_b1))                                  # (P, hidden)
        h = walk.tanh(h, "prefix mlp tanh")
        return walk.add(walk.matmul(h, walk.param(self.mlp_w2), "prefix mlp"),
                        walk.param(self.mlp_b2))                               # (P, L*2*C)


def prefix_shapes(config, gpt_config) -> dict:
    """The prefix encoder's parameter shapes: the prefixes (P, L*2*C) themselves, or with
    ``prefix_projection`` E (P, C) and the MLP C -> hidden -> L*2*C that makes them."""
    P, C = config.num_virtual_tokens, gpt_config.n_embd
    width = gpt_config.n_layer * 2 * C
    if not config.prefix_projection:
        return {"embedding": (P, width)}
    H = config.encoder_hidden_size
    return {"embedding": (P, C), "mlp_w1": (C, H), "mlp_b1": (H,), "mlp_w2": (H, width),
            "mlp_b2": (width,)}


class _SoftPromptMethod(Method):
    """Shared parts: the encoder lives on the PeftModel, keyed by adapter name."""

    #: the virtual tokens go into the key/value cache (prefix) rather than before the input
    in_cache = False

    def encoder_shapes(self, gpt_config) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError

    def plan(self, base) -> MethodPlan:
        """The encoder, shape-only; the base untouched; the inputs it builds, over shapes."""
        P = self.num_virtual_tokens = self.config.num_virtual_tokens
        enc = PromptEncoder.shape_only(self.encoder_shapes(base.config), base.dtype)
        plan = MethodPlan(added=dict(enc.named_parameters()),
                          inputs=lambda walk, idx: self.trace_inputs(walk, base, enc, idx))
        if self.in_cache:
            plan.prefix_tokens = P
        else:
            plan.prompt_tokens = P
        return plan

    def encoder(self, pm) -> PromptEncoder:
        return _holder(pm)._modules[self.name]

    def named_parameters(self, pm):
        return {n: p for n, p in self.encoder(pm).named_parameters()}

    def remove(self, pm) -> None:
        holder = _holder(pm)
        if self.name in holder._modules:
            delattr(holder, self.name)

    def detach_keep(self, pm) -> None:
        self.remove(pm)

    def extra_flops_per_token(self, pm) -> int:
        r"""FLOPs the virtual tokens add to each token's forward pass, at inference too.

        Each layer's query meets P more keys and mixes P more values:
        :math:`2 \cdot 2\,P\,C` per layer. (Prompt tuning also runs its P virtual
        tokens through the whole model once per sequence, in the prefill.)
        """
        cfg = pm.base_model.config
        return 4 * cfg.n_layer * cfg.n_embd * int(self.num_virtual_tokens)

    def _check_fits(self, pm, T):
        """Refuse T real tokens that, after the P virtual ones, overrun ``n_positions``."""
        P, n = self.num_virtual_tokens, pm.config.n_positions
        if P + T > n:
            raise ValueError(
                f"{P} virtual tokens + {T} real tokens = {P + T} positions exceed "
                f"n_positions={n}: shorten the input or use fewer virtual tokens"
            )


@register_method("PROMPT_TUNING")
class PromptTuningMethod(_SoftPromptMethod):
    """Prompt tuning: P trainable embeddings prepended to the input."""

    def encoder_shapes(self, gpt_config) -> dict:
        """E (P, C): one input embedding per virtual token."""
        return {"embedding": (self.config.num_virtual_tokens, gpt_config.n_embd)}

    def inject(self, pm) -> None:
        r"""Make the P trainable embeddings E (P, C), on the PeftModel's ``prompt_encoder``.

        The base is not touched. ``prompt_tuning_init`` sets E's start:
        ``VOCAB``, the embeddings of P random vocabulary entries; ``TEXT``,
        those of ``prompt_tuning_init_text``'s characters, repeated or cut to
        P; otherwise ``RANDOM``, :math:`\mathcal N(0, 0.02^2)` like ``wte``. Each
        is a copy: training E never moves ``wte``.
        """
        cfg, base = self.config, pm.base_model
        P = self.num_virtual_tokens = cfg.num_virtual_tokens
        self._check_fits(pm, 1)                          # at least one real token must fit
        wte = backend.asnumpy(base.wte.weight.data)                          # (V, C)
        rng = _init_rng(cfg.init_seed, "prompt_tuning")
        if cfg.prompt_tuning_init == "VOCAB":
            emb = wte[rng.integers(0, wte.shape[0], size=P)]
        elif cfg.prompt_tuning_init == "TEXT":
            ids = np.asarray(CharTokenizer().encode(cfg.prompt_tuning_init_text))
            if ids.size and ids.max() >= wte.shape[0]:
                raise ValueError(
                    f"prompt_tuning_init_text encodes to token ids up to {int(ids.max())}, "
                    f"beyond this model's vocabulary of {wte.shape[0]}"
                )
            emb = wte[np.resize(ids, P)] if P else wte[:0]                   # repeat to length P
        else:
            emb = rng.normal(0.0, 0.02, size=self.encoder_shapes(base.config)["embedding"])
        setattr(_holder(pm), self.name,
                PromptEncoder(emb.astype(wte.dtype).copy(), device=base.device))

    def named_parameters(self, pm):
        return {"prompt_embeddings": self.encoder(pm).embedding}

    def forward_inputs(self, pm, idx, targets):
        r"""The base's input with the prompt in front: ``inputs_embeds`` :math:`[E; \mathrm{wte}(idx)]`.

        ``idx`` (B, T) becomes embeddings (B, P+T, C): the same P vectors E
        before every sequence of the batch. The base adds position
        embeddings to all P+T, so the virtual tokens take positions
        0 .. P-1 and the real ones P .. P+T-1. ``targets`` (B, T) get P
        ``IGNORE_INDEX`` entries in front, (B, P+T), so the loss is over the
        real tokens only; :meth:`trim_logits` then cuts the P virtual
        positions off the logits. With P = 0 the input passes as it is.
        """
        P = self.num_virtual_tokens
        if P == 0:
            return {}, targets
        base = pm.base_model
        ids = base._token_ids(idx)
        B, T = ids.shape
        self._check_fits(pm, T)
        prompt = self.encoder(pm).embedding                                  # (P, C)
        virtual = ops.broadcast_to(ops.reshape(prompt, (1, P, prompt.shape[1])),
                                   (B, P, prompt.shape[1]))                  # (B, P, C)
        embeds = ops.concatenate([virtual, base.wte(ids)], axis=1)           # (B, P+T, C)
        if targets is not None:
            # a Tensor's array, or the array itself: every array has a .data
            # attribute too (NumPy's a memoryview, CuPy's a device pointer)
            t = backend.asnumpy(targets.data if isinstance(targets, Tensor) else targets)
            pad = np.full((B, P), IGNORE_INDEX, dtype=np.int64)
            targets = np.concatenate([pad, t.astype(np.int64)], axis=1)     # (B, P+T)
        return {"inputs_embeds": embeds}, targets

    def trace_inputs(self, walk, base, encoder, idx) -> dict:
        """:meth:`forward_inputs` over shapes: ``inputs_embeds`` [E; wte(idx)] (B, P+T, C)."""
        P = self.num_virtual_tokens
        if P == 0:
            return {}
        prompt = walk.param(encoder.embedding)                               # (P, C)
        virtual = walk.view(prompt, (idx.shape[0],) + prompt.shape)          # broadcast: a view
        return {"inputs_embeds": walk.concatenate([virtual, base.wte.trace(walk, idx)], axis=1)}

    def trim_logits(self, logits):
        """The logits of the real tokens only: the first P positions are the prompt's."""
        P = self.num_virtual_tokens
        return logits if P == 0 else logits[:, P:, :]                        # (B, T, V)

    def generate_inputs(self, pm, idx):
        """The prompt for ``generate``: E as ``prompt_embeds`` (1, P, C), shared by the batch."""
        P = self.num_virtual_tokens
        if P == 0:
            return {}
        e = self.encoder(pm).embedding
        return {"prompt_embeds": ops.reshape(e, (1, P, e.shape[1]))}        # (1, P, C)


@register_method("PREFIX_TUNING")
class PrefixTuningMethod(_SoftPromptMethod):
    """Prefix tuning: P trainable keys and values in every layer's attention."""

    in_cache = True

    def encoder_shapes(self, gpt_config) -> dict:
        return prefix_shapes(self.config, gpt_config)

    def inject(self, pm) -> None:
        r"""Make the trainable prefixes, on the PeftModel's ``prompt_encoder``; the base is untouched.

        Without ``prefix_projection``: the prefix matrix itself, (P, L·2·C),
        drawn from :math:`\mathcal N(0, 0.02^2)`: for each of the P virtual
        positions, a key and a value for every layer. With it: E (P, C) and
        an MLP C -> ``encoder_hidden_size`` -> L·2·C that produces the
        matrix (see :class:`PromptEncoder`); training moves E and the MLP,
        and the file keeps only what they produce.
        """
        cfg, base = self.config, pm.base_model
        gc = base.config
        self.num_virtual_tokens = cfg.num_virtual_tokens
        self._check_fits(pm, 1)                          # at least one real token must fit
        shapes = prefix_shapes(cfg, gc)
        dtype = base.dtype
        rng = _init_rng(cfg.init_seed, "prefix_tuning")
        if cfg.prefix_projection:
            # Li and Liang's reparameterisation: prefixes = MLP(E), E (P, C)
            C, H = gc.n_embd, cfg.encoder_hidden_size
            emb = rng.normal(0.0, 0.02, shapes["embedding"])
            proj = (rng.uniform(-1, 1, shapes["mlp_w1"]) / np.sqrt(C), np.zeros(shapes["mlp_b1"]),
                    rng.uniform(-1, 1, shapes["mlp_w2"]) / np.sqrt(H), np.zeros(shapes["mlp_b2"]))
            proj = tuple(a.astype(dtype) for a in proj)
        else:
            emb, proj = rng.normal(0.0, 0.02, shapes["embedding"]), None
        setattr(_holder(pm), self.name,
                PromptEncoder(emb.astype(dtype), proj, device=base.device))

    def prefixes(self, pm):
        """The (P, n_layer*2*C) prefix matrix (through the MLP when there is one)."""
        return self.encoder(pm)()

    def cache(self, pm) -> KVCache:
        r"""A read-only KVCache: layer l's keys and values from the prefix matrix.

        The layout is Hugging Face's: (P, L·2·C) viewed as (P, 2L, nh, hs),
        permuted to (2L, nh, P, hs); layer l takes entries 2l (keys) and
        2l+1 (values).
        """
        gc = pm.config
        P, L, nh = self.num_virtual_tokens, gc.n_layer, gc.n_head
        hs = gc.n_embd // nh
        x = ops.reshape(self.prefixes(pm), (P, 2 * L, nh, hs))                # (P, 2L, nh, hs)
        x = ops.permute(x, (1, 2, 0, 3))                                      # (2L, nh, P, hs)
        pairs = []
        for layer in range(L):
            k = ops.reshape(x[2 * layer], (1, nh, P, hs))                     # (1, nh, P, hs)
            v = ops.reshape(x[2 * layer + 1], (1, nh, P, hs))                 # (1, nh, P, hs)
            pairs.append((k, v))
        return KVCache.from_prefix(pairs, append=False)

    def forward_inputs(self, pm, idx, targets):
        """The base's input with the prefixes in its cache: ``kv_cache`` = :meth:`cache`.

        Nothing is prepended to the sequence: ``idx`` (B, T) and ``targets``
        pass as they are, and the logits are (B, T, V) already. In every
        layer, attention puts the P prefix keys and values (1, nh, P, hs),
        broadcast over the batch, before the tokens' own; the real tokens
        take positions P .. P+T-1. Built afresh each call, so gradients reach
        the prefixes (and through them the MLP) on every step.
        """
        if self.num_virtual_tokens == 0:
            return {}, targets
        T = np.shape(idx)[-1] if idx is not None else 0
        self._check_fits(pm, T)
        return {"kv_cache": self.cache(pm)}, targets

    def trace_inputs(self, walk, base, encoder, idx) -> dict:
        """:meth:`forward_inputs` over shapes: layer l's (k, v), each a (1, nh, P, hs) view of
        the prefix matrix (:meth:`cache`)."""
        P, gc = self.num_virtual_tokens, base.config
        if P == 0:
            return {}
        prefixes = encoder.trace(walk)                                       # (P, L*2*C)
        pair = (1, gc.n_head, P, gc.head_size)
        return {"past": [(walk.view(prefixes, pair), walk.view(prefixes, pair))
                         for _ in range(gc.n_layer)]}

    def generate_inputs(self, pm, idx):
        """The prefixes for ``generate``: :meth:`cache`, built without a graph."""
        if self.num_virtual_tokens == 0:
            return {}
        with no_grad():
            return {"kv_cache": self.cache(pm)}

    def state_dict(self, pm) -> dict:
        # peft's format: the prefixes themselves, not the MLP that made them
        with no_grad():
            return {"prompt_embeddings": self.prefixes(pm).data}

    def trainable_count(self, pm) -> int:
        gc = pm.config
        return self.num_virtual_tokens * gc.n_layer * 2 * gc.n_embd

    def load_state_dict(self, pm, state) -> None:
        gc = pm.config
        want = (self.num_virtual_tokens, gc.n_layer * 2 * gc.n_embd)
        got = tuple(state["prompt_embeddings"].shape) if "prompt_embeddings" in state else None
        if got != want or len(state) != 1:
            raise ValueError(
                f"prefix tuning weights do not fit this model: expected one array "
                f"'prompt_embeddings' of shape {want}, got {sorted(state)} {got}"
            )
        # a loaded prefix replaces the MLP: the prefixes are what was saved
        dev, dtype = pm.base_model.device, pm.base_model.dtype
        setattr(_holder(pm), self.name,
                PromptEncoder(np.asarray(state["prompt_embeddings"]).astype(dtype), device=dev))
