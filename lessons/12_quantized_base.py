# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Lesson 12: a quantized frozen base (QLoRA)
#
# PEFT shrinks gradients and optimizer state; gradient checkpointing shrinks
# the activations. The frozen weights themselves were still 4 bytes each. A
# frozen weight is only ever *read*, so it can be stored in fewer bits than
# it is computed in: QLoRA (Dettmers et al., 2023) keeps the base in 4-bit
# NormalFloat (NF4), quantizes the quantization constants again (double
# quantization), and trains LoRA in higher precision on top. That is how a
# 65B model fine-tunes on one 48 GB card.
#
# **What you will learn**
#
# 1. Why 4 bits can work: weights are nearly normal, so codes placed at the
#    normal's quantiles are all used.
# 2. The NF4 codebook, derived in a few lines, and its buckets over the real
#    weights.
# 3. The error of NF4, FP4, int4 and int8 on this base's weights.
# 4. What double quantization saves, in bits per parameter.
# 5. The memory of LoRA and of QLoRA, estimated, accounted and measured: the
#    weights shrink, and a new kind of memory appears, the *temporary*.
# 6. QLoRA's quality against LoRA's on a task.
# 7. 65B on a 48 GB card, from the estimator.

# %%
import statistics

import numpy as np

from minipeft import memory
from minipeft.tools import lessons
from minipeft.workflows.base import load_base
from minipeft.workflows.compare import warm_step
from minipeft.data import get_task
from minipeft.nn import quant as Q
from minipeft.optim import AdamW
from minipeft.peft import LoraConfig, get_peft_model
from minipeft.peft.qlora import quantize_base
from minipeft.workflows.quant_eval import format_table, quantization_table, row_name

plt = lessons.setup()

# %% [markdown]
# ## 1. The weights are nearly normal
#
# Take every Linear weight of the shipped base (the run counts them below),
# standardise each matrix, and hold its sorted entries against the
# quantiles of a standard normal (a Q-Q plot in numbers: their correlation
# is 1 for a perfectly normal sample).

# %%
base = load_base()
linears = {n: m.weight.numpy() for n, m in base.named_modules()
           if type(m).__name__ == "Linear"}
