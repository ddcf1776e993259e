r"""``minipeft bench``: how long one training step takes, against PyTorch and against the floor.

A step is what training repeats: forward with the loss, backward, one AdamW
update, ``zero_grad``. For each case (model size and batch) and method (full
fine-tuning; LoRA with r = 8 on ``c_attn``) the benchmark builds the model
(random weights: speed does not depend on them), draws one fixed batch, runs
warm-up steps (first calls allocate and fill caches) and then times steps one
by one with ``time.perf_counter``. Per row it prints:

* the **median** ms per step (robust to the odd slow step on a shared
  machine) with the spread between the 10th and 90th percentiles, and tokens
  per second;
* the **matmul floor**: the step's matrix-product FLOPs (every product the
  engine formed, logged through :data:`minipeft.autograd.profile.matmul_log`),
  divided by the best rate the same process measures for NumPy's matmul on
  those very shapes: the time the step would take if it did nothing but its
  products at full speed. **Efficiency** is floor / median;
* with ``torch``, ``transformers`` and ``peft`` importable, the same step in
  **PyTorch eager**: ``transformers.GPT2LMHeadModel`` with eager attention,
  loaded with the same weights, trained by ``torch.optim.AdamW`` with the same
  settings on the same batch, with as many threads as NumPy's BLAS uses (LoRA
  through ``peft.LoraConfig(r=8, target_modules=["c_attn"], fan_in_fan_out=True)``).
  Both losses on the batch are printed first, so a mismatch would show. The
  two steps are timed interleaved (minipeft, PyTorch, minipeft, ...), so both
  see the same machine, and the ratio is the median of the per-pair ratios.
  The steps run in alternating blocks of ``BLOCK`` (minipeft's block, then
  PyTorch's, ...), each block after one untimed step: both sides' thread
  pools spin for a while after their work waiting for more (OpenBLAS's
  threads, PyTorch's OpenMP team), and a step timed right after the other
  side's would share its cores with them. Strict A B A B timing made
  whichever side ran second pay: before minipeft held BLAS to one thread,
  OpenBLAS's spinning made PyTorch's tiny step about 1.5x slower. A pause
  before each step instead is no cure either: it lets idle cores sleep, and
  waking them costs a threaded step more than it would ever pay in training,
  where steps run back to back.

``--profile`` adds, per row, where minipeft's time goes: every op's forward
and backward (see :func:`~minipeft.autograd.profile.profile_ops`), the
optimizer, and what is left (module code, the loop). The profiled steps are
extra steps, not the timed ones.

``--reference`` adds, per row, what the reference engine costs: the same
step timed with the plain ops of ``autograd/ops.py`` and their walk
(:func:`~minipeft.autograd.reference_ops`), beside the fast path's time, and
both paths profiled per op, so each line shows what that op's fast kernel buys.

The BLAS library and its kernel are printed (threadpoolctl). OpenBLAS picks
its kernel by CPU unless ``OPENBLAS_CORETYPE`` forces one (some machines force
an AVX2 kernel on AVX-512 hardware, about 35% slower for these shapes), and
``OPENBLAS_L2_SIZE`` changes its blocking; both are read when NumPy loads, so
``minipeft bench`` run from the shell re-executes itself with the two removed
from its environment (only its own: tests and CI keep theirs), unless told
``--keep-blas-env``.

Timings belong here, never in the tests: a test asserts what must be true on
every machine; how fast something runs is a measurement of one machine, and
only ratios measured in one run are compared.
"""

from __future__ import annotations

import math
import os
import sys
import time
import warnings
from dataclasses import dataclass

import numpy as np

from .. import backend
from ..autograd import profile as op_profile
from ..autograd import reference_ops
from ..autograd.function import no_grad
from ..autograd.parallel import blas_own_threads, get_num_threads, set_num_threads, split_matmul
from ..autograd.profile import profile_ops
from ..nn.gpt import GPT, GPTConfig
from ..optim import AdamW
from ..peft import LoraConfig, get_peft_model

#: environment variables that change OpenBLAS's kernel or blocking
BLAS_OVERRIDES = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
_REEXEC_MARK = "MINIPEFT_BENCH_REEXEC"  # set in the re-executed process: says what was unset


@dataclass
class BenchCase:
    name: str
    config: GPTConfig
    batch_size: int
    seq_len: int

    @property
    def tokens(self) -> int:
        return self.batch_size * self.seq_len


