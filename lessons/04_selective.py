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
# # Lesson 4: selective methods, and freezing against masking
#
# The simplest PEFT family adds nothing to the model: it picks which of the
# existing weights train. BitFit trains the biases; others train chosen
# layers, chosen components (attention, MLP, LayerNorms), or a scattered
# fraction of the entries of chosen weights (element masks).
#
# How the choice is *enforced* decides what it saves. There are two ways:
#
# * **freezing**: `requires_grad = False`. The engine allocates no gradient
#   and skips the product that would form it ("frozen means not computed");
# * **masking**: the gradient is computed in full, then multiplied by a
#   boolean mask ("computed, then masked"). Needed when the trained entries
#   are scattered inside a weight.
#
# **What you will learn**
#
# 1. How many parameters BitFit, layer, component and mask selections train.
# 2. What freezing saves, measured: gradient products counted by the engine
#    (`ops.counters`), gradient buffers, optimizer state, saved activations,
#    matrix-product FLOPs and step time.
# 3. Why a 1% mask still pays for the whole gradient, and where its index
#    costs more than it saves (`break_even_density`).
# 4. How the selections fare on a task, for their cost.

# %%
import time

import numpy as np

from minipeft.tools import lessons
from minipeft.autograd import LEDGER, ops
from minipeft.workflows.base import load_base
from minipeft.data import get_task
from minipeft.optim import AdamW
from minipeft.peft import (
    BitFitConfig,
    FullFinetuneConfig,
    LayerSelectConfig,
    MaskConfig,
    get_peft_model,
)
from minipeft.peft.selective import break_even_density, mask_state_bytes

plt = lessons.setup()

# %% [markdown]
# ## 1. What each selection trains
#
# `get_peft_model` freezes the base and unfreezes what the config selects.
# `print_trainable_parameters` prints Hugging Face peft's line; a masked
# weight counts only its selected entries.

# %%
selections = {
    "full fine-tuning": FullFinetuneConfig(),
    "BitFit (all biases)": BitFitConfig(),
    "last block": LayerSelectConfig(layers=[-1]),
    "first block": LayerSelectConfig(layers=[0]),
    "attention only": LayerSelectConfig(components=["attn"]),
    "MLP only": LayerSelectConfig(components=["mlp"]),
    "LayerNorms only": LayerSelectConfig(components=["ln", "ln_f"]),
    "weights of the last 2 blocks": LayerSelectConfig(layers=[-2, -1], param_types=["weight"]),
    "mask 1% of every Linear": MaskConfig(density=0.01),
}
trainable = {}
for name, cfg in selections.items():
    pm = get_peft_model(load_base(), cfg)
    trainable[name], total = pm.get_nb_trainable_parameters()
    print(f"{name:30s}", end=" ")
    pm.print_trainable_parameters()

# %% [markdown]
# ## 2. Freezing against masking, measured
#
# One training step (forward, backward, AdamW) on the same batch of the
# `reverse` task, for full fine-tuning and four selections. For each we read:
#
# * `ops.counters`: how many weight-gradient products $x^\top g$ the Linear
#   layers formed (`linear.dW`) and how many input gradients (`linear.dx`);
# * the gradient buffers that exist after backward (`p.grad`);
# * the optimizer's state (`AdamW.state_bytes()`: two moments per trained
#   entry, plus a mask's index);
# * the activation ledger's bytes after the forward pass;
# * the FLOPs of every matrix product the engine formed
#   (`lessons.count_flops()`), forward and backward;
# * the wall-clock time of the step, on this machine (shown, never asserted).

# %%
task = get_task("reverse")
batch = next(task.batches("train", 16, shuffle=False))
n_tokens = batch[0].size
compared = {
    "full fine-tuning": FullFinetuneConfig(),
    "BitFit": BitFitConfig(),
    "last block": LayerSelectConfig(layers=[-1]),
    "mask 1% (every Linear)": MaskConfig(density=0.01),
    "mask 1% (c_attn only)": MaskConfig(target_modules=["c_attn"], density=0.01),
}


