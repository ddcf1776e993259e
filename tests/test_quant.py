r"""Quantized storage of frozen weights (minipeft.nn.quant): formats, the quantized Linear,
quantized bases under PEFT, and bitsandbytes where it is installed.

Property tests run in float32 and float64 on every backend: each dequantized
entry lies within half of its own bucket's gap times its block's constant (so
rounding to the wrong neighbour fails), constants come back exactly (within
the second level's error when double-quantized), zeros stay zero, packing
round-trips and the last, partial block is handled.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from peft_cases import small_base, tokens
from strategies import few

from minipeft import Tensor, backend
from minipeft.autograd import LEDGER, gradcheck, ops
from minipeft.nn import quant as Q
from minipeft.nn.layers import Linear
from minipeft.peft import (
    FullFinetuneConfig,
    IA3Config,
    LayerSelectConfig,
    LoraConfig,
    MaskConfig,
    get_peft_model,
)

FOUR = list(Q.FOUR_BIT)
settings_ = few


def host(a):
    return backend.asnumpy(getattr(a, "data", a))


def _dev(a, device):
    return backend.to_device(np.ascontiguousarray(a), device)


# ---------------------------------------------------------------------------
# Codebooks
# ---------------------------------------------------------------------------

#: the NF4 values QLoRA's appendix and bitsandbytes publish (4 decimals)
PUBLISHED_NF4 = [-1.0, -0.6962, -0.5251, -0.3949, -0.2844, -0.1848, -0.0911, 0.0,
                 0.0796, 0.1609, 0.2461, 0.3379, 0.4407, 0.5626, 0.7230, 1.0]


def test_nf4_codebook_matches_published_values():
    cb = Q.nf4_codebook()
    assert cb.dtype == np.float32 and cb.shape == (16,)
    assert np.all(np.diff(cb) > 0) and cb[0] == -1.0 and cb[-1] == 1.0 and cb[7] == 0.0
    np.testing.assert_allclose(cb, PUBLISHED_NF4, atol=1e-4)


def test_fp4_and_int4_and_dynamic_codebooks():
    fp4 = Q.fp4_codebook()
    mags = sorted(set(np.abs(fp4 * 6).round(6).tolist()))
    assert mags == [0, 0.5, 1, 1.5, 2, 3, 4, 6]          # E2M1's magnitudes
    assert fp4[0b0111] == 1.0 and fp4[0b1111] == -1.0
    assert np.array_equal(Q.int4_codebook()[1:], (np.arange(-7, 8) / 7).astype(np.float32))
    dm = Q.dynamic_map()
    assert dm.shape == (256,) and dm.dtype == np.float32 and np.all(np.diff(dm) > 0)
    assert dm.max() == 1.0 and dm.min() > -1.0 and 0.0 in dm


# ---------------------------------------------------------------------------
# Properties of quantize / dequantize
# ---------------------------------------------------------------------------

float_dtypes = st.sampled_from([np.float32, np.float64])


@st.composite
def weights(draw):
    """A float array of 1..3 axes (sizes that leave partial blocks), some entries zero."""
    dtype = draw(float_dtypes)
    shape = draw(hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=9))
    scale = draw(st.sampled_from([1e-3, 1.0, 50.0]))
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    a = rng.standard_normal(shape) * scale
    a[rng.random(shape) < 0.2] = 0.0
    return a.astype(dtype)


def _bucket_bound(q, a):
    r"""Per entry: half the gap between the two codes around :math:`w / a_b`, times :math:`a_b`."""
    n = a.size
    consts = host(Q.constants(q)).astype(np.float64)
    if q.format == "int8":
        per = np.broadcast_to(consts, a.reshape(-1, a.shape[-1]).shape).reshape(-1)
    else:
        per = np.repeat(consts, q.blocksize)[:n]
    vals = np.sort(np.unique(Q.codebook(q.format).astype(np.float64)))
    s = np.clip(a.reshape(-1).astype(np.float64) / np.where(per > 0, per, 1.0), -1, 1)
    hi = np.clip(np.searchsorted(vals, s, side="left"), 1, len(vals) - 1)
    gap = vals[hi] - vals[hi - 1]
    return gap / 2 * per, per


@pytest.mark.parametrize("fmt", list(Q.FORMATS))
@settings_
@given(a=weights(), blocksize=st.sampled_from([1, 2, 8, 64]))
def test_each_entry_within_half_its_bucket(device, fmt, a, blocksize):
    if fmt == "int8" and a.ndim < 2:
        a = a.reshape(1, -1)
    q = Q.quantize(_dev(a, device), fmt, blocksize)
    d = Q.dequantize(q)
    assert backend.device_of(d) == backend.device_of(q.codes)
    d = host(d)
    assert d.dtype == a.dtype and d.shape == a.shape
    bound, per = _bucket_bound(q, a)
    err = np.abs(d.reshape(-1).astype(np.float64) - a.reshape(-1))
    # slack: float32 rounding of w / a and of c * a, a few ulps of the constant
    slack = 4e-7 * per + 4e-7 * np.abs(a.reshape(-1))
    assert np.all(err <= bound + slack), (err - bound - slack).max()
    # zeros stay zero
    assert np.all(d[a == 0] == 0)


@pytest.mark.parametrize("fmt", FOUR)
@settings_
@given(a=weights(), blocksize=st.sampled_from([2, 4, 64]))
def test_constants_and_packing_round_trip(device, fmt, a, blocksize):
    q = Q.quantize(_dev(a, device), fmt, blocksize)
    n = a.size
    nblocks = -(-n // blocksize)
    # one float32 constant per block, the last (partial) one included: its absmax, exactly
    flat = np.concatenate([a.reshape(-1).astype(np.float32),
                           np.zeros(nblocks * blocksize - n, np.float32)])
    expect = np.abs(flat.reshape(nblocks, blocksize)).max(axis=1)
    absmax = host(q.absmax)
    assert absmax.dtype == np.float32 and np.array_equal(absmax, expect)
    # packing: two codes a byte, high nibble first; unpacking gives the codes back
    codes = host(q.codes)
    assert codes.dtype == np.uint8 and codes.shape == (-(-n // 2),)
    unpacked = np.stack([codes >> 4, codes & 15], axis=1).reshape(-1)[:n]
    padded = np.concatenate([unpacked, codes[-1:] & 15 if n % 2 else codes[:0]])
    assert np.array_equal((padded[0::2] << 4) | padded[1::2], codes)
    cb = Q.codebook(fmt)
    # each unpacked code is the one nearest to w / a (ties and clamping as in quantize)
    s = np.clip(a.reshape(-1).astype(np.float32) / np.repeat(np.maximum(absmax, 1e-38),
                                                               blocksize)[:n], -1, 1)
    dist = np.abs(cb[unpacked].astype(np.float64) - s)
    assert np.all(dist <= np.abs(cb[None, :].astype(np.float64) - s[:, None]).min(axis=1) + 1e-6)
    if n % 2:  # the pad nibble codes zero
        assert cb[codes[-1] & 15] == 0.0


@pytest.mark.parametrize("fmt", FOUR)
@settings_
@given(a=weights())
def test_double_quant_constants_within_second_level_error(device, fmt, a):
    q1 = Q.quantize(_dev(a, device), fmt, 2)
    q2 = Q.quantize(_dev(a, device), fmt, 2, double_quant=True)
    assert q2.double_quant and host(q2.absmax).dtype == np.uint8
    exact = host(q1.absmax).astype(np.float64)
    approx = host(Q.constants(q2)).astype(np.float64)
    # the dynamic map's largest gap is 0.1 (between 0.9 and 1): half of it, times each
    # 256-block's scale of |absmax - mean|, bounds the error
    scale = np.repeat(host(q2.absmax_scale), Q.DQ_BLOCKSIZE)[:exact.size]
    assert np.all(np.abs(approx - exact) <= 0.05 * scale + 1e-6 * exact.max())
    # the 4-bit codes are the same as without the second level
    assert np.array_equal(host(q1.codes), host(q2.codes))
    assert np.all(host(Q.dequantize(q2))[a == 0] == 0)


def test_bits_per_parameter():
    w = np.random.default_rng(0).standard_normal((64 * 256, 4)).astype(np.float32)
    assert Q.quantize_nf4(w).bits_per_parameter() == 4.5
    dq = Q.quantize_nf4(w, double_quant=True)
    n = w.size
    assert dq.bits_per_parameter() == pytest.approx(4 + 8 / 64 + 32 / (64 * 256) + 32 / n)
    assert round(dq.bits_per_parameter(), 3) == 4.127
    assert dq.codes_nbytes == n // 2 and dq.constants_nbytes == n // 64
    assert dq.second_level_nbytes == 4 * (n // 64 // 256) + 4
    assert Q.quantize_int8(w.reshape(-1, 128)).bits_per_parameter() == 8 + 32 / (n // 128)


# ---------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------

W = np.ones((4, 8), np.float32)


@pytest.mark.parametrize("call, err, words", [
    (lambda: Q.quantize_nf4(W, blocksize=48), ValueError, "power of two"),
    (lambda: Q.quantize_nf4(W, blocksize=0), ValueError, "power of two"),
    (lambda: Q.quantize_nf4(W, blocksize=-64), ValueError, "power of two"),
    (lambda: Q.quantize_nf4(W, blocksize=64.0), ValueError, "power of two"),
    (lambda: Q.quantize_nf4(W, blocksize=True), ValueError, "power of two"),
    (lambda: Q.quantize(W, "nf3"), ValueError, "unknown quantization format"),
    (lambda: Q.quantize_model(small_base().freeze(), "int2"), ValueError, "unknown"),
    (lambda: Q.quantize_nf4(W.astype(np.int32)), TypeError, "float32 or float64"),
    (lambda: Q.quantize_nf4(W.astype(np.float16)), TypeError, "float32 or float64"),
    (lambda: Q.quantize_nf4(np.array([1.0, np.nan], np.float32)), ValueError, "inf or nan"),
    (lambda: Q.quantize_nf4(np.array([1.0, np.inf])), ValueError, "inf or nan"),
    (lambda: Q.quantize_nf4(np.array([1e39, 1.0])), ValueError, "float32's range"),
    (lambda: Q.quantize_nf4(np.zeros((0,), np.float32)), ValueError, "empty"),
    (lambda: Q.quantize_int8(W, double_quant=True), ValueError, "4-bit formats"),
    (lambda: Q.quantize_int8(W[0]), ValueError, "matrix"),
    (lambda: Q.dequantize_nf4(Q.quantize_fp4(W)), ValueError, "fp4"),
    (lambda: Q.QuantLinear.from_linear(Linear(4, 8)), ValueError, "requires grad"),
    (lambda: Q.quantize_model(small_base()), ValueError, "freeze the base"),
])
def test_bad_input_is_a_clear_error(call, err, words):
    with pytest.raises(err, match=words):
        call()


def test_a_quantized_weight_cannot_train_or_be_written():
    base = Q.quantize_model(small_base().freeze(), "nf4")
    layer = base.h[0].attn.c_attn
    w = layer.weight
    with pytest.raises(RuntimeError, match="cannot train"):
        w.requires_grad = True
    with pytest.raises(RuntimeError, match="would be lost"):
        w.data = w.data * 2
    with pytest.raises(RuntimeError, match="would be lost"):
        layer.weight.data += 1.0
    for config in (FullFinetuneConfig(), MaskConfig(density=0.1),
                   LayerSelectConfig(layers=[-1], components=["attn"])):
        with pytest.raises(ValueError, match="quantized weights"):
            get_peft_model(Q.quantize_model(small_base().freeze(), "nf4"), config)


# ---------------------------------------------------------------------------
# The quantized Linear
# ---------------------------------------------------------------------------


def _qlinear(device, fmt="nf4", dtype=np.float64, bias=True, seed=0):
    lin = Linear(6, 5, bias=bias, rng=np.random.default_rng(seed), std=0.5).to(device,
                                                                                 dtype=dtype)
    if bias:
        lin.bias.data = _dev(np.random.default_rng(1).standard_normal(5).astype(dtype), device)
    lin.weight.requires_grad = False
    return Q.QuantLinear.from_linear(lin, fmt, blocksize=8, double_quant=fmt != "int8")


@pytest.mark.parametrize("fmt", list(Q.FORMATS))
def test_quant_linear_input_gradient_and_no_weight_gradient(device, fmt):
    ql = _qlinear(device, fmt)
    assert "weight" not in ql._parameters and ql.bias.requires_grad
    W = ql.dequantized()                                       # (6, 5) float64
    x = Tensor(_dev(np.random.default_rng(2).standard_normal((3, 6)), device),
               requires_grad=True)
    # forward equals x W_hat + b, W_hat the dequantized float weight
    ref = host(x) @ host(W) + host(ql.bias)
    np.testing.assert_allclose(host(ql(x)), ref, rtol=1e-12, atol=1e-12)
    gradcheck(lambda x_, b_: Q.QuantLinearFunction.apply(x_, b_, layer=ql), [x, ql.bias])
    # the float Linear with W_hat gives the same gradients
    x.grad = ql.bias.grad = None
    before = dict(ops.counters)
    saved = LEDGER.nbytes()
    y = ql(x)
    assert LEDGER.nbytes() == saved                            # nothing saved: not x, not W
    (y * y).sum().backward()
    after = ops.counters
    assert after["quantlinear.dx"] == before.get("quantlinear.dx", 0) + 1
    assert after["linear.dW"] == before.get("linear.dW", 0)
    assert after["matmul.dB"] == before.get("matmul.dB", 0)
    g = 2 * (host(x) @ host(W) + host(ql.bias))
    np.testing.assert_allclose(host(x.grad), g @ host(W).T, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(host(ql.bias.grad), g.sum(axis=0), rtol=1e-10, atol=1e-12)


def test_quant_linear_bytes_and_frozen_bias():
    ql = _qlinear("cpu", "nf4", dtype=np.float32, bias=False)
    assert ql.bias is None and ql.codes_nbytes == 15 and ql.constants_nbytes == 4
    assert ql.second_level_nbytes == 8 and ql.dequantized_nbytes() == 30 * 4
    x = Tensor(np.ones((2, 6), np.float32))
    assert host(ql(x)).dtype == np.float32
    # model.to(dtype) casts floats; the stored constants stay float32
    ql.to(dtype=np.float64)
    assert ql.weight_absmax_scale.dtype == np.float32 and ql.weight_codes.dtype == np.uint8


# ---------------------------------------------------------------------------
# Whole models and PEFT on a quantized base
# ---------------------------------------------------------------------------


def _lin_names(m):
    return sorted(n for n, mod in m.named_modules() if isinstance(mod, Q.QuantLinear))


@pytest.mark.parametrize("fmt", list(Q.FORMATS))
def test_quantize_model_replaces_the_frozen_linears(fmt):
    base = small_base().freeze()
    Q.quantize_model(base, fmt)
    assert len(_lin_names(base)) == 4 * 2
    rec = Q.quantization_config(base)
    assert rec.format == fmt and rec.double_quant == (fmt != "int8")
    assert rec.blocksize == (None if fmt == "int8" else 64) and rec.kept_float == []
    # embeddings, LayerNorms and the tied head stay float
    names = dict(base.named_parameters())
    assert {"wte.weight", "wpe.weight", "h.0.ln_1.weight", "ln_f.bias"} <= set(names)
    assert not any(n.endswith("c_attn.weight") for n in names)
    out = base(tokens())
    assert np.all(np.isfinite(host(out[0] if isinstance(out, tuple) else out)))


def test_layer_selection_then_quantize_keeps_trained_blocks_float():
    pm = get_peft_model(small_base(), LayerSelectConfig(layers=[-1], components=["attn"]))
    Q.quantize_model(pm, "nf4")
    rec = Q.quantization_config(pm)
    assert rec.kept_float == ["h.1.attn.c_attn", "h.1.attn.c_proj"]
    assert "base_model.h.1.attn.c_attn" not in _lin_names(pm)
    assert "base_model.h.0.attn.c_attn" in _lin_names(pm)
    assert len(rec.quantized) == 6


def _branch_logits(model, idx):
    out = model(idx)
    return host(out[0] if isinstance(out, tuple) else out)


@pytest.mark.parametrize("order", ["quantize_first", "wrap_first"])
def test_lora_on_a_quantized_base_is_the_identity_at_init(order, device):
    base = small_base(device)
    cfg = LoraConfig(r=2, lora_alpha=4.0, target_modules=["c_attn", "c_proj", "c_fc"])
    if order == "quantize_first":
        qbase = Q.quantize_model(small_base(device).freeze(), "nf4")
        pm = get_peft_model(Q.quantize_model(base.freeze(), "nf4"), cfg)
    else:
        qbase = Q.quantize_model(small_base(device).freeze(), "nf4")
        pm = Q.quantize_model(get_peft_model(base, cfg), "nf4")
    wrapped = [m for _, m in pm.named_modules() if hasattr(m, "lora_A")]
    assert wrapped and all(isinstance(m.base_layer, Q.QuantLinear) for m in wrapped)
    idx = tokens()
    assert np.array_equal(_branch_logits(pm, idx), _branch_logits(qbase, idx))
    trainable = {id(p) for p in pm.trainable_parameters()}
    assert trainable and all(".lora_" in n for n, p in pm.named_parameters() if id(p) in trainable)


def test_lora_gradients_over_a_quantized_linear_pass_the_float64_check(device):
    from minipeft.peft.lora import LoraLinear

    ql = _qlinear(device, "nf4")
    ql.bias.requires_grad = False
    wrap = LoraLinear(ql)
    wrap.add("default", LoraConfig(r=2, lora_alpha=4.0), "layer")
    wrap.active_adapter = "default"
    A, B = wrap.lora_A.default, wrap.lora_B.default
    B.data = _dev(np.random.default_rng(4).standard_normal(B.shape) * 0.3, device)
    assert A.dtype == np.float64
    x = Tensor(_dev(np.random.default_rng(5).standard_normal((2, 3, 6)), device),
               requires_grad=True)
    gradcheck(lambda x_, a_, b_: wrap(x_), [x, A, B])
    # identity at init relative to the quantized base
    B.data = B.data * 0.0
    np.testing.assert_array_equal(host(wrap(x)), host(ql(x)))


@pytest.mark.parametrize("config", [
    LoraConfig(r=2, lora_alpha=4.0, target_modules=["c_attn", "c_fc"]),
    LoraConfig(r=2, lora_alpha=4.0, target_modules=["c_attn"], use_dora=True),
    IA3Config(),
], ids=["lora", "dora", "ia3"])
def test_merge_and_unload_on_a_quantized_base_gives_a_float_model(config):
    pm = get_peft_model(Q.quantize_model(small_base().freeze(), "nf4"), config)
    for p in pm.trainable_parameters():
        p.data = p.data + np.random.default_rng(0).standard_normal(p.shape).astype(p.dtype) * .1
    idx = tokens()
    unmerged = _branch_logits(pm, idx)
    with pytest.warns(Q.DequantizationWarning, match="dequantized to float"):
        merged = pm.merge_and_unload()
    assert _lin_names(merged) == []
    assert all(p.dtype == np.float32 for p in merged.parameters())
    np.testing.assert_allclose(_branch_logits(merged, idx), unmerged, rtol=1e-4, atol=1e-4)
    # re-quantizing reports the error it adds, and it is the error of quantizing again
    report = Q.requantize(merged)
    assert len(_lin_names(merged)) == 8 and report["total"]["mse"] > 0
    assert all(r["max_abs"] > 0 for k, r in report.items() if k != "total")


def test_adapters_wrap_a_quantized_linear():
    from minipeft.peft import AdapterConfig

    base = Q.quantize_model(small_base().freeze(), "fp4")
    ref = _branch_logits(base, tokens())
    pm = get_peft_model(base, AdapterConfig(bottleneck=4))
    assert np.array_equal(_branch_logits(pm, tokens()), ref)
    wrapped = [m for _, m in pm.named_modules() if hasattr(m, "adapter_up")]
    assert wrapped and all(isinstance(m.base_layer, Q.QuantLinear) for m in wrapped)


# ---------------------------------------------------------------------------
# bitsandbytes, where installed (optional: never a dependency)
# ---------------------------------------------------------------------------

HAVE_BNB = importlib.util.find_spec("bitsandbytes") is not None


def _bnb():
    if not HAVE_BNB:
        pytest.skip("bitsandbytes is not installed (optional: pip install bitsandbytes)")
    import torch  # noqa: PLC0415
    try:
        import bitsandbytes.functional as F  # noqa: PLC0415
    except Exception as exc:  # noqa: BLE001 - an installed but broken bitsandbytes
        pytest.skip(f"bitsandbytes does not import here: {exc}")
    return torch, F


def test_bitsandbytes_codebooks_agree():
    torch, F = _bnb()
    np.testing.assert_allclose(Q.nf4_codebook(), F.get_4bit_type("nf4", device="cpu").numpy(),
                               rtol=0, atol=1e-6)
    np.testing.assert_allclose(Q.dynamic_map(), F.create_dynamic_map(signed=True).numpy(),
                               rtol=0, atol=1e-6)


@pytest.mark.parametrize("shape", [(128, 384), (4, 70), (3, 5), (33,)])
def test_bitsandbytes_nf4_agrees_entry_for_entry(shape):
    torch, F = _bnb()
    w = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    qt, state = F.quantize_4bit(torch.from_numpy(w), quant_type="nf4", blocksize=64)
    q = Q.quantize_nf4(w, blocksize=64)
    # the same bytes (high nibble first) and the same constants, exactly
    assert np.array_equal(q.codes, qt.numpy().reshape(-1))
    assert np.array_equal(q.absmax, state.absmax.numpy())
    # dequantized: equal up to the codebooks' last-digit difference (and one rounding)
    d_bnb = F.dequantize_4bit(qt, state).numpy()
    dc = float(np.abs(Q.nf4_codebook() - F.get_4bit_type("nf4", device="cpu").numpy()).max())
    np.testing.assert_allclose(Q.dequantize_nf4(q), d_bnb, rtol=0,
                               atol=(dc + 2.0 ** -23) * float(np.abs(w).max()))


@pytest.mark.parametrize("shape", [(128, 384), (256, 512), (4, 70)])
def test_bitsandbytes_compress_statistics_agrees_with_double_quant(shape):
    torch, F = _bnb()
    w = np.random.default_rng(2).standard_normal(shape).astype(np.float32)
    qt, state = F.quantize_4bit(torch.from_numpy(w), quant_type="nf4", blocksize=64,
                                compress_statistics=True)
    q = Q.quantize_nf4(w, blocksize=64, double_quant=True)
    assert np.array_equal(q.codes, qt.numpy().reshape(-1))             # the 4-bit codes
    np.testing.assert_allclose(q.absmax_scale, state.state2.absmax.numpy(), rtol=1e-6)
    np.testing.assert_allclose(float(q.absmax_offset), state.offset.item(), rtol=1e-6)
    # the 8-bit codes of the constants: the same, except where bitsandbytes' CPU kernel
    # (a binary search over the map) does not pick the nearest code and this one does
    mine, theirs = q.absmax, state.absmax.numpy()
    differ = np.nonzero(mine != theirs)[0]
    assert differ.size <= 0.01 * mine.size
    first = Q.quantize_nf4(w, blocksize=64).absmax
    s = (first - q.absmax_offset)[differ] / q.absmax_scale[differ // Q.DQ_BLOCKSIZE]
    dm = Q.dynamic_map()
    assert np.all(np.abs(s - dm[mine[differ]]) <= np.abs(s - dm[theirs[differ]]) + 1e-6)
    # dequantized, in the blocks whose constants agree: equal up to the codebooks
    d_bnb = F.dequantize_4bit(qt, state).numpy().reshape(-1)
    d = Q.dequantize_nf4(q).reshape(-1)
    same = np.repeat(mine == theirs, 64)[:d.size]
    np.testing.assert_allclose(d[same], d_bnb[same], rtol=0, atol=1e-6 * float(np.abs(w).max()))


def test_merge_adapter_then_unmerge_on_a_quantized_base():
    cfg = LoraConfig(r=2, lora_alpha=4.0, target_modules=["c_attn"])
    pm = get_peft_model(Q.quantize_model(small_base().freeze(), "nf4"), cfg)
    B = pm.base_model.h[0].attn.c_attn.lora_B.default
    B.data = B.data + 0.1
    idx = tokens()
    unmerged = _branch_logits(pm, idx)
    with pytest.warns(Q.DequantizationWarning):
        pm.merge_adapter()
    # the merged layers are float now; the others stay quantized
    assert len(_lin_names(pm)) == 8 - 2
    np.testing.assert_allclose(_branch_logits(pm, idx), unmerged, rtol=1e-4, atol=1e-4)
    pm.unmerge_adapter()
    np.testing.assert_allclose(_branch_logits(pm, idx), unmerged, rtol=1e-4, atol=1e-4)


def test_bitfit_on_a_quantized_base_trains_biases_only():
    from minipeft.optim import SGD
    from minipeft.peft import BitFitConfig

    pm = get_peft_model(Q.quantize_model(small_base().freeze(), "nf4"), BitFitConfig())
    layer = pm.base_model.h[0].mlp.c_fc
    codes = host(layer.weight_codes).copy()
    bias = host(layer.bias).copy()
    before = dict(ops.counters)
    idx = tokens()
    _, loss = pm(idx, np.roll(idx, -1, axis=1))
    loss.backward()
    assert ops.counters["linear.dW"] == before.get("linear.dW", 0)
    assert ops.counters["quantlinear.dx"] > before.get("quantlinear.dx", 0)
    SGD(pm.trainable_parameters(), lr=0.1).step()
    assert not np.array_equal(host(layer.bias), bias)
    assert np.array_equal(host(layer.weight_codes), codes)


def test_quantization_table_on_the_shipped_base():
    from minipeft.data.corpus import pretraining_text
    from minipeft.data.tokenizer import CharTokenizer
    from minipeft.workflows.base import load_base, validation_loss
    from minipeft.workflows.quant_eval import format_table, quantization_table

    table = quantization_table(rows=(("nf4", True), ("int8", False)), val_batches=1)
    assert [r["format"] for r in table] == ["float32", "nf4", "int8"]
    val_ids = CharTokenizer().encode(pretraining_text("val"))
    assert table[0]["loss"] == pytest.approx(validation_loss(load_base(), val_ids, batches=1))
    nf4, int8 = table[1], table[2]
    assert round(nf4["bits"], 3) == 4.128 and 8.0 < int8["bits"] < 8.5
    assert 0 < int8["mse"] < nf4["mse"] <= nf4["worst_block_mse"]
    assert "nf4+dq" in format_table(table)


# ---------------------------------------------------------------------------
# Memory: quantized weights and the dequantization temporary, three views
# ---------------------------------------------------------------------------

from minipeft import memory  # noqa: E402
from minipeft.nn.gpt import GPT  # noqa: E402
from minipeft.optim import AdamW  # noqa: E402
from minipeft.peft.qlora import quantize_base  # noqa: E402

#: (format, double quantization): every stored layout
LAYOUTS = [(f, dq) for f in FOUR for dq in (True, False)] + [("int8", False)]


@pytest.mark.parametrize("fmt,dq", LAYOUTS)
@pytest.mark.parametrize("shape", [(128, 384), (7, 9), (3, 1000)])
def test_the_layout_the_estimator_counts_is_what_quantize_stores(fmt, dq, shape):
    w = np.random.default_rng(0).normal(0, 0.02, shape).astype(np.float32)
    q = Q.quantize(w, fmt, 64, dq) if fmt != "int8" else Q.quantize(w, "int8")
    arrays = {"codes": q.codes, "absmax": q.absmax, "absmax_scale": q.absmax_scale,
              "absmax_offset": q.absmax_offset}
    layout = Q.quantized_layout(shape, fmt, 64, dq)
    assert set(layout) == {k for k, a in arrays.items() if a is not None}
    for k, (shp, dt) in layout.items():
        assert (arrays[k].shape, np.dtype(arrays[k].dtype)) == (shp, dt), k
        assert isinstance(arrays[k], np.ndarray), k       # a buffer, not a NumPy scalar
    assert sum(np.prod(s, dtype=int) * d.itemsize for s, d in layout.values()) == q.nbytes


def _profiled(fmt=None, dq=True, B=2, T=16):
    cfg = memory.preset("reference")
    pm = get_peft_model(GPT(cfg, seed=0), LoraConfig()).train()
    if fmt is not None:
        quantize_base(pm, fmt, 64, dq)
    opt = AdamW(pm.trainable_parameters(), lr=1e-3)
    rng = np.random.default_rng(0)
    batch = (rng.integers(0, cfg.vocab_size, (B, T)), rng.integers(0, cfg.vocab_size, (B, T)))
    from minipeft.workflows.compare import warm_step  # noqa: PLC0415

    warm_step(pm, opt, batch)
    return pm, memory.profile_step(pm, opt, batch)


@pytest.mark.parametrize("fmt,dq", LAYOUTS)
def test_estimated_equals_accounted_for_quantized_weights_and_the_temporary(fmt, dq):
    pm, rep = _profiled(fmt, dq)
    e = rep.estimated
    assert e.quantize == fmt
    # every row up to the temporaries: the same arrays, by formula and by the books
    for cat in memory.CATEGORIES[:memory.CATEGORIES.index("temporaries") + 1]:
        assert int(round(e.bytes[cat])) == rep.accounted[cat], cat
    # the weights are the codes, constants and second-level constants, plus the float rest
    quantized = [m for m in pm.modules() if isinstance(m, Q.QuantLinear)]
    assert len(quantized) == 16
    floats = sum(p.size * 4 for p in pm.base_model.parameters() if not p.requires_grad)
    assert rep.accounted["weights_frozen"] == floats + sum(m.weight_nbytes for m in quantized)
    # the temporary: the largest layer's dequantized weight (c_fc, 128 x 512 float32), one at a time
    assert rep.accounted["temporaries"] == 128 * 512 * 4
    assert rep.method == ("qlora" if fmt == "nf4" else f"lora+{fmt}")


def test_the_allocator_confirms_the_weights_shrink():
    _, flt = _profiled(None)
    _, q = _profiled("nf4")
    # between operators the allocator's bytes are the books' (no temporary alive)...
    for rep in (flt, q):
        for phase in memory.PHASES:
            assert rep.phases_measured[phase][0] == rep.phases_accounted[phase], phase
    # ...so what it measures at the start shrinks by exactly the weights' saving
    saved = flt.accounted["weights_frozen"] - q.accounted["weights_frozen"]
    assert saved > 0.75 * 16 * 128 * 128 * 12 / 16 * 4      # most of the Linears' 3 MiB
    assert flt.phases_measured["start"][0] - q.phases_measured["start"][0] == saved
    assert q.measured_peak < flt.measured_peak
    assert flt.accounted["temporaries"] == 0 and flt.estimated.bytes["temporaries"] == 0


def test_the_estimator_at_65b_counts_nf4_with_double_quantization():
    cfg = memory.preset("65b")
    e = memory.estimate(cfg, "lora", dtype="mixed", batch_size=1, seq_len=512,
                        gradient_checkpointing=True, quantize="nf4", r=64,
                        target_modules=["c_attn", "attn.c_proj", "c_fc", "mlp.c_proj"])
    plain = memory.estimate(cfg, "lora", dtype="mixed", batch_size=1, seq_len=512,
                            gradient_checkpointing=True, r=64,
                            target_modules=["c_attn", "attn.c_proj", "c_fc", "mlp.c_proj"])
    linears = cfg.n_layer * 12 * cfg.n_embd ** 2
    # 4 + 8/64 + 32/(64*256) bits a Linear weight, plus 16-bit embeddings, LayerNorms, biases
    assert e.bytes["weights_frozen"] == pytest.approx(linears * 4.127 / 8 + (
        plain.bytes["weights_frozen"] - 2 * linears), rel=1e-3)
    assert e.bytes["temporaries"] == 4 * cfg.n_embd ** 2 * 2      # c_fc dequantized to 16 bits
    assert e.bytes["weights_trainable"] == plain.bytes["weights_trainable"]


def test_quantized_formats_are_not_dtypes_and_the_old_recipes_have_new_names():
    with pytest.raises(ValueError, match="mixed-int4"):
        memory.estimate("7b", "lora", dtype="int4")
    with pytest.raises(ValueError, match="quantize='nf4'"):
        memory.estimate("7b", "lora", dtype="nf4")
    a = memory.estimate("7b", "lora", dtype="mixed-int4", batch_size=1, seq_len=512)
    b = memory.estimate("7b", "lora", dtype="mixed", quantize="nf4", batch_size=1, seq_len=512)
    # the rule of thumb leaves the constants out and halves the embeddings too: it differs
    assert a.bytes["weights_frozen"] != b.bytes["weights_frozen"]
    for method in ("full", "mask"):
        with pytest.raises(ValueError, match="cannot train"):
            memory.estimate("reference", method, quantize="nf4")
    with pytest.raises(ValueError, match="unknown quantization format"):
        memory.estimate("reference", "lora", quantize="nf3")


# ---------------------------------------------------------------------------
# QLoRA everywhere a method appears
# ---------------------------------------------------------------------------

from minipeft.peft import PeftModel  # noqa: E402
from minipeft.workflows.finetune import FinetuneSettings, finetune, load_finetuned  # noqa: E402

QUICK = FinetuneSettings(steps=2, batch_size=4, eval_limit=4)


@pytest.mark.parametrize("config,words", [
    (FullFinetuneConfig(), "full fine-tuning trains every Linear weight"),
    (MaskConfig(), "element masks train chosen entries"),
])
def test_quantize_refuses_the_methods_that_train_linear_weights(config, words):
    with pytest.raises(ValueError, match=words):
        finetune(config, settings=QUICK, quantize="nf4", progress=False)
    with pytest.raises(ValueError, match="unknown quantization format"):
        finetune(LoraConfig(), settings=QUICK, quantize="nf5", progress=False)


@pytest.mark.parametrize("argv,words", [
    (["finetune", "--method", "full", "--quantize", "nf4"], "full fine-tuning trains"),
    (["finetune", "--method", "mask", "--quantize", "int8"], "element masks train"),
    (["finetune", "--method", "qlora", "--quantize", "fp4"], "--method lora --quantize fp4"),
])
def test_cli_quantize_refusals(argv, words, capsys):
    from minipeft.tools.cli import main  # noqa: PLC0415

    assert main(argv) == 2
    assert words in capsys.readouterr().err


def test_qlora_adapter_saves_its_base_and_loads_onto_the_float_base_quantized(tmp_path):
    import json  # noqa: PLC0415

    from minipeft.workflows.base import load_base  # noqa: PLC0415

    out = str(tmp_path / "qlora")
    res = finetune(LoraConfig(), settings=QUICK, quantize="nf4", out=out, progress=False,
                   zero_shot=False)
    assert res.method == "qlora" and res.settings["quantize"] == "nf4"
    assert (res.trainable, res.total) == (16384, 838400)      # quantized weights count as entries
    meta = json.loads((tmp_path / "qlora" / "adapter_config.json").read_text())
    assert meta["base_config"]["quantization"] == {"format": "nf4", "blocksize": 64,
                                                   "double_quant": True}
    # the fingerprint is the float base's, taken before its weights became codes
    assert meta["base_fingerprint"] == PeftModel(load_base(), LoraConfig()).base_fingerprint
    assert Q.quantization_config(res.model).float_fingerprint == meta["base_fingerprint"]
    model, info = load_finetuned(out)
    assert info["settings"]["quantize"] == "nf4"
    rec = Q.quantization_config(model)
    assert (rec.format, rec.blocksize, rec.double_quant) == ("nf4", 64, True)
    assert sum(isinstance(m, Q.QuantLinear) for m in model.modules()) == 16
    ids = tokens((2, 12), vocab=96, seed=3)
    np.testing.assert_allclose(host(model(ids)), host(res.model.eval()(ids)), rtol=1e-5,
                               atol=1e-6)
    # a wrong base is refused, float or quantized
    with pytest.raises(ValueError, match="another base"):
        PeftModel.from_pretrained(GPT(load_base().config, seed=5), out)
    other = get_peft_model(load_base(), IA3Config())
    Q.quantize_model(other, "fp4")
    fp4_base = other.unload()
    before = [(n, type(m)) for n, m in fp4_base.named_modules()]
    with pytest.raises(ValueError, match="stored as"):
        PeftModel.from_pretrained(fp4_base, out)
    assert [(n, type(m)) for n, m in fp4_base.named_modules()] == before   # left untouched
    # a base already in NF4 as recorded takes the adapter as it is
    nf4_base = get_peft_model(load_base(), IA3Config())
    Q.quantize_model(nf4_base, "nf4")
    again = PeftModel.from_pretrained(nf4_base.unload(), out)
    np.testing.assert_allclose(host(again(ids)), host(model(ids)), rtol=1e-5, atol=1e-6)


def test_print_trainable_parameters_counts_quantized_weights_as_their_entries(capsys):
    from minipeft.workflows.base import load_base  # noqa: PLC0415

    pm = get_peft_model(load_base(), LoraConfig())
    pm.print_trainable_parameters()
    quantize_base(pm, "nf4")
    pm.print_trainable_parameters()
    a, b = capsys.readouterr().out.strip().splitlines()
    assert a == b == "trainable params: 16,384 || all params: 838,400 || trainable%: 1.9542"


def test_compare_has_a_qlora_row():
    from minipeft.workflows.compare import COMPARE_METHODS, CompareSettings, compare  # noqa: PLC0415

    assert "qlora" in CompareSettings().methods and "qlora" in COMPARE_METHODS
    st = CompareSettings.quick_settings(methods=("qlora",), steps=2, test_limit=4, val_limit=4,
                                        gen_tokens=2)
    (row,) = compare(st, progress=False).rows
    assert row["method"] == "qlora" and row["family"] == "reparameterization"
    assert (row["trainable"], row["total"]) == (16384, 838400)
    # the frozen Linears' 3 MiB of float32 are gone from the accounted peak of a float LoRA's
    assert row["mem_accounted_peak_bytes"] > 0


def test_cli_memory_qlora_prints_the_three_views(capsys):
    from minipeft.tools.cli import main  # noqa: PLC0415

    assert main(["memory", "--method", "qlora", "--batch-size", "2", "--seq-len", "16"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("qlora |") and "temporaries (dequantized W)" in out
    assert "exact (0 bytes): weights, frozen;" in out and "temporaries (dequantized W);" in out