CASES = {
    # the reference configuration
    "tiny": BenchCase("tiny", GPTConfig(n_layer=4, n_head=4, n_embd=128, vocab_size=96,
                                        n_positions=128), 16, 128),
    "medium": BenchCase("medium", GPTConfig(n_layer=6, n_head=6, n_embd=384, vocab_size=96,
                                            n_positions=256), 8, 256),
    # GPT-2 small's width and depth: for a GPU (``--case large --device gpu``)
    "large": BenchCase("large", GPTConfig(n_layer=12, n_head=12, n_embd=768, vocab_size=96,
                                          n_positions=512), 16, 512),
}
METHODS = ("full", "lora")
DEFAULT_CASES = ("tiny", "medium")

#: timed steps in a row for one side before the other side's turn (each block
#: after one untimed step)
BLOCK = 5

# The optimizer settings both sides use.
LR, BETAS, EPS, WEIGHT_DECAY = 1e-4, (0.9, 0.999), 1e-8, 0.01
LORA_R = 8


# ---------------------------------------------------------------------------
# The environment: BLAS kernel, threads, and the re-exec that clears overrides
# ---------------------------------------------------------------------------


def blas_overrides() -> dict[str, str]:
    """The OpenBLAS overrides set in this process's environment."""
    return {k: os.environ[k] for k in BLAS_OVERRIDES if k in os.environ}


def reexec_without_blas_overrides() -> None:
    """Replace this process by ``python -m minipeft <same arguments>`` without the overrides.

    Only when run from the command line (``bench`` among ``sys.argv``) and not
    already re-executed; the new process's environment lacks the variables,
    so the BLAS NumPy loads picks its kernel itself.
    """
    found = blas_overrides()
    if not found or os.environ.get(_REEXEC_MARK) or "bench" not in sys.argv[1:]:
        return
    env = {k: v for k, v in os.environ.items() if k not in BLAS_OVERRIDES}
    env[_REEXEC_MARK] = ", ".join(f"{k}={v}" for k, v in found.items())
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, "-m", "minipeft", *sys.argv[1:]], env)


def blas_info() -> dict:
    """NumPy's BLAS as threadpoolctl sees it: library, version, kernel, threads."""
    try:
        from threadpoolctl import threadpool_info  # noqa: PLC0415
    except ImportError:
        return {}
    for info in threadpool_info():
        if info.get("user_api") == "blas":
            return info
    return {}


def _header(args, threads: int, torch_mod) -> list[str]:
    info = blas_info()
    lines = [f"minipeft bench: one training step (forward, backward, AdamW), {args.steps} timed "
             f"after {args.warmup} warm-up; device {args.device}"]
    if info:
        lines.append(f"NumPy {np.__version__}, BLAS {info.get('internal_api')} "
                     f"{info.get('version')}, kernel {info.get('architecture')}, "
                     f"{threads} threads of its own; minipeft on {get_num_threads()} threads "
                     "(products split by rows or batch entries, one BLAS thread each)")
    else:
        lines.append(f"NumPy {np.__version__}, BLAS unknown (install threadpoolctl to see it)")
    unset = os.environ.get(_REEXEC_MARK)
    found = blas_overrides()
    if unset:
        lines.append(f"OpenBLAS overrides unset for this run: {unset}")
    elif found:
        lines.append("OpenBLAS overrides IN EFFECT (--keep-blas-env, or not run from the shell): "
                     + ", ".join(f"{k}={v}" for k, v in found.items()))
    else:
        lines.append("OpenBLAS overrides: none set (OPENBLAS_CORETYPE, OPENBLAS_L2_SIZE)")
    if torch_mod is not None:
        import peft  # noqa: PLC0415
        import transformers  # noqa: PLC0415
        lines.append(f"reference: PyTorch {torch_mod.__version__} eager ({torch_mod.get_num_threads()} "
                     f"threads), transformers {transformers.__version__}, peft {peft.__version__}")
    else:
        lines.append("reference: PyTorch not compared (torch, transformers and peft not all importable, "
                     "or --compare off)")
    return lines


# ---------------------------------------------------------------------------
# minipeft's side
# ---------------------------------------------------------------------------


