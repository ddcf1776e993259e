r"""NF4, FP4, int4 and int8 storage of frozen weights, and the Linear that computes with it.

A frozen weight is only ever read, so it may be stored in fewer bits than it
is computed in: QLoRA (Dettmers et al. 2023) keeps a 65B base in 4 bits a
weight and trains LoRA in higher precision on top. This module writes the
storage out in array code, the same on NumPy, CuPy and the strict stand-in.

**Blockwise absmax quantization.** The array is flattened in C order and cut
into blocks of ``blocksize`` consecutive entries (the last block may be
partial). Block b keeps one float32 constant, its absolute maximum
:math:`a_b = \max_{i \in b} |w_i|`, and each entry the index of the code
nearest to :math:`w_i / a_b \in [-1, 1]`:

.. math::  q_i = \operatorname{argmin}_k \lvert c_k - w_i / a_b \rvert, \qquad
           \hat w_i = c_{q_i}\, a_b

Four-bit codes are packed two to a byte, the first entry in the high nibble,
the second in the low one: bitsandbytes' layout, byte for byte.

**Codebooks.** NF4 spends its 16 codes on equal-probability bins of a
standard normal (weights are nearly normal, so no code is wasted); FP4 is the
E2M1 float; int4 is evenly spaced. int8 follows LLM.int8's vector-wise
scheme instead: one absmax per output column and 255 evenly spaced codes.

**Double quantization** (QLoRA): 32 bits of constant per 64 weights is 0.5
bits a weight. The float32 constants, less their mean, are quantized again
to 8 bits in blocks of 256 with bitsandbytes' dynamic 8-bit map, one float32
scale per block: :math:`8/64 + 32/(64 \cdot 256) \approx 0.127` bits a weight.

:class:`QuantLinear` stores codes and constants only. Its forward
dequantizes the weight into a temporary in the compute dtype and multiplies;
its backward forms the input gradient alone (the weight is frozen), and
dequantizes again rather than keeping a float copy, so one layer's
dequantized weight is alive at a time and nothing is saved for backward.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import warnings

import numpy as np

from .. import backend
from ..autograd import ops
from ..autograd.function import Function
from ..autograd.tensor import Tensor
from .layers import Linear, _build
from .module import Module, Parameter, base_name, parameters_digest, replace_module

#: the storage formats, in the order the tables list them
FORMATS = ("nf4", "fp4", "int4", "int8")
#: the 4-bit formats (blockwise, packed two codes a byte)
FOUR_BIT = ("nf4", "fp4", "int4")
#: double quantization's second level: blocks of this many first-level constants
DQ_BLOCKSIZE = 256


# ---------------------------------------------------------------------------
# Codebooks, derived (not pasted)
# ---------------------------------------------------------------------------


def nf4_codebook() -> np.ndarray:
    r"""The 16 NormalFloat-4 values, ascending, float32, from standard-normal quantiles.

    QLoRA's appendix: estimate :math:`2^{k-1}` quantiles for the positive half
    and :math:`2^{k-1} - 1` for the negative half, join them with an exact 0
    and normalise into [-1, 1]. The outermost quantile would be infinite, so
    the probabilities start at an offset
    :math:`\delta = \tfrac12\big((1 - \tfrac1{2\cdot 15}) + (1 - \tfrac1{2\cdot 16})\big)
    \approx 0.9677`:

    .. math::
        q^+_j = \Phi^{-1}\!\Big(\delta + \tfrac{j}{8}(\tfrac12 - \delta)\Big),\ j = 0..7,
        \qquad
        q^-_j = -\Phi^{-1}\!\Big(\delta + \tfrac{j}{7}(\tfrac12 - \delta)\Big),\ j = 0..6

    and the code is :math:`\{q^-\} \cup \{0\} \cup \{q^+\}` divided by
    :math:`\max q^+ = \Phi^{-1}(\delta)` (bitsandbytes' ``create_normal_map``).
    """
    offset = 0.5 * ((1 - 1 / (2 * 15)) + (1 - 1 / (2 * 16)))
    inv = statistics.NormalDist().inv_cdf
    positive = [inv(offset + j / 8 * (0.5 - offset)) for j in range(8)]
    negative = [-inv(offset + j / 7 * (0.5 - offset)) for j in range(7)]
    values = np.sort(np.array(positive + [0.0] + negative))
    return (values / values.max()).astype(np.float32)


def fp4_codebook() -> np.ndarray:
    r"""The 16 E2M1 values indexed by their bit pattern ``s e1 e0 m``, normalised to [-1, 1].

    One sign bit, two exponent bits (bias 1), one mantissa bit:
    :math:`(-1)^s\, 2^{e-1}(1 + m/2)` for :math:`e > 0`, and the subnormals
    :math:`(-1)^s\, m/2` for :math:`e = 0`: the magnitudes 0, 0.5, 1, 1.5, 2, 3,
    4, 6, here divided by 6. (bitsandbytes' own "fp4" uses another exponent
    layout, with 0.0052 as its smallest magnitude; this is the E2M1 of the
    OCP microscaling formats.)
    """
    values = []
    for code in range(16):
        s, e, m = code >> 3, (code >> 1) & 3, code & 1
        mag = m / 2 if e == 0 else 2.0 ** (e - 1) * (1 + m / 2)
        values.append(-mag if s else mag)
    return (np.array(values) / 6.0).astype(np.float32)


def int4_codebook() -> np.ndarray:
    r"""int4 absmax: code i stands for :math:`(i - 8)/7`; codes 1..15 cover [-1, 1] evenly.

    Symmetric rounding :math:`\operatorname{round}(7 w / a)` uses the 15 values
    -7..7; code 0 (-8/7) lies outside [-1, 1] and is never chosen.
    """
    return ((np.arange(16) - 8) / 7.0).astype(np.float32)


def dynamic_map() -> np.ndarray:
    r"""bitsandbytes' signed dynamic 8-bit map (256 values in [-1, 1], ascending, float32).

    Dettmers (2016): a code is a sign, an exponent written as a run of zeros
    ended by a 1 (decimal exponents :math:`10^{-6} .. 10^{0}`), and the bits
    left over as a linear fraction. Exponent i (0..6) gets :math:`2^{i}`
    fractions: the midpoints of :math:`2^{i} + 1` evenly spaced points in
    [0.1, 1], times :math:`10^{i-6}`, with both signs. With 0 and 1 that is
    :math:`2 \cdot 127 + 2 = 256` values (``create_dynamic_map(signed=True)``).
    """
    data = []
    for i in range(7):
        bounds = np.linspace(0.1, 1.0, 2 ** i + 1, dtype=np.float32)
        means = (bounds[:-1] + bounds[1:]) / np.float32(2.0)
        scale = np.float32(10.0 ** (i - 6))
        data += list(scale * means) + list(-scale * means)
    data += [np.float32(0.0), np.float32(1.0)]
    return np.sort(np.array(data, dtype=np.float32))


def codebook(fmt: str) -> np.ndarray:
    """The code values of a 4-bit format, indexed by code (host float32, 16 entries)."""
    _check_format(fmt)
    if fmt == "int8":
        return (np.arange(-127, 128) / 127.0).astype(np.float32)
    return {"nf4": nf4_codebook, "fp4": fp4_codebook, "int4": int4_codebook}[fmt]()


# ---------------------------------------------------------------------------
# The quantized array
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class QuantizedArray:
    r"""One array in a quantized format: codes, constants and what is needed to undo it.

    Attributes:
        format: ``"nf4"``, ``"fp4"``, ``"int4"`` or ``"int8"``.
        shape, dtype: of the original array (dequantization returns these).
        blocksize: entries that share one constant (4-bit formats); for int8,
            None (one constant per output column, the last axis).
        codes: uint8, two 4-bit codes a byte, ``ceil(n / 2)`` bytes (4-bit);
            int8 (rows, columns) for int8.
        absmax: the first-level constants: float32 (one per block or column),
            or, with ``double_quant``, their uint8 codes in the dynamic map.
        absmax_scale: with ``double_quant``, one float32 scale per 256 constants.
        absmax_offset: with ``double_quant``, the constants' mean (float32 0-d).
    """

    format: str
    shape: tuple
    dtype: np.dtype
    blocksize: int | None
    codes: object
    absmax: object
    double_quant: bool = False
    absmax_scale: object = None
    absmax_offset: object = None

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def codes_nbytes(self) -> int:
        """Bytes of the codes (4 bits a weight, rounded up to whole bytes; 8 for int8)."""
        return int(self.codes.nbytes)

    @property
    def constants_nbytes(self) -> int:
        """Bytes of the first-level constants (float32, or uint8 codes when double-quantized)."""
        return int(self.absmax.nbytes)

    @property
    def second_level_nbytes(self) -> int:
        """Bytes of double quantization's float32 scales and mean (0 without it)."""
        if not self.double_quant:
            return 0
        return int(self.absmax_scale.nbytes) + int(self.absmax_offset.nbytes)

    @property
    def nbytes(self) -> int:
        """Every byte the quantized array stores."""
        return self.codes_nbytes + self.constants_nbytes + self.second_level_nbytes

    def bits_per_parameter(self) -> float:
        r"""Stored bits per original entry: :math:`8 \cdot \text{nbytes} / n`.

        NF4 with blocks of 64: :math:`4 + 32/64 = 4.5`; with double
        quantization :math:`4 + 8/64 + 32/(64 \cdot 256) \approx 4.127` (plus
        the mean's 32 bits over the whole array).
        """
        return 8.0 * self.nbytes / self.size

    def dequantized_nbytes(self, dtype=None) -> int:
        """Bytes of the dequantized temporary in ``dtype`` (default: the original dtype)."""
        return self.size * np.dtype(self.dtype if dtype is None else dtype).itemsize

    @property
    def xp(self):
        return backend.xp(self.codes)

    def to(self, device: str) -> QuantizedArray:
        """A copy of the structure with every array on ``device``."""
        move = (lambda a: None if a is None else backend.to_device(a, device))
        return dataclasses.replace(
            self, codes=move(self.codes), absmax=move(self.absmax),
            absmax_scale=move(self.absmax_scale), absmax_offset=move(self.absmax_offset))


# ---------------------------------------------------------------------------
# Checks on the input
# ---------------------------------------------------------------------------


def _check_format(fmt) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"unknown quantization format {fmt!r}: choose one of {list(FORMATS)}")


