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
# 3. Why a sparse mask (`density=0.01`) still pays for the whole gradient, and where its index
#    costs more than it saves (`break_even_density`).
# 4. The training loop, written out once and checked against `minipeft.workflows.train`,
#    and how the selections fare on a task, for their cost.

# %%
import inspect
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
from minipeft.workflows.train import train

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
# ### The two mechanisms, on screen
#
# **Freezing** lives in the Linear operator's backward pass. For
# $y = xW + b$ with upstream gradient $G = \partial L / \partial y$:
#
# $$ \frac{\partial L}{\partial x} = G W^\top, \qquad
#    \frac{\partial L}{\partial W} = x^\top G, \qquad
#    \frac{\partial L}{\partial b} = \mathbf{1}^\top G, $$
#
# and each is formed only if what it is the gradient of needs one
# (`ctx.needs_input_grad`). Here is the engine's own source:

# %%
print(inspect.getsource(ops.Linear.backward))

# %% [markdown]
# **Masking** is the opposite: the gradient is computed in full, then
# multiplied by the boolean mask $M$, $\;\nabla W \odot M$, and the
# optimizer moves only the entries where $M$ is true. We re-derive it: the
# full gradient from a fully trainable copy of the same base on the same
# batch, times the mask, against the masked model's gradient; then one
# AdamW step, which must leave every entry outside the mask as it was.

# %%
small = next(get_task("reverse").batches("train", 4, shuffle=False))
masked_pm = get_peft_model(load_base(), MaskConfig(target_modules=["c_attn"], density=0.01))
full_pm = get_peft_model(load_base(), FullFinetuneConfig())
for m in (masked_pm, full_pm):
    _, loss = m(*small)
    loss.backward()
name = next(n for n in dict(masked_pm.named_parameters()) if n.endswith("h.0.attn.c_attn.weight"))
w_masked, w_full = dict(masked_pm.named_parameters())[name], dict(full_pm.named_parameters())[name]
mask = w_masked.grad_mask                                  # (C, 3C) booleans
mine = w_full.grad * mask                                  # computed in full, then masked
frozen = dict(masked_pm.named_parameters())[name.replace("attn.c_attn", "mlp.c_fc")]
before = w_masked.numpy().copy()
AdamW([p for p in masked_pm.parameters() if p.requires_grad], lr=1e-3).step()
moved = w_masked.numpy() != before                         # (C, 3C): which entries changed
print(f"{name}: {int(mask.sum()):,d} of {mask.size:,d} entries masked in; "
      f"{int(moved.sum()):,d} moved; a frozen weight's gradient: {frozen.grad}")
assert np.allclose(w_masked.grad, mine, rtol=1e-5, atol=1e-8) and not w_masked.grad[~mask].any()
assert not moved[~mask].any() and moved[mask].mean() > 0.9 and frozen.grad is None

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
print(lessons.table([[name] + [r[k] for k in keys] + [step_ms[name]] for name, r in rows.items()],
                    [""] + keys + ["step (ms)"], [""] + [",d"] * len(keys) + [".0f"]))
n_linears = sum(1 for n, _ in load_base().named_parameters()
                if n.endswith(".weight") and (".attn.c_" in n or ".mlp.c_" in n))
rf_, rb_ = rows["full fine-tuning"], rows["BitFit"]
lessons.say(f"""Read the table column by column.

* **dW products.** Full fine-tuning forms all {rf_['dW products']} (one per Linear weight; the base
  has {n_linears}). BitFit forms {rb_['dW products']}: a bias's gradient is a sum of $g$ and needs
  no product. The last block forms its own {rows['last block']['dW products']}. The masks form
  *all* of their weights' products, though they train a hundredth of the entries.
* **Gradient bytes.** A frozen weight has no gradient buffer. A masked one has a full-size buffer
  (mostly zeros).
* **Optimizer bytes.** AdamW keeps two moments per trained entry: the masks keep state only for
  their k entries (plus the index of those k).
* **Saved activations.** BitFit still trains biases in block 0, so the gradient flows through every
  layer and most activations are kept. The last block alone stops the backward pass early.
* **Backward FLOPs** follow the products: the mask of every Linear costs
  {100 * rows['mask 1% (every Linear)']['backward FLOPs'] / rf_['backward FLOPs']:.0f}% of full
  fine-tuning's; BitFit {100 * rb_['backward FLOPs'] / rf_['backward FLOPs']:.0f}% (only the input
  gradients).""")

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

# %%
lessons.say("**What to notice:** the bars of the mask of every Linear for gradient bytes and "
            "backward FLOPs stand almost as tall as full fine-tuning (the line at 1), while its "
            "optimizer bar falls to a few hundredths, like BitFit's and the other mask's; only "
            "the last block lowers the saved activations much.")
r_mask = rows["mask 1% (every Linear)"]
assert r_mask["gradient bytes"] > 0.9 * full["gradient bytes"]
assert r_mask["backward FLOPs"] > 0.9 * full["backward FLOPs"]
assert all(rows[n]["optimizer bytes"] < 0.05 * full["optimizer bytes"]
           for n in ("BitFit", "mask 1% (every Linear)", "mask 1% (c_attn only)"))
assert rows["last block"]["saved activations"] < 0.5 * min(
    r["saved activations"] for n, r in rows.items() if n != "last block")

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
print(lessons.table([[f"{d:.2f}", measured["int64"][i], measured["int32"][i]]
                     for i, d in enumerate(densities)],
                    ["density", "mask + state, int64 index (B)", "int32 index (B)"],
                    ["", ",d", ",d"]))

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