def make_batch(case: BenchCase, seed: int = 0):
    """Token ids and next-token targets (B, T), int64 on the host."""
    rng = np.random.default_rng(seed)
    V = case.config.vocab_size
    idx = rng.integers(0, V, (case.batch_size, case.seq_len))
    targets = rng.integers(0, V, (case.batch_size, case.seq_len))
    return idx, targets


class MinipeftStep:
    """One model, optimizer and batch; ``run()`` is one training step."""

    def __init__(self, case: BenchCase, method: str, device: str):
        backend.keep_freed_memory()  # as the training loop does (both sides of the comparison)
        model = GPT(case.config, seed=0).to(device)
        # the base weights as GPT-2 names them, taken before any wrapping
        self.base_state = {k: backend.asnumpy(v).copy() for k, v in model.state_dict().items()}
        if method == "lora":
            model = get_peft_model(model, LoraConfig(r=LORA_R, lora_alpha=LORA_R,
                                                     target_modules=["c_attn"]))
        self.model = model
        self.opt = AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, betas=BETAS,
                         eps=EPS, weight_decay=WEIGHT_DECAY)
        idx, targets = make_batch(case)
        self.idx = backend.to_device(idx, device)
        self.targets = backend.to_device(targets, device)

    def loss(self) -> float:
        with no_grad():
            return self.model(self.idx, self.targets)[1].item()

    def run(self) -> None:
        _, loss = self.model(self.idx, self.targets)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad()
        backend.synchronize()

    def matmul_shapes(self) -> list[tuple[int, int, int, int]]:
        """(batch, m, k, n) of every matrix product one step forms."""
        op_profile.matmul_log = []
        try:
            self.run()
            return op_profile.matmul_log
        finally:
            op_profile.matmul_log = None


def matmul_flops(shapes) -> int:
    return sum(2 * b * m * k * n for b, m, k, n in shapes)


def best_matmul_rate(shapes, device: str, reps: int = 5, cache: dict | None = None,
                     threads: int | None = None) -> float:
    r"""The best FLOP/s NumPy's (or CuPy's) matmul reaches on any of ``shapes``.

    Each distinct (batch, m, k, n) is timed on random float32 operands of that
    shape, the fastest of ``reps`` runs after one warm-up; the floor uses the
    best rate over all of them. ``cache`` maps shapes already measured to their rate.
    On the CPU each shape gets the better of minipeft's split product and
    BLAS's own ``threads`` threads (default: as many as BLAS had).
    """
    xp = backend.module_for(device)
    cache = {} if cache is None else cache
    rng = np.random.default_rng(0)
    for shape in sorted(set(shapes)):
        if shape in cache:
            continue
        b, m, k, n = shape
        lead = (b,) if b > 1 else ()
        a = backend.to_device(rng.standard_normal(lead + (m, k), dtype=np.float32), device)
        w = backend.to_device(rng.standard_normal(lead + (k, n), dtype=np.float32), device)
        out = xp.empty(lead + (m, n), dtype=np.float32)

        def fastest(product, a=a, w=w, out=out):
            best = math.inf
            for _ in range(reps + 1):
                backend.synchronize()
                t0 = time.perf_counter()
                product(a, w, out=out)
                backend.synchronize()
                best = min(best, time.perf_counter() - t0)
            return best

        if device == "cpu":
            # the better of the engine's split product (one BLAS thread per
            # part) and BLAS's own threads on the whole: the floor is the best
            # this machine does, whoever does it
            best = fastest(split_matmul)
            with blas_own_threads(threads):
                best = min(best, fastest(np.matmul))
        else:
            best = fastest(xp.matmul)
        cache[shape] = 2 * b * m * k * n / best
    return max(cache[s] for s in set(shapes))


# ---------------------------------------------------------------------------
# PyTorch's side (imported only here, only when asked for)
# ---------------------------------------------------------------------------


def reference_available() -> bool:
    """Whether torch, transformers and peft all import."""
    try:
        import peft  # noqa: F401, PLC0415
        import torch  # noqa: F401, PLC0415
        import transformers  # noqa: F401, PLC0415
    except Exception:  # noqa: BLE001 - a broken install is "not available" too
        return False
    return True