def _check_blocksize(blocksize) -> int:
    ok = (isinstance(blocksize, (int, np.integer)) and not isinstance(blocksize, bool)
          and blocksize > 0 and (int(blocksize) & (int(blocksize) - 1)) == 0)
    if not ok:
        raise ValueError(f"blocksize must be a positive power of two (64 is QLoRA's), "
                         f"got {blocksize!r}")
    return int(blocksize)


def _check_array(a, what: str = "quantize"):
    """The array as float32 (the precision codes are chosen in), after the checks."""
    if isinstance(a, Tensor):
        raise TypeError(f"{what}: pass the array (tensor.data), not a Tensor")
    xp = backend.xp(a)
    if np.dtype(a.dtype) not in backend.FLOAT_DTYPES:
        raise TypeError(f"{what}: needs a float32 or float64 array, got {a.dtype}; "
                        "convert it with .astype(np.float32)")
    if a.size == 0:
        raise ValueError(f"{what}: the array is empty, there is nothing to quantize")
    if not bool(xp.isfinite(a).all().item()):
        raise ValueError(f"{what}: the array holds inf or nan; a constant would be "
                         "non-finite and every entry of its block lost. Fix the weights first.")
    if float(xp.abs(a).max().item()) > float(np.finfo(np.float32).max):
        raise ValueError(f"{what}: entries exceed float32's range (about 3.4e38); "
                         "the constants are stored in float32")
    return xp, a.astype(xp.float32)


