"""The autograd engine's contracts: accumulation, the activation ledger, memory,
"frozen means not computed", in-place safety, graph recording, and whole
compositions checked by random projection.
"""

from __future__ import annotations

import gc
import math
import re
import tracemalloc

import numpy as np
import pytest
from strategies import leaf, on

from minipeft import Tensor, backend
from minipeft.autograd import LEDGER, gradcheck, is_grad_enabled, no_grad, ops, vjp_check

# every test here runs on the fast path and on the reference ops (conftest.py)
pytestmark = pytest.mark.usefixtures("engine_path")


def host(a):
    return backend.asnumpy(a.data if isinstance(a, Tensor) else a)


@pytest.fixture(autouse=True)
def empty_ledger():
    """Every test starts and ends with nothing saved for backward.

    A graph still alive after its test (a leak) shows up here as a failure.
    """
    gc.collect()
    assert LEDGER.nbytes() == 0 and LEDGER.num_nodes() == 0, "a graph outlived its test"
    yield
    gc.collect()
    assert LEDGER.nbytes() == 0 and LEDGER.num_nodes() == 0, "a graph outlived its test"


def rand(device, shape, seed=0, requires_grad=True, dtype=np.float64, lo=-1.0, hi=1.0):
    rng = np.random.default_rng(seed)
    return leaf(rng.uniform(lo, hi, shape), device, requires_grad=requires_grad, dtype=dtype)


# ---------------------------------------------------------------------------
# Accumulation
# ---------------------------------------------------------------------------


def test_tensor_used_twice_accumulates(device):
    x = rand(device, (2, 3))
    xs = host(x)
    (x * x + x).sum().backward()                  # d/dx = 2x + 1
    np.testing.assert_allclose(host(x.grad), 2 * xs + 1)

    x.grad = None
    (x + x).sum().backward()                      # the same leaf twice in one op
    np.testing.assert_array_equal(host(x.grad), np.full((2, 3), 2.0))

    x.grad = None
    h = x.exp()                                   # a non-leaf used three times
    (h * h + h).sum().backward()                  # d/dx = (2 e^x + 1) e^x
    np.testing.assert_allclose(host(x.grad), (2 * np.exp(xs) + 1) * np.exp(xs))


def test_gradients_accumulate_across_backward_calls(device):
    x = rand(device, (3,))
    for _ in range(3):
        (x * 2.0).sum().backward()
    np.testing.assert_array_equal(host(x.grad), np.full(3, 6.0))


def test_backward_seed_is_not_aliased(device):
    """backward(v) must neither write into v nor let a leaf's .grad be v itself."""
    a, b = rand(device, (3,)), rand(device, (3,), seed=1)
    v = backend.to_device(np.array([1.0, 2.0, 3.0]), device)
    for _ in range(2):
        (a + b).backward(v)
    np.testing.assert_array_equal(host(v), [1.0, 2.0, 3.0])
    np.testing.assert_array_equal(host(a.grad), [2.0, 4.0, 6.0])
    np.testing.assert_array_equal(host(b.grad), [2.0, 4.0, 6.0])
    c = rand(device, (3,), seed=2)                # a leaf as the root: v is its gradient
    c.backward(v)
    assert c.grad is not v
    c.backward(v)
    np.testing.assert_array_equal(host(v), [1.0, 2.0, 3.0])
    np.testing.assert_array_equal(host(c.grad), [2.0, 4.0, 6.0])


def test_a_leaf_grad_is_never_shared(device):
    """One gradient array reaching two leaves (y = a + b) becomes two buffers."""
    a, b = rand(device, (2, 2)), rand(device, (2, 2), seed=1)
    (a + b).sum().backward()
    assert backend.buffer_id(a.grad) != backend.buffer_id(b.grad)
    (a + b).sum().backward()
    np.testing.assert_array_equal(host(a.grad), np.full((2, 2), 2.0))
    np.testing.assert_array_equal(host(b.grad), np.full((2, 2), 2.0))


def test_repeated_indices_in_a_gather_sum(device):
    x = rand(device, (4, 2))
    x[on(device, [0, 0, 3, 0])].sum().backward()
    np.testing.assert_array_equal(host(x.grad), [[3, 3], [0, 0], [0, 0], [1, 1]])
    x.grad = None
    x[[2, 2]].sum().backward()                    # a Python list index too
    np.testing.assert_array_equal(host(x.grad), [[0, 0], [0, 0], [2, 2], [0, 0]])

    w = rand(device, (3, 2))
    ids = on(device, [[1, 1], [1, 2]])
    ops.embedding(w, ids).sum().backward()
    np.testing.assert_array_equal(host(w.grad), [[0, 0], [3, 3], [1, 1]])


