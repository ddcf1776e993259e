"""The GPT: GPT-2's names, shapes and init; gradients of a block and of the whole model
(plain, with a trainable prefix, with gradient checkpointing); causality; the key/value
cache and generation; clear errors on bad input; learning one batch."""

import gc
import re

import numpy as np
import pytest

from minipeft import GPT, GPTConfig, Tensor, backend, no_grad
from minipeft.autograd import LEDGER, ops, vjp_check
from minipeft.nn import KVCache, Module, Parameter, sample_next_token

# every test here runs on the fast path and on the reference ops (conftest.py)
pytestmark = pytest.mark.usefixtures("engine_path")

SMALL = dict(n_layer=2, n_head=2, n_embd=16, vocab_size=11, n_positions=16)
B, T = 2, 5


def small(device="cpu", dtype=np.float64, seed=0, **over) -> GPT:
    return GPT(GPTConfig(**{**SMALL, **over}), seed=seed).to(device, dtype=dtype)


def tokens(shape=(B, T), vocab=11, seed=0):
    return np.random.default_rng(seed).integers(0, vocab, shape)


def targets_with_ignored(seed=1):
    t = tokens(seed=seed)
    t[0, 1] = t[1, 4] = -100            # e.g. padding: left out of the loss
    return t


def grads(model):
    return {n: backend.asnumpy(p.grad) for n, p in model.named_parameters() if p.grad is not None}


