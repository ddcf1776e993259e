"""Every operator's backward against float64 central differences, entry by entry.

Shapes and values are drawn by hypothesis (see ``strategies.py`` for how
domains, kinks and ties are avoided); each test runs on every backend through
the ``device`` fixture. ``gradcheck`` weights a non-scalar output by a random
vector, so every output entry's contribution is checked, and it perturbs every
input entry, so every gradient entry is checked.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from strategies import (
    axes_for,
    broadcast_pairs,
    distinct,
    engine,
    fast_only,
    few,
    index_array,
    leaf,
    nonzero,
    on,
    positive,
    shapes,
    values,
)

from minipeft import Tensor, backend
from minipeft.autograd import gradcheck, ops

# every test here runs on the fast path and on the reference ops (conftest.py)
pytestmark = pytest.mark.usefixtures("engine_path")

# ---------------------------------------------------------------------------
# Elementwise arithmetic, broadcasting included
# ---------------------------------------------------------------------------


@engine
@given(data=st.data())
@pytest.mark.parametrize("op", [ops.add, ops.sub, ops.mul])
def test_binary_broadcasting(device, op, data):
    sa, sb = data.draw(broadcast_pairs())
    a = leaf(data.draw(values(sa)), device)
    b = leaf(data.draw(values(sb)), device)
    assert gradcheck(op, [a, b])


@engine
@given(data=st.data())
def test_div(device, data):
    sa, sb = data.draw(broadcast_pairs())
    a = leaf(data.draw(values(sa)), device)
    b = leaf(data.draw(nonzero(sb, lo=0.5)), device)
    assert gradcheck(ops.div, [a, b])


@engine
@given(data=st.data())
def test_operators_with_constants(device, data):
    """Python-number operands on either side: only the tensor gets a gradient."""
    x = leaf(data.draw(nonzero(data.draw(shapes()), lo=0.5)), device)
    c = data.draw(st.floats(0.5, 2.0))
    assert gradcheck(lambda x: 2.0 * x - c + x / c - c / x + (1.0 - x) * c, [x])


@engine
@given(data=st.data())
def test_neg(device, data):
    x = leaf(data.draw(values(data.draw(shapes()))), device)
    assert gradcheck(ops.neg, [x])
    assert gradcheck(lambda x: -x, [x])


@engine
@given(data=st.data(), p=st.sampled_from([0, 1, 2, 3, 4, 0.5, -1, 1.5, 2.5, -0.5]))
def test_pow_scalar_exponent(device, data, p):
    # x > 0 so every real power is defined; integer powers also on signed x
    x = leaf(data.draw(positive(data.draw(shapes()))), device)
    assert gradcheck(lambda x: x ** p, [x])
    if isinstance(p, int) and p >= 0:
        x = leaf(data.draw(values(data.draw(shapes()))), device)
        assert gradcheck(lambda x: ops.pow(x, p), [x])


@engine
@given(data=st.data())
def test_pow_tensor_exponent(device, data):
    sa, sb = data.draw(broadcast_pairs())
    a = leaf(data.draw(positive(sa)), device)          # a > 0: a^b ln a is defined
    b = leaf(data.draw(values(sb)), device)
    assert gradcheck(ops.pow, [a, b])


# ---------------------------------------------------------------------------
# Matrix products
# ---------------------------------------------------------------------------

dims = st.integers(1, 3)


@engine
@given(m=dims, k=dims, n=dims, data=st.data())
def test_matmul_2d(device, m, k, n, data):
    a = leaf(data.draw(values((m, k))), device)
    b = leaf(data.draw(values((k, n))), device)
    assert gradcheck(ops.matmul, [a, b])


@engine
@given(m=dims, k=dims, n=dims, data=st.data())
def test_matmul_batched_broadcast(device, m, k, n, data):
    """Batch axes broadcast against each other, a 2-D weight included (ba or bb empty)."""
    ba, bb = data.draw(broadcast_pairs(max_dims=2))
    a = leaf(data.draw(values(ba + (m, k))), device)
    b = leaf(data.draw(values(bb + (k, n))), device)
    assert gradcheck(ops.matmul, [a, b])


@engine
@given(m=dims, k=dims, n=dims, data=st.data(), grad_a=st.booleans())
def test_matmul_one_side_frozen(device, m, k, n, data, grad_a):
    """With one operand frozen, the other's gradient is still right."""
    a = leaf(data.draw(values((2, m, k))), device, requires_grad=grad_a)
    b = leaf(data.draw(values((k, n))), device, requires_grad=not grad_a)
    assert gradcheck(ops.matmul, [a, b])