def test_a_graph_can_be_walked_once(device):
    x = rand(device, (3,))
    y = x.exp().sum()
    y.backward()
    with pytest.raises(RuntimeError, match="Exp.backward.*released"):
        y.backward()


def test_deep_graph_needs_no_recursion(device):
    """The topological sort is a loop: 5,000 chained ops run backward fine."""
    x = rand(device, (2,))
    y = x
    for _ in range(5000):
        y = y * 1.0
    y.sum().backward()
    np.testing.assert_array_equal(host(x.grad), [1.0, 1.0])
    del y


# ---------------------------------------------------------------------------
# Numerically extreme logits
# ---------------------------------------------------------------------------


def _logits_extreme():
    return np.array([[1e4, -1e4, 0.0, 1e4 - 2.0],
                     [-1e4, -1e4, -1e4 + 1.0, -1e4 + 3.0],
                     [5.0, -1e4, 1e4, 1e4]])


def _ref_log_softmax(z):
    """A float64 reference by the stable formula, computed independently here."""
    m = z.max(axis=-1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(axis=-1, keepdims=True))


@pytest.mark.parametrize("dtype, tol", [(np.float64, 1e-12), (np.float32, 1e-6)])
def test_softmax_family_with_huge_logits_is_finite_and_exact(device, dtype, tol):
    z = _logits_extreme()
    ref_ls = _ref_log_softmax(z)
    x = Tensor(z, dtype=dtype, requires_grad=True, device=device)

    ls = ops.log_softmax(x)
    assert np.isfinite(host(ls)).all()
    np.testing.assert_allclose(host(ls), ref_ls, rtol=tol, atol=tol * 1e4)
    sm = ops.softmax(x)
    np.testing.assert_allclose(host(sm), np.exp(ref_ls), rtol=tol, atol=tol)

    targets = np.array([1, 2, 0])
    ce = ops.cross_entropy(x, on(device, targets))
    ref_ce = -ref_ls[np.arange(3), targets].mean()
    assert np.isfinite(ce.item())
    np.testing.assert_allclose(ce.item(), ref_ce, rtol=tol)
    ce.backward()
    onehot = np.eye(4)[targets]
    np.testing.assert_allclose(host(x.grad), (np.exp(ref_ls) - onehot) / 3, atol=tol)

    x.grad = None
    (ls.sum() + sm.sum()).backward()
    assert np.isfinite(host(x.grad)).all()


def test_cross_entropy_ignores_rows(device):
    z = rand(device, (3, 4))
    t = on(device, [2, -100, 1])
    ce = ops.cross_entropy(z, t)
    ref = -_ref_log_softmax(host(z))[[0, 2], [2, 1]].mean()
    np.testing.assert_allclose(ce.item(), ref, rtol=1e-12)
    ce.backward()
    np.testing.assert_array_equal(host(z.grad)[1], 0.0)   # the ignored row gets nothing
    every = ops.cross_entropy(rand(device, (2, 3)), on(device, [-100, -100]))
    assert every.item() == 0.0                          # no valid row: 0, not nan


# ---------------------------------------------------------------------------
# The activation ledger
# ---------------------------------------------------------------------------


def test_ledger_holds_exactly_the_hand_count(device):
    r"""y = tanh(x @ W).sum(): which arrays are saved?

    * MatMul: for dL/dW = x^T G it keeps x; dL/dx is not wanted (x is data),
      so W is not kept.
    * Tanh: dy/dh = 1 - tanh^2 keeps its output t = tanh(x @ W).
    * Sum: its gradient is a broadcast, it keeps nothing.
    """
    x = rand(device, (5, 3), requires_grad=False)      # 15 float64: 120 bytes
    W = rand(device, (3, 4), seed=1)                    # 12 float64:  96 bytes
    y = (x @ W).tanh().sum()                            # t: (5, 4) 20 float64: 160 bytes
    assert LEDGER.nbytes() == x.nbytes + 5 * 4 * 8 == 280
    assert LEDGER.num_buffers() == 2 and LEDGER.num_nodes() == 2
    y.backward()
    assert LEDGER.nbytes() == 0 and LEDGER.num_nodes() == 0 and LEDGER.num_buffers() == 0

    # with x requiring a gradient too, MatMul keeps W as well (dL/dx = G W^T)
    x.requires_grad = True
    y = (x @ W).tanh().sum()
    assert LEDGER.nbytes() == 120 + 96 + 160
    y.backward()
    assert LEDGER.nbytes() == 0