w_all = np.concatenate([w.ravel() for w in linears.values()])
print(f"{len(linears)} Linear weights, {w_all.size:,d} entries")
inv = statistics.NormalDist().inv_cdf
qq = {}
for name, w in linears.items():
    z = np.sort(((w - w.mean()) / w.std()).ravel())
    probs = (np.arange(z.size) + 0.5) / z.size
    normal = np.array([inv(p) for p in probs[:: max(1, z.size // 2000)]])
    qq[name] = float(np.corrcoef(z[:: max(1, z.size // 2000)], normal)[0, 1])
print(f"{len(linears)} Linear weights, {w_all.size:,d} entries")
print(f"Q-Q correlation with a normal: lowest {min(qq.values()):.4f} ({min(qq, key=qq.get)}), "
      f"median {np.median(list(qq.values())):.4f}")
assert min(qq.values()) > 0.98          # every matrix: a straight Q-Q line

# %% [markdown]
# ## 2. NF4: one code per equal-probability slice of the normal
#
# A 4-bit code has 16 values. Spread them evenly over [-1, 1] (int4) and the
# outer ones are almost never used, because a block's entries, divided by
# its largest magnitude, crowd around zero. NF4 puts them at the normal's
# quantiles instead, so each code gets about the same share. The appendix of
# the QLoRA paper: 8 positive quantiles, 7 negative, an exact zero, all
# divided by the largest. The outermost quantile would be infinite, so the
# probabilities start at an offset, the average of $1 - 1/(2 \cdot 15)$ and
# $1 - 1/(2 \cdot 16)$.

# %%
offset = 0.5 * ((1 - 1 / (2 * 15)) + (1 - 1 / (2 * 16)))
positive = [inv(offset + j / 8 * (0.5 - offset)) for j in range(8)]
negative = [-inv(offset + j / 7 * (0.5 - offset)) for j in range(7)]
ours = np.sort(np.array(positive + [0.0] + negative))
ours = (ours / ours.max()).astype(np.float32)
print("NF4 codes:", np.round(ours, 4))
assert np.array_equal(ours, Q.nf4_codebook())       # the package derives the same 16 values

# %% [markdown]
# Each entry is divided by its block's absolute maximum (`blocksize=64` entries a block)
# and rounded to the nearest code; the bucket of a code runs from the
# midpoint with its lower neighbour to the midpoint with its upper one. The
# plot puts the buckets over the histogram of the real, block-scaled weights
# and counts how many entries land in each.

# %%
w0 = linears["h.0.attn.c_attn"]
blocks = w_all.reshape(-1, 64)
scaled = (blocks / np.abs(blocks).max(axis=1, keepdims=True)).ravel()


def usage(codes):
    """Share of the scaled weights that round to each code."""
    edges = (codes[:-1] + codes[1:]) / 2
    return np.bincount(np.searchsorted(edges, scaled), minlength=codes.size) / scaled.size


def entropy(p):
    p = p[p > 0]
    return float(-(p * np.log2(p)).sum())


books = {"nf4": Q.nf4_codebook(), "int4": np.sort(Q.int4_codebook())[1:],
         "fp4": np.unique(Q.fp4_codebook())}
shares = {k: usage(v) for k, v in books.items()}
bits = {k: entropy(p) for k, p in shares.items()}
for k in books:
    print(f"{k:5s} {len(books[k])} codes: entropy of their use {bits[k]:.3f} bits "
          f"(4 would use every code equally); least used code {shares[k].min():.2%} of entries")

fig, axes = plt.subplots(1, 2, figsize=(11, 3.6), sharey=False)
for ax, k in zip(axes, ("nf4", "int4")):
    ax.hist(scaled, bins=200, color="0.8", density=True)
    for c in books[k]:
        ax.axvline(c, color="C0" if k == "nf4" else "C3", lw=0.8)
    ax.set_title(f"{k}: codes over the block-scaled weights (entropy {bits[k]:.2f} bits)")
    ax.set_xlabel("w / absmax of its block")
plt.tight_layout()
plt.show()

# %% [markdown]
# **What to notice:** NF4's codes are dense where the weights are dense, so
# its 16 codes are used more evenly than int4's (a higher entropy of use,
# printed above): int4 spends codes on the tails where few weights live.

# %%
assert bits["nf4"] > bits["int4"] and bits["nf4"] > bits["fp4"]

# %% [markdown]
# ## 3. The error of each format on this base
#
# `minipeft.workflows.quant_eval` quantizes the base's Linear weights in each format
# and measures the weight error (mean squared, and the worst block's) and
# the pretraining-corpus loss of the quantized base against float32, with
# its paired standard error over the batches. (The fast setting scores a few
# batches of the corpus only.)

# %%
table = quantization_table(val_batches=lessons.pick(None, 2))
print(format_table(table))
by = {row_name(r): r for r in table}
fig, ax = plt.subplots(figsize=(7, 3.2))
names = [row_name(r) for r in table[1:]]
ax.bar(names, [by[n]["rel_mse"] for n in names], color="C0")
ax.set_yscale("log")
ax.set_ylabel("weight MSE / mean square weight")
ax.set_title("Quantization error of the base's Linear weights")
plt.show()

# %% [markdown]
# **What to notice:** of the 4-bit formats NF4 has the smallest weight
# error, as the paper found; int8, with 256 codes, is far below all of them.
# The corpus loss tells the 4-bit formats apart less clearly: read each
# difference against its standard error (the last two lines of the table).

# %%
assert by["nf4+dq"]["mse"] < by["fp4+dq"]["mse"] and by["nf4+dq"]["mse"] < by["int4+dq"]["mse"]
assert by["int8"]["mse"] < by["nf4+dq"]["mse"] / 10

# %% [markdown]
# ## 4. Double quantization
#
# A float32 constant for every `blocksize=64` weights is $32/64 = 0.5$ bits a weight on
# top of the 4. Double quantization stores those constants, less their mean,
# as 8-bit codes in blocks of 256, with one float32 scale per block:
# $8/64 + 32/(64 \cdot 256) \approx 0.127$ bits a weight (plus the mean's 32
# bits over the whole matrix).

# %%
single, double = Q.quantize(w0, "nf4", 64, False), Q.quantize(w0, "nf4", 64, True)
n = w0.size
print(f"{w0.shape} weight: {single.bits_per_parameter():.4f} bits a weight without, "
      f"{double.bits_per_parameter():.4f} with double quantization")
assert single.bits_per_parameter() == 4 + 32 / 64
assert abs(double.bits_per_parameter() - (4 + 8 / 64 + 32 * np.ceil(n / 64 / 256) / n
                                          + 32 / n)) < 1e-12

# %% [markdown]
# ## 5. Memory, three views
#
# One training step of LoRA (r=8 on `c_attn`) on the float32 base and on
# the NF4 base, each profiled three ways (lesson 3): the estimator's closed
# form, the engine's books, and the allocator. The quantized Linear keeps
# nothing for backward (its weight is frozen, so its input is not needed)
# and dequantizes its weight for each product: that array is a
# **temporary**, alive while one layer runs, the fifth category of training
# memory.

# %%
B, T = lessons.pick((16, 128), (4, 64))
rng = np.random.default_rng(0)
batch = (rng.integers(0, 96, (B, T)), rng.integers(0, 96, (B, T)))
reports = {}
for name, fmt in (("LoRA", None), ("QLoRA", "nf4")):
    pm = get_peft_model(load_base(), LoraConfig()).train()
    if fmt:
        quantize_base(pm, fmt)
    opt = AdamW(pm.trainable_parameters(), lr=1e-3)
    warm_step(pm, opt, batch)
    reports[name] = memory.profile_step(pm, opt, batch)

MiB = memory.MiB
print(f"batch {B} x {T} (MiB)        " + "".join(f"{v:>11s}" for v in
      ("LoRA est", "acc", "meas", "QLoRA est", "acc", "meas")))
rows = [("weights, frozen", "weights_frozen"), ("temporaries", "temporaries"),
        ("activations", "activations")]
for label, cat in rows:
    cells = []
    for r in reports.values():
        meas = r.phases_measured["start"][0] if cat == "weights_frozen" else None
        cells += [r.estimated.bytes[cat], r.accounted[cat], meas]
    print(f"{label:24s}" + "".join("          -" if c is None else f"{c / MiB:>11.3f}"
                                   for c in cells))
print(f"{'peak':24s}" + "".join(f"{c / MiB:>11.3f}" for r in reports.values()
                                for c in (r.estimated.peak, r.accounted_peak, r.measured_peak)))
lo, ql = reports["LoRA"], reports["QLoRA"]
saved = lo.accounted["weights_frozen"] - ql.accounted["weights_frozen"]
print(f"the allocator at the start of the step: {lo.phases_measured['start'][0] / MiB:.3f} MiB "
      f"-> {ql.phases_measured['start'][0] / MiB:.3f} MiB, {saved / MiB:.3f} MiB less, the "
      f"books' saving on the weights to the byte")

# %% [markdown]
# (The measured column for the weights is everything the allocator holds at
# the start of the step: the weights plus the optimizer's state and the
# batch, the same for both.) Estimated and accounted agree to the byte on
# the weights (codes, constants, second-level constants) and on the
# temporary (the largest layer's weight, `c_fc`'s 128 × 512, dequantized in
# float32).

# %%
for r in reports.values():
    for cat in ("weights_frozen", "weights_trainable", "temporaries", "activations"):
        assert int(r.estimated.bytes[cat]) == r.accounted[cat], cat
assert ql.accounted["temporaries"] == 128 * 512 * 4 and lo.accounted["temporaries"] == 0
assert lo.phases_measured["start"][0] - ql.phases_measured["start"][0] == saved > 0

# %% [markdown]
# ## 6. Quality: QLoRA against LoRA
#
# The same LoRA (r=8 on `c_attn`, the same learning rate, steps and batches)
# on the float32 base and on the NF4 base with double quantization, on the
# sentiment task, over seeds. The held-out answer loss is the finer measure;
# the test accuracy is what a user sees.

# %%
task = get_task("sentiment")
steps, n_test, seeds = lessons.pick((150, 200, (0, 1, 2)), (15, 16, (0,)))
runs = {"LoRA": [], "QLoRA": []}
for seed in seeds:
    for name, fmt in (("LoRA", None), ("QLoRA", "nf4")):
        runs[name].append(lessons.finetune_and_score(LoraConfig(), task, lr=1e-2, steps=steps,
                                                     n_test=n_test, quantize=fmt, seed=seed))
start = lessons.answer_loss(load_base(), task)
for name, rs in runs.items():
    loss = [r.answer_loss for r in rs]
    acc = [r.score for r in rs]
    print(f"{name:6s} answer loss {np.mean(loss):.4f} (sd {np.std(loss):.4f}), test accuracy "
          f"{np.mean(acc):.3f} (sd {np.std(acc):.3f}) over seeds {list(seeds)}")
gap = [q.answer_loss - f.answer_loss for q, f in zip(runs["QLoRA"], runs["LoRA"])]
gain = start - np.mean([r.answer_loss for r in runs["LoRA"]])
print(f"QLoRA - LoRA answer loss: {np.mean(gap):+.4f} (per seed {np.round(gap, 4).tolist()}); "
      f"LoRA's gain over the base's {start:.4f}: {gain:.4f}")

# %% [markdown]
# **What to notice:** the two runs end close together: the difference
# quantizing the base makes is a small fraction of what training gains.

# %%
assert gain > 0 and abs(np.mean(gap)) < 0.25 * gain

# %% [markdown]
# ## 7. 65B on a 48 GB card
#
# QLoRA's own setting: LLaMA-65B's shape (here with GPT-2's MLP), LoRA
# r=64 on every Linear, batch 1, gradient checkpointing, 16-bit activations
# and trained weights with float32 Adam state (`dtype="mixed"`), the frozen
# Linears in NF4 with double quantization.

# %%
every_linear = ["c_attn", "attn.c_proj", "c_fc", "mlp.c_proj"]
fits = {}
for seq in (512, 2048):
    e = memory.estimate("65b", "lora", dtype="mixed", batch_size=1, seq_len=seq,
                        gradient_checkpointing=True, quantize="nf4", r=64,
                        target_modules=every_linear)
    fits[seq] = e
    print(f"T={seq}: peak {e.peak / memory.GiB:.2f} GiB, margin on 48 GiB "
          f"{48 - e.peak / memory.GiB:+.2f} GiB; frozen weights "
          f"{e.bytes['weights_frozen'] / memory.GiB:.2f} GiB, LoRA weights, gradients and "
          f"Adam {(e.bytes['weights_trainable'] + e.bytes['gradients'] + e.bytes['optimizer']) / memory.GiB:.2f} GiB")
fp16 = memory.estimate("65b", "lora", dtype="mixed", batch_size=1, seq_len=512,
                       gradient_checkpointing=True, r=64, target_modules=every_linear)
print(f"the same on a 16-bit base: {fp16.peak / memory.GiB:.1f} GiB")

# %% [markdown]
# What the estimate leaves out: paged optimizers (QLoRA moves Adam's state
# to CPU memory when a long sequence spikes the GPU's; counted here as
# resident), bf16 compute (NumPy has no bfloat16; bf16 and fp16 take the
# same 2 bytes a number, which is what is counted), LLaMA's three-matrix SwiGLU MLP,
# and the framework's own memory (CUDA context, allocator fragmentation).

# %%
assert fits[512].fits(48) and fits[2048].fits(48) and not fp16.fits(80)

# %% [markdown]
# ## Exercises
#
# 1. Derive the FP4 (E2M1) codebook from its bits and plot its buckets over
#    the weights as in section 2. Which codes are used least?
# 2. Quantize the base with blocks of 32, 64 and 256 (`quantization_table(blocksize=...)`).
#    How do the error and the bits per weight move?
# 3. At what sequence length does the 65B QLoRA estimate of section 7 stop
#    fitting a 48 GB card? And with LoRA on `c_attn` only?
# 4. Merge the QLoRA adapter of section 6 (`merge_and_unload()`). What does
#    the warning say, and what does `requantize` report?
