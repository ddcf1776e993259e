r"""``minipeft bench``: how long one training step takes.

A step is what training repeats: forward with the loss, backward, one AdamW
update, ``zero_grad``. The benchmark builds the reference model (random
weights: speed does not depend on them), draws one fixed batch, runs a few
warm-up steps (first calls allocate and fill caches) and then times each of
``--steps`` steps alone with ``time.perf_counter``. It reports the median
(robust to the odd slow step on a shared machine) and the spread between the
10th and 90th percentiles, and tokens per second.

Timings belong here, never in the tests: a test asserts what must be true on
every machine; how fast something runs is a measurement of one machine.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from . import backend
from .nn.gpt import GPT, GPTConfig
from .optim import AdamW
from .peft import LoraConfig, get_peft_model


@dataclass
class BenchCase:
    name: str
    config: GPTConfig
    batch_size: int
    seq_len: int


CASES = {
    "tiny": BenchCase("tiny", GPTConfig(), 16, 128),
}


def time_steps(model, opt, idx, targets, steps: int, warmup: int) -> np.ndarray:
    """Seconds of each timed training step (after ``warmup`` untimed ones)."""
    times = []
    for i in range(warmup + steps):
        backend.synchronize()
        t0 = time.perf_counter()
        _, loss = model(idx, targets)
        loss.backward()
        opt.step()
        opt.zero_grad()
        backend.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return np.array(times)


def bench_case(case: BenchCase, method: str, device: str, steps: int, warmup: int) -> dict:
    model = GPT(case.config, seed=0).to(device)
    if method == "lora":
        model = get_peft_model(model, LoraConfig(r=8, target_modules=["c_attn"]))
    opt = AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    rng = np.random.default_rng(0)
    V = case.config.vocab_size
    idx = rng.integers(0, V, (case.batch_size, case.seq_len))
    targets = rng.integers(0, V, (case.batch_size, case.seq_len))
    t = time_steps(model, opt, backend.to_device(idx, device),
                   backend.to_device(targets, device), steps, warmup)
    tokens = case.batch_size * case.seq_len
    med = float(np.median(t))
    return {
        "case": case.name, "method": method, "device": device,
        "median_ms": 1000 * med,
        "p10_ms": 1000 * float(np.percentile(t, 10)),
        "p90_ms": 1000 * float(np.percentile(t, 90)),
        "tokens_per_s": tokens / med,
        "steps": len(t),
    }


def run_bench(args) -> int:
    steps, warmup = int(args.steps), int(args.warmup)
    if steps < 1 or warmup < 0:
        raise ValueError("--steps must be >= 1 and --warmup >= 0")
    print(f"one training step (forward, backward, AdamW), {steps} timed after {warmup} warm-up; "
          f"device {args.device}")
    print(f"{'case':<6} {'method':<6} {'median ms':>10} {'p10-p90 ms':>15} {'tokens/s':>10}")
    for case in CASES.values():
        for method in ("full", "lora"):
            r = bench_case(case, method, args.device, steps, warmup)
            print(f"{r['case']:<6} {r['method']:<6} {r['median_ms']:>10.1f} "
                  f"{r['p10_ms']:>7.1f}-{r['p90_ms']:<7.1f} {r['tokens_per_s']:>10,.0f}")
    return 0