def test_ledger_counts_a_shared_buffer_once(device):
    """Arrays are booked by their underlying buffer: views and repeats count once."""
    x = rand(device, (4, 3))                            # 12 float64: 96 bytes
    h = x.exp()                                         # Exp keeps h: 96
    a = h.reshape(3, 4).tanh()                          # Reshape keeps nothing; Tanh its output: 96
    b = h * h.T.T                                       # Mul keeps h and a view of h: no new bytes
    assert LEDGER.nbytes() == 96 + 96 and LEDGER.num_buffers() == 2
    c = a * 2.0                                         # dL/da needs only the constant (0-d): 8
    assert LEDGER.nbytes() == 96 + 96 + 8 and LEDGER.num_nodes() == 4
    (b.sum() + c.sum()).backward()
    assert LEDGER.nbytes() == 0 and LEDGER.num_buffers() == 0


def test_ledger_empties_when_a_graph_is_dropped(device):
    x = rand(device, (4, 4))
    y = (x @ x).gelu().softmax().sum()
    assert LEDGER.nbytes() > 0 and LEDGER.num_nodes() == 3
    del y
    gc.collect()
    assert LEDGER.nbytes() == 0 and LEDGER.num_nodes() == 0


def test_ledger_releases_each_node_during_backward(device):
    """Saved arrays go as soon as their node's backward has run, not at the end."""
    x = rand(device, (3, 3))
    seen = []

    class Probe(ops.Neg):
        @staticmethod
        def backward(ctx, g):
            seen.append(LEDGER.nbytes())
            return -g

    y = Probe.apply(x.exp().tanh()).sum()   # Exp keeps e^x, Tanh keeps its output
    assert LEDGER.nbytes() == 2 * 72
    y.backward()
    assert seen == [2 * 72]                 # Probe runs first: both still held
    assert LEDGER.nbytes() == 0


def test_memory_does_not_grow_over_1000_steps(device):
    """1,000 forward/backward steps of a small MLP leave nothing behind.

    Three books are read: the ledger (back to zero after every step), array
    memory (NumPy reports its buffers to tracemalloc under its own domain; a
    leaked graph keeps arrays) and the number of objects the garbage collector
    tracks (a leaked Tensor or graph node is one). Python's own dicts may
    resize once in a while, so the total of tracemalloc's default domain is
    not a fair measure; the two above are.
    """
    x = rand(device, (4, 8), requires_grad=False, dtype=np.float32)
    W1 = rand(device, (8, 16), seed=1, dtype=np.float32)
    W2 = rand(device, (16, 1), seed=2, dtype=np.float32)
    params = [W1, W2]

    def step():
        loss = (((x @ W1).gelu() @ W2) ** 2).mean()
        loss.backward()
        assert LEDGER.nbytes() == 0 and LEDGER.num_nodes() == 0
        for p in params:
            p.grad = None

    tracemalloc.start()
    try:
        for _ in range(100):
            step()
        gc.collect()
        arrays0, objects0, pool0 = _array_bytes(), len(gc.get_objects()), _gpu_pool_used(device)
        for _ in range(1000):
            step()
        gc.collect()
        arrays1, objects1, pool1 = _array_bytes(), len(gc.get_objects()), _gpu_pool_used(device)
    finally:
        tracemalloc.stop()
    assert arrays1 - arrays0 <= 1024, f"array memory grew by {arrays1 - arrays0} bytes"
    assert objects1 - objects0 < 100, f"{objects1 - objects0} more live objects"
    assert pool1 == pool0


def _array_bytes():
    """Bytes of NumPy buffers alive now, as traced by tracemalloc."""
    snap = tracemalloc.take_snapshot().filter_traces(
        [tracemalloc.DomainFilter(True, np.lib.tracemalloc_domain)])
    return sum(stat.size for stat in snap.statistics("filename"))


def _gpu_pool_used(device):
    if device != "gpu":
        return 0
    return backend.require_gpu().get_default_memory_pool().used_bytes()


# ---------------------------------------------------------------------------
# Frozen means not computed
# ---------------------------------------------------------------------------