def prefix_pairs(cfg, P, device, batch=1, seed=5):
    """Trainable per-layer prefix keys and values (batch, nh, P, hs), float64."""
    rng = np.random.default_rng(seed)
    shape = (batch, cfg.n_head, P, cfg.n_embd // cfg.n_head)
    return [tuple(Tensor(rng.standard_normal(shape), requires_grad=True, dtype=np.float64,
                         device=device) for _ in "kv") for _ in range(cfg.n_layer)]


# -- configuration -------------------------------------------------------------


def test_config_defaults_are_the_reference_model():
    c = GPTConfig()
    assert (c.n_layer, c.n_head, c.n_embd, c.vocab_size, c.n_positions) == (4, 4, 128, 96, 128)
    assert c.dropout == 0.0 and c.layer_norm_epsilon == 1e-5 and not c.gradient_checkpointing


@pytest.mark.parametrize("kwargs, message", [
    (dict(n_embd=130, n_head=4), r"n_embd \(130\) must be divisible by n_head \(4\)"),
    (dict(n_layer=0), "n_layer must be a positive integer"),
    (dict(vocab_size=2.5), "vocab_size must be a positive integer"),
    (dict(dropout=1.0), r"dropout must be in \[0, 1\)"),
    (dict(layer_norm_epsilon=0.0), "layer_norm_epsilon must be positive"),
])
def test_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GPTConfig(**kwargs)


# -- names, shapes, counts, init ------------------------------------------------------


def test_parameter_names_and_shapes_are_gpt2s():
    cfg = GPTConfig(**SMALL)
    C, V, L = cfg.n_embd, cfg.vocab_size, cfg.n_layer
    want = {"wte.weight": (V, C), "wpe.weight": (cfg.n_positions, C)}
    for i in range(L):
        want.update({
            f"h.{i}.ln_1.weight": (C,), f"h.{i}.ln_1.bias": (C,),
            f"h.{i}.attn.c_attn.weight": (C, 3 * C), f"h.{i}.attn.c_attn.bias": (3 * C,),
            f"h.{i}.attn.c_proj.weight": (C, C), f"h.{i}.attn.c_proj.bias": (C,),
            f"h.{i}.ln_2.weight": (C,), f"h.{i}.ln_2.bias": (C,),
            f"h.{i}.mlp.c_fc.weight": (C, 4 * C), f"h.{i}.mlp.c_fc.bias": (4 * C,),
            f"h.{i}.mlp.c_proj.weight": (4 * C, C), f"h.{i}.mlp.c_proj.bias": (C,),
        })
    want.update({"ln_f.weight": (C,), "ln_f.bias": (C,)})
    model = GPT(cfg)
    assert {n: p.shape for n, p in model.named_parameters()} == want
    assert list(model.state_dict()) == list(want)          # GPT-2's order, no lm_head


def test_reference_model_has_822016_parameters_with_the_head_tied():
    model = GPT(GPTConfig())
    assert model.num_parameters() == 822_016
    assert sum(p.size for p in model.parameters()) == 822_016
    # the head is wte itself: one parameter object, no second (V, C) matrix
    assert sum(1 for _, p in model.named_parameters() if p.shape == (96, 128)) == 1


def test_tied_head_receives_gradient_from_both_uses():
    model = small()
    model.wte.weight.requires_grad = False
    logits = model(tokens())
    assert model.wte.weight.grad is None
    model.wte.weight.requires_grad = True
    idx = np.zeros((1, 3), dtype=np.int64)             # only token 0 is looked up
    model(idx)[0, -1, 5].backward()
    g = backend.asnumpy(model.wte.weight.grad)
    assert np.abs(g[5]).sum() > 0                     # through the head only
    assert np.abs(g[0]).sum() > 0                     # through the lookup (and the head)
    assert logits.shape == (B, T, 11)


def test_init_is_gpt2s_and_depends_only_on_the_seed():
    cfg = GPTConfig(n_layer=4, n_head=4, n_embd=128, vocab_size=96, n_positions=128)
    model = GPT(cfg, seed=3)
    p = dict(model.named_parameters())
    for name in ("wte.weight", "wpe.weight", "h.0.attn.c_attn.weight", "h.2.mlp.c_fc.weight"):
        assert abs(p[name].data.std() - 0.02) < 0.002, name
    for name in ("h.0.attn.c_proj.weight", "h.3.mlp.c_proj.weight"):
        assert abs(p[name].data.std() - 0.02 / np.sqrt(2 * 4)) < 0.001, name
    for name, t in p.items():
        if name.endswith(".bias"):
            np.testing.assert_array_equal(t.data, 0.0)
        if re.search(r"ln_\w+\.weight", name):
            np.testing.assert_array_equal(t.data, 1.0)
        assert t.dtype == np.float32 and t.device == "cpu"
    again, other = GPT(cfg, seed=3), GPT(cfg, seed=4)
    for name, t in again.named_parameters():
        np.testing.assert_array_equal(t.data, p[name].data)
    assert not np.array_equal(other.wte.weight.data, p["wte.weight"].data)


# -- forward ---------------------------------------------------------------------------


def test_forward_gives_logits_and_the_masked_mean_loss(device):
    model = small(device, dtype=np.float32)
    idx, tgt = tokens(), targets_with_ignored()
    logits = model(idx)
    assert logits.shape == (B, T, 11) and logits.dtype == np.float32 and logits.device == device
    logits2, loss = model(idx, tgt)
    z = logits2.numpy().reshape(-1, 11).astype(np.float64)
    t = tgt.reshape(-1)
    logp = z - z.max(1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(1, keepdims=True))
    keep = t != -100
    want = -logp[np.arange(len(t))[keep], t[keep]].mean()
    assert loss.shape == () and abs(loss.item() - want) < 1e-5
    # a custom ignore index works the same way
    _, loss2 = model(idx, np.where(tgt == -100, -1, tgt), ignore_index=-1)
    assert abs(loss2.item() - want) < 1e-5


def test_inputs_embeds_replace_the_token_lookup(device):
    model = small(device)
    idx = tokens()
    with no_grad():
        emb = model.wte(idx)
        np.testing.assert_allclose(model(inputs_embeds=emb).numpy(), model(idx).numpy(),
                                   rtol=0, atol=1e-12)


def test_model_moves_between_devices(device):
    host = small("cpu", dtype=np.float32)
    idx = tokens()
    want = host(idx).numpy()
    moved = small("cpu", dtype=np.float32).to(device)
    assert moved.device == device and all(p.device == device for p in moved.parameters())
    np.testing.assert_allclose(moved(backend.to_device(idx, device)).numpy(), want, atol=1e-6)
    assert moved.to("cpu").device == "cpu"


def test_causality_later_tokens_never_change_earlier_logits(device):
    model = small(device, dtype=np.float32)
    idx = tokens((2, 12))
    base = model(idx).numpy()
    for t in (0, 5, 11):
        changed = idx.copy()
        changed[:, t] = (changed[:, t] + 3) % 11
        out = model(changed).numpy()
        np.testing.assert_allclose(out[:, :t], base[:, :t], rtol=0, atol=1e-6)
        assert not np.allclose(out[:, t], base[:, t])


# -- gradients: a block, the whole model, a trainable prefix -----------------------------


def test_block_gradients(device):
    model = small(device)
    block = model.h[0]
    x = Tensor(np.random.default_rng(0).standard_normal((B, T, 16)), requires_grad=True,
               dtype=np.float64, device=device)
    vjp_check(lambda *_: block(x), [x, *block.parameters()])


def test_whole_model_gradients_with_ignored_targets(device):
    model = small(device)
    idx, tgt = tokens(), targets_with_ignored()
    params = list(model.parameters())
    vjp_check(lambda *_: model(idx, tgt)[1], params)
    vjp_check(lambda *_: model(idx), params, trials=1)


def test_whole_model_gradients_with_a_trainable_prefix(device):
    model = small(device)
    cfg = model.config
    pairs = prefix_pairs(cfg, P=3, device=device)             # (1, nh, P, hs): broadcast to B
    idx, tgt = tokens(), targets_with_ignored()
    prefix = [t for pair in pairs for t in pair]
    fn = lambda *_: model(idx, tgt, kv_cache=KVCache.from_prefix(pairs))[1]
    vjp_check(fn, [*model.parameters(), *prefix])
    # the prefix receives gradients and is never appended to
    cache = KVCache.from_prefix(pairs)
    model(idx, tgt, kv_cache=cache)[1].backward()
    assert cache.length == 3 and all(t.grad is not None and t.grad.shape == t.shape for t in prefix)


def test_prefix_takes_the_first_positions():
    """With P cached positions the new tokens take positions P..P+T-1, HF's convention."""
    model = small(dtype=np.float32)
    idx = tokens((2, 9))
    full = model(idx).numpy()
    with no_grad():
        cache = KVCache(model.config.n_layer)            # generation-style: appended to
        model(idx[:, :4], kv_cache=cache)
        assert cache.length == 4
        rest = model(idx[:, 4:], kv_cache=cache.copy(append=False))
    np.testing.assert_allclose(rest.numpy(), full[:, 4:], rtol=0, atol=2e-5)


# -- gradient checkpointing --------------------------------------------------------------


def _loss_grads_and_peak(model, idx, tgt, **kw):
    model.zero_grad()
    gc.collect()
    LEDGER.reset_peak()
    start = LEDGER.nbytes()
    _, loss = model(idx, tgt, **kw)
    loss.backward()
    return loss.item(), grads(model), LEDGER.peak - start


def test_checkpointing_gives_identical_gradients_and_a_smaller_ledger(device):
    over = dict(n_layer=3, dropout=0.1)           # dropout: the masks must be replayed
    plain = small(device, dtype=np.float32, **over).train()
    ckpt = small(device, dtype=np.float32, gradient_checkpointing=True, **over).train()
    idx, tgt = tokens((4, 16)), tokens((4, 16), seed=1)
    loss_a, ga, peak_a = _loss_grads_and_peak(plain, idx, tgt)
    loss_b, gb, peak_b = _loss_grads_and_peak(ckpt, idx, tgt)
    assert loss_a == loss_b
    assert ga.keys() == gb.keys() == {n for n, _ in plain.named_parameters()}
    for name in ga:
        np.testing.assert_array_equal(gb[name], ga[name], err_msg=name)
    assert peak_b < 0.7 * peak_a, (peak_b, peak_a)
    # nothing is left in the books once backward has run
    gc.collect()
    assert LEDGER.num_nodes() == 0


def test_checkpointed_model_passes_the_gradient_check(device):
    model = small(device, gradient_checkpointing=True).train()
    idx, tgt = tokens(), targets_with_ignored()
    vjp_check(lambda *_: model(idx, tgt)[1], list(model.parameters()))


class ScaledLinear(Module):
    """A stand-in for a PEFT wrapper injected after the model was built."""

    def __init__(self, base):
        super().__init__()
        self.base_layer = base
        self.scale = Parameter(np.full(base.out_features, 1.5), dtype=base.weight.dtype)

    def forward(self, x):
        return self.base_layer(x) * self.scale


def test_checkpointing_reaches_injected_parameters_and_prefixes_with_frozen_embeddings(device):
    """Frozen base, trainable wrapper params inside blocks and a trainable prefix:
    the block inputs do not require grad, yet every trainable tensor gets its gradient."""
    results = []
    for ckpt in (False, True):
        model = small(device, gradient_checkpointing=ckpt).train()
        model.freeze()
        for block in model.h:
            block.mlp.c_fc = ScaledLinear(block.mlp.c_fc)
            block.mlp.c_fc.scale.to(device)
        pairs = prefix_pairs(model.config, P=2, device=device, batch=B)
        _, loss = model(tokens(), targets_with_ignored(), kv_cache=KVCache.from_prefix(pairs))
        loss.backward()
        trainable = {n: backend.asnumpy(p.grad) for n, p in model.named_parameters()
                     if p.requires_grad}
        assert set(trainable) == {f"h.{i}.mlp.c_fc.scale" for i in range(2)}
        assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
        results.append((trainable, [backend.asnumpy(t.grad) for pair in pairs for t in pair]))
    (ga, pa), (gb, pb) = results
    for name in ga:
        np.testing.assert_allclose(gb[name], ga[name], rtol=1e-12, atol=1e-14, err_msg=name)
    for a, b in zip(pa, pb):
        np.testing.assert_allclose(b, a, rtol=1e-12, atol=1e-14)


def test_checkpointing_is_off_in_eval_and_under_no_grad():
    model = small(gradient_checkpointing=True).eval()
    idx = tokens()
    _, loss = model(idx, idx)
    loss.backward()              # eval: a plain graph, still differentiable
    assert model.h[0].attn.c_attn.weight.grad is not None
    with no_grad():
        assert model.train()(idx).shape == (B, T, 11)


# -- the key/value cache and generation ------------------------------------------------


def test_cached_logits_match_full_recomputation(device):
    model = small(device, dtype=np.float32)
    idx = tokens((2, 10))
    full = model(idx).numpy()
    with no_grad():
        cache = KVCache(model.config.n_layer)
        steps = [model(idx[:, :6], kv_cache=cache).numpy()]
        for t in range(6, 10):
            steps.append(model(idx[:, t:t + 1], kv_cache=cache).numpy())
    assert cache.length == 10
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, rtol=1e-5, atol=1e-5)