class TorchStep:
    """The same model, weights, optimizer settings and batch in PyTorch eager."""

    def __init__(self, case: BenchCase, method: str, device: str, ours: MinipeftStep):
        import torch  # noqa: PLC0415
        import transformers  # noqa: PLC0415

        transformers.logging.set_verbosity_error()  # no notes about configs on every row
        self.torch = torch
        self.dev = torch.device("cuda" if device == "gpu" else "cpu")
        cfg = case.config
        hf_cfg = transformers.GPT2Config(
            vocab_size=cfg.vocab_size, n_positions=cfg.n_positions, n_embd=cfg.n_embd,
            n_layer=cfg.n_layer, n_head=cfg.n_head, layer_norm_epsilon=cfg.layer_norm_epsilon,
            activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
            use_cache=False, bos_token_id=None, eos_token_id=None,
        )
        model = transformers.GPT2LMHeadModel._from_config(hf_cfg, attn_implementation="eager")
        # GPT-2's Conv1D stores weights (in, out), as minipeft's Linear does:
        # every array copies over unchanged; the LM head is tied to wte.
        state = {"transformer." + k: torch.from_numpy(v.copy()) for k, v in ours.base_state.items()}
        missing, unexpected = model.load_state_dict(state, strict=False)
        bad = [k for k in missing if k != "lm_head.weight" and not k.endswith(".attn.bias")
               and not k.endswith(".masked_bias")]
        if unexpected or bad:
            raise RuntimeError(f"bench: weights do not map onto GPT2LMHeadModel: "
                               f"missing {bad}, unexpected {unexpected}")
        if method == "lora":
            import peft  # noqa: PLC0415
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = peft.get_peft_model(model, peft.LoraConfig(
                    r=LORA_R, lora_alpha=LORA_R, target_modules=["c_attn"], fan_in_fan_out=True,
                    lora_dropout=0.0))
            # the same A and B as minipeft's (peft keeps them as (r, in) and (out, r))
            # (names: minipeft's "[base_model.]h.0.attn.c_attn.lora_A.default" is peft's
            # "base_model.model.transformer.h.0.attn.c_attn.lora_A.default.weight")
            theirs = dict(model.named_parameters())
            with torch.no_grad():
                for name, p in ours.model.named_parameters():
                    if ".lora_A." in name or ".lora_B." in name:
                        tail = name.removeprefix("base_model.")
                        key = "base_model.model.transformer." + tail + ".weight"
                        theirs[key].copy_(torch.from_numpy(backend.asnumpy(p.data).T.copy()))
        model.to(self.dev).train()
        self.model = model
        self.opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR,
                                     betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY)
        self.idx = torch.from_numpy(backend.asnumpy(ours.idx)).to(self.dev)
        self.targets = torch.from_numpy(backend.asnumpy(ours.targets)).to(self.dev)
        self.V = cfg.vocab_size

    def _loss(self):
        # minipeft's targets are already shifted (targets[:, t] follows position t),
        # so the loss is taken on the logits as they are, not through HF's labels=
        logits = self.model(input_ids=self.idx).logits                   # (B, T, V)
        return self.torch.nn.functional.cross_entropy(logits.reshape(-1, self.V),
                                                      self.targets.reshape(-1))

    def loss(self) -> float:
        with self.torch.no_grad():
            return float(self._loss())

    def loss_through_labels(self) -> tuple[float, object]:
        """HF's own loss: ``labels=`` are shifted inside the model (labels[:, t+1] is
        what position t predicts), so labels = targets moved one step right; the
        last position has no label there. Returns the loss and minipeft's
        targets with that last position ignored, to compare against."""
        torch = self.torch
        labels = torch.full_like(self.targets, -100)
        labels[:, 1:] = self.targets[:, :-1]
        with torch.no_grad():
            loss = float(self.model(input_ids=self.idx, labels=labels).loss)
        ignored = backend.asnumpy(self.targets.cpu().numpy()).copy()
        ignored[:, -1] = -100
        return loss, ignored

    def run(self) -> None:
        loss = self._loss()
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if self.dev.type == "cuda":
            self.torch.cuda.synchronize()


# ---------------------------------------------------------------------------
# One row: time, floor, reference, profile
# ---------------------------------------------------------------------------


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _spread(times) -> dict:
    t = np.asarray(times)
    return {"median_ms": 1000 * float(np.median(t)), "p10_ms": 1000 * float(np.percentile(t, 10)),
            "p90_ms": 1000 * float(np.percentile(t, 90))}


