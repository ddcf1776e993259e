"""Backends: which module an array belongs to, moving arrays, the strict stand-in's
CuPy manners, the GPU's absence explained, and the few per-backend primitives.
"""

from __future__ import annotations

import pickle
import sys
import types

import numpy as np
import pytest

from minipeft import Tensor, backend
from minipeft.autograd import ops
from minipeft.backend import StrictArray, StrictError

# ---------------------------------------------------------------------------
# The strict stand-in refuses what CuPy refuses (host-only by nature)
# ---------------------------------------------------------------------------


def strict(a):
    return backend.to_device(np.asarray(a, dtype=np.float64), "strict")


def test_implicit_conversion_to_numpy_is_refused():
    s = strict([1.0, 2.0])
    for convert in (np.asarray, np.array, lambda a: np.asarray(a, dtype=np.float32),
                    np.ascontiguousarray):
        with pytest.raises(StrictError, match="asnumpy"):
            convert(s)
    with pytest.raises(StrictError):
        pickle.dumps(s)
    assert isinstance(StrictError("x"), TypeError)  # what CuPy raises, too


def test_mixing_with_plain_numpy_is_refused():
    s, h = strict([1.0, 2.0]), np.ones(2)
    for op in (lambda: s + h, lambda: h + s, lambda: s * h, lambda: s @ np.ones((2, 2)),
               lambda: backend.strict.exp(h), lambda: backend.strict.concatenate([s, h]),
               lambda: s.__setitem__(0, np.ones(())), lambda: s[np.array([0])]):
        with pytest.raises(StrictError, match="plain NumPy array"):
            op()


def test_strict_allows_what_cupy_allows():
    s = strict([1.0, 2.0, 3.0])
    assert isinstance(s + 1.0, StrictArray) and isinstance(s * np.float32(2), StrictArray)
    assert isinstance(backend.strict.exp(s), StrictArray)
    assert isinstance(s.sum(), StrictArray) and s.sum().ndim == 0   # 0-d, like CuPy
    assert float(s.sum()) == 6.0 and s[1].item() == 2.0
    np.testing.assert_array_equal(s.get(), [1.0, 2.0, 3.0])
    created = backend.strict.asarray(np.ones(2))                   # an explicit transfer
    assert isinstance(created, StrictArray)


def test_a_strict_tensor_refuses_a_numpy_operand_in_an_op():
    x = Tensor(np.ones(3), device="strict")
    with pytest.raises(TypeError, match="different devices"):
        x + np.ones(3, dtype=np.float32)
    with pytest.raises(TypeError, match="different devices"):
        ops.matmul(Tensor(np.ones((2, 2)), device="strict"), Tensor(np.ones((2, 2))))


# ---------------------------------------------------------------------------
# xp, devices, moves
# ---------------------------------------------------------------------------


def test_xp_identifies_the_module(device):
    a = backend.to_device(np.ones(3), device)
    mod = backend.xp(a)
    assert mod is backend.module_for(device)
    assert backend.device_of(a) == device
    assert backend.xp(np.ones(2)) is np and backend.xp(2.0) is np
    assert backend.xp(strict([1.0])) is backend.strict
    if device == "gpu":
        assert mod is backend.require_gpu()
    with pytest.raises(TypeError, match="not an array minipeft knows: list"):
        backend.xp([1.0, 2.0])


def test_asnumpy_and_to_device_round_trip(device):
    host = np.arange(6.0).reshape(2, 3)
    a = backend.to_device(host, device)
    assert backend.to_device(a, device) is a              # already there: no copy
    back = backend.asnumpy(a)
    assert type(back) is np.ndarray
    np.testing.assert_array_equal(back, host)
    if device != "cpu":                                   # a move is a copy, not a view
        host[0, 0] = 99.0
        assert backend.asnumpy(a)[0, 0] == 0.0
    for other in ("cpu", "strict"):
        moved = backend.to_device(a, other)
        assert backend.device_of(moved) == other
        np.testing.assert_array_equal(backend.asnumpy(moved), back)


def test_tensor_to_moves_data_and_grad(device):
    x = Tensor(np.ones(3), requires_grad=True, dtype=np.float64)
    (x * 2.0).sum().backward()
    assert x.to(device) is x and x.device == device
    assert backend.device_of(x.grad) == device
    np.testing.assert_array_equal(x.numpy(), np.ones(3))
    y = Tensor([1.0, 2.0], device=device)
    assert y.device == device and y.dtype == np.float32   # float32 by default


def test_unknown_device_is_a_clear_value_error():
    for make in (lambda: Tensor([1.0], device="cuda"),
                 lambda: Tensor([1.0]).to("tpu"),
                 lambda: backend.to_device(np.ones(1), "GPU"),
                 lambda: backend.module_for("metal"),
                 lambda: backend.Generator("mps")):
        with pytest.raises(ValueError, match="unknown device .*expected one of 'cpu', 'gpu', 'strict'"):
            make()


@pytest.fixture
def no_cupy(monkeypatch):
    """Pretend CuPy is not installed, whatever this machine has."""
    monkeypatch.setitem(sys.modules, "cupy", None)      # `import cupy` raises ImportError
    monkeypatch.setattr(backend, "_cupy", None)
    monkeypatch.setattr(backend, "_cupy_error", None)