def one_step(pm, opt, idx, targets):
    """A training step, measured: counters, gradient bytes, ledger, FLOPs."""
    ops.counters.clear()
    before = LEDGER.nbytes()
    with lessons.count_flops() as flops:
        _, loss = pm(idx, targets)
        saved = LEDGER.nbytes() - before
        forward_flops = flops.total
        loss.backward()
    backward_flops = flops.total - forward_flops
    grads = sum(p.grad.nbytes for p in pm.parameters() if p.grad is not None)
    opt.step()
    opt.zero_grad()
    return {"dW products": ops.counters["linear.dW"], "dx products": ops.counters["linear.dx"],
            "gradient bytes": grads, "optimizer bytes": opt.state_bytes(),
            "saved activations": saved, "forward FLOPs": forward_flops,
            "backward FLOPs": backward_flops}


rows, step_ms = {}, {}
for name, cfg in compared.items():
    pm = get_peft_model(load_base(), cfg)
    opt = AdamW(pm.trainable_parameters(), lr=1e-3)
    rows[name] = one_step(pm, opt, *batch)
    times = []
    for _ in range(lessons.pick(5, 2)):
        t0 = time.perf_counter()
        one_step(pm, opt, *batch)
        times.append(time.perf_counter() - t0)
    step_ms[name] = 1e3 * min(times)
    rows[name]["trainable"] = pm.get_nb_trainable_parameters()[0]

keys = ["trainable", "dW products", "dx products", "gradient bytes", "optimizer bytes",
        "saved activations", "backward FLOPs"]
print(f"{'':24s}" + "".join(f"{k:>18s}" for k in keys) + f"{'step (ms)':>11s}")
for name, r in rows.items():
    print(f"{name:24s}" + "".join(f"{r[k]:>18,d}" for k in keys) + f"{step_ms[name]:>11.0f}")

# %% [markdown]
# Read the table column by column.
#
# * **dW products.** Full fine-tuning forms all 16 (4 Linears in each of 4
#   blocks). BitFit forms none: a bias's gradient is a sum of $g$ and needs
#   no product. The last block forms its own 4. The masks form *all* of
#   their weights' products, though they train 1% of the entries.
# * **Gradient bytes.** A frozen weight has no gradient buffer. A masked
#   one has a full-size buffer (mostly zeros).
# * **Optimizer bytes.** AdamW keeps two moments per trained entry: the
#   masks keep state only for their k entries (plus the index of those k).
# * **Saved activations.** BitFit still trains biases in block 0, so the
#   gradient flows through every layer and most activations are kept. The
#   last block alone stops the backward pass early.
# * **Backward FLOPs** follow the products: a mask costs nearly what full
#   fine-tuning costs; BitFit about half (only the input gradients).

# %%
full = rows["full fine-tuning"]
metrics = ["trainable", "gradient bytes", "optimizer bytes", "saved activations", "backward FLOPs"]
fig, ax = plt.subplots(figsize=(8, 3.8))
width = 0.8 / (len(rows) - 1)
for i, (name, r) in enumerate(list(rows.items())[1:]):
    ax.bar(np.arange(len(metrics)) + i * width, [r[m] / full[m] for m in metrics], width, label=name)
ax.set_xticks(np.arange(len(metrics)) + 0.4 - width / 2, metrics)
ax.set_yscale("log")
ax.set_ylabel("fraction of full fine-tuning")
ax.axhline(1.0, color="k", lw=0.8)
ax.set_title("What each selection costs in one step")
ax.legend(fontsize=8)
plt.show()

# %% [markdown]
# ## 3. Where a mask's index eats its saving
#
# A mask must remember *which* entries train. The optimizer keeps their flat
# positions: an int64 index costs 8 bytes an entry, as much as both Adam
# moments together. During training the boolean mask adds one byte per entry
# of the weight. Against full Adam state ($8n$ bytes for $n$ entries), a
# mask of density $d = k/n$ costs $16k + n$ bytes, so it saves only while
#
# $$ d < \frac{8 - 1}{8 + 8} = 0.4375 \quad(\text{int32 index: } 7/12). $$
#
# We measure it: masks of growing density on the `c_attn` weights, one step
# each, reading the optimizer's state and the mask's bytes.