def bench_row(case: BenchCase, method: str, device: str, steps: int, warmup: int,
              compare: bool, profile: bool, rate_cache: dict, threads: int | None = None,
              reference: bool = False) -> dict:
    """Time one (case, method) row; returns its numbers (see :func:`run_bench`)
    and, under ``"notes"``, lines to print beneath it (the loss check)."""
    ours = MinipeftStep(case, method, device)
    row = {"case": case.name, "method": method, "device": device, "steps": steps,
           "tokens": case.tokens, "notes": []}

    # Both models hold the same weights until their first step: compare the losses now.
    ref = TorchStep(case, method, device, ours) if compare else None
    if ref is not None:
        ours_loss, ref_loss = ours.loss(), ref.loss()
        row.update(loss=ours_loss, ref_loss=ref_loss, loss_diff=abs(ours_loss - ref_loss))
        hf_loss, ignored = ref.loss_through_labels()
        with no_grad():
            shifted = ours.model(ours.idx, backend.to_device(ignored, device))[1].item()
        row["notes"].append(
            f"  loss on the batch: minipeft {ours_loss:.6f}, PyTorch {ref_loss:.6f} "
            f"(|diff| {row['loss_diff']:.1e}); HF's labels= (shifted inside the model) "
            f"{hf_loss:.6f} vs minipeft with the last target ignored {shifted:.6f} "
            f"(|diff| {abs(hf_loss - shifted):.1e})")

    # The floor: the products of one step (which also warms up), at the best measured rate.
    shapes = ours.matmul_shapes()
    flops = matmul_flops(shapes)
    rate = best_matmul_rate(shapes, device, cache=rate_cache, threads=threads)
    row.update(matmul_gflop=flops / 1e9, best_gflops=rate / 1e9, floor_ms=1000 * flops / rate)

    for _ in range(warmup):
        ours.run()
        if ref is not None:
            ref.run()
    mine, theirs = [], []
    while len(mine) < steps:         # alternating blocks: A A A A A, B B B B B, ...
        n = min(BLOCK, steps - len(mine))
        for side, times in ((ours, mine), (ref, theirs)):
            if side is None:
                continue
            if ref is not None:
                side.run()           # untimed: the other side's threads settle meanwhile
            times.extend(_timed(side.run) for _ in range(n))
    row.update(_spread(mine))
    row["tokens_per_s"] = case.tokens / (row["median_ms"] / 1000)
    row["efficiency"] = row["floor_ms"] / row["median_ms"]
    if ref is not None:
        sp = _spread(theirs)
        row.update({"ref_" + k: v for k, v in sp.items()})
        row["ratio"] = float(np.median(np.asarray(mine) / np.asarray(theirs)))
    if profile:
        row["profile"] = profile_steps(ours, n=3)
    if reference:
        row["reference"] = reference_steps(ours, steps, warmup)
    return row


def reference_steps(step: MinipeftStep, steps: int, warmup: int) -> dict:
    """The same step on the reference path: its median and spread over ``steps`` steps,
    and both paths profiled per op (three extra steps each)."""
    with reference_ops():
        for _ in range(warmup):
            step.run()
        spread = _spread([_timed(step.run) for _ in range(steps)])
        slow = profile_steps(step, n=3)
    return {**spread, "profile": slow, "fast_profile": profile_steps(step, n=3)}


def format_reference(row: dict) -> list[str]:
    """What the reference path costs beside the fast one: the step, then each op."""
    r = row["reference"]
    fast = {name: f + b for name, f, b, _, _ in r["fast_profile"]["rows"]}
    slow = {name: f + b for name, f, b, _, _ in r["profile"]["rows"]}
    lines = [f"  the reference path: {r['median_ms']:.1f} ms per step "
             f"(p10-p90 {r['p10_ms']:.1f}-{r['p90_ms']:.1f}), {r['median_ms'] / row['median_ms']:.2f}x "
             f"the fast path's {row['median_ms']:.1f} ms; per op, ms per profiled step:",
             f"    {'op':<26} {'fast':>9} {'reference':>10} {'ref/fast':>9}"]
    for name in sorted(set(fast) | set(slow), key=lambda n: -slow.get(n, fast.get(n, 0.0))):
        f, sl = fast.get(name), slow.get(name)
        ratio = f"{sl / f:>8.2f}x" if f and sl is not None else f"{'-':>9}"
        lines.append(f"    {name:<26} {'-' if f is None else f'{f:.2f}':>9} "
                     f"{'-' if sl is None else f'{sl:.2f}':>10} {ratio}")
    lines.append(f"    {'profiled step':<26} {r['fast_profile']['step_ms']:>9.2f} "
                 f"{r['profile']['step_ms']:>10.2f} "
                 f"{r['profile']['step_ms'] / r['fast_profile']['step_ms']:>8.2f}x")
    return lines