@engine
@given(data=st.data(), k=dims, n=dims, bias=st.booleans(),
       needs=st.sampled_from([(True, True, True), (True, False, False), (False, True, True),
                              (False, True, False), (False, False, True)]))
def test_linear(device, data, k, n, bias, needs):
    """x W + b over any leading axes (a 1-D x included), each input alone or together."""
    lead = data.draw(shapes(max_dims=2))
    x = leaf(data.draw(values(lead + (k,))), device, requires_grad=needs[0])
    w = leaf(data.draw(values((k, n))), device, requires_grad=needs[1])
    b = leaf(data.draw(values((n,))), device, requires_grad=needs[2])
    args = [x, w, b] if bias else [x, w]
    if not any(t.requires_grad for t in args):
        return
    assert gradcheck(ops.linear, args)
    want = backend.asnumpy(x.data) @ backend.asnumpy(w.data)
    if bias:
        want = want + backend.asnumpy(b.data)
    np.testing.assert_allclose(ops.linear(*args).numpy(), want, rtol=1e-12, atol=1e-12)


def test_linear_frozen_weight_forms_no_weight_gradient_product(device):
    x = leaf(np.ones((2, 5, 3)), device)
    w = leaf(np.ones((3, 4)), device, requires_grad=False)
    b = leaf(np.zeros(4), device)
    before = dict(ops.counters)
    y = ops.linear(x, w, b)
    from minipeft.autograd import LEDGER
    assert LEDGER.nbytes() == w.nbytes  # x is not kept: only x^T G would use it
    y.sum().backward()
    assert ops.counters["linear.dW"] == before.get("linear.dW", 0)
    assert ops.counters["linear.dx"] == before.get("linear.dx", 0) + 1
    assert w.grad is None and x.grad is not None and b.grad is not None


def _attention_by_composition(qkv, n_head, keep=None, p=0.0):
    """The same attention from the general ops: the reference the fused op must equal."""
    B, T, C3 = qkv.shape
    C = C3 // 3
    hs = C // n_head
    q, k, v = qkv[..., :C], qkv[..., C:2 * C], qkv[..., 2 * C:]
    q, k, v = (t.reshape(B, T, n_head, hs).transpose(1, 2) for t in (q, k, v))
    att = (q * (1.0 / np.sqrt(hs))) @ k.transpose(-2, -1)                  # (B, nh, T, T)
    att = ops.masked_fill(att, ops.causal_mask(T, qkv), float("-inf")).softmax(axis=-1)
    if keep is not None:
        att = ops.dropout(att, p, keep)
    return (att @ v).transpose(1, 2).reshape(B, T, C)


@engine
@given(data=st.data(), B=st.integers(1, 2), T=st.integers(1, 4), n_head=st.integers(1, 2),
       hs=st.integers(1, 2), dropout=st.booleans())
def test_causal_attention(device, data, B, T, n_head, hs, dropout):
    """The fused op's gradient against differences, and both directions against composition."""
    C = n_head * hs
    qkv = leaf(data.draw(values((B, T, 3 * C))), device)
    keep, p = None, 0.0
    if dropout:
        keep = on(device, data.draw(hnp.arrays(np.bool_, (B, n_head, T, T))))
        p = 0.25
    _check_attention(device, data, qkv, n_head, keep, p)


def _check_attention(device, data, qkv, n_head, keep, p):
    """The fused op's gradient against differences, and its values and gradient
    against the composition of simple ops (float64)."""
    assert gradcheck(lambda t: ops.causal_attention(t, n_head, keep, p), [qkv])
    qkv.grad = None
    y = ops.causal_attention(qkv, n_head, keep, p)
    ref = leaf(backend.asnumpy(qkv.data), device)
    want = _attention_by_composition(ref, n_head, keep, p)
    np.testing.assert_allclose(y.numpy(), want.numpy(), rtol=1e-12, atol=1e-12)
    g = on(device, data.draw(values(y.shape)))
    y.backward(g)
    want.backward(g)
    np.testing.assert_allclose(backend.asnumpy(qkv.grad), backend.asnumpy(ref.grad),
                               rtol=1e-10, atol=1e-12)
    qkv.grad = None