# %%
densities = lessons.pick([0.01, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0],
                         [0.05, 0.3, 0.5, 0.8])
small_batch = tuple(a[:2] for a in batch)
measured = {"int64": [], "int32": []}
predicted = {"int64": [], "int32": []}
for d in densities:
    for index_dtype, index_bytes in (("int64", 8), ("int32", 4)):
        pm = get_peft_model(load_base(), MaskConfig(target_modules=["c_attn"], density=d))
        opt = AdamW(pm.trainable_parameters(), lr=1e-3, index_dtype=index_dtype)
        _, loss = pm(*small_batch)
        loss.backward()
        opt.step()
        masked = [p for p in pm.parameters() if p.grad_mask is not None]
        n = sum(p.size for p in masked)
        k = pm.get_nb_trainable_parameters()[0]
        costs = mask_state_bytes(n, k, index_bytes)
        measured[index_dtype].append(opt.state_bytes() + sum(p.grad_mask.nbytes for p in masked))
        predicted[index_dtype].append(costs["masked_adam_state"] + costs["indices"]
                                      + costs["bool_mask"])
dense = mask_state_bytes(n, n)["full_adam_state"]
print(f"c_attn weights: n = {n:,d} entries; dense AdamW state {dense:,d} bytes")
for i, d in enumerate(densities):
    print(f"density {d:4.2f}: mask + state, int64 index {measured['int64'][i]:>9,d} B, "
          f"int32 {measured['int32'][i]:>9,d} B")

grid = np.linspace(0, 1, 101)
fig, ax = plt.subplots()
ax.plot(densities, np.array(measured["int64"]) / 1e6, "o-", label="mask, int64 index (measured)")
ax.plot(densities, np.array(measured["int32"]) / 1e6, "s-", label="mask, int32 index (measured)")
ax.plot(grid, np.full_like(grid, dense / 1e6), "k--", label="full Adam state")
for b, c in ((8, "C0"), (4, "C1")):
    ax.axvline(break_even_density(b), color=c, ls=":")
ax.set_xlabel("density k/n")
ax.set_ylabel("MB")
ax.set_title(f"Break-even: {break_even_density(8):.4f} (int64), {break_even_density(4):.4f} (int32)")
ax.legend(fontsize=8)
plt.show()

# %% [markdown]
# And the gradient: whatever the density, the masked weight's gradient
# buffer is full size ($4n$ bytes). Freezing a whole weight saves that; no
# mask can.
#
# ## 4. Quality for the cost
#
# Each selection trains on `reverse` for the same number of steps (its own
# learning rate: small sets of parameters need larger steps), then answers
# the test words. Zero-shot the base reverses none of them (lesson 1).
# `lessons.finetune_and_score` is what `minipeft finetune` runs
# (`minipeft.workflows.finetune.finetune`), kept in memory instead of saved, plus the
# held-out answer loss.

# %%
runs = {
    "full fine-tuning": (FullFinetuneConfig(), 1e-3),
    "BitFit": (BitFitConfig(), 1e-2),
    "last block": (LayerSelectConfig(layers=[-1]), 3e-3),
    "mask 1%": (MaskConfig(density=0.01), 1e-2),
}
steps = lessons.pick(200, 25)
n_test = lessons.pick(500, 100)
zero_shot_loss = lessons.answer_loss(load_base(), task)
histories, scores, val_losses = {}, {}, {}
for name, (cfg, lr) in runs.items():
    run = lessons.finetune_and_score(cfg, task, lr, steps, n_test)
    histories[name], val_losses[name], scores[name] = run.history, run.answer_loss, run.score
    print(f"{name:18s} {run.trainable:>8,d} trained  "
          f"answer loss {zero_shot_loss:.2f} -> {val_losses[name]:.3f}   "
          f"exact match {scores[name]:.3f} on {n_test} test words")