def profile_steps(step: MinipeftStep, n: int = 3) -> dict:
    """Per-op forward and backward ms per step over ``n`` extra steps, plus the optimizer."""
    total = opt_s = 0.0
    with profile_ops() as prof:
        for _ in range(n):
            t0 = time.perf_counter()
            _, loss = step.model(step.idx, step.targets)
            loss.backward()
            t1 = time.perf_counter()
            step.opt.step()
            step.opt.zero_grad()
            backend.synchronize()
            t2 = time.perf_counter()
            total += t2 - t0
            opt_s += t2 - t1
    rows = [(name, 1000 * f / n, 1000 * b / n, calls // n, 1000 * mm / n)
            for name, f, b, calls, mm in prof.rows()]
    return {"rows": rows, "step_ms": 1000 * total / n, "optimizer_ms": 1000 * opt_s / n}


def format_profile(row: dict) -> list[str]:
    p = row["profile"]
    step = p["step_ms"]
    lines = [f"  where minipeft's time goes: {row['case']}/{row['method']}, ms per step "
             f"(profiled steps: {step:.1f} ms each; 'matmul': the part in matrix products)",
             f"    {'op':<26} {'calls':>5} {'forward':>9} {'backward':>9} {'total':>9} "
             f"{'matmul':>9} {'share':>6}"]
    accounted = products = 0.0
    for name, f, b, calls, mm in p["rows"]:
        if name != "Checkpoint":  # its time is its block's ops, already listed
            accounted += f + b
            products += mm
        lines.append(f"    {name:<26} {calls:>5} {f:>9.2f} {b:>9.2f} {f + b:>9.2f} {mm:>9.2f} "
                     f"{100 * (f + b) / step:>5.1f}%")
    opt = p["optimizer_ms"]
    lines.append(f"    {'AdamW step + zero_grad':<26} {'':>5} {'':>9} {'':>9} {opt:>9.2f} {'':>9} "
                 f"{100 * opt / step:>5.1f}%")
    rest = step - accounted - opt
    lines.append(f"    {'(module code, loop)':<26} {'':>5} {'':>9} {'':>9} {rest:>9.2f} {'':>9} "
                 f"{100 * rest / step:>5.1f}%")
    lines.append(f"    matrix products {products:.1f} ms ({100 * products / step:.0f}%), everything "
                 f"else {step - products:.1f} ms ({100 * (step - products) / step:.0f}%)")
    return lines


# ---------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------

COLUMNS = ("case", "method", "ms/step", "p10-p90", "tokens/s", "GFLOP", "floor ms", "eff.",
           "PyTorch ms", "p10-p90", "mp/PT")


def format_row(r: dict) -> str:
    s = (f"{r['case']:<7}{r['method']:<7}{r['median_ms']:>9.1f} "
         f"{r['p10_ms']:>7.1f}-{r['p90_ms']:<7.1f}{r['tokens_per_s']:>9,.0f}"
         f"{r['matmul_gflop']:>8.1f}{r['floor_ms']:>10.1f}{100 * r['efficiency']:>6.0f}%")
    if "ratio" in r:
        s += (f"{r['ref_median_ms']:>11.1f} {r['ref_p10_ms']:>7.1f}-{r['ref_p90_ms']:<7.1f}"
              f"{r['ratio']:>6.2f}")
    else:
        s += f"{'-':>11} {'-':>15}{'-':>6}"
    return s


def format_header() -> str:
    return (f"{'case':<7}{'method':<7}{'ms/step':>9} {'p10-p90':^15}{'tokens/s':>9}"
            f"{'GFLOP':>8}{'floor ms':>10}{'eff.':>7}{'PyTorch ms':>11} {'p10-p90':^15}"
            f"{'mp/PT':>6}")


TARGETS = (
    # (what, case, value of the row(s), target, at most?)
    ("tiny full: minipeft/PyTorch", "tiny", lambda rows: rows["full"].get("ratio"), 1.0),
    ("medium full: minipeft/PyTorch", "medium", lambda rows: rows["full"].get("ratio"), 1.1),
    ("medium LoRA/full (minipeft)", "medium",
     lambda rows: rows["lora"]["median_ms"] / rows["full"]["median_ms"], 0.8),
)


def summary(results: list[dict]) -> list[str]:
    by_case: dict[str, dict[str, dict]] = {}
    for r in results:
        by_case.setdefault(r["case"], {})[r["method"]] = r
    lines = []
    for case, rows in by_case.items():
        rate = max(r["best_gflops"] for r in rows.values())
        line = f"{case}: best matmul rate on the step's shapes {rate:.0f} GFLOP/s"
        if "full" in rows and "lora" in rows:
            line += (f"; LoRA/full step: minipeft "
                     f"{rows['lora']['median_ms'] / rows['full']['median_ms']:.2f}")
            if "ratio" in rows["full"] and "ratio" in rows["lora"]:
                line += (f", PyTorch "
                         f"{rows['lora']['ref_median_ms'] / rows['full']['ref_median_ms']:.2f}")
        lines.append(line)
    checks = []
    for what, case, value, target in TARGETS:
        try:
            v = value(by_case[case])
        except KeyError:
            continue
        if v is not None:
            checks.append(f"{what} {v:.2f} (target <= {target}: {'met' if v <= target else 'NOT met'})")
    if "medium" in by_case and "full" in by_case["medium"]:
        e = by_case["medium"]["full"]["efficiency"]
        checks.append(f"medium full: efficiency against the matmul floor {100 * e:.0f}% "
                      f"(target >= 60%: {'met' if e >= 0.6 else 'NOT met'})")
    if checks:
        lines.append("targets: " + "; ".join(checks))
    return lines


def _list_arg(value: str, allowed, what: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in items if v not in allowed]
    if bad or not items:
        raise ValueError(f"--{what}: unknown {', '.join(bad) or 'empty list'}; "
                         f"choose from {', '.join(allowed)}")
    return items


def run_bench(args) -> int:
    steps, warmup = int(args.steps), int(args.warmup)
    if steps < 1 or warmup < 0:
        raise ValueError("--steps must be >= 1 and --warmup >= 0")
    cases = _list_arg(getattr(args, "case", None) or ",".join(DEFAULT_CASES), CASES, "case")
    methods = _list_arg(getattr(args, "method", None) or ",".join(METHODS), METHODS, "method")
    device = args.device
    if device == "gpu":
        backend.require_gpu()  # says what to install when CuPy or the GPU is missing
    compare_opt = getattr(args, "compare", "auto")
    compare = compare_opt == "on" or (compare_opt == "auto" and reference_available())
    if compare_opt == "on" and not reference_available():
        raise RuntimeError("--compare on: torch, transformers and peft must be importable "
                           "(pip install torch==2.13.0 first, then transformers peft)")
    if device == "strict":
        compare = False  # the stand-in has no PyTorch counterpart
    threads = getattr(args, "threads", None)
    torch_mod = None
    before = get_num_threads()
    n_threads = threads or before          # the engine's default: as many as NumPy's BLAS had
    set_num_threads(n_threads)
    try:
        if compare:
            import torch  # noqa: PLC0415
            torch.set_num_threads(n_threads)
            torch_mod = torch
            if device == "gpu" and not torch.cuda.is_available():
                compare = False
                torch_mod = None
        for line in _header(args, n_threads, torch_mod):
            print(line)
        results = []
        print(format_header(), flush=True)
        for name in cases:
            rate_cache: dict = {}
            for method in methods:
                r = bench_row(CASES[name], method, device, steps, warmup, compare,
                              bool(getattr(args, "profile", False)), rate_cache, n_threads,
                              bool(getattr(args, "reference", False)))
                results.append(r)
                print(format_row(r))
                for line in (r["notes"] + (format_profile(r) if "profile" in r else [])
                             + (format_reference(r) if "reference" in r else [])):
                    print(line)
                sys.stdout.flush()
        for line in summary(results):
            print(line)
    finally:
        set_num_threads(None if threads is None else before)
    return 0