# ---------------------------------------------------------------------------
# Rounding to the nearest code
# ---------------------------------------------------------------------------


def _nearest(xp, scaled, values):
    r"""Index into ``values`` (a code per index) of the value nearest each entry of ``scaled``.

    With the values sorted, the nearest one is found by where ``scaled`` falls
    among the midpoints of neighbours; an entry exactly on a midpoint goes to
    the lower value (``searchsorted(..., side="left")``, as bitsandbytes'
    ``torch.bucketize``).
    """
    order = np.argsort(values, kind="stable")
    v = values[order]
    mid = (v[:-1] + v[1:]) / np.float32(2.0)                  # (K - 1,) bucket edges
    pos = xp.searchsorted(xp.asarray(mid), scaled, side="left")
    return xp.asarray(order.astype(np.uint8))[pos]


def _blockwise_absmax(xp, flat, blocksize):
    """(nblocks,) float32 absmax of consecutive blocks and the entries divided by it, in [-1, 1]."""
    n = flat.shape[0]
    nblocks = -(-n // blocksize)
    pad = nblocks * blocksize - n
    if pad:   # the last, partial block: zeros change no absmax
        flat = xp.concatenate([flat, xp.zeros(pad, dtype=flat.dtype)])
    blocks = flat.reshape(nblocks, blocksize)                  # (nblocks, blocksize)
    absmax = xp.abs(blocks).max(axis=1)                        # (nblocks,)
    # x * (1 / a), clamped: bitsandbytes' arithmetic, so codes agree entry for entry;
    # an all-zero block keeps a = 0 and its entries code 0
    inv = 1.0 / xp.maximum(absmax, 1e-38)
    scaled = xp.clip(blocks * inv[:, None], -1.0, 1.0)         # (nblocks, blocksize)
    return absmax, scaled.reshape(-1)[:n]                      # (n,): the pad dropped


def _double_quantize(xp, absmax):
    """absmax (float32) -> (uint8 codes, float32 scale per 256, float32 mean)."""
    # 0-d array (NumPy's mean gives a scalar, which is no buffer the books can follow)
    offset = xp.asarray(absmax.mean(dtype=xp.float32), dtype=xp.float32)
    centred = absmax - offset
    scale, scaled = _blockwise_absmax(xp, centred, DQ_BLOCKSIZE)
    codes = _nearest(xp, scaled, dynamic_map())                # the map is sorted: index = code
    return codes, scale, offset.reshape(())                    # the mean as a 0-d array


def _undouble(q):
    """The first-level constants (float32) of a double-quantized array."""
    xp = q.xp
    nb = q.absmax.shape[0]
    values = xp.asarray(dynamic_map())[q.absmax]               # (nb,)
    n2 = q.absmax_scale.shape[0]
    pad = n2 * DQ_BLOCKSIZE - nb
    if pad:
        values = xp.concatenate([values, xp.zeros(pad, dtype=values.dtype)])
    values = values.reshape(n2, DQ_BLOCKSIZE) * q.absmax_scale[:, None]   # (n2, 256)
    return values.reshape(-1)[:nb] + q.absmax_offset           # (nb,)


def constants(q: QuantizedArray):
    """The float32 constants a dequantization multiplies by (second level undone)."""
    return _undouble(q) if q.double_quant else q.absmax


def quantized_layout(shape, fmt: str = "nf4", blocksize: int | None = 64,
                     double_quant: bool = False) -> dict:
    r"""What :func:`quantize` stores for an array of ``shape``: name -> (shape, dtype), no arrays.

    With n entries: 4-bit codes take :math:`\lceil n/2 \rceil` bytes, the
    constants one per block (:math:`\lceil n / \text{blocksize} \rceil`,
    float32, or uint8 codes with double quantization, which adds one float32
    scale per 256 constants and their float32 mean); int8 keeps an int8 code
    per entry and a float32 constant per column. The memory estimator
    counts these, and a test holds them to :func:`quantize`'s arrays.
    """
    _check_format(fmt)
    n = math.prod(shape)
    if fmt == "int8":
        cols = shape[-1]
        return {"codes": ((n // cols, cols), np.dtype(np.int8)),
                "absmax": ((cols,), np.dtype(np.float32))}
    blocksize = _check_blocksize(blocksize)
    nblocks = -(-n // blocksize)
    out = {"codes": ((-(-n // 2),), np.dtype(np.uint8))}
    if not double_quant:
        out["absmax"] = ((nblocks,), np.dtype(np.float32))
        return out
    out["absmax"] = ((nblocks,), np.dtype(np.uint8))
    out["absmax_scale"] = ((-(-nblocks // DQ_BLOCKSIZE),), np.dtype(np.float32))
    out["absmax_offset"] = ((), np.dtype(np.float32))
    return out


def _shaped_quantized(array, fmt, blocksize, double_quant) -> QuantizedArray:
    """A QuantizedArray of zero-stride arrays with :func:`quantize`'s shapes (no memory):
    what a shape-only build (the memory estimator's, at 65B) holds."""
    lay = quantized_layout(array.shape, fmt, blocksize, double_quant)
    arrays = {k: np.broadcast_to(np.zeros((), dt), shp) for k, (shp, dt) in lay.items()}
    return QuantizedArray(fmt, tuple(array.shape), np.dtype(array.dtype),
                          blocksize if fmt != "int8" else None, arrays["codes"], arrays["absmax"],
                          double_quant, arrays.get("absmax_scale"), arrays.get("absmax_offset"))


# ---------------------------------------------------------------------------
# quantize / dequantize
# ---------------------------------------------------------------------------


def quantize(array, fmt: str = "nf4", blocksize: int = 64, double_quant: bool = False
             ) -> QuantizedArray:
    """Quantize a float array to ``fmt`` (see the module docstring); returns a QuantizedArray.

    ``blocksize`` and ``double_quant`` apply to the 4-bit formats; int8 keeps
    one float32 constant per column of the last axis and refuses them.
    """
    _check_format(fmt)
    if fmt == "int8":
        return quantize_int8(array, double_quant=double_quant)
    blocksize = _check_blocksize(blocksize)
    xp, a32 = _check_array(array)
    n = a32.size
    absmax, scaled = _blockwise_absmax(xp, a32.reshape(-1), blocksize)    # C order: (n,)
    codes = _nearest(xp, scaled, codebook(fmt))                           # (n,) uint8
    if n % 2:   # an odd count: one more code, for zero, fills the last byte
        zero = _nearest(xp, xp.zeros(1, dtype=xp.float32), codebook(fmt))
        codes = xp.concatenate([codes, zero])
    packed = (codes[0::2] << 4) | codes[1::2]                             # (ceil(n/2),) uint8
    q = QuantizedArray(fmt, tuple(array.shape), np.dtype(array.dtype), blocksize, packed,
                       absmax)
    if double_quant:
        q.absmax, q.absmax_scale, q.absmax_offset = _double_quantize(xp, absmax)
        q.double_quant = True
    return q


def dequantize(q: QuantizedArray, dtype=None):
    r"""The array back from its codes: :math:`\hat w_i = c_{q_i}\, a_b`, in ``dtype``
    (default: the original dtype) and the original shape."""
    dtype = np.dtype(q.dtype if dtype is None else dtype)
    xp = q.xp
    cb = xp.asarray(codebook(q.format))
    a = constants(q)
    if q.format == "int8":
        # (rows, cols) codes times each column's absmax / 127
        w = q.codes.astype(xp.float32) * (a * (1.0 / 127.0))[None, :]     # (rows, cols)
        return w.reshape(q.shape).astype(dtype, copy=False)              # the original shape
    n, bs = q.size, q.blocksize
    nblocks = a.shape[0]
    m = q.codes.shape[0]
    out = xp.zeros(max(nblocks * bs, 2 * m), dtype=xp.float32)            # whole blocks and bytes
    out[0:2 * m:2] = cb[q.codes >> 4]                                     # high nibble: even entries
    out[1:2 * m:2] = cb[q.codes & 15]                                     # low nibble: odd entries
    blocks = out[:nblocks * bs].reshape(nblocks, bs)                      # (nblocks, bs)
    blocks *= a[:, None]
    return out[:n].reshape(q.shape).astype(dtype, copy=False)             # the original shape


def quantize_nf4(array, blocksize: int = 64, double_quant: bool = False) -> QuantizedArray:
    """NF4 blockwise quantization (QLoRA's storage of the frozen base)."""
    return quantize(array, "nf4", blocksize, double_quant)


def quantize_fp4(array, blocksize: int = 64, double_quant: bool = False) -> QuantizedArray:
    """FP4 (E2M1) blockwise quantization."""
    return quantize(array, "fp4", blocksize, double_quant)


def quantize_int4(array, blocksize: int = 64, double_quant: bool = False) -> QuantizedArray:
    """int4 blockwise absmax quantization (15 evenly spaced codes)."""
    return quantize(array, "int4", blocksize, double_quant)


def quantize_int8(array, double_quant: bool = False) -> QuantizedArray:
    r"""LLM.int8's vector-wise quantization: one absmax per output column.

    A weight is stored (in, out), so an output feature is a column:
    :math:`q_{ij} = \operatorname{round}(127\, w_{ij} / a_j)`,
    :math:`a_j = \max_i |w_{ij}|`, 8 + 32/in bits a weight. (LLM.int8's
    outlier decomposition, which keeps activation outliers in 16 bits, is
    not written here: it acts on the inputs, not on the stored weight.)
    """
    if double_quant:
        raise ValueError("int8 keeps one float32 constant per column (32/in bits a weight); "
                         "double quantization is for the 4-bit formats: pass double_quant=False")
    xp, a32 = _check_array(array)
    if a32.ndim < 2:
        raise ValueError(f"int8 quantizes per output column and needs a matrix (in, out), "
                         f"got shape {tuple(array.shape)}")
    w = a32.reshape(-1, a32.shape[-1])                                    # (rows, cols)
    absmax = xp.abs(w).max(axis=0)                                        # (cols,)
    # w / a in [-1, 1] first, then times 127: 127 / a itself overflows for tiny a
    scaled = xp.clip(w / xp.maximum(absmax, 1e-38)[None, :], -1.0, 1.0)  # (rows, cols)
    codes = xp.rint(scaled * 127.0).astype(xp.int8)
    return QuantizedArray("int8", tuple(array.shape), np.dtype(array.dtype), None, codes, absmax)


def dequantize_nf4(q: QuantizedArray, dtype=None):
    """Dequantize an NF4 QuantizedArray (see :func:`dequantize`)."""
    if q.format != "nf4":
        raise ValueError(f"dequantize_nf4 got a {q.format} array; use dequantize(q)")
    return dequantize(q, dtype)


def block_errors(array, q: QuantizedArray):
    r"""Squared error of each block (int8: each column), as ``(mean squared, worst block's mean)``.

    A block is the set of entries that share one constant.
    """
    xp = backend.xp(array)
    d = (dequantize(q, np.float64) - array.astype(xp.float64)) ** 2
    if q.format == "int8":
        per = d.reshape(-1, q.shape[-1]).mean(axis=0)                     # (cols,)
    else:
        flat = d.reshape(-1)                                              # (n,)
        nb = -(-flat.shape[0] // q.blocksize)
        sums = xp.zeros(nb * q.blocksize, dtype=xp.float64)
        sums[:flat.shape[0]] = flat
        counts = xp.full(nb, float(q.blocksize))
        counts[-1] = flat.shape[0] - (nb - 1) * q.blocksize
        per = sums.reshape(nb, q.blocksize).sum(axis=1) / counts          # (nblocks,)
    return float(d.mean().item()), float(per.max().item())


# ---------------------------------------------------------------------------
# The quantized frozen Linear
# ---------------------------------------------------------------------------


class QuantLinearFunction(Function):
    r""":math:`y = x\,\hat W + b` with :math:`\hat W` dequantized from its codes each time it is used.

    .. math:: \frac{\partial L}{\partial x} = G\,\hat W^\top, \qquad
              \frac{\partial L}{\partial b} = \textstyle\sum_n G_n

    and no :math:`\partial L/\partial W`: the stored weight is codes, which do
    not train. Nothing goes through ``save_for_backward``: the input is not
    needed (no weight gradient) and :math:`\hat W` is rebuilt from the codes
    in backward, so the dequantized weight is a temporary of one product.
    """

    @staticmethod
    def forward(ctx, x, *bias, layer):
        if x.ndim < 1 or x.shape[-1] != layer.in_features:
            raise ValueError(f"quantized linear: x of shape {tuple(x.shape)} does not end in "
                             f"in_features={layer.in_features}")
        ctx.layer = layer if ctx.needs_input_grad[0] else None
        ctx.shape = x.shape
        w = layer.dequantized(x.dtype)                                     # (in, out), temporary
        y = x.reshape(-1, layer.in_features) @ w                           # (N, in) @ (in, out)
        if bias:
            y += bias[0]
        return y.reshape(x.shape[:-1] + (layer.out_features,))             # (..., out)

    @staticmethod
    def backward(ctx, g):
        needs = ctx.needs_input_grad
        g2 = g.reshape(-1, g.shape[-1])                                    # (N, out)
        gx = gb = None
        if needs[0]:
            ops.counters["quantlinear.dx"] += 1
            w = ctx.layer.dequantized(g.dtype)                             # again: a temporary
            gx = (g2 @ w.T).reshape(ctx.shape)                             # (N, out) @ (out, in)
        if len(needs) == 1:
            return (gx,)
        if needs[1]:
            gb = g2.sum(axis=0)                                            # (out,)
        return gx, gb


#: called with every dequantized weight a QuantLinear makes (the memory books count it
#: as a temporary while it lives; see :func:`minipeft.memory.profile_step`)
DEQUANTIZE_HOOKS: list = []


class DequantizedWeight(Tensor):
    """A quantized layer's weight as a float tensor to read: frozen and not writable.

    Wrappers read ``base_layer.weight`` for its dtype, device and values. A
    write into it would be lost (it is rebuilt from the codes on every read),
    so writing ``.data`` or asking it to train raises instead.
    """

    def __init__(self, data):
        object.__setattr__(self, "_sealed", False)
        super().__init__(data, _copy=False)
        object.__setattr__(self, "_sealed", True)

    def __setattr__(self, name, value):
        if getattr(self, "_sealed", False) and name == "data":
            raise RuntimeError(
                "this weight is stored quantized (codes and constants); a value written into "
                "its dequantized copy would be lost. Dequantize the layer first "
                "(dequantize_model), or merge an adapter, which does so and says so.")
        if name == "requires_grad" and value:
            raise RuntimeError(
                "a quantized weight cannot train: its codes are not a parameter. Train an "
                "adapter on top (LoRA: QLoRA), or leave this Linear float (quantize_model "
                "skips Linears whose weight requires grad).")
        object.__setattr__(self, name, value)


class QuantLinear(Module):
    r"""A frozen Linear stored quantized: codes and constants, a float bias, no float weight.

    Build one with :meth:`from_linear`. ``forward`` computes
    :math:`x \hat W + b` through :class:`QuantLinearFunction`. The bias stays
    a float :class:`Parameter` and may train (BitFit on a quantized base).

    Byte counts for the books: :attr:`codes_nbytes`, :attr:`constants_nbytes`,
    :attr:`second_level_nbytes` and :meth:`dequantized_nbytes` (the temporary).
    """

    _CONSTANTS = ("weight_absmax", "weight_absmax_scale", "weight_absmax_offset")

    def __init__(self, q: QuantizedArray, bias: Parameter | None = None):
        super().__init__()
        if len(q.shape) != 2:
            raise ValueError(f"QuantLinear needs a quantized (in, out) weight, got {q.shape}")
        self.in_features, self.out_features = q.shape
        self.format, self.blocksize, self.double_quant = q.format, q.blocksize, q.double_quant
        self._dtype = q.dtype
        self.register_buffer("weight_codes", q.codes)
        self.register_buffer("weight_absmax", q.absmax)
        if q.double_quant:
            self.register_buffer("weight_absmax_scale", q.absmax_scale)
            self.register_buffer("weight_absmax_offset", q.absmax_offset)
        self.bias = bias

    @classmethod
    def from_linear(cls, linear: Linear, fmt: str = "nf4", blocksize: int = 64,
                    double_quant: bool = True) -> QuantLinear:
        """Quantize a frozen Linear's weight; the bias is kept as it is (the same Parameter)."""
        if linear.weight.requires_grad:
            raise ValueError(
                "this Linear's weight requires grad: a quantized weight is frozen. Freeze it "
                "first (linear.weight.requires_grad = False), or leave it float.")
        dq = double_quant and fmt in FOUR_BIT
        if getattr(_build, "shapes_only", False):      # the estimator's shape-only build
            return cls(_shaped_quantized(linear.weight.data, fmt, blocksize, dq), linear.bias)
        q = quantize(linear.weight.data, fmt, blocksize, dq)
        return cls(q, linear.bias)

    # -- the stored form -----------------------------------------------------
    def register_buffer(self, name, array):
        # Module.to(dtype=...) casts float buffers; the constants stay float32 (and
        # double quantization's uint8 codes of them stay codes)
        if name in self._CONSTANTS and np.dtype(array.dtype).kind == "f" \
                and array.dtype != np.float32:
            array = array.astype(backend.xp(array).float32)
        super().register_buffer(name, array)

    @property
    def quantized(self) -> QuantizedArray:
        """The weight's codes and constants as a :class:`QuantizedArray`."""
        return QuantizedArray(
            self.format, (self.in_features, self.out_features), self._dtype, self.blocksize,
            self.weight_codes, self.weight_absmax, self.double_quant,
            getattr(self, "weight_absmax_scale", None), getattr(self, "weight_absmax_offset", None))

    @property
    def compute_dtype(self):
        """The dtype the weight is dequantized to when read: the bias's, else the original's."""
        return self.bias.dtype if self.bias is not None else self._dtype

    def dequantized(self, dtype=None):
        """The weight as a float array (in, out): a new temporary on every call.

        Each one is handed to :data:`DEQUANTIZE_HOOKS`, so the memory books
        see it (the fifth category: temporaries) for as long as it lives.
        """
        w = dequantize(self.quantized, self.compute_dtype if dtype is None else dtype)
        for hook in DEQUANTIZE_HOOKS:
            hook(w, self)
        return w

    @property
    def weight(self) -> DequantizedWeight:
        """The dequantized weight, read-only and frozen (see :class:`DequantizedWeight`)."""
        return DequantizedWeight(self.dequantized())

    codes_nbytes = property(lambda self: self.quantized.codes_nbytes)
    constants_nbytes = property(lambda self: self.quantized.constants_nbytes)
    second_level_nbytes = property(lambda self: self.quantized.second_level_nbytes)
    weight_nbytes = property(lambda self: self.quantized.nbytes)

    def dequantized_nbytes(self, dtype=None) -> int:
        """Bytes of the dequantized temporary a forward or backward holds."""
        return self.quantized.dequantized_nbytes(self.compute_dtype if dtype is None else dtype)

    def bits_per_parameter(self) -> float:
        return self.quantized.bits_per_parameter()

    def forward(self, x: Tensor) -> Tensor:
        args = (x,) if self.bias is None else (x, self.bias)
        return QuantLinearFunction.apply(*args, layer=self)

    def trace(self, walk, x):
        """:meth:`forward` over shapes: nothing saved (not x, not the weight); the
        dequantized weight is a temporary of this layer, in the compute dtype, in
        forward and again in backward (see :mod:`minipeft.memory.trace`)."""
        walk.temporary(self.in_features * self.out_features, walk.label(self, " dequantized W"))
        return walk.quant_linear(x, walk.param(self.bias), self.out_features)

    def to_linear(self, dtype=None) -> Linear:
        """A float Linear holding the dequantized weight and this layer's bias Parameter."""
        dtype = np.dtype(self.compute_dtype if dtype is None else dtype)
        lin = Linear.__new__(Linear)
        Module.__init__(lin)
        lin.in_features, lin.out_features = self.in_features, self.out_features
        lin.weight = Parameter(self.dequantized(dtype), requires_grad=False)
        lin.bias = self.bias
        return lin

    def extra_repr(self) -> str:
        dq = ", double_quant" if self.double_quant else ""
        bs = f", blocksize={self.blocksize}" if self.blocksize else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"format={self.format}{bs}{dq}, bias={self.bias is not None}")


# ---------------------------------------------------------------------------
# Whole models
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class QuantizationConfig:
    """What :func:`quantize_model` did, kept on the base as ``quantization_config``.

    ``quantized``: the Linears replaced (names in the unwrapped base);
    ``kept_float``: Linears left float because their weight trains;
    ``float_fingerprint``: the float base's fingerprint before it was
    quantized (:func:`minipeft.peft.model.fingerprint`; the codes are
    buffers, which a fingerprint of parameters would not see).
    """

    format: str
    blocksize: int | None
    double_quant: bool
    quantized: list = dataclasses.field(default_factory=list)
    kept_float: list = dataclasses.field(default_factory=list)
    float_fingerprint: str | None = None


class DequantizationWarning(UserWarning):
    """A quantized base was turned back into float weights (merging an adapter into it)."""


def _base_of(model: Module) -> Module:
    """The base under a PeftModel (``model.base_model``), else the model itself."""
    return getattr(model, "base_model", model)


def quantization_config(model: Module) -> QuantizationConfig | None:
    """The record :func:`quantize_model` left on this model's base (None: never quantized)."""
    return getattr(_base_of(model), "quantization_config", None)


def _linears(model: Module):
    """(dotted name, Linear) of every float Linear, wrapped ones included."""
    return [(n, m) for n, m in model.named_modules() if n and type(m) is Linear]


def quantize_model(model: Module, fmt: str = "nf4", blocksize: int = 64,
                   double_quant: bool = True) -> Module:
    """Replace the frozen Linears of ``model`` by :class:`QuantLinear` (in place; returns it).

    Embeddings, LayerNorms and the tied LM head (``wte``) stay float, as in
    QLoRA. Works on a bare base and on a :func:`~minipeft.peft.get_peft_model`
    model: a wrapper's ``base_layer`` is replaced, the wrapper stays.

    Linears whose weight requires grad (the blocks layer selection trains)
    stay float and are listed in the record's ``kept_float``; a model with no
    frozen Linear at all is refused (freeze it, or wrap it first). The record,
    a :class:`QuantizationConfig`, is kept on the base as
    ``quantization_config``. ``double_quant`` applies to the 4-bit formats.
    """
    _check_format(fmt)
    blocksize = _check_blocksize(blocksize) if fmt in FOUR_BIT else None
    double_quant = bool(double_quant) and fmt in FOUR_BIT
    base = _base_of(model)
    linears = _linears(base)
    frozen = [(n, m) for n, m in linears if not m.weight.requires_grad]
    training = [n for n, m in linears if m.weight.requires_grad]
    if not frozen:
        raise ValueError(
            "quantize_model replaces frozen Linears and every Linear here trains"
            + (f" ({len(training)} of them)" if training else " (there are none)")
            + ": freeze the base first (model.freeze()), or call get_peft_model first, "
            "which freezes what the method does not train.")
    for n, _ in frozen:
        parent_name, _, child = n.rpartition(".")
        parent = base.get_submodule(parent_name)
        if getattr(parent, "merged_adapter", None) is not None:
            raise ValueError(f"{n}: an adapter is merged into this weight; unmerge it before "
                             "quantizing (or merge_and_unload and quantize the result)")
    # the float base's fingerprint, before its weights become codes (a shape-only
    # build, the estimator's, has no values to hash)
    float_fp = None if getattr(_build, "shapes_only", False) else parameters_digest(base)
    for n, m in frozen:
        replace_module(base, n, QuantLinear.from_linear(m, fmt, blocksize, double_quant))
    record = QuantizationConfig(fmt, blocksize, double_quant,
                                [base_name(n) for n, _ in frozen],
                                [base_name(n) for n in training], float_fp)
    base.quantization_config = record
    return model


def dequantize_model(model: Module, dtype=None) -> list[str]:
    """Replace every QuantLinear by a float Linear of its dequantized weight; the names done.

    The weights are what the codes hold (the quantization error stays in
    them); ``quantization_config`` is kept so :func:`requantize` knows the format.
    """
    done = []
    for n, m in [(n, m) for n, m in model.named_modules() if isinstance(m, QuantLinear)]:
        replace_module(model, n, m.to_linear(dtype))
        done.append(n)
    return done


def dequantize_for_merge(wrapper: Module) -> None:
    r"""Before a merge: put a float Linear where ``wrapper``'s chain ends in a QuantLinear.

    A merged weight :math:`\hat W + \Delta W` has no codes; the layer becomes
    float and a :class:`DequantizationWarning` says so.
    """
    outer = wrapper
    while isinstance(getattr(outer, "base_layer", None), Module) and \
            hasattr(outer.base_layer, "base_layer"):
        outer = outer.base_layer
    inner = outer.base_layer
    if not isinstance(inner, QuantLinear):
        return
    warnings.warn(
        f"merging into a quantized base: the merged layers' {inner.format} weights are "
        "dequantized to float (dequantized weight plus the update); they are no longer "
        "quantized. requantize(model) quantizes them again and returns the error it adds.",
        DequantizationWarning, stacklevel=3)
    lin = inner.to_linear()
    outer._modules["base_layer"] = lin
    object.__setattr__(outer, "base_layer", lin)


def requantize(model: Module, fmt: str | None = None, blocksize: int | None = None,
               double_quant: bool | None = None) -> dict:
    r"""Quantize a merged (float) model again; returns the error this adds, per Linear.

    Format, blocksize and double quantization default to the model's record
    (:func:`quantization_config`). Every frozen float Linear is quantized; the
    result maps each name to ``{"mse": ..., "max_abs": ...}`` of the
    re-quantized weight against the float weight it replaced, and ``"total"``
    to the mean squared error over all of them.
    """
    rec = quantization_config(model)
    if fmt is None:
        if rec is None:
            raise ValueError("requantize: this model was never quantized; name the format "
                             f"(one of {list(FORMATS)})")
        fmt = rec.format
    blocksize = blocksize if blocksize is not None else (rec.blocksize if rec else 64) or 64
    double_quant = double_quant if double_quant is not None else (rec.double_quant if rec
                                                                   else True)
    base = _base_of(model)
    before = {n: m.weight.data for n, m in _linears(base) if not m.weight.requires_grad}
    quantize_model(model, fmt, blocksize, double_quant)
    report, sq, count = {}, 0.0, 0
    for n, w in before.items():
        q = base.get_submodule(n)
        d = q.dequantized(w.dtype) - w
        err = float((d * d).sum().item())
        report[n] = {"mse": err / w.size, "max_abs": float(backend.xp(d).abs(d).max().item())}
        sq, count = sq + err, count + w.size
    report["total"] = {"mse": sq / max(count, 1)}
    return report
