"""float32 stays float32, forward and backward, for every op (NEP 50 discipline).

Under NumPy 2's promotion rules a NumPy float64 *scalar* is "strong":
``x32 * np.sqrt(64)`` is float64. A single such constant inside an op would
double the memory of every activation after it and silently change the
numbers. Each case below runs an op on float32 inputs, checks the output's
dtype, runs backward and checks every gradient's dtype. Several cases pass
NumPy float64 scalars on purpose: the engine must not let them promote.
"""

from __future__ import annotations

import numpy as np
import pytest
from strategies import on

from minipeft import Tensor, backend
from minipeft.autograd import ops

F32 = np.float32


def _x(device, shape=(2, 3), lo=-2.0, hi=2.0, seed=0, requires_grad=True):
    rng = np.random.default_rng(seed)
    return Tensor(rng.uniform(lo, hi, shape).astype(F32), requires_grad=requires_grad,
                  device=device)


def _ids(device, values):
    return on(device, np.array(values, dtype=np.int64))


# name -> (inputs(device) -> list of tensors, fn(*tensors) -> tensor)
CASES = {
    "add": (lambda d: [_x(d), _x(d, (3,), seed=1)], ops.add),
    "sub": (lambda d: [_x(d), _x(d, (2, 1), seed=1)], ops.sub),
    "mul": (lambda d: [_x(d), _x(d, (3,), seed=1)], ops.mul),
    "div": (lambda d: [_x(d), _x(d, (3,), 0.5, 2.0, seed=1)], ops.div),
    "neg": (lambda d: [_x(d)], ops.neg),
    "pow 2": (lambda d: [_x(d)], lambda x: x ** 2),
    "pow 3": (lambda d: [_x(d)], lambda x: x ** 3),
    "pow 0.5": (lambda d: [_x(d, lo=0.5)], lambda x: x ** 0.5),
    "pow 0": (lambda d: [_x(d)], lambda x: x ** 0),
    "pow np.float64(2.5)": (lambda d: [_x(d, lo=0.5)], lambda x: x ** np.float64(2.5)),
    "pow tensor": (lambda d: [_x(d, lo=0.5), _x(d, seed=1)], ops.pow),
    "mul np.sqrt(64)": (lambda d: [_x(d)], lambda x: x * np.sqrt(64.0)),
    "np.float64 * x": (lambda d: [_x(d)], lambda x: np.float64(2.0) * x),
    "x / np.float64": (lambda d: [_x(d)], lambda x: x / np.float64(3.0)),
    "np.float64 - x": (lambda d: [_x(d)], lambda x: np.float64(3.0) - x),
    "x + np.float32": (lambda d: [_x(d)], lambda x: x + np.float32(1.0)),
    "matmul": (lambda d: [_x(d, (2, 2, 3)), _x(d, (3, 4), seed=1)], ops.matmul),
    "matmul batched": (lambda d: [_x(d, (2, 2, 3)), _x(d, (1, 3, 4), seed=1)], ops.matmul),
    "linear": (lambda d: [_x(d, (2, 2, 3)), _x(d, (3, 4), seed=1), _x(d, (4,), seed=2)],
               ops.linear),
    "linear without bias": (lambda d: [_x(d, (2, 3)), _x(d, (3, 4), seed=1)], ops.linear),
    "causal_attention": (lambda d: [_x(d, (2, 3, 12))], lambda qkv: ops.causal_attention(qkv, 2)),
    "causal_attention with dropout": (
        lambda d: [_x(d, (2, 3, 12))],
        lambda qkv: ops.causal_attention(qkv, 2, on(qkv.device, np.arange(36).reshape(2, 2, 3, 3)
                                                    % 3 != 1), np.float64(0.25))),
    "sum": (lambda d: [_x(d)], lambda x: ops.sum(x, axis=1)),
    "mean": (lambda d: [_x(d)], lambda x: ops.mean(x, axis=(0, 1), keepdims=True)),
    "max": (lambda d: [_x(d)], lambda x: ops.max(x, axis=0)),
    "reshape": (lambda d: [_x(d)], lambda x: x.reshape(3, 2)),
    "permute": (lambda d: [_x(d, (2, 3, 4))], lambda x: x.permute(2, 0, 1)),
    "transpose": (lambda d: [_x(d)], lambda x: x.T),
    "broadcast_to": (lambda d: [_x(d, (3,))], lambda x: ops.broadcast_to(x, (2, 3))),
    "getitem slice": (lambda d: [_x(d)], lambda x: x[:, 1:]),
    "getitem gather": (lambda d: [_x(d)], lambda x: x[_ids(x.device, [1, 1, 0])]),
    "concatenate": (lambda d: [_x(d), _x(d, (2, 1), seed=1)],
                    lambda a, b: ops.concatenate([a, b], axis=1)),
    "exp": (lambda d: [_x(d)], ops.exp),
    "log": (lambda d: [_x(d, lo=0.5)], ops.log),
    "sqrt": (lambda d: [_x(d, lo=0.5)], ops.sqrt),
    "tanh": (lambda d: [_x(d)], ops.tanh),
    "sigmoid": (lambda d: [_x(d)], ops.sigmoid),
    "relu": (lambda d: [_x(d)], ops.relu),
    "gelu": (lambda d: [_x(d)], ops.gelu),
    "softmax": (lambda d: [_x(d)], ops.softmax),
    "log_softmax": (lambda d: [_x(d)], ops.log_softmax),
    "layer_norm": (lambda d: [_x(d), _x(d, (3,), seed=1), _x(d, (3,), seed=2)], ops.layer_norm),
    "layer_norm eps np.float64": (
        lambda d: [_x(d), _x(d, (3,), seed=1), _x(d, (3,), seed=2)],
        lambda x, w, b: ops.layer_norm(x, w, b, eps=np.float64(1e-5))),
    "embedding": (lambda d: [_x(d, (4, 3))], lambda w: ops.embedding(w, _ids(w.device, [3, 0, 3]))),
    "cross_entropy": (lambda d: [_x(d, (3, 4))],
                      lambda z: ops.cross_entropy(z, _ids(z.device, [1, -100, 3]))),
    "dropout": (lambda d: [_x(d)],
                lambda x: ops.dropout(x, np.float64(0.25), on(x.device, np.eye(2, 3, dtype=bool)))),
    "masked_fill": (lambda d: [_x(d)],
                    lambda x: ops.masked_fill(x, ops.causal_mask(3, x)[:2], np.float64(-1e9))),
    "cast to f64 and back": (lambda d: [_x(d)], lambda x: ops.cast(ops.cast(x, np.float64), F32)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_float32_in_float32_out_and_gradients(device, name):
    make, fn = CASES[name]
    inputs = make(device)
    out = fn(*inputs)
    assert out.dtype == F32, f"{name}: forward gave {out.dtype}"
    assert out.device == device
    g = backend.to_device(np.ones(out.shape, dtype=F32), device)
    out.backward(g)
    for k, t in enumerate(inputs):
        assert t.grad is not None, f"{name}: input {k} got no gradient"
        assert t.grad.dtype == F32, f"{name}: gradient of input {k} is {t.grad.dtype}"
        assert backend.device_of(t.grad) == device
        assert np.isfinite(backend.asnumpy(t.grad)).all()


def test_every_op_has_a_float32_case():
    """A new op in ops.py must get a case above (a case's name starts with its op)."""
    functions = {n for n, f in vars(ops).items()
                 if callable(f) and not isinstance(f, type) and not n.startswith("_")
                 and getattr(f, "__module__", "") == ops.__name__}
    helpers = {"unbroadcast", "causal_mask"}  # not differentiable ops
    missing = {op for op in functions - helpers if not any(c.startswith(op) for c in CASES)}
    assert not missing, f"ops without a float32 case: {sorted(missing)}"
    assert len(functions) > 25  # the scan itself found the ops


def test_scalar_constants_take_the_tensor_dtype(device):
    """Python and NumPy scalars are constants in the tensor's dtype, on its device."""
    for dt in (np.float32, np.float64):
        x = Tensor(np.ones(3, dtype=dt), device=device)
        for c in (2, 2.0, np.float64(2.0), np.float32(2.0), np.int64(2)):
            for y in (x * c, c * x, x + c, c - x, x / c, c / x):
                assert y.dtype == dt and y.device == device