def test_greedy_generation_is_the_same_with_and_without_the_cache(device):
    model = small(device, dtype=np.float32, seed=1)
    idx = tokens((2, 4))
    a = model.generate(idx, 8, temperature=0)
    b = model.generate(idx, 8, temperature=0, use_cache=False)
    assert isinstance(a, np.ndarray) and a.shape == (2, 12) and a.dtype.kind == "i"
    np.testing.assert_array_equal(a[:, :4], idx)
    np.testing.assert_array_equal(a, b)


def test_generation_with_a_prefix_or_virtual_tokens_agrees_with_and_without_the_cache(device):
    model = small(device, dtype=np.float32, seed=2)
    cfg = model.config
    idx = tokens((2, 3))
    pairs = [tuple(Tensor(t.numpy().astype(np.float32), device=device) for t in pair)
             for pair in prefix_pairs(cfg, P=2, device="cpu")]
    cache = KVCache.from_prefix(pairs)
    a = model.generate(idx, 6, temperature=0, kv_cache=cache)
    b = model.generate(idx, 6, temperature=0, kv_cache=cache, use_cache=False)
    np.testing.assert_array_equal(a, b)
    assert cache.length == 2 and not cache.append        # the given prefix is untouched
    virt = Tensor(np.random.default_rng(0).standard_normal((1, 3, 16)), dtype=np.float32,
                  device=device)
    c = model.generate(idx, 6, temperature=0, prompt_embeds=virt)
    d = model.generate(idx, 6, temperature=0, prompt_embeds=virt, use_cache=False)
    np.testing.assert_array_equal(c, d)
    assert c.shape == (2, 9)


