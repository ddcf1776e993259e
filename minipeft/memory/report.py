r"""One step, three views: :func:`profile_step` runs a real step under the books and the
meter and puts the estimate beside them (:class:`StepReport`)."""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass, field

import numpy as np

from .. import backend
from ..autograd.tensor import BACKWARD_HOOKS
from ..nn.gpt import GPT, GPTConfig
from ..nn.quant import DEQUANTIZE_HOOKS, quantization_config
from ..optim import SGD, AdamW
from ..peft import FullFinetuneConfig, PeftModel
from ..peft.qlora import recipe_name
from .books import _Books
from .estimate import Estimate, estimate
from .measure import _CupyHook, _TraceMalloc
from .presets import CATEGORIES, LABELS, MiB, _fmt_bytes


def _run_step(model, optimizer, batch, meter=None):
    """One training step under the books (and the meter): returns the books, the phases, seconds."""
    # The batch as the model will read it (int64, contiguous, on its device),
    # so the books count the arrays the step really uses; a step starts
    # without gradients.
    idx, targets = batch
    device = model.device
    idx = backend.to_device(np.ascontiguousarray(backend.asnumpy(idx), dtype=np.int64), device)
    targets = backend.to_device(np.ascontiguousarray(backend.asnumpy(targets), dtype=np.int64),
                                device)
    optimizer.zero_grad()
    for p in model.parameters():
        p.grad = None
    # The meter starts first (tracemalloc must see the arrays the books will
    # name), then the books open on what is alive. Each phase boundary below
    # is a snapshot of both.
    if meter is not None:
        meter.start(model, optimizer)
        # the batch, made under tracing too (copies are new allocations)
        idx, targets = idx.copy(), targets.copy()
    gc.collect()
    books = _Books(model, optimizer, (idx, targets))
    phases = {}
    books.snapshot("start")
    if meter is not None:
        phases["start"] = meter.phase()
    backend.synchronize()
    t0 = time.perf_counter()
    # A quantized Linear hands each weight it dequantizes to the books (a temporary).
    DEQUANTIZE_HOOKS.append(books.temporary)
    try:
        logits, loss = model(idx, targets)
    except BaseException:
        DEQUANTIZE_HOOKS.remove(books.temporary)
        raise
    books.outputs = [logits.data, loss.data]        # held by the caller until the step ends
    books.snapshot("end of forward")
    if meter is not None:
        phases["end of forward"] = meter.phase()
    # Inside backward the books are called after every node (Books.hook):
    # the gradients in flight are seen as they appear and go.
    BACKWARD_HOOKS.append(books.hook)
    try:
        loss.backward()
    finally:
        BACKWARD_HOOKS.remove(books.hook)
        DEQUANTIZE_HOOKS.remove(books.temporary)
    books.snapshot("end of backward")
    if meter is not None:
        phases["end of backward"] = meter.phase()
    optimizer.step()
    books.snapshot("after optimizer.step")
    backend.synchronize()
    seconds = time.perf_counter() - t0
    if meter is not None:
        phases["after optimizer.step"] = meter.phase()
    del logits, loss
    books.outputs = []
    books.close()
    return books, phases, seconds


# ---------------------------------------------------------------------------
# One step, three views
# ---------------------------------------------------------------------------

PHASES = ("start", "end of forward", "end of backward", "after optimizer.step")


