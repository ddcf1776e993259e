"""Optimizers against hand computations, and their memory promises.

AdamW and SGD are checked step by step against the update rules written out
in float64 NumPy here; frozen parameters must stay bit-identical and own no
state; masked parameters must keep k-sized state and never change outside
their mask; float32 must stay float32 on every backend.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from minipeft import Tensor, backend
from minipeft.autograd import ops
from minipeft.nn import Module, Parameter
from minipeft.optim import (
    SGD,
    AdamW,
    LRSchedule,
    clip_grad_norm_,
    cosine_with_warmup,
    param_groups,
)

# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


def host(a) -> np.ndarray:
    return backend.asnumpy(a).copy()


def set_grad(p: Tensor, g: np.ndarray) -> None:
    """Give ``p`` a gradient by hand: a copy, on its device and in its dtype."""
    p.grad = backend.to_device(np.array(g, dtype=p.dtype), p.device)


def param(a, device, **kw) -> Parameter:
    """A Parameter holding a *copy* of ``a`` (a Tensor adopts an array without copying)."""
    return Parameter(np.array(a), device=device, **kw)


def quadratic_backward(params, coef: float = 1.0) -> None:
    """loss = coef * sum_p sum(p * p): gradients 2 * coef * p, through the engine."""
    loss = None
    for p in params:
        term = ops.sum(p * p)
        loss = term if loss is None else loss + term
    (loss * coef).backward()


class TwoLayer(Module):
    """A 2-D weight, a 1-D bias, a 2-D embedding: one of each kind param_groups sorts."""

    def __init__(self, device="cpu", dtype=np.float32):
        super().__init__()
        rng = np.random.default_rng(0)
        self.wte = Parameter(rng.standard_normal((5, 3)), dtype=dtype, device=device)
        self.weight = Parameter(rng.standard_normal((3, 4)), dtype=dtype, device=device)
        self.bias = Parameter(rng.standard_normal(4), dtype=dtype, device=device)


# ---------------------------------------------------------------------------
# AdamW and SGD against the maths
# ---------------------------------------------------------------------------


def test_adamw_first_two_steps_match_hand_computation(device):
    lr, b1, b2, eps, wd = 0.1, 0.9, 0.999, 1e-8, 0.01
    w0 = np.array([0.5, -1.0, 2.0, 0.0])
    g1 = np.array([0.1, -0.2, 0.3, 0.0])
    g2 = np.array([-0.4, -0.1, 0.5, 0.2])

    p = param(w0, device, dtype=np.float64)
    opt = AdamW([p], lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd)
    set_grad(p, g1)
    opt.step()
    after1 = host(p.data)
    set_grad(p, g2)
    opt.step()
    after2 = host(p.data)

    # Step t = 1, written out. m0 = v0 = 0.
    #   decay:   w <- w0 - lr*wd*w0
    #   m1 = (1-b1) g1,  v1 = (1-b2) g1^2
    #   m_hat = m1 / (1-b1) = g1,  v_hat = v1 / (1-b2) = g1^2
    #   w1 = w0 (1 - lr*wd) - lr * g1 / (|g1| + eps)
    m1 = (1 - b1) * g1
    v1 = (1 - b2) * g1**2
    w1 = w0 - lr * wd * w0 - lr * (m1 / (1 - b1)) / (np.sqrt(v1 / (1 - b2)) + eps)
    np.testing.assert_allclose(w1, w0 * (1 - lr * wd) - lr * g1 / (np.abs(g1) + eps),
                               rtol=1e-14)
    np.testing.assert_allclose(after1, w1, rtol=1e-13, atol=1e-16)
    # The entry with zero gradient moved by decay only (and w0 = 0 there: not at all).
    assert after1[3] == 0.0

    # Step t = 2:
    #   m2 = b1 m1 + (1-b1) g2,  v2 = b2 v1 + (1-b2) g2^2
    #   w2 = w1 (1 - lr*wd) - lr * (m2 / (1-b1^2)) / (sqrt(v2 / (1-b2^2)) + eps)
    m2 = b1 * m1 + (1 - b1) * g2
    v2 = b2 * v1 + (1 - b2) * g2**2
    w2 = w1 - lr * wd * w1 - lr * (m2 / (1 - b1**2)) / (np.sqrt(v2 / (1 - b2**2)) + eps)
    np.testing.assert_allclose(after2, w2, rtol=1e-13, atol=1e-16)

    state = opt.state_of(p)
    assert state["step"] == 2
    np.testing.assert_allclose(host(state["m"]), m2, rtol=1e-15)
    np.testing.assert_allclose(host(state["v"]), v2, rtol=1e-15)


def test_sgd_momentum_matches_hand_computation(device):
    lr, mu, wd = 0.05, 0.9, 0.1
    w0 = np.array([[1.0, -2.0], [0.5, 3.0]])
    grads = [np.array([[0.2, 0.1], [-0.3, 0.0]]),
             np.array([[-0.1, 0.4], [0.2, 0.5]]),
             np.array([[0.3, -0.2], [0.1, -0.1]])]

    p = param(w0, device, dtype=np.float64)
    opt = SGD([p], lr=lr, momentum=mu, weight_decay=wd)
    # By hand (PyTorch's convention: the L2 term joins the gradient):
    #   d_t = g_t + wd * w_{t-1};  b_1 = d_1,  b_t = mu * b_{t-1} + d_t;  w_t = w_{t-1} - lr * b_t
    w, buf = w0.copy(), None
    for g in grads:
        set_grad(p, g)
        opt.step()
        d = g + wd * w
        buf = d if buf is None else mu * buf + d
        w = w - lr * buf
        np.testing.assert_allclose(host(p.data), w, rtol=1e-14)
    np.testing.assert_allclose(host(opt.state_of(p)["momentum_buffer"]), buf, rtol=1e-14)


def test_sgd_without_momentum_keeps_no_state_arrays(device):
    p = Parameter(np.ones(6), device=device)
    opt = SGD([p], lr=0.5)
    set_grad(p, np.full(6, 2.0))
    opt.step()
    np.testing.assert_array_equal(host(p.data), np.zeros(6))
    assert opt.state_bytes() == 0


# ---------------------------------------------------------------------------
# Weight decay: decoupled, and not on the no-decay group
# ---------------------------------------------------------------------------


def test_param_groups_put_1d_params_in_the_no_decay_group():
    model = TwoLayer()
    model.wte.requires_grad = True
    groups = param_groups(model, weight_decay=0.1)
    by_name = {g["name"]: [n for n, _ in g["params"]] for g in groups}
    assert sorted(by_name["decay"]) == ["weight", "wte"]       # embeddings are 2-D: decayed
    assert by_name["no_decay"] == ["bias"]
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    # Frozen parameters are not listed at all.
    model.weight.requires_grad = False
    names = [n for g in param_groups(model, 0.1) for n, _ in g["params"]]
    assert "weight" not in names


def test_weight_decay_is_decoupled_and_skips_the_no_decay_group(device):
    lr, wd = 0.1, 0.5
    model = TwoLayer(device, dtype=np.float64)
    w0, b0, e0 = host(model.weight.data), host(model.bias.data), host(model.wte.data)
    opt = AdamW(param_groups(model, wd), lr=lr, weight_decay=123.0)  # group values win
    # Zero gradients: m = v = 0, so Adam's own step is exactly 0 and only the
    # decoupled decay moves the weights: w <- w - lr * wd * w.
    for p in model.parameters():
        set_grad(p, np.zeros(p.shape))
    opt.step()
    np.testing.assert_allclose(host(model.weight.data), w0 - lr * wd * w0, rtol=1e-15)
    np.testing.assert_allclose(host(model.wte.data), e0 - lr * wd * e0, rtol=1e-15)
    np.testing.assert_array_equal(host(model.bias.data), b0)   # no decay: not one bit


def test_decoupled_decay_does_not_depend_on_gradient_scale(device):
    # Adam's first step is scale-invariant in g, and decoupled decay is not
    # divided by sqrt(v): so scaling the gradient by 1000 changes nothing.
    # (Adam + L2 would see its decay shrink by that factor.)
    outs = []
    for scale in (1.0, 1000.0):
        p = Parameter(np.array([1.0, -2.0, 3.0]), dtype=np.float64, device=device)
        opt = AdamW([p], lr=0.1, weight_decay=0.3, eps=1e-12)
        set_grad(p, scale * np.array([0.5, 0.25, -1.0]))
        opt.step()
        outs.append(host(p.data))
    np.testing.assert_allclose(outs[0], outs[1], rtol=1e-12)


# ---------------------------------------------------------------------------
# State only for trainable parameters
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("make_opt", [
    lambda ps: AdamW(ps, lr=0.1, weight_decay=0.1),
    lambda ps: SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.1),
], ids=["adamw", "sgd"])
def test_frozen_parameter_is_untouched_and_has_no_state(device, make_opt):
    model = TwoLayer(device)
    model.weight.requires_grad = False
    frozen_before = host(model.weight.data)
    opt = make_opt(model.named_parameters())  # the frozen one is passed in, on purpose
    for _ in range(3):
        opt.zero_grad()
        quadratic_backward(list(model.parameters()))
        assert model.weight.grad is None      # the engine made no buffer for it
        opt.step()
    after = host(model.weight.data)
    assert after.dtype == frozen_before.dtype
    assert after.tobytes() == frozen_before.tobytes()        # bit-identical
    assert opt.state_of(model.weight) is None
    trainable = model.wte.size + model.bias.size
    per_entry = 8 if isinstance(opt, AdamW) else 4           # m and v, or one buffer
    assert opt.state_bytes() == per_entry * trainable
    assert set(opt.named_state_bytes()) == {"wte", "bias"}


def test_state_is_lazy_and_parameters_without_gradient_are_skipped(device):
    a = Parameter(np.ones(3), dtype=np.float32, device=device, name="a")
    b = Parameter(np.ones(4), dtype=np.float32, device=device, name="b")
    opt = AdamW([a, b], lr=0.1)
    assert opt.state_bytes() == 0                   # nothing before the first step
    set_grad(a, np.ones(3))
    opt.step()
    assert opt.state_of(b) is None                  # b had no gradient: skipped
    np.testing.assert_array_equal(host(b.data), np.ones(4))
    assert opt.state_bytes() == 2 * 3 * 4


def test_zero_grad_drops_the_buffers(device):
    model = TwoLayer(device)
    opt = SGD(model.parameters(), lr=0.1)
    quadratic_backward(list(model.parameters()))
    assert all(p.grad is not None for p in model.parameters())
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


# ---------------------------------------------------------------------------
# Masked parameters: compact state, nothing outside the mask changes
# ---------------------------------------------------------------------------


def _masked_param(device, dtype=np.float32):
    rng = np.random.default_rng(1)
    p = Parameter(rng.standard_normal((6, 7)), dtype=dtype, device=device)
    mask = rng.random((6, 7)) < 0.3
    p.grad_mask = backend.to_device(mask, device)
    return p, mask


@pytest.mark.parametrize("index_dtype", ["int64", "int32"])
@pytest.mark.parametrize("kind", ["adamw", "sgd"])
def test_masked_parameter_keeps_k_sized_state_and_untouched_rest(device, kind, index_dtype):
    p, mask = _masked_param(device)
    k = int(mask.sum())
    before = host(p.data)
    if kind == "adamw":
        opt = AdamW([p], lr=0.05, weight_decay=0.1, index_dtype=index_dtype)
    else:
        opt = SGD([p], lr=0.05, momentum=0.9, weight_decay=0.1, index_dtype=index_dtype)
    for _ in range(5):
        opt.zero_grad()
        quadratic_backward([p])
        opt.step()
    after = host(p.data)

    # Outside the mask: bit-identical, weight decay included. Inside: trained.
    assert after[~mask].tobytes() == before[~mask].tobytes()
    assert np.all(after[mask] != before[mask])
    assert after.dtype == np.float32

    # State: the flat index of the k entries and k-sized moments.
    state = opt.state_of(p)
    np.testing.assert_array_equal(host(state["index"]), np.flatnonzero(mask))
    assert state["index"].dtype == np.dtype(index_dtype)
    moments = ["m", "v"] if kind == "adamw" else ["momentum_buffer"]
    for key in moments:
        assert state[key].shape == (k,)
        assert state[key].dtype == np.float32
    # Documented cost: 4 bytes per moment entry (float32) + 8 per index entry
    # (int64), or 4 (int32).
    index_bytes = 8 if index_dtype == "int64" else 4
    assert opt.state_bytes() == k * (4 * len(moments) + index_bytes)


def test_masked_entries_follow_dense_adamw_exactly(device):
    # The k selected entries of a masked parameter must move exactly as a
    # dense parameter holding only those entries, fed the same gradients.
    p, mask = _masked_param(device, dtype=np.float64)
    dense = param(host(p.data)[mask], device, dtype=np.float64)
    opt_masked = AdamW([p], lr=0.05, weight_decay=0.1)
    opt_dense = AdamW([dense], lr=0.05, weight_decay=0.1)
    for _ in range(4):
        opt_masked.zero_grad()
        opt_dense.zero_grad()
        quadratic_backward([p])
        quadratic_backward([dense])
        opt_masked.step()
        opt_dense.step()
    np.testing.assert_array_equal(host(p.data)[mask], host(dense.data))


# ---------------------------------------------------------------------------
# float32 stays float32
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("make_opt", [
    lambda ps: AdamW(ps, lr=0.1, weight_decay=0.1),
    lambda ps: SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.1),
], ids=["adamw", "sgd"])
def test_float32_stays_float32(device, make_opt):
    model = TwoLayer(device)
    masked, _ = _masked_param(device)
    params = [*model.parameters(), masked]
    opt = make_opt(params)
    for _ in range(2):
        opt.zero_grad()
        quadratic_backward(params)
        clip_grad_norm_(params, 0.1)
        opt.step()
    for p in params:
        assert p.data.dtype == np.float32
        assert backend.device_of(p.data) == device
        for key, a in opt.state_of(p).items():
            if key not in ("step", "index"):
                assert a.dtype == np.float32, key


# ---------------------------------------------------------------------------
# Gradient clipping
# ---------------------------------------------------------------------------


def test_clip_grad_norm_scales_all_gradients_together(device):
    a = Parameter(np.zeros(2), dtype=np.float64, device=device)
    b = Parameter(np.zeros((2, 2)), dtype=np.float64, device=device)
    c = Parameter(np.zeros(3), dtype=np.float64, device=device)   # no gradient: ignored
    ga, gb = np.array([3.0, 0.0]), np.array([[0.0, 4.0], [0.0, 12.0]])
    set_grad(a, ga)
    set_grad(b, gb)
    total = clip_grad_norm_([("a", a), ("b", b), ("c", c)], max_norm=6.5)
    assert total == pytest.approx(13.0, rel=1e-15)          # sqrt(9 + 16 + 144)
    coef = 6.5 / (13.0 + 1e-6)
    np.testing.assert_allclose(host(a.grad), ga * coef, rtol=1e-15)
    np.testing.assert_allclose(host(b.grad), gb * coef, rtol=1e-15)
    new_norm = math.sqrt(np.sum(host(a.grad) ** 2) + np.sum(host(b.grad) ** 2))
    assert new_norm == pytest.approx(6.5, rel=1e-6)
    assert c.grad is None

    # Below the threshold nothing changes, not one bit.
    before = host(b.grad)
    assert clip_grad_norm_([a, b], max_norm=100.0) == pytest.approx(6.5, rel=1e-6)
    assert host(b.grad).tobytes() == before.tobytes()

    with pytest.raises(ValueError, match="max_norm"):
        clip_grad_norm_([a], 0.0)


# ---------------------------------------------------------------------------
# Schedule
# ---------------------------------------------------------------------------


def test_cosine_with_warmup_key_points():
    kw = dict(total_steps=110, warmup_steps=10, base_lr=1.0, min_lr=0.1)
    lr = lambda s: cosine_with_warmup(s, **kw)
    assert lr(0) == pytest.approx(0.1)           # base / W
    assert lr(4) == pytest.approx(0.5)           # linear: (4 + 1) / 10
    assert lr(9) == pytest.approx(1.0)           # end of warmup
    assert lr(10) == pytest.approx(1.0)          # start of the cosine
    assert lr(60) == pytest.approx(0.55)         # halfway: mean of base and min
    assert lr(110) == pytest.approx(0.1)         # the end: min_lr
    assert lr(500) == pytest.approx(0.1)         # and after it
    decay = [lr(s) for s in range(10, 111)]
    assert all(x >= y for x, y in zip(decay, decay[1:]))
    # No warmup: the first step already runs at base_lr.
    assert cosine_with_warmup(0, 100, 0, 3e-4) == pytest.approx(3e-4)

    for bad in (dict(total_steps=0, warmup_steps=0), dict(total_steps=10, warmup_steps=11)):
        with pytest.raises(ValueError):
            cosine_with_warmup(0, base_lr=1.0, **bad)


def test_lr_schedule_object_sets_the_optimizer_rate():
    sched = LRSchedule(base_lr=1e-3, total_steps=100, warmup_steps=10)
    opt = AdamW([Parameter(np.ones(2))], lr=123.0)
    assert sched.apply(opt, 4) == pytest.approx(5e-4)
    assert opt.lr == pytest.approx(5e-4)
    assert sched(10) == cosine_with_warmup(10, 100, 10, 1e-3)
    with pytest.raises(ValueError, match="warmup_steps"):
        LRSchedule(base_lr=1.0, total_steps=5, warmup_steps=6)


# ---------------------------------------------------------------------------
# Construction errors and moving state between devices
# ---------------------------------------------------------------------------


def test_bad_parameter_lists_are_refused_clearly():
    p = Parameter(np.ones(2), name="w")
    with pytest.raises(ValueError, match="no parameters"):
        AdamW([])
    with pytest.raises(ValueError, match="appears twice"):
        AdamW([p, p])
    with pytest.raises(ValueError, match="expected keys"):
        AdamW([{"params": [p], "lr": 0.1}])
    with pytest.raises(TypeError, match="Parameters or"):
        SGD([np.ones(2)], lr=0.1)
    with pytest.raises(ValueError, match="index_dtype"):
        AdamW([p], index_dtype="int16")
    with pytest.raises(ValueError, match="momentum"):
        SGD([p], lr=0.1, momentum=1.0)
    # A Module stands for its named parameters.
    names = [n for n, _ in AdamW(TwoLayer()).named_parameters()]
    assert sorted(names) == ["bias", "weight", "wte"]


def test_state_moves_with_optimizer_to(device):
    if device == "cpu":
        pytest.skip("needs a second device")
    model = TwoLayer("cpu")
    opt = AdamW(model.parameters(), lr=0.1)
    quadratic_backward(list(model.parameters()))
    opt.step()
    model.to(device)
    opt.zero_grad()
    quadratic_backward(list(model.parameters()))
    with pytest.raises(RuntimeError, match=r"optimizer\.to"):
        opt.step()
    opt.to(device)
    opt.step()
    assert all(backend.device_of(opt.state_of(p)["m"]) == device for p in model.parameters())


def test_masked_update_lands_in_a_non_contiguous_parameter(device):
    # A transposed (non-contiguous) array: reshape(-1) would be a copy, so the
    # optimizer must first make the data contiguous, or its writes would be lost.
    p, mask = _masked_param(device)
    p.data = p.data.T                                              # (7, 6), a view
    p.grad_mask = backend.to_device(mask.T, device)
    before = host(p.data)
    opt = SGD([p], lr=0.5)
    set_grad(p, np.ones((7, 6)))
    opt.step()
    np.testing.assert_array_equal(host(p.data), np.where(mask.T, before - 0.5, before))