def test_sampling_is_seeded_and_top_k_one_is_greedy(device):
    model = small(device, dtype=np.float32, dropout=0.2).train()
    idx = tokens((3, 2))
    a = model.generate(idx, 6, temperature=1.0, seed=0)
    b = model.generate(idx, 6, temperature=1.0, seed=0)
    np.testing.assert_array_equal(a, b)
    assert model.training                                  # the mode is restored
    greedy = model.generate(idx, 6, temperature=0)
    np.testing.assert_array_equal(model.generate(idx, 6, temperature=0.7, top_k=1, seed=3), greedy)


def test_sample_next_token():
    logits = np.array([[0.0, 5.0, 1.0, -2.0], [3.0, 0.0, 0.0, 2.9]])
    np.testing.assert_array_equal(sample_next_token(logits, 0.0), [1, 0])
    rng = np.random.default_rng(0)
    draws = np.stack([sample_next_token(logits, 1.0, top_k=2, rng=rng) for _ in range(400)])
    assert set(draws[:, 0]) <= {1, 2} and set(draws[:, 1]) <= {0, 3}
    assert 0.35 < (draws[:, 1] == 3).mean() < 0.6           # e^2.9 / (e^3 + e^2.9) = 0.475


def test_generation_stops_at_the_stop_token():
    model = small(dtype=np.float32, seed=1)
    idx = tokens((1, 3))
    first = model.generate(idx, 1, temperature=0)[0, -1]
    out = model.generate(idx, 10, temperature=0, stop_token=int(first))
    assert out.shape == (1, 4) and out[0, -1] == first