@dataclass
class StepReport:
    r"""The three views of one training step (see :func:`profile_step`).

    * ``estimated``: an :class:`Estimate` (None when the model is not a GPT
      or a PeftModel of one, or the optimizer is not SGD or AdamW);
    * ``accounted``: the largest bytes of each category over the step;
      ``accounted_peak`` the largest total, reached at ``peak_event`` with
      the breakdown ``peak_breakdown``; ``phases_accounted`` the totals at
      the phase boundaries;
    * ``measured``: ``phases_measured`` (bytes of arrays alive at each phase
      boundary, as the allocator saw them, and all traced bytes),
      ``measured_peak`` (the allocator's peak over the step, Python objects
      included on the CPU), ``python_objects`` at the start.
    """

    method: str
    device: str
    config: GPTConfig
    batch_size: int
    seq_len: int
    optimizer: str
    estimated: Estimate | None
    accounted: dict
    accounted_peak: int
    peak_event: str
    peak_breakdown: dict
    phases_accounted: dict
    ledger_parameter_bytes: int
    measured_source: str
    phases_measured: dict
    measured_peak: int
    python_objects: int
    rounding: int | None
    seconds: float                # of the profiled step, books and tracing on (slower than plain)
    elsewhere: int = 0
    notes: list = field(default_factory=list)
    #: the accounted activations at their peak, by owner: ``backbone`` (what the
    #: frozen model keeps so the gradient can pass through it) and ``method``
    activation_split: dict = field(default_factory=dict)

    # -- gaps ---------------------------------------------------------------------
    def gaps(self) -> list[tuple[str, int, str]]:
        """(what, bytes, why) for every difference between two views."""
        out = []
        e = self.estimated
        # Estimated against accounted: the first six categories are the same
        # arrays counted two ways and must agree to the byte.
        if e is not None:
            for cat in CATEGORIES[:6] + ("temporaries",):
                d = int(round(e.bytes[cat])) - self.accounted[cat]
                why = ("the same arrays, counted by formula and by the books" if d == 0 else
                       "MISMATCH: the closed form and the model disagree about these arrays")
                out.append((f"{LABELS[cat]}: estimated - accounted", d, why))
            d = int(round(e.bytes["activations"])) - self.accounted["activations"]
            why = ("the walk applies each operator's saving rule, as the engine does" if d == 0 else
                   "an operator saves something the walk does not know (or the reverse)")
            out.append(("activations: estimated - accounted", d, why))
            d = int(round(e.bytes["other"])) - self.accounted["other"]
            out.append(("other live arrays: estimated - accounted", d,
                        "the estimate is the logits plus the top MLP's in-flight gradients (9N'C); "
                        "the books follow the gradients actually alive at each moment"))
            d = int(round(e.peak)) - self.accounted_peak
            out.append(("peak: estimated - accounted", d,
                        "the estimate adds the in-flight peak to every activation; when backward's "
                        "gradients peak, the head's and the top block's activations are already freed"))
        # Measured against accounted between operators, where no temporary is alive.
        for phase in PHASES:
            acc = self.phases_accounted[phase]
            meas = self.phases_measured[phase][0]
            out.append((f"arrays alive, {phase}: measured - accounted", meas - acc,
                        "every array alive between operators is in a book" if meas == acc else
                        ("the pool rounds each allocation up to 512 bytes" if self.device == "gpu"
                         else "arrays no book holds (e.g. a cache kept by a module)")))
        # The peaks: the allocator also sees what lives only inside an operator,
        # and Python's own objects (or, on the GPU, the pool's rounding).
        d = self.measured_peak - self.accounted_peak
        temps = ("temporaries inside operators that no book holds (LayerNorm's and attention's "
                 "scratch arrays, the optimizer's update")
        if self.config is not None:
            pc = self.estimated.peft_config if self.estimated is not None else None
            n = self.batch_size * (self.seq_len + (getattr(pc, "num_virtual_tokens", 0)
                                                   if getattr(pc, "peft_type", "") == "PROMPT_TUNING"
                                                   else 0))
            gelu = 2 * 4 * n * self.config.n_embd * 4
            temps += (f"; GELU's backward alone works in two scratch arrays of its input's size, "
                      f"2 x 4N'C floats = {_fmt_bytes(gelu, MiB)} here, on top of the books' peak")
        reasons = [temps + ")"]
        if self.device == "gpu":
            reasons.append(f"the pool's rounding to 512 bytes ({_fmt_bytes(self.rounding or 0)} "
                           "over the step)")
        else:
            reasons.append(f"Python objects: graph nodes, tensors, the books' own records "
                           f"({_fmt_bytes(self.python_objects)} at the start)")
        out.append(("peak: measured - accounted", d, "; ".join(reasons)))
        return out

    @property
    def accounted_over_measured(self) -> float:
        return self.accounted_peak / self.measured_peak

    # -- printing -------------------------------------------------------------------
    def table(self) -> str:
        cfg, e = self.config, self.estimated
        unit = MiB

        def f(v):
            return "-" if v is None else f"{v / unit:,.3f}"

        n = sum(self.accounted[c] for c in ("weights_frozen", "weights_trainable"))
        head = (f"{self.method} | GPT {cfg.n_layer} layers x {cfg.n_embd} wide, {cfg.n_head} heads, "
                f"vocab {cfg.vocab_size} | batch {self.batch_size} x {self.seq_len} | "
                f"{self.optimizer} | {self.device}")
        if e is not None:
            head += (f"\n{e.n_params:,d} parameters ({_fmt_bytes(n)}), {e.n_trainable:,d} with "
                     f"requires_grad, {e.n_trained:,d} updated by the optimizer")
        lines = [head, "", f"{'category (MiB)':<34}{'estimated':>12}{'accounted':>12}{'gap':>10}"]
        for cat in CATEGORIES:
            est = None if e is None else e.bytes[cat]
            gap = "" if est is None else f"{(est - self.accounted[cat]) / unit:,.3f}"
            lines.append(f"{LABELS[cat]:<34}{f(est):>12}{f(self.accounted[cat]):>12}{gap:>10}")
        peak_e = None if e is None else e.peak
        lines.append(f"{'peak (all at one moment)':<34}{f(peak_e):>12}{f(self.accounted_peak):>12}"
                     f"{'' if e is None else f'{(e.peak - self.accounted_peak) / unit:,.3f}':>10}")
        lines += ["", f"{'arrays alive (MiB)':<34}{'accounted':>12}{'measured':>12}{'gap':>10}"]
        for phase in PHASES:
            acc, meas = self.phases_accounted[phase], self.phases_measured[phase][0]
            lines.append(f"{phase:<34}{f(acc):>12}{f(meas):>12}{(meas - acc) / unit:>10,.3f}")
        d = self.measured_peak - self.accounted_peak
        lines.append(f"{'peak over the step':<34}{f(self.accounted_peak):>12}{f(self.measured_peak):>12}"
                     f"{d / unit:>10,.3f}")
        lines.append(f"(measured by {self.measured_source}; accounted peak = "
                     f"{100 * self.accounted_over_measured:.1f}% of measured, reached at "
                     f"'{self.peak_event}'; the ledger also held "
                     f"{f(self.ledger_parameter_bytes)} MiB of parameter arrays, counted as weights)")
        lines += ["", "gaps:"]
        for what, nbytes, why in self.gaps():
            if nbytes != 0 or "MISMATCH" in why:
                lines.append(f"  {what}: {nbytes / unit:+,.3f} MiB: {why}")
        exact = [w.split(":")[0] for w, nb, _ in self.gaps() if nb == 0]
        if exact:
            lines.append("  exact (0 bytes): " + "; ".join(exact))
        sp = self.activation_split
        if sp:
            es = "" if e is None else (f" (estimated {f(e.activation_split['backbone'])} and "
                                       f"{f(e.activation_split['method'])})")
            lines += ["", f"activations at their peak, MiB: kept by the backbone "
                          f"{f(sp['backbone'])}, by the method's own modules {f(sp['method'])}{es}"]
        if e is not None:
            lines += ["", e.breakdown()]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    __str__ = table