fig, ax = plt.subplots()
for name, h in histories.items():
    ax.plot(h.steps, h.losses, label=f"{name} ({scores[name]:.2f})")
ax.set_yscale("log")
ax.set_xlabel("step")
ax.set_ylabel("training loss (answer characters)")
ax.set_title("reverse: training loss (test exact match in brackets)")
ax.legend(fontsize=8)
plt.show()

# %% [markdown]
# ## The claim, checked
#
# * Frozen means not computed: a frozen weight forms no gradient product
#   and owns no gradient buffer. BitFit forms 0 of the 16 products, the last
#   block 4, full fine-tuning 16.
# * Masked means computed, then masked: a 1% mask of every Linear forms all
#   16 products, holds a full-size gradient, and its backward pass costs
#   more than 90% of full fine-tuning's FLOPs; only its optimizer state
#   shrinks.
# * The optimizer's bytes are what `mask_state_bytes` predicts, to the
#   byte, and a mask saves state only below `break_even_density()`
#   (7/16 with an int64 index and a boolean mask).
# * Every selection learns: its held-out answer loss falls below the base's.

# %%
r_full, r_bitfit, r_last = rows["full fine-tuning"], rows["BitFit"], rows["last block"]
r_mask, r_mask_attn = rows["mask 1% (every Linear)"], rows["mask 1% (c_attn only)"]
assert (r_full["dW products"], r_bitfit["dW products"], r_last["dW products"]) == (16, 0, 4)
assert r_mask["dW products"] == 16 and r_mask_attn["dW products"] == 4
# gradient buffers: only what trains has one; a mask's is its weights' full size
assert r_bitfit["gradient bytes"] == 4 * r_bitfit["trainable"]
assert r_full["gradient bytes"] == 4 * r_full["trainable"]
linear_entries = sum(p.size for n, p in load_base().named_parameters()
                     if n.endswith(".weight") and (".attn.c_" in n or ".mlp.c_" in n))
assert r_mask["gradient bytes"] == 4 * linear_entries > 100 * 4 * r_mask["trainable"]
# optimizer state: 8 bytes per trained entry; a mask adds its int64 index
assert r_full["optimizer bytes"] == 8 * r_full["trainable"]
assert r_mask["optimizer bytes"] == (8 + 8) * r_mask["trainable"]
# FLOPs: the mask computes (nearly) everything, BitFit about half, the forward is the same
assert r_mask["backward FLOPs"] > 0.9 * r_full["backward FLOPs"]
assert r_bitfit["backward FLOPs"] < 0.6 * r_full["backward FLOPs"]
assert len({r["forward FLOPs"] for r in rows.values()}) == 1
# the break-even density, measured
assert measured["int64"] == predicted["int64"] and measured["int32"] == predicted["int32"]
assert break_even_density(8) == 7 / 16 and break_even_density(4) == 7 / 12
for i, d in enumerate(densities):
    assert (measured["int64"][i] < dense) == (d < break_even_density(8))
    assert (measured["int32"][i] < dense) == (d < break_even_density(4))
# quality: every selection learned something on held-out answers
assert all(v < zero_shot_loss for v in val_losses.values())
print("all claims hold")

# %% [markdown]
# ## Exercises
#
# 1. Train only the LayerNorms (`components=["ln", "ln_f"]`). How many
#    parameters is that, and how does it compare with BitFit on `reverse`?
# 2. Choose the mask's entries by gradient (`selection="gradient"`, with a
#    `calibration_batch=(idx, targets)` passed to `get_peft_model`) instead of
#    at random. Does it learn faster at 1%?
# 3. With a mask at density 0.3, how many bytes does the boolean mask cost,
#    and how many the int64 index? At what density are they equal?
# 4. Freeze everything but block 0 (`layers=[0]`). Predict, before
#    measuring, whether its saved activations are closer to BitFit's or to
#    the last block's.
#
# Solutions: `lessons/solutions.md`, section "Lesson 4".