def test_generation_refuses_to_run_past_n_positions():
    model = small(dtype=np.float32)
    with pytest.raises(ValueError, match=r"4 prompt \+ 13 new tokens = 17 exceed n_positions=16"):
        model.generate(tokens((1, 4)), 13)
    assert model.generate(tokens((1, 4)), 12, temperature=0).shape == (1, 16)


# -- bad input ---------------------------------------------------------------------------


@pytest.mark.parametrize("idx, error, message", [
    (np.zeros((2, 3), dtype=np.float32), TypeError, "expected integer token ids, got dtype float32"),
    (np.zeros(3, dtype=np.int64), ValueError, r"expected token ids shaped \(B, T\).*got shape \(3,\)"),
    (np.full((1, 3), 11), ValueError, r"token ids must lie in \[0, 11\).*from 11 to 11"),
    (np.full((1, 3), -1), ValueError, r"token ids must lie in \[0, 11\)"),
    (np.zeros((1, 17), dtype=np.int64), ValueError, "17 tokens exceed n_positions=16"),
    ("hello", TypeError, "expected an integer array of token ids"),
])
def test_bad_token_ids_are_refused_clearly(device, idx, error, message):
    model = small(device, dtype=np.float32)
    if isinstance(idx, np.ndarray):
        idx = backend.to_device(idx, device)
    with pytest.raises(error, match=message):
        model(idx)