def _optimizer_kind(optimizer) -> str | None:
    if isinstance(optimizer, AdamW):
        return "adamw"
    if isinstance(optimizer, SGD):
        return "sgd_momentum" if optimizer.momentum else "sgd"
    return None


def _model_method(model):
    """(GPTConfig, PEFT config) of a GPT or a PeftModel; (None, None) for other models."""
    if isinstance(model, PeftModel) and isinstance(model.base_model, GPT):
        if model.active_adapter is None:
            return model.base_model.config, None
        return model.base_model.config, model.peft_config[model.active_adapter]
    if isinstance(model, GPT) and all(p.requires_grad for p in model.parameters()):
        return model.config, FullFinetuneConfig()
    return getattr(model, "config", None), None


def profile_step(model, optimizer, batch, *, measure: bool = True) -> StepReport:
    r"""Run one training step (forward with the loss, backward, ``optimizer.step()``) and
    report it three ways: estimated, accounted and measured, per category.

    Args:
        model: a GPT, or a PeftModel around one (any module ``model(idx, targets)
            -> (logits, loss)`` is accounted and measured; only a GPT gets an estimate).
        optimizer: the optimizer over its trainable parameters (SGD or AdamW).
        batch: ``(idx, targets)``, integer arrays (B, T) on any device.
        measure: also measure with the allocator (tracemalloc or CuPy's pool).

    The gradients are dropped first (a step starts without them) and are
    left in ``.grad`` afterwards. On the CPU the model's, the optimizer's and
    the method's arrays are replaced by equal copies once (so that
    tracemalloc, restarted here, sees them; see :class:`_TraceMalloc`); a
    tracemalloc session that was running is restarted.
    """
    idx, targets = batch
    B, T = tuple(int(n) for n in np.shape(backend.asnumpy(idx)))
    device = model.device
    meter = None
    if measure:
        meter = _CupyHook() if device == "gpu" else _TraceMalloc()
    try:
        books, phases, seconds = _run_step(model, optimizer, batch, meter)
    finally:
        if meter is not None:
            meter.stop()
    # The estimate for the same model, method, optimizer, batch and mode,
    # where the model is one the closed form knows.
    cfg, pc = _model_method(model)
    kind = _optimizer_kind(optimizer)
    est, notes = None, []
    q = quantization_config(model)
    first_step = books.event("start")["optimizer"] == 0     # AdamW's moments do not exist yet
    if cfg is not None and pc is not None and kind is not None:
        dtype = {np.dtype(np.float32): "fp32", np.dtype(np.float64): "fp64"}[np.dtype(model.dtype)]
        quant = {} if q is None else {"quantize": q.format, "blocksize": q.blocksize or 64,
                                      "double_quant": q.double_quant}
        est = estimate(cfg, pc, optimizer=kind, batch_size=B, seq_len=T, dtype=dtype,
                       index_dtype=optimizer.index_dtype, first_step=first_step,
                       training=model.training, **quant)
    else:
        notes.append("no estimate: the model is not a GPT (or PeftModel of one) with one active "
                     "adapter, or the optimizer is neither SGD nor AdamW")
    if first_step:
        notes.append("the optimizer's first step: its state is allocated in step(), after backward")
    if books.elsewhere:
        notes.append(f"{books.elsewhere:,d} bytes of the books are host arrays beside a model on "
                     f"{device} (a method's indices): the device's allocator does not see them")
    # The report: the books' peak and where it happened, each phase's totals,
    # and the meter's readings.
    pe_label, pe = books.peak_event
    if isinstance(pe_label, tuple):          # ("backward", "computed", "GELU")
        pe_label = f"backward: {pe_label[1]} {pe_label[2]}"
    ev = {p: sum(books.event(p).values()) for p in PHASES}
    measured = phases if meter is not None else {p: (0, 0) for p in PHASES}
    start_arrays, start_total = measured["start"]
    return StepReport(
        method=(type(model).__name__ if pc is None else
                pc.method if q is None else recipe_name(pc.method, q.format)),
        device=device, config=cfg, batch_size=B, seq_len=T, optimizer=kind or type(optimizer).__name__,
        estimated=est, accounted=dict(books.max), accounted_peak=books.peak, peak_event=pe_label,
        peak_breakdown=pe, phases_accounted=ev,
        ledger_parameter_bytes=books.ledger_params,
        measured_source=meter.source if meter is not None else "not measured",
        phases_measured=measured, measured_peak=(meter.peak if meter is not None else 0),
        python_objects=start_total - start_arrays, rounding=getattr(meter, "rounding", None),
        seconds=seconds, elsewhere=books.elsewhere, notes=notes,
        activation_split=dict(books.split_at_peak),
    )