@fast_only
@few
@given(data=st.data(), T=st.integers(2, 9), dropout=st.booleans())
def test_causal_attention_in_row_blocks(device, data, T, dropout):
    """With blocks of one or two query rows (the blocks skip everything above the
    diagonal), still the composition's values and the differences' gradient."""
    from minipeft.autograd import fused as ops_module
    B, n_head, hs = 2, 2, 2
    qkv = leaf(data.draw(values((B, T, 3 * n_head * hs))), device)
    keep, p = None, 0.0
    if dropout:
        keep = on(device, data.draw(hnp.arrays(np.bool_, (B, n_head, T, T))))
        p = 0.5
    saved = ops_module._ATTN_BLOCK, ops_module._ATTN_MAX_BLOCKS
    try:
        ops_module._ATTN_MAX_BLOCKS = 8
        for block in (1, 2):
            ops_module._ATTN_BLOCK = block
            assert len(ops_module._causal_blocks(T)) == min(T // block, 8)
            _check_attention(device, data, qkv, n_head, keep, p)
    finally:
        ops_module._ATTN_BLOCK, ops_module._ATTN_MAX_BLOCKS = saved


def test_causal_attention_without_a_mask_ignores_p(device):
    """Eval mode hands no keep-mask but the layer's p: nothing may be rescaled."""
    qkv = leaf(np.random.default_rng(0).standard_normal((2, 5, 12)), device)
    np.testing.assert_array_equal(ops.causal_attention(qkv, 2, None, 0.5).numpy(),
                                  ops.causal_attention(qkv, 2).numpy())


def test_causal_attention_saves_heads_and_probabilities_only(device, engine_path):
    from minipeft.autograd import LEDGER
    B, T, nh, hs = 2, 5, 2, 3
    qkv = leaf(np.random.default_rng(0).standard_normal((B, T, 3 * nh * hs)), device)
    y = ops.causal_attention(qkv, nh)
    # q, k and v (qkv's size: the fast kernel's copy, or qkv itself) and P or E
    # (B, nh, T, T), in float64; the fast kernel keeps 1/z (B, nh, T, 1) too
    rz = B * nh * T * 8 if engine_path == "fast" else 0
    assert LEDGER.nbytes() == qkv.nbytes + B * nh * T * T * 8 + rz
    y.sum().backward()
    assert LEDGER.nbytes() == 0
    with pytest.raises(ValueError, match="divisible by n_head=4"):
        ops.causal_attention(qkv, 4)


# ---------------------------------------------------------------------------
# Reductions
# ---------------------------------------------------------------------------


@engine
@given(data=st.data(), keepdims=st.booleans())
@pytest.mark.parametrize("op", [ops.sum, ops.mean])
def test_sum_mean(device, op, data, keepdims):
    shape = data.draw(shapes())
    axis = data.draw(axes_for(len(shape)))
    x = leaf(data.draw(values(shape)), device)
    assert gradcheck(lambda x: op(x, axis=axis, keepdims=keepdims), [x])


@engine
@given(data=st.data(), keepdims=st.booleans())
def test_max(device, data, keepdims):
    shape = data.draw(shapes())
    axis = data.draw(axes_for(len(shape)))
    x = leaf(data.draw(distinct(shape)), device)  # no ties: max is differentiable there
    assert gradcheck(lambda x: ops.max(x, axis=axis, keepdims=keepdims), [x])


# ---------------------------------------------------------------------------
# Shape ops
# ---------------------------------------------------------------------------


@engine
@given(data=st.data())
def test_reshape(device, data):
    shape = data.draw(shapes())
    size = int(np.prod(shape))
    target = data.draw(st.sampled_from([(size,), (1, size), (size, 1), shape[::-1], (-1,)]))
    x = leaf(data.draw(values(shape)), device)
    assert gradcheck(lambda x: ops.reshape(x, target), [x])
    assert gradcheck(lambda x: x.view(*target), [x])


@engine
@given(data=st.data())
def test_permute_transpose(device, data):
    shape = data.draw(shapes(min_dims=2))
    perm = data.draw(st.permutations(range(len(shape))))
    i, j = data.draw(st.lists(st.integers(-len(shape), len(shape) - 1), min_size=2, max_size=2))
    x = leaf(data.draw(values(shape)), device)
    assert gradcheck(lambda x: ops.permute(x, perm), [x])
    assert gradcheck(lambda x: ops.transpose(x, i, j), [x])
    assert gradcheck(lambda x: x.T, [x])


@engine
@given(data=st.data())
def test_broadcast_to(device, data):
    target = data.draw(shapes())
    # the source: some leading axes dropped, some kept axes set to 1
    lead = data.draw(st.integers(0, len(target)))
    ones = data.draw(st.lists(st.booleans(), min_size=len(target), max_size=len(target)))
    src = tuple(1 if o else n for n, o in zip(target[lead:], ones[lead:]))
    x = leaf(data.draw(values(src)), device)
    assert gradcheck(lambda x: ops.broadcast_to(x, target), [x])


@engine
@given(data=st.data())
def test_getitem_slices(device, data):
    shape = data.draw(shapes(min_dims=1))
    index = tuple(
        data.draw(st.one_of(st.slices(n), st.integers(-n, n - 1))) for n in shape
    )
    x = leaf(data.draw(values(shape)), device)
    assert gradcheck(lambda x: x[index], [x])


@engine
@given(data=st.data())
def test_getitem_gather_repeated(device, data):
    """Integer-array gathers (repeats likely): alone, with a slice, and paired."""
    shape = data.draw(shapes(min_dims=2))
    x = leaf(data.draw(values(shape)), device)
    i0 = on(device, data.draw(index_array(shape[0])))
    i1 = on(device, data.draw(hnp.arrays(np.int64, i0.shape,
                                         elements=st.integers(0, shape[1] - 1))))
    assert gradcheck(lambda x: x[i0], [x])
    assert gradcheck(lambda x: x[:, i1], [x])
    assert gradcheck(lambda x: x[i0, i1], [x])


@engine
@given(data=st.data())
def test_concatenate(device, data):
    shape = data.draw(shapes(min_dims=1))
    axis = data.draw(st.integers(-len(shape), len(shape) - 1))
    sizes = data.draw(st.lists(st.integers(1, 3), min_size=1, max_size=3))
    xs = []
    for s in sizes:
        sh = list(shape)
        sh[axis] = s
        xs.append(leaf(data.draw(values(tuple(sh))), device))
    assert gradcheck(lambda *xs: ops.concatenate(xs, axis=axis), xs)


# ---------------------------------------------------------------------------
# Unary functions
# ---------------------------------------------------------------------------


@engine
@given(data=st.data())
@pytest.mark.parametrize(
    "op, domain",
    [
        (ops.exp, values), (ops.log, positive), (ops.sqrt, positive), (ops.tanh, values),
        (ops.sigmoid, values), (ops.relu, nonzero), (ops.gelu, values),
    ],
    ids=["exp", "log", "sqrt", "tanh", "sigmoid", "relu", "gelu"],
)
def test_unary(device, op, domain, data):
    x = leaf(data.draw(domain(data.draw(shapes()), hi=3.0)), device)
    assert gradcheck(op, [x])


# ---------------------------------------------------------------------------
# Neural-network ops
# ---------------------------------------------------------------------------


@engine
@given(data=st.data())
@pytest.mark.parametrize("op", [ops.softmax, ops.log_softmax])
def test_softmax_log_softmax(device, op, data):
    shape = data.draw(shapes(min_dims=1))
    axis = data.draw(st.integers(-len(shape), len(shape) - 1))
    x = leaf(data.draw(values(shape, -3.0, 3.0)), device)
    assert gradcheck(lambda x: op(x, axis=axis), [x])


@engine
@given(data=st.data(), C=st.integers(2, 4))
def test_layer_norm(device, data, C):
    lead = data.draw(shapes(max_dims=2))
    x = leaf(data.draw(distinct(lead + (C,))), device)  # spread: the variance is not tiny
    w = leaf(data.draw(values((C,))), device)
    b = leaf(data.draw(values((C,))), device)
    assert gradcheck(ops.layer_norm, [x, w, b])


@engine
@given(data=st.data(), C=st.integers(2, 4), needs=st.sampled_from(
    [(True, False, False), (False, True, False), (False, False, True), (False, True, True)]))
def test_layer_norm_partial(device, data, C, needs):
    """Each of x, weight and bias alone (frozen others save less; still right)."""
    x = leaf(data.draw(distinct((2, C))), device, requires_grad=needs[0])
    w = leaf(data.draw(values((C,))), device, requires_grad=needs[1])
    b = leaf(data.draw(values((C,))), device, requires_grad=needs[2])
    assert gradcheck(ops.layer_norm, [x, w, b])


@engine
@given(data=st.data(), V=st.integers(1, 4), C=st.integers(1, 3))
def test_embedding_repeated_ids(device, data, V, C):
    w = leaf(data.draw(values((V, C))), device)
    ids_shape = data.draw(shapes(min_dims=1, max_dims=2, max_side=4))
    ids = on(device, data.draw(hnp.arrays(np.int64, ids_shape, elements=st.integers(0, V - 1))))
    assert gradcheck(lambda w: ops.embedding(w, ids), [w])


@engine
@given(data=st.data(), N=st.integers(1, 4), V=st.integers(1, 4),
       ignore=st.sampled_from([-100, -1]))
def test_cross_entropy_ignore_index(device, data, N, V, ignore):
    z = leaf(data.draw(values((N, V), -3.0, 3.0)), device)
    t = data.draw(hnp.arrays(np.int64, (N,), elements=st.one_of(
        st.integers(0, V - 1), st.just(ignore))))
    t = on(device, t)
    assert gradcheck(lambda z: ops.cross_entropy(z, t, ignore_index=ignore), [z])


@engine
@given(data=st.data(), p=st.sampled_from([0.0, 0.1, 0.5]))
def test_dropout_given_mask(device, data, p):
    shape = data.draw(shapes())
    mask = on(device, data.draw(hnp.arrays(np.bool_, shape)))
    x = leaf(data.draw(values(shape)), device)
    assert gradcheck(lambda x: ops.dropout(x, p, mask), [x])


# Fill values stay moderate here: a -1e9 in <v, y> makes f(x+h) - f(x-h) cancel two
# numbers near 1e9, and the rounding of that (1e-7) swamps the difference.
@engine
@given(data=st.data(), value=st.sampled_from([0.0, -30.0, 3.5]))
def test_masked_fill(device, data, value):
    shape = data.draw(shapes())
    mask = on(device, data.draw(hnp.arrays(np.bool_, shape)))
    x = leaf(data.draw(values(shape)), device)
    assert gradcheck(lambda x: ops.masked_fill(x, mask, value), [x])


@few
@given(data=st.data())
def test_cast_gradient_is_cast_back(device, data):
    """cast's Jacobian is the identity in the other dtype: checked exactly, not by
    differences (a float32 round trip would make finite differences lie)."""
    shape = data.draw(shapes())
    for src, dst in [(np.float64, np.float32), (np.float32, np.float64)]:
        x = leaf(data.draw(values(shape)), device, dtype=src)
        y = ops.cast(x, dst)
        assert y.dtype == dst
        v = data.draw(values(shape)).astype(dst)
        y.backward(backend.to_device(v, device))
        assert x.grad.dtype == src
        np.testing.assert_array_equal(backend.asnumpy(x.grad), v.astype(src))
    x = leaf(np.ones(shape), device)
    assert ops.cast(x, np.float64) is x  # a cast to the same dtype is no op at all


# ---------------------------------------------------------------------------
# Max with ties: the documented subgradient (ties share equally)
# ---------------------------------------------------------------------------


def test_max_ties_share_the_gradient(device):
    x = leaf([[1.0, 3.0, 3.0], [2.0, 0.0, 2.0]], device)
    ops.max(x, axis=1).sum().backward()
    np.testing.assert_allclose(backend.asnumpy(x.grad), [[0, 0.5, 0.5], [0.5, 0, 0.5]])


# ---------------------------------------------------------------------------
# Bad input: clear errors naming what was expected
# ---------------------------------------------------------------------------


def test_matmul_shape_mismatch_names_both_shapes(device):
    a, b = leaf(np.ones((2, 3)), device), leaf(np.ones((4, 5)), device)
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(4, 5\)"):
        a @ b
    with pytest.raises(ValueError, match=r"batch axes \(2,\) and \(3,\)"):
        leaf(np.ones((2, 2, 3)), device) @ leaf(np.ones((3, 3, 1)), device)
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        leaf(np.ones(3), device) @ leaf(np.ones((3, 1)), device)


@pytest.mark.parametrize("op", [ops.add, ops.sub, ops.mul, ops.div, ops.pow])
def test_broadcast_failure_names_shapes(device, op):
    a, b = leaf(np.ones((2, 3)), device), leaf(np.ones((4,)), device)
    with pytest.raises(ValueError, match=r"\(2, 3\) and \(4,\) cannot be broadcast"):
        op(a, b)


def test_broadcast_to_failure(device):
    with pytest.raises(ValueError, match=r"cannot broadcast shape \(3,\) to \(2, 4\)"):
        ops.broadcast_to(leaf(np.ones(3), device), (2, 4))


@pytest.mark.parametrize("op", [ops.add, ops.mul, ops.matmul])
def test_dtype_mixing_is_refused(device, op):
    a = leaf(np.ones((2, 2)), device, dtype=np.float32)
    b = leaf(np.ones((2, 2)), device, dtype=np.float64)
    with pytest.raises(TypeError, match="float32 and float64"):
        op(a, b)
    with pytest.raises(TypeError, match="float64 and float32"):
        op(b, a)


def test_other_shape_errors(device):
    x = leaf(np.ones((2, 3)), device)
    with pytest.raises(ValueError, match=r"cannot view 6 elements of shape \(2, 3\) as"):
        x.reshape(4, 2)
    with pytest.raises(ValueError, match="not a permutation"):
        x.permute(0, 0)
    with pytest.raises(ValueError, match="axis 2 is out of range"):
        x.sum(axis=2)
    with pytest.raises(ValueError, match=r"weight and bias must have shape \(3,\)"):
        ops.layer_norm(x, leaf(np.ones(2), device), leaf(np.ones(3), device))
    with pytest.raises(ValueError, match=r"logits \(N, V\) and targets \(N,\)"):
        ops.cross_entropy(x, on(device, np.zeros(3, dtype=np.int64)))
    with pytest.raises(TypeError, match="token ids must be integers"):
        ops.embedding(x, on(device, np.zeros(2)))
    with pytest.raises(ValueError, match="needs at least one tensor"):
        ops.concatenate([])
    with pytest.raises(TypeError, match="expected Tensor inputs"):
        ops.exp(np.ones(2))
    with pytest.raises(TypeError, match="only float32 or float64"):
        Tensor(np.arange(3), requires_grad=True, device=device)


# ---------------------------------------------------------------------------
# Blocks of rows on several threads give exactly the one-block result
# ---------------------------------------------------------------------------


@fast_only
def test_ops_split_over_threads_equal_one_block(monkeypatch):
    """GELU, layer norm, causal attention, linear's bias, add and AdamW split their large
    elementwise work into blocks of rows, one per thread, walked in small pieces, and on
    several threads each large product into parts of rows (or batch entries).

    Bit-identity is claimed only where it is guaranteed: an elementwise map or a
    reduction within a row computes each entry from the same inputs by the same loop
    however the rows are cut, so pieces on one thread equal one call on the whole, and
    what depends on nothing but such work equals it on any number of threads. A
    product's entry is a sum of k terms, and the order BLAS adds them in is the
    kernel's choice; it may differ between a (512, 512) product and a slice of its
    rows (OpenBLAS's Haswell kernel does so, its SkylakeX kernel does not). There the
    threaded result is held to a float32 bound instead (``PRODUCT_ULPS``). The tests in
    tests/test_blas_kernels.py run this one under more than one kernel."""
    from minipeft.autograd import parallel
    from minipeft.autograd.parallel import set_num_threads
    from minipeft.optim import AdamW

    rng = np.random.default_rng(0)
    x = rng.standard_normal((512, 512)).astype(np.float32)        # 2**18 entries: 4 blocks
    w, b = rng.standard_normal((2, 512)).astype(np.float32)
    qkv = rng.standard_normal((4, 128, 3 * 128)).astype(np.float32)
    g_att = rng.standard_normal((4, 128, 128)).astype(np.float32)
    W = rng.standard_normal((512, 384)).astype(np.float32)

    def run():
        xs = [Tensor(x, requires_grad=True) for _ in range(2)]
        ln_w, ln_b = Tensor(w, requires_grad=True), Tensor(b, requires_grad=True)
        q = Tensor(qkv, requires_grad=True)
        y1, y2 = ops.gelu(xs[0]), ops.layer_norm(xs[1], ln_w, ln_b)
        y3 = ops.causal_attention(q, 2)
        (y1 * y2).sum().backward()
        y3.backward(g_att)
        lw, lb = Tensor(W, requires_grad=True), Tensor(b[:384], requires_grad=True)
        y4 = ops.linear(xs[0], lw, lb) + ops.linear(xs[1], lw, lb)
        y4.backward(np.ones(y4.shape, np.float32))
        p = Tensor(x.copy(), requires_grad=True)
        p.grad = x[::-1].copy()
        opt = AdamW([p], lr=0.1)
        opt.step()
        opt.step()
        return [t.numpy() for t in (y1, y2, y3, y4)] + [
            t.grad for t in (*xs, ln_w, ln_b, q, lw, lb)] + [p.data]

    # what each output of run() depends on: elementwise work and reductions within a
    # row only (bit-identical on any number of threads), or a matrix product too
    names = ["gelu", "layer_norm", "attention", "linear",
             "x0.grad", "x1.grad", "ln_w.grad", "ln_b.grad", "qkv.grad", "W.grad", "b.grad",
             "AdamW step"]
    through_a_product = {"attention", "linear", "x0.grad", "x1.grad", "qkv.grad", "W.grad"}
    try:
        set_num_threads(1)
        with monkeypatch.context() as m:
            m.setattr(parallel, "_PIECE", 1 << 40)      # no pieces: one call on the whole
            whole = run()
        one = run()                                     # the same products, elementwise in pieces
        many = {}
        for n in (2, 4):
            set_num_threads(n)
            many[n] = run()
    finally:
        set_num_threads(None)
    assert len(whole) == len(names)
    for name, a, b_ in zip(names, whole, one):
        np.testing.assert_array_equal(b_, a, err_msg=f"{name}: pieces on one thread")
    for n, outs in many.items():
        for name, a, c in zip(names, whole, outs):
            if name not in through_a_product:
                np.testing.assert_array_equal(c, a, err_msg=f"{name} on {n} threads")
                continue
            # Summed in another order, a float32 sum moves by a few roundings of its
            # largest partial sums, about |entry| * 2**-23 each. PRODUCT_ULPS of the
            # array's largest entry is far above what a kernel does (Haswell: under
            # 5) and far below a real error (a wrong or missing part moves entries
            # by their own size).
            bound = PRODUCT_ULPS * np.finfo(np.float32).eps * np.abs(a).max()
            np.testing.assert_allclose(c, a, rtol=0, atol=bound,
                                       err_msg=f"{name} on {n} threads")


#: how far a product's entries may move when BLAS sums them in another order (see
#: test_ops_split_over_threads_equal_one_block): this many float32 roundings (2**-23)
#: of the array's largest entry
PRODUCT_ULPS = 32


@fast_only
@pytest.mark.parametrize("a_shape, b_shape, axis", [
    ((6, 40, 30), (6, 30, 50), 0),          # a stack: by batch entry
    ((6, 2, 40, 30), (30, 50), 0),          # b broadcast along the batch
    ((1, 3, 40, 30), (5, 3, 30, 50), 0),    # a broadcast (batch 1) against b's 5
    ((64, 300), (300, 70), -2),             # rows of the output
    ((3, 300), (300, 700), -1),             # too few rows: columns
])
def test_a_split_product_equals_numpys(monkeypatch, a_shape, b_shape, axis):
    """Each part is BLAS's product on a slice; together, NumPy's product (float64)."""
    from minipeft.autograd import parallel
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal(a_shape), rng.standard_normal(b_shape)
    want = np.matmul(a, b)
    parts = []
    real = parallel.in_parts

    def spy(fn, length):
        parts.append(length)
        return real(fn, length)

    monkeypatch.setattr(parallel, "in_parts", spy)
    monkeypatch.setattr(parallel, "_SPLIT_FLOPS", 0)
    try:
        parallel.set_num_threads(3)
        got = parallel.split_matmul(a, b)
        out = np.full(want.shape[:-1] + (want.shape[-1] + 3,), np.nan)[..., :want.shape[-1]]
        parallel.split_matmul(a, b, out=out)                 # into a strided view
    finally:
        parallel.set_num_threads(None)
    assert parts == [want.shape[axis]] * 2
    np.testing.assert_allclose(got, want, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(out, want, rtol=1e-13, atol=1e-13)


@fast_only
def test_parts_cover_the_range_once_and_raise_what_a_part_raises():
    from minipeft.autograd import parallel
    try:
        parallel.set_num_threads(3)
        for length in (1, 2, 3, 10):
            seen = []
            parallel.in_parts(lambda lo, hi, seen=seen: seen.append((lo, hi)), length)
            assert sorted(i for lo, hi in seen for i in range(lo, hi)) == list(range(length))
            assert len(seen) == min(3, length)

        def fail(lo, hi):
            if lo > 0:
                raise ZeroDivisionError("a part failed")

        with pytest.raises(ZeroDivisionError, match="a part failed"):
            parallel.in_parts(fail, 6)
    finally:
        parallel.set_num_threads(None)


@fast_only
def test_engine_threads_hold_blas_to_one_and_give_it_back():
    """With more than one engine thread, OpenBLAS is held to one (its idle threads
    would spin on the cores the engine uses); with one, BLAS gets its count back."""
    from minipeft.autograd import parallel
    if parallel.blas_threads() is None:
        pytest.skip("NumPy's BLAS is not OpenBLAS: nothing to hold")
    x = np.ones((512, 512), np.float32)
    try:
        parallel.set_num_threads(2)
        parallel.split_matmul(x, x)
        assert parallel.blas_threads() == 1
        with parallel.blas_own_threads(2):
            assert parallel.blas_threads() == 2
        assert parallel.blas_threads() == 1
        parallel.set_num_threads(1)
        assert parallel.blas_threads() == parallel._blas["initial"]     # what BLAS first had
    finally:
        parallel.set_num_threads(None)
    with pytest.raises(ValueError, match="at least 1"):
        parallel.set_num_threads(0)


# ---------------------------------------------------------------------------
# A gradient no one else holds is overwritten in place, with the same result
# ---------------------------------------------------------------------------


@fast_only
@pytest.mark.parametrize("name", ["gelu", "layer_norm", "causal_attention", "mul", "dropout"])
def test_backward_in_place_in_an_owned_gradient_gives_the_same_gradient(device, name, monkeypatch):
    """The fast kernels' in-place backward (the reference never writes into g).

    ``f(x) * 2`` hands f's backward a fresh gradient (the product's), which f may
    overwrite; the seeded ``f(x)`` with 2 G hands it the caller's, which it must not."""
    from minipeft.autograd import fused
    rng = np.random.default_rng(0)
    shape = (2, 3, 12)
    x = leaf(rng.standard_normal(shape), device)
    w = leaf(rng.standard_normal(12), device)
    b = leaf(rng.standard_normal(12), device)
    mask = on(device, rng.random((2, 3, 12)) > 0.3)
    f = {"gelu": ops.gelu, "layer_norm": lambda t: ops.layer_norm(t, w, b),
         "causal_attention": lambda t: ops.causal_attention(t, 2),
         "mul": lambda t: t * Tensor(b.data),             # one input needs its gradient
         "dropout": lambda t: ops.dropout(t, 0.3, mask)}[name]
    used = []
    real = fused._owned
    monkeypatch.setattr(fused, "_owned", lambda *a: used.append(real(*a)) or used[-1])

    y = f(x)
    G = on(device, rng.standard_normal(y.shape))
    y.backward(G * 2.0)                                 # the caller's array: not owned
    want = [backend.asnumpy(t.grad).copy() for t in (x, w, b) if t.grad is not None]
    G_copy = backend.asnumpy(G).copy()
    assert all(u is None for u in used)
    for t in (x, w, b):
        t.grad = None
    used.clear()
    (f(x) * 2.0).backward(G)                            # Mul's fresh product: owned
    got = [backend.asnumpy(t.grad) for t in (x, w, b) if t.grad is not None]
    assert any(u is not None for u in used), "the in-place path was not taken"
    np.testing.assert_array_equal(backend.asnumpy(G), G_copy)   # the caller's seed untouched
    for a, b_ in zip(want, got):
        np.testing.assert_allclose(a, b_, rtol=1e-12, atol=1e-12)