# %%
lessons.say("**What to notice:** each measured line crosses the dashed full-state line at its "
            f"dotted break-even density ({break_even_density(8):.4f} with an int64 index, "
            f"{break_even_density(4):.4f} with int32): below it a mask saves state, above it the "
            "index costs more than it saves.")
for i, d in enumerate(densities):
    assert (measured["int64"][i] < dense) == (d < break_even_density(8))
    assert (measured["int32"][i] < dense) == (d < break_even_density(4))

# %% [markdown]
# And the gradient: whatever the density, the masked weight's gradient
# buffer is full size ($4n$ bytes). Freezing a whole weight saves that; no
# mask can.
#
# ## 4. Quality for the cost
#
# ### The training loop, written out
#
# Training is four lines repeated: forward to the loss, backward to the
# gradients of what trains, the optimizer's update, and clearing the
# gradients. Here it is as you could write it, checked against
# `minipeft.workflows.train` (which adds a learning-rate schedule, gradient clipping,
# a progress bar and evaluation, all switched off here) on the same seed and
# batches: the same losses and the same weights, bit for bit.

# %%
def my_train(model, opt, batches, steps):
    losses = []
    for _, (idx, targets) in zip(range(steps), batches):
        _, loss = model(idx, targets)          # forward: mean cross-entropy on the answers
        loss.backward()                        # gradients, for what trains only
        opt.step()                             # AdamW's update
        opt.zero_grad()                        # free the gradients until the next backward
        losses.append(loss.item())
    return losses


loop_steps = lessons.pick(10, 5)
ours, theirs = (get_peft_model(load_base(), BitFitConfig()) for _ in range(2))
mine = my_train(ours, AdamW(ours.trainable_parameters(), lr=1e-2, weight_decay=0.0),
                task.batches("train", 16, seed=0, epochs=None), loop_steps)
history = train(theirs, AdamW(theirs.trainable_parameters(), lr=1e-2, weight_decay=0.0),
                task.batches("train", 16, seed=0, epochs=None), loop_steps, progress=False)
print("my loop:       ", [f"{v:.4f}" for v in mine])
print("minipeft.workflows.train:", [f"{v:.4f}" for v in history.losses])
assert mine == history.losses and mine[-1] < mine[0]
assert all(np.array_equal(a.numpy(), b.numpy())
           for a, b in zip(ours.parameters(), theirs.parameters()))

# %% [markdown]
# ### Every selection on a task
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
histories, scores, val_losses, n_trained = {}, {}, {}, {}
for name, (cfg, lr) in runs.items():
    run = lessons.finetune_and_score(cfg, task, lr, steps, n_test)
    histories[name], val_losses[name], scores[name] = run.history, run.answer_loss, run.score
    n_trained[name] = run.trainable
print(lessons.table([[n, n_trained[n], zero_shot_loss, val_losses[n], scores[n]] for n in runs],
                    ["", "trained", "answer loss, base", "after training",
                     f"exact match ({n_test} test words)"], ["", ",d", ".2f", ".3f", ".3f"]))

fig, ax = plt.subplots()
for name, h in histories.items():
    ax.plot(h.steps, h.losses, label=f"{name} ({scores[name]:.2f})")
ax.set_yscale("log")
ax.set_xlabel("step")
ax.set_ylabel("training loss (answer characters)")
ax.set_title("reverse: training loss (test exact match in brackets)")
ax.legend(fontsize=8)
plt.show()

# %%
best = min(val_losses, key=val_losses.get)
lessons.say(f"**What to notice:** every curve falls (the base's held-out answer loss was "
            f"{zero_shot_loss:.2f}); {best} ends lowest, at {val_losses[best]:.3f} held out. "
            f"After {steps} steps the exact-match scores in brackets are "
            + ", ".join(f"{n} {scores[n]:.2f}" for n in runs)
            + (": the fast setting trains too briefly for most selections to answer whole "
               "words; the held-out loss is its check." if lessons.FAST else "."))
assert all(h.losses[-1] < h.losses[0] for h in histories.values())
assert all(v < zero_shot_loss for v in val_losses.values())

# %%
lessons.say(f"""## The claim, checked

* Frozen means not computed: a frozen weight forms no gradient product and owns no gradient
  buffer. BitFit forms {rb_['dW products']} of the {rf_['dW products']} products, the last block
  {rows['last block']['dW products']}, full fine-tuning {rf_['dW products']}.
* Masked means computed, then masked: the mask of every Linear forms all
  {r_mask['dW products']} products, holds a full-size gradient, and its backward pass costs more
  than 90% of full fine-tuning's FLOPs; only its optimizer state shrinks.
* The optimizer's bytes are what `mask_state_bytes` predicts, to the byte, and a mask saves state
  only below `break_even_density()` (7/16 with an int64 index and a boolean mask).
* Every selection learns: its held-out answer loss falls below the base's.""")

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
#    at random. Does it learn faster at `density=0.01`?
# 3. With a mask at `density=0.3`, how many bytes does the boolean mask cost,
#    and how many the int64 index? At what density are they equal?
# 4. Freeze everything but block 0 (`layers=[0]`). Predict, before
#    measuring, whether its saved activations are closer to BitFit's or to
#    the last block's.
#
# Solutions: `lessons/solutions.md`, section "Lesson 4".
