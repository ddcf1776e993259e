"""Layers: Linear, Embedding, LayerNorm, Dropout (with mask record and replay), on every backend."""

import numpy as np
import pytest

from minipeft import Tensor, backend, no_grad
from minipeft.autograd import vjp_check
from minipeft.nn import (
    Dropout,
    Embedding,
    LayerNorm,
    Linear,
    record_dropout_masks,
    replay_dropout_masks,
)

# every test here runs on the fast path and on the reference ops (conftest.py)
pytestmark = pytest.mark.usefixtures("engine_path")


def f64(shape, device, seed=0, requires_grad=True):
    data = np.random.default_rng(seed).standard_normal(shape)
    return Tensor(data, requires_grad=requires_grad, dtype=np.float64, device=device)


# -- Linear ------------------------------------------------------------------


def test_linear_stores_weight_in_out_and_computes_xw_plus_b(device):
    lin = Linear(3, 5, rng=np.random.default_rng(0)).to(device)
    assert lin.weight.shape == (3, 5) and lin.bias.shape == (5,)
    assert [n for n, _ in lin.named_parameters()] == ["weight", "bias"]
    np.testing.assert_array_equal(backend.asnumpy(lin.bias.data), 0.0)
    lin.bias.data = backend.to_device(np.arange(5, dtype=np.float32), device)
    x = np.random.default_rng(1).standard_normal((2, 4, 3)).astype(np.float32)
    y = lin(Tensor(x, device=device))
    assert y.shape == (2, 4, 5) and y.dtype == np.float32 and y.device == device
    want = x @ backend.asnumpy(lin.weight.data) + np.arange(5)
    np.testing.assert_allclose(y.numpy(), want, rtol=1e-5, atol=1e-6)


def test_linear_init_is_seeded_and_scaled():
    a = Linear(64, 32, rng=np.random.default_rng(7))
    b = Linear(64, 32, rng=np.random.default_rng(7))
    np.testing.assert_array_equal(a.weight.data, b.weight.data)
    assert abs(a.weight.data.std() - 0.02) < 0.002
    c = Linear(64, 32, rng=np.random.default_rng(7), std=0.005, bias=False)
    assert c.bias is None and c.num_parameters() == 64 * 32
    assert abs(c.weight.data.std() - 0.005) < 0.0005


def test_linear_gradients(device):
    lin = Linear(4, 3, rng=np.random.default_rng(0)).to(device, dtype=np.float64)
    lin.bias.data = backend.to_device(np.random.default_rng(2).standard_normal(3), device)
    x = f64((2, 5, 4), device)
    vjp_check(lambda *_: lin(x), [x, lin.weight, lin.bias])


def test_linear_frozen_weight_gets_no_gradient(device):
    lin = Linear(4, 3, rng=np.random.default_rng(0)).to(device)
    lin.weight.requires_grad = False
    x = Tensor(np.ones((2, 4), np.float32), requires_grad=True, device=device)
    lin(x).sum().backward()
    assert lin.weight.grad is None and lin.bias.grad is not None and x.grad is not None


# -- Embedding ---------------------------------------------------------------


def test_embedding_looks_up_rows_from_ids_on_any_device(device):
    emb = Embedding(10, 4, rng=np.random.default_rng(0)).to(device)
    ids = np.array([[1, 2, 2], [9, 0, 1]])   # host ids: moved to the table's device
    out = emb(ids)
    assert out.shape == (2, 3, 4) and out.device == device
    np.testing.assert_array_equal(out.numpy(), backend.asnumpy(emb.weight.data)[ids])


def test_embedding_gradient_sums_repeated_ids(device):
    emb = Embedding(5, 3, rng=np.random.default_rng(0)).to(device, dtype=np.float64)
    ids = np.array([[1, 1, 4, 1]])
    emb(ids).sum().backward()
    want = np.zeros((5, 3))
    want[1], want[4] = 3.0, 1.0
    np.testing.assert_array_equal(backend.asnumpy(emb.weight.grad), want)
    vjp_check(lambda *_: emb(ids), [emb.weight])


# -- LayerNorm ---------------------------------------------------------------