def test_gpu_without_cupy_says_what_to_install(no_cupy):
    assert not backend.gpu_available()
    for make in (lambda: Tensor([1.0]).to("gpu"), lambda: Tensor([1.0], device="gpu"),
                 lambda: backend.module_for("gpu"), lambda: backend.Generator("gpu")):
        with pytest.raises(RuntimeError, match=r"CuPy is not installed.*pip install -e \.\[gpu\]"):
            make()


def test_gpu_with_cupy_but_no_device_says_so(monkeypatch, no_cupy):
    def fail():
        raise RuntimeError("cudaErrorNoDevice")

    fake = types.SimpleNamespace(cuda=types.SimpleNamespace(
        runtime=types.SimpleNamespace(getDeviceCount=fail)))
    monkeypatch.setitem(sys.modules, "cupy", fake)
    with pytest.raises(RuntimeError, match="no usable CUDA device.*cudaErrorNoDevice"):
        Tensor([1.0]).to("gpu")


# ---------------------------------------------------------------------------
# Per-backend primitives
# ---------------------------------------------------------------------------


def test_scatter_add_counts_repeated_indices(device):
    target = backend.to_device(np.zeros((3, 2)), device)
    idx = backend.to_device(np.array([0, 2, 0, 0]), device)
    vals = backend.to_device(np.arange(8.0).reshape(4, 2), device)
    backend.scatter_add(target, idx, vals)
    np.testing.assert_array_equal(backend.asnumpy(target), [[10, 13], [0, 0], [2, 3]])


def test_buffer_id_sees_through_views(device):
    a = backend.to_device(np.zeros((4, 6)), device)
    b = backend.to_device(np.zeros((4, 6)), device)
    for view in (a.T, a.reshape(24), a[1:3], a[:, ::2]):
        assert backend.buffer_id(view) == backend.buffer_id(a)
    assert backend.buffer_id(a) != backend.buffer_id(b)
    assert backend.base_nbytes(a[0]) == a.nbytes == 192


def test_generator_is_seeded_and_on_its_device(device):
    g1, g2 = backend.Generator(device, seed=7), backend.Generator(device, seed=7)
    for dtype in (np.float32, np.float64):
        r1, r2 = g1.random((3, 4), dtype=dtype), g2.random((3, 4), dtype=dtype)
        assert backend.device_of(r1) == device and r1.dtype == dtype and r1.shape == (3, 4)
        np.testing.assert_array_equal(backend.asnumpy(r1), backend.asnumpy(r2))
        h = backend.asnumpy(r1)
        assert ((0 <= h) & (h < 1)).all()
        n1, n2 = g1.standard_normal((5,), dtype=dtype), g2.standard_normal((5,), dtype=dtype)
        assert backend.device_of(n1) == device and n1.dtype == dtype
        np.testing.assert_array_equal(backend.asnumpy(n1), backend.asnumpy(n2))


def test_causal_mask_is_on_the_device(device):
    m = ops.causal_mask(3, Tensor(np.zeros((3, 3)), device=device))
    assert backend.device_of(m) == device
    np.testing.assert_array_equal(backend.asnumpy(m), np.triu(np.ones((3, 3), bool), 1))


def test_compute_code_asks_the_data_for_its_module():
    """ops.py uses numpy only for shapes, axes and dtypes, never on tensor data.

    Every array operation must go through ``backend.xp(array)``, so this lists
    the few ``np.`` names ops.py may use; a new one is a review question.
    """
    import tokenize
    from pathlib import Path

    with Path(ops.__file__).open("rb") as f:
        toks = [t for t in tokenize.tokenize(f.readline)
                if t.type in (tokenize.NAME, tokenize.OP)]
    used = {c.string for a, b, c in zip(toks, toks[1:], toks[2:])
            if a.string == "np" and b.string == "." and c.type == tokenize.NAME}
    allowed = {"broadcast_shapes", "prod", "argsort", "dtype", "generic"}
    assert used <= allowed, f"ops.py calls numpy directly: {sorted(used - allowed)}"
    assert {"broadcast_shapes", "dtype"} <= used      # the scan itself works


# ---------------------------------------------------------------------------
# Host memory kept for reuse
# ---------------------------------------------------------------------------


def _faults_to_fill_twice(nbytes: int) -> int:
    """Minor page faults taken while a fresh array of ``nbytes`` is filled, after one
    such array was allocated, filled and freed."""
    import resource  # noqa: PLC0415 - POSIX only

    a = np.ones(nbytes // 4, dtype=np.float32)
    del a
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    b = np.ones(nbytes // 4, dtype=np.float32)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    del b
    return after - before


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_kept_memory_is_reused_without_page_faults():
    # 12 MiB, an MLP hidden layer at bench's medium case: one page fault per
    # 4 KiB page (3,072) when the block goes back to the kernel between uses
    assert backend.keep_freed_memory() is True
    assert backend.keep_freed_memory() is True          # idempotent
    faults = _faults_to_fill_twice(12 * 2**20)
    assert faults < 100, f"{faults} page faults refilling a freed 12 MiB block"