def test_frozen_weight_forms_no_weight_gradient_product(device):
    x = rand(device, (2, 5, 3))                          # an activation that needs dL/dx
    W = rand(device, (3, 4), seed=1, requires_grad=False)
    before = dict(ops.counters)
    y = (x @ W).sum()
    # only W is kept (for dL/dx = G W^T); x, which only dL/dW would use, is not
    assert LEDGER.nbytes() == W.nbytes
    y.backward()
    assert ops.counters["matmul.dB"] == before.get("matmul.dB", 0)
    assert ops.counters["matmul.dA"] == before.get("matmul.dA", 0) + 1
    assert W.grad is None
    assert x.grad is not None


def test_frozen_input_forms_no_input_gradient_product(device):
    x = rand(device, (5, 3), requires_grad=False)
    W = rand(device, (3, 4), seed=1)
    before = dict(ops.counters)
    (x @ W).sum().backward()
    assert ops.counters["matmul.dA"] == before.get("matmul.dA", 0)
    assert ops.counters["matmul.dB"] == before.get("matmul.dB", 0) + 1
    assert x.grad is None and W.grad is not None


def test_frozen_leaves_never_get_a_gradient(device):
    x = rand(device, (2, 3))
    w = rand(device, (3,), seed=1, requires_grad=False)
    b = rand(device, (3,), seed=2, requires_grad=False)
    (ops.layer_norm(x, w, b) * w + b).sum().backward()
    assert w.grad is None and b.grad is None and x.grad is not None


# ---------------------------------------------------------------------------
# In-place ops and the version counter
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["+=", "*=", "copy_"])
def test_inplace_on_a_saved_input_makes_backward_raise(device, how):
    x = rand(device, (2, 3))
    W = rand(device, (3, 3), seed=1, requires_grad=False)
    y = (x @ W).sum()                                   # MatMul saved W for dL/dx
    _inplace(W, how)
    with pytest.raises(RuntimeError, match=rf"MatMul\.backward: input 1.*`{re.escape(how)}`"):
        y.backward()


def test_inplace_under_no_grad_on_a_saved_output_raises(device):
    x = rand(device, (2, 3))
    h = x.exp()                                         # Exp saved its output
    y = h.sum()
    with no_grad():
        h += 1.0                                        # allowed here, but h was saved
    with pytest.raises(RuntimeError, match=r"Exp\.backward: its output.*`\+=`"):
        y.backward()


def test_inplace_through_a_view_is_seen(device):
    x = rand(device, (2, 3))
    w = rand(device, (6,), seed=1, requires_grad=False)
    y = (x * w.reshape(2, 3)).sum()                     # Mul saved the view's data
    w *= 2.0                                            # the base changes: so does the view
    with pytest.raises(RuntimeError, match=r"Mul\.backward.*`\*=`"):
        y.backward()


def test_inplace_on_an_unsaved_tensor_is_fine(device):
    x = rand(device, (3,))
    c = rand(device, (3,), seed=1, requires_grad=False)
    y = (x + c).sum()                                   # Add saves nothing
    c += 1.0
    y.backward()
    np.testing.assert_array_equal(host(x.grad), np.ones(3))


def test_inplace_on_a_tensor_requiring_grad_while_recording_raises(device):
    x = rand(device, (3,))
    for how in ["+=", "*=", "copy_"]:
        with pytest.raises(RuntimeError, match=rf"{re.escape(how)}: in-place change"):
            _inplace(x, how)
    h = x * 2.0
    with pytest.raises(RuntimeError, match="requires grad"):
        h -= 1.0
    del h
    with no_grad():                                    # an optimizer step: allowed
        x -= 0.5 * x
        x /= 2.0
    assert x._version[0] == 2


def test_inplace_mixing_dtypes_is_refused(device):
    x = rand(device, (3,), requires_grad=False, dtype=np.float32)
    with pytest.raises(TypeError, match="dtype float64 differs"):
        x += rand(device, (3,), requires_grad=False)


def _inplace(t, how):
    if how == "+=":
        t += 1.0
    elif how == "*=":
        t *= 2.0
    else:
        t.copy_(backend.to_device(np.zeros(t.shape), t.device))


# ---------------------------------------------------------------------------
# Recording: requires_grad propagation and no_grad
# ---------------------------------------------------------------------------