def test_layer_norm_matches_the_formula(device):
    ln = LayerNorm(6, eps=1e-5).to(device, dtype=np.float64)
    assert ln.extra_repr() == "6, eps=1e-05"
    ln.weight.data = backend.to_device(np.linspace(0.5, 2.0, 6), device)
    ln.bias.data = backend.to_device(np.linspace(-1.0, 1.0, 6), device)
    x = np.random.default_rng(0).standard_normal((3, 6)) * 4 + 2
    y = ln(Tensor(x, dtype=np.float64, device=device)).numpy()
    xh = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(y, xh * np.linspace(0.5, 2.0, 6) + np.linspace(-1.0, 1.0, 6),
                               rtol=1e-12, atol=1e-12)


def test_layer_norm_gradients(device):
    ln = LayerNorm(5).to(device, dtype=np.float64)
    ln.weight.data = backend.to_device(np.random.default_rng(1).standard_normal(5), device)
    x = f64((2, 3, 5), device)
    vjp_check(lambda *_: ln(x), [x, ln.weight, ln.bias])


# -- Dropout -----------------------------------------------------------------


def test_dropout_is_identity_in_eval_mode_and_at_p_zero(device):
    x = Tensor(np.ones((4, 8)), requires_grad=True, device=device)
    d = Dropout(0.5, seed=0).eval()
    assert d(x) is x
    assert Dropout(0.0, seed=0)(x) is x


def test_dropout_draws_masks_on_the_input_device_and_scales(device):
    d = Dropout(0.25, seed=3)
    x = Tensor(np.ones((200, 50), np.float32), requires_grad=True, device=device)
    y = d(x)
    assert y.device == device and y.dtype == np.float32
    vals = y.numpy()
    # kept entries are scaled by 1/(1-p), dropped ones are exactly 0
    assert set(np.unique(vals).tolist()) <= {0.0, np.float32(1 / 0.75)}
    assert abs((vals == 0).mean() - 0.25) < 0.02
    y.sum().backward()
    np.testing.assert_array_equal(backend.asnumpy(x.grad), vals)   # d/dx = m / (1-p)


def test_dropout_is_deterministic_given_its_seed(device):
    x = Tensor(np.ones((6, 7)), device=device)
    a, b = Dropout(0.5, seed=11), Dropout(0.5, seed=11)
    np.testing.assert_array_equal(a(x).numpy(), b(x).numpy())
    assert not np.array_equal(a(x).numpy(), a(x).numpy())  # the stream moves on
    c = Dropout(0.5, seed=12)
    assert not np.array_equal(Dropout(0.5, seed=11)(x).numpy(), c(x).numpy())


def test_dropout_masks_are_recorded_then_replayed(device):
    d1, d2 = Dropout(0.5, seed=0), Dropout(0.3, seed=1)
    x = Tensor(np.random.default_rng(0).standard_normal((5, 6)), device=device)
    with no_grad(), record_dropout_masks() as tape:
        first = d2(d1(x)).numpy()
    assert len(tape.masks) == 2 and tape.masks[0].dtype == bool
    assert backend.device_of(tape.masks[0]) == device
    # replay: the same output although the generators have moved on
    with replay_dropout_masks(tape.masks):
        again = d2(d1(x)).numpy()
    np.testing.assert_array_equal(again, first)
    # without replay the next draw differs
    assert not np.array_equal(d2(d1(x)).numpy(), first)


def test_dropout_replay_refuses_a_different_forward():
    d = Dropout(0.5, seed=0)
    x = Tensor(np.ones((3, 4)))
    with record_dropout_masks() as tape:
        d(x)
    with pytest.raises(RuntimeError, match="recorded mask 1 has shape"):
        with replay_dropout_masks(tape.masks):
            d(Tensor(np.ones((2, 4))))
    with pytest.raises(RuntimeError, match="only 1 were recorded"):
        with replay_dropout_masks(tape.masks):
            d(x)
            d(x)
    with pytest.raises(RuntimeError, match="1 masks were recorded but the recomputed forward used 0"):
        with replay_dropout_masks(tape.masks):
            pass


def test_dropout_rejects_bad_probabilities():
    for p in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError, match=r"dropout probability must be in \[0, 1\)"):
            Dropout(p)