def test_bad_targets_caches_and_embeddings_are_refused_clearly():
    model = small(dtype=np.float32)
    idx = tokens()
    with pytest.raises(ValueError, match=r"targets: expected shape \(B, T\) = \(2, 5\)"):
        model(idx, idx[:, :4])
    with pytest.raises(ValueError, match=r"ids must lie in \[0, 11\) or equal ignore_index"):
        model(idx, np.full((B, T), 12))
    with pytest.raises(TypeError, match="targets: expected integer token ids"):
        model(idx, idx.astype(np.float32))
    with pytest.raises(ValueError, match="give exactly one of idx"):
        model()
    with no_grad():
        emb = model.wte(idx)
    with pytest.raises(ValueError, match="give exactly one of idx"):
        model(idx, inputs_embeds=emb)
    with pytest.raises(ValueError, match=r"inputs_embeds: expected a Tensor shaped \(B, T, 16\)"):
        model(inputs_embeds=ops.reshape(emb, (B * T, 16)))
    with pytest.raises(TypeError, match="inputs_embeds: expected float32"):
        model(inputs_embeds=emb.astype(np.float64))
    with pytest.raises(ValueError, match="kv_cache: holds 3 layers, the model has 2"):
        model(idx, kv_cache=KVCache(3))
    with pytest.raises(TypeError, match="kv_cache: expected a KVCache"):
        model(idx, kv_cache=[None, None])
    bad = [(Tensor(np.zeros((1, 3, 2, 8), np.float32)),) * 2] * 2       # 3 heads, model has 2
    with pytest.raises(ValueError, match=r"needs \(2 or 1, 2, P, 8\)"):
        model(idx, kv_cache=KVCache.from_prefix(bad))
    long_prefix = [(Tensor(np.zeros((1, 2, 12, 8), np.float32)),) * 2] * 2
    with pytest.raises(ValueError, match="5 tokens after 12 cached positions exceed n_positions=16"):
        model(idx, kv_cache=KVCache.from_prefix(long_prefix))


# -- learning ------------------------------------------------------------------------------


def test_a_tiny_model_overfits_one_batch():
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, vocab_size=11, n_positions=16), seed=0)
    idx = tokens((4, 12), seed=3)
    tgt = np.roll(idx, -1, axis=1)
    tgt[:, -1] = -100
    params = list(model.parameters())
    m = [np.zeros_like(p.data) for p in params]
    v = [np.zeros_like(p.data) for p in params]
    lr, b1, b2 = 1e-2, 0.9, 0.999
    losses = []
    for step in range(1, 51):            # plain Adam, written out (the optimizers live in optim.py)
        model.zero_grad()
        _, loss = model(idx, tgt)
        loss.backward()
        losses.append(loss.item())
        for p, mi, vi in zip(params, m, v):
            mi *= b1
            mi += (1 - b1) * p.grad
            vi *= b2
            vi += (1 - b2) * p.grad * p.grad
            p.data -= lr * (mi / (1 - b1 ** step)) / (np.sqrt(vi / (1 - b2 ** step)) + 1e-8)
    assert losses[0] > 2.0 and losses[-1] < 0.25 * losses[0], losses[::10]


# -- against Hugging Face ------------------------------------------------------------------


def test_same_logits_as_hugging_face_gpt2():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cfg = GPTConfig(**SMALL)
    ours = GPT(cfg, seed=0)
    hf_cfg = transformers.GPT2Config(
        vocab_size=cfg.vocab_size, n_positions=cfg.n_positions, n_embd=cfg.n_embd,
        n_layer=cfg.n_layer, n_head=cfg.n_head, layer_norm_epsilon=cfg.layer_norm_epsilon,
        activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    hf = transformers.GPT2LMHeadModel(hf_cfg).eval()
    # GPT-2's Conv1D stores weights (in, out) too: the arrays copy over unchanged
    state = {"transformer." + k: torch.from_numpy(v.copy()) for k, v in ours.state_dict().items()}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and all(k == "lm_head.weight" or k.endswith(".attn.bias")
                                  or k.endswith(".masked_bias") for k in missing)
    idx = tokens((2, 7))
    with torch.no_grad():
        want = hf(torch.from_numpy(idx)).logits.numpy()
    np.testing.assert_allclose(ours(idx).numpy(), want, rtol=1e-4, atol=1e-5)