def test_no_input_requiring_grad_records_nothing(device):
    a = rand(device, (2, 3), requires_grad=False)
    b = rand(device, (3, 2), seed=1, requires_grad=False)
    before = LEDGER.nbytes()
    for y in [a @ b, a.exp(), a * a, ops.softmax(a), ops.layer_norm(a, a[0], a[1])]:
        assert not y.requires_grad and y._node is None
    assert LEDGER.nbytes() == before == 0
    with pytest.raises(RuntimeError, match="does not require grad"):
        (a * a).sum().backward()


def test_requires_grad_propagates(device):
    a = rand(device, (2, 3))
    c = rand(device, (2, 3), seed=1, requires_grad=False)
    y = (a * c).exp()
    assert y.requires_grad and y._node is not None and not y.is_leaf
    assert (c * 2.0).requires_grad is False
    assert y.detach().requires_grad is False and y.detach()._node is None


def test_no_grad_records_nothing(device):
    x = rand(device, (3, 3))
    with no_grad():
        assert not is_grad_enabled()
        y = (x @ x).tanh().softmax().sum()
        assert not y.requires_grad and y._node is None
        assert LEDGER.nbytes() == 0
    assert is_grad_enabled()
    with pytest.raises(ValueError), no_grad():
        raise ValueError
    assert is_grad_enabled()                     # restored after an exception too


# ---------------------------------------------------------------------------
# backward's own errors
# ---------------------------------------------------------------------------


def test_backward_errors_are_clear(device):
    x = rand(device, (2, 3))
    y = x * 2.0
    with pytest.raises(RuntimeError, match=r"non-scalar tensor of shape \(2, 3\)"):
        y.backward()
    with pytest.raises(ValueError, match=r"grad has shape \(3,\), expected \(2, 3\)"):
        y.backward(backend.to_device(np.ones(3), device))
    c = rand(device, (), requires_grad=False)
    with pytest.raises(RuntimeError, match="does not require grad"):
        c.backward()
    del y


# ---------------------------------------------------------------------------
# Compositions, by random projection (<v, J u> against <J^T v, u>)
# ---------------------------------------------------------------------------


def test_vjp_causal_attention(device):
    """softmax(q k^T / sqrt(d), causal mask) v over (batch, heads, T, d)."""
    B, H, T, d = 2, 2, 4, 3
    q = rand(device, (B, H, T, d), seed=1)
    k = rand(device, (B, H, T, d), seed=2)
    v = rand(device, (B, H, T, d), seed=3)
    mask = ops.causal_mask(T, q)

    def attention(q, k, v):
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(d))    # (B, H, T, T)
        att = ops.masked_fill(att, mask, float("-inf")).softmax(axis=-1)
        return att @ v                                             # (B, H, T, d)

    assert vjp_check(attention, [q, k, v], trials=3)
    # masked positions really see nothing of the future: row 0 is v's row 0
    np.testing.assert_allclose(host(attention(q, k, v))[:, :, 0], host(v)[:, :, 0])


def test_vjp_mlp_with_layer_norm(device):
    """A pre-norm residual MLP block with a cross-entropy head, every parameter checked."""
    C = 4
    x = rand(device, (2, 3, C), seed=0)
    w, b = rand(device, (C,), seed=1), rand(device, (C,), seed=2)
    W1, b1 = rand(device, (C, 8), seed=3), rand(device, (8,), seed=4)
    W2, b2 = rand(device, (8, C), seed=5), rand(device, (C,), seed=6)
    targets = on(device, [0, 3, -100, 1, 1, 2])

    def block(x, w, b, W1, b1, W2, b2):
        h = x + (ops.layer_norm(x, w, b) @ W1 + b1).gelu() @ W2 + b2   # (2, 3, C)
        return ops.cross_entropy(h.reshape(6, C), targets)

    params = [x, w, b, W1, b1, W2, b2]
    assert vjp_check(block, params, trials=3)
    assert gradcheck(block, params)


def test_vjp_detects_a_wrong_backward(device):
    """The check itself can fail: a deliberately wrong derivative is caught."""

    class BadTanh(ops.Tanh):
        @staticmethod
        def backward(ctx, g):
            (y,) = ctx.saved
            return g * (1.0 - y)          # should be 1 - y^2

    x = rand(device, (3, 2))
    with pytest.raises(AssertionError, match="random-projection check failed"):
        vjp_check(lambda x: BadTanh.apply(x), [x])
    with pytest.raises(AssertionError, match="gradient of input 0"):
        gradcheck(lambda x: BadTanh.apply(x), [x])
    with pytest.raises(TypeError, match="float64"):
        gradcheck(ops.tanh, [rand(device, (2,), dtype=np.float32)])
