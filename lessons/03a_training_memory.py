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
# # Lesson 3a: why training memory is large
#
# A model has to be stored to be used; to be *trained* it needs several times
# that. Training keeps, besides the weights, a gradient for every weight that
# trains, the optimizer's running averages of those gradients, and whatever
# the forward pass saved for the backward pass (lesson 2's activation
# ledger). This lesson counts each of those on one training step of the tiny
# model, where every byte can be checked. Lesson 3b scales the count up to
# models with billions of parameters, where it decides what fits on which
# card.
#
# **What you will learn**
#
# 1. The categories of training memory (weights, gradients, optimizer state,
#    activations, other live arrays), counted three ways on one training
#    step of the reference model: by formula (*estimated*), by the engine's
#    own books (*accounted*) and by the memory allocator (*measured*); where
#    the three agree to the byte, and why they differ where they do.
# 2. The bytes-per-parameter rule: fp32 AdamW holds 4 bytes a parameter of
#    weight, 4 of gradient and 8 of moments, 16 bytes a trained parameter
#    before a single activation is saved, 12 of them only for what trains.
# 3. Activations: what keeps them, how they grow with the batch and the
#    sequence, and why they dominate at the reference batch.

# %%
import tempfile
from pathlib import Path

import numpy as np
from IPython.display import Image, display

from minipeft import memory
from minipeft.tools import lessons
from minipeft.workflows.base import load_base
from minipeft.data import CharTokenizer, lm_batches, pretraining_text
from minipeft.optim import AdamW
from minipeft.peft import FullFinetuneConfig, LoraConfig, get_peft_model

plt = lessons.setup()
MiB, GiB = memory.MiB, memory.GiB

# %% [markdown]
# ## 1. One training step, three ways
#
# A training step is a forward pass (which saves activations), a backward
# pass (which turns them into gradients and frees them) and the optimizer's
# update. `minipeft.memory` sorts every array the step touches into
# categories:
#
# * **weights**, frozen and trainable: the parameters themselves;
# * **gradients**: one `.grad` buffer for every parameter that trains;
# * **optimizer state**: AdamW's two moments for every trained entry;
# * **masks and method copies**: what some PEFT methods keep aside (none here);
# * **the batch**: the token ids and targets (int64);
# * **activations**: what the forward pass saved for backward (the ledger),
#   at its largest;
# * **other live arrays**: the logits and the loss the caller holds, the
#   gradients of activations while backward runs, the optimizer's scratch.
#
# and counts them three ways:
#
# 1. **estimated**: `memory.estimate(config, method, batch_size, seq_len,
#    dtype)`, a closed form that builds no arrays (so it works at 65B just as
#    well);
# 2. **accounted**: `memory.profile_step(model, optimizer, batch)` runs one
#    real step and keeps books of every array the engine owns, from the
#    moment it is made to the moment it is freed;
# 3. **measured**: during that same step, the allocator's own count
#    (Python's `tracemalloc`, which NumPy reports every buffer to).
#
# We profile full fine-tuning and LoRA (r = 8 on `c_attn`) on the shipped
# base, at the reference batch: `B=16` windows of `T=128` characters of the
# validation text. One ordinary step first, so that the optimizer's moments
# exist, as they do in the middle of training.

# %%
ids = CharTokenizer().encode(pretraining_text("val"))
B, T = 16, 128                                  # the reference batch
batch = next(lm_batches(ids, B, T, seed=0))
methods = {"full": FullFinetuneConfig(), "lora": LoraConfig(r=8)}
models, opts, reports = {}, {}, {}
for name, cfg in methods.items():
    models[name] = model = get_peft_model(load_base(), cfg)
    opts[name] = opt = AdamW(model.trainable_parameters(), lr=1e-3)
    _, loss = model(*batch)                     # an ordinary step: the moments now exist
    loss.backward()
    opt.step()
    opt.zero_grad()
    reports[name] = memory.profile_step(model, opt, batch)
print(reports["full"].table())

# %% [markdown]
# Reading the table from the top:
#
# * **Estimated against accounted.** The first six rows agree to the byte:
#   the formula and the books count the same arrays, once from the config
#   and once from the model. The activations agree too: the estimate walks
#   the GPT's operators and applies each one's rule for what it saves (a
#   Linear keeps its input only if its weight trains, attention keeps q, k, v
#   and the exponentiated scores, GELU its input...), as the engine does.
# * **Accounted against measured.** Between operators (start, end of
#   forward, end of backward, after the update) the allocator's bytes equal
#   the books' to the byte: no array escapes the books. Inside an operator
#   they do not: the measured peak is higher, because operators compute in
#   temporaries that no book holds while they run (GELU's backward works in
#   two scratch arrays of its input's size) and Python objects
#   (graph nodes, tensor wrappers) take memory too.
# * **The estimated peak** is a little above the accounted one: it assumes
#   the largest in-flight gradients sit beside *all* the activations, while
#   in the real step the head's and the top block's activations are already
#   freed when those gradients peak.
#
# The same table for LoRA differs in what trains. Side by side, the books:

# %%
print(lessons.table(
    [[memory.LABELS[cat]] + [reports[m].accounted[cat] / MiB for m in methods]
     for cat in memory.CATEGORIES]
    + [["peak, accounted"] + [reports[m].accounted_peak / MiB for m in methods],
       ["peak, measured"] + [reports[m].measured_peak / MiB for m in methods]],
    ["category (MiB, accounted)", "full", "LoRA r=8"], ["", ".3f", ".3f"]))
print()
print(reports["lora"].estimated.breakdown())
n_full = models["full"].num_parameters()
n_lora_trained, n_lora_all = models["lora"].get_nb_trainable_parameters()
lessons.say(
    f"LoRA's gradients and optimizer state nearly vanish: {n_lora_trained:,d} entries train "
    f"instead of {n_full:,d}. Its activations shrink by much less "
    f"({reports['lora'].accounted['activations'] / MiB:.1f} MiB against "
    f"{reports['full'].accounted['activations'] / MiB:.1f}): the frozen `c_proj`, `c_fc` and "
    "`mlp.c_proj` keep no input (no weight gradient will be formed), but attention, GELU and "
    "the LayerNorms must still pass the gradient down to block 0's LoRA, so they keep theirs.")

# %% [markdown]
# `memory.plot` draws the three views as stacked bars at each one's peak:
# the estimate, the books (by category) and the allocator (what was alive
# at the start, and what the step added up to its peak).

# %%
png = memory.plot([reports["full"], reports["lora"]],
                  str(Path(tempfile.mkdtemp(prefix="minipeft_lesson03_")) / "views.png"))
display(Image(filename=png))

# %%
rf, rl = reports["full"], reports["lora"]
lessons.say(
    "**What to notice:** for each method the books' bar is never above the allocator's, and the "
    "estimate's is a little above the books' "
    f"(full: {rf.estimated.peak / MiB:.1f} MiB estimated, {rf.accounted_peak / MiB:.1f} accounted, "
    f"{rf.measured_peak / MiB:.1f} measured), and LoRA's bars are lower than full "
    "fine-tuning's by far less than its trainable count suggests: the activations stay.")
for rep in (rf, rl):
    assert rep.accounted_peak <= rep.measured_peak and rep.accounted_peak <= rep.estimated.peak
assert rl.accounted_peak < rf.accounted_peak
assert rl.accounted["activations"] > 0.5 * rf.accounted["activations"]

# %% [markdown]
# ## 2. Sixteen bytes a trained parameter
#
# For every parameter that trains, fp32 AdamW keeps the weight, its gradient
# and two moments, at 4 bytes each: **16 bytes a trained parameter**,
# whatever the batch. A frozen parameter costs only its weight, 4 bytes a
# parameter. So PEFT's saving on this part is 12 bytes for every parameter
# it freezes. We check both on the books of the step we just ran.

# %%
full, lora = reports["full"].accounted, reports["lora"].accounted
full_per_param = (full["weights_trainable"] + full["gradients"] + full["optimizer"]) / n_full
print(f"full fine-tuning: ({full['weights_trainable']:,d} + {full['gradients']:,d} + "
      f"{full['optimizer']:,d}) bytes / {n_full:,d} parameters = {full_per_param} bytes a parameter")
print(f"LoRA: gradients + state {lora['gradients'] + lora['optimizer']:,d} bytes "
      f"= {(lora['gradients'] + lora['optimizer']) / n_lora_trained} x {n_lora_trained:,d} "
      f"trained; frozen weights {lora['weights_frozen']:,d} bytes = "
      f"{lora['weights_frozen'] / (n_lora_all - n_lora_trained)} x "
      f"{n_lora_all - n_lora_trained:,d}")

# %% [markdown]
# Large models train in 16-bit precision, but that does not make the
# optimizer cheaper. In ZeRO's accounting of mixed precision (Rajbhandari
# et al., 2020) a trained parameter has a 16-bit weight and gradient (2 + 2)
# and the optimizer keeps an fp32 master copy and two fp32 moments
# (4 + 4 + 4): 16 bytes a trained parameter again. Only *frozen* weights get
# cheaper, down to a byte or half a byte when stored in 8 or 4 bits (QLoRA,
# Dettmers et al., 2023). The recipes the
# estimator knows:

# %%
moments = memory.OPTIMIZERS["adamw"]
print(lessons.table(
    [[name, p.weight, p.grad, p.master, moments * p.moment,
      p.weight + p.grad + p.master + moments * p.moment, p.frozen]
     for name, p in memory.DTYPES.items()],
    ["recipe (bytes a parameter)", "weight", "grad", "master", "moments", "trained", "frozen"],
    [""] + ["g"] * 6))
per_param = {(size, dt): memory.estimate(size, "full", dtype=dt, batch_size=1,
                                         seq_len=64).training_bytes_per_param
             for size in ("reference", "7b") for dt in ("fp32", "mixed")}
print("\nestimated weights + gradients + AdamW state per parameter, full fine-tuning:", per_param)

# %% [markdown]
# ## 3. Activations: the part that grows with the batch
#
# The 16 bytes a trained parameter do not depend on the batch. The activations do:
# every position of every sequence saves its share in every layer. With
# $N = BT$ positions, width $C$, $n_h$ heads and vocabulary $V$, full
# fine-tuning keeps per block
#
# $$ \underbrace{2(NC + N)}_{\text{2 LayerNorms}}
#  + \underbrace{7NC}_{\text{the 4 Linears' inputs}}
#  + \underbrace{3NC + n_h B T^2 + n_h B T}_{\text{attention}}
#  + \underbrace{4NC}_{\text{GELU}}
#  = 16NC + 2N + n_h B T^2 + n_h B T $$
#
# floats (`memory.full_finetuning_activations`), and the head keeps the
# final LayerNorm's, its own input and the softmax over $V$. Linear in the
# batch, and in the sequence but for attention's $T^2$. What keeps what, at
# the reference batch:

# %%
print(reports["full"].estimated.breakdown())
closed = memory.full_finetuning_activations("reference", B, T)
print(f"closed form: {closed['block']:,d} bytes a block x 4 + head {closed['head']:,d} "
      f"= {closed['total']:,d}; accounted {full['activations']:,d}")

# %% [markdown]
# Now the batch and the sequence length vary. For each point we run a real
# step on the books (`measure=False`: no allocator, it is quicker) and draw
# the estimate beside it. The dashed line is what does not grow: weights,
# gradients and AdamW state, 16 bytes a parameter of the whole model.

# %%
sweep_T = lessons.pick([32, 64, 128], [32, 128])
sweep_B = lessons.pick([1, 2, 4, 8, 16], [1, 4])
sweep = {}
for t in sweep_T:
    for b in sweep_B:
        rep = memory.profile_step(models["full"], opts["full"], next(lm_batches(ids, b, t, seed=1)),
                                  measure=False)
        sweep[b, t] = (rep.estimated.bytes["activations"], rep.accounted["activations"])
state_bytes = full["weights_trainable"] + full["gradients"] + full["optimizer"]

fig, ax = plt.subplots()
grid = np.arange(1, 17)
for i, t in enumerate(sweep_T):
    line = [memory.estimate("reference", "full", batch_size=int(b), seq_len=t).bytes["activations"]
            for b in grid]
    ax.plot(grid * t, np.array(line) / MiB, color=f"C{i}", label=f"T = {t}, estimated")
    ax.scatter([b * t for b in sweep_B], [sweep[b, t][1] / MiB for b in sweep_B], color=f"C{i}",
               marker="o", zorder=3, label=f"T = {t}, accounted")
ax.axhline(state_bytes / MiB, color="k", ls="--", label="weights + gradients + state")
ax.set_xscale("log")
ax.set_yscale("log")
ax.set_xlabel("tokens in the batch (B x T)")
ax.set_ylabel("saved activations (MiB)")
ax.set_title("Reference GPT, full fine-tuning: activations grow with the batch")
ax.legend(fontsize=7)
plt.show()
for (b, t), (est, acc) in sweep.items():
    print(f"B = {b:2d}, T = {t:3d}: estimated {est / MiB:7.3f} MiB, accounted {acc / MiB:7.3f} MiB")

# %%
cross = min(b * 128 for b in range(1, 17)
            if memory.estimate("reference", "full", batch_size=b, seq_len=128).bytes["activations"]
            > state_bytes)
lessons.say(
    "**What to notice:** every accounted point sits on its estimated line, and the activations "
    f"pass the weights, gradients and state together (the dashed line) at {cross:,d} tokens "
    f"for sequences of 128; at the reference batch ({B * T:,d} tokens) they are "
    f"{full['activations'] / state_bytes:.1f} times that, "
    f"{100 * rf.peak_breakdown['activations'] / rf.accounted_peak:.0f}% of the step's accounted "
    "peak. The tiny model is an extreme case: its activations per token are about $64LC$ bytes "
    r"against $16 \cdot 12LC^2$ bytes of training state, so the wider the model, the more "
    "tokens it takes for activations to catch up (lesson 3b).")
assert all(est == acc for est, acc in sweep.values())
assert cross < B * T and full["activations"] > 5 * state_bytes
for t in sweep_T:
    assert all(sweep[a, t][1] < sweep[b, t][1] for a, b in zip(sweep_B, sweep_B[1:]))

# %%
lessons.say(f"""## The claim, checked

* fp32 AdamW holds exactly {full_per_param:g} bytes a trained parameter before activations
  (4 + 4 + 8, counted by the books), and so does ZeRO's mixed precision (2 + 2 + 12); LoRA pays
  {(lora['gradients'] + lora['optimizer']) / n_lora_trained:g} bytes of gradient and state per
  trained parameter and {lora['weights_frozen'] / (n_lora_all - n_lora_trained):g} per frozen one.
* Estimated equals accounted, to the byte, for weights, gradients and optimizer state (and here
  for activations too, at every point of the sweep); between operators the allocator agrees with
  the books to the byte; the accounted peak is never above the measured one, and within a quarter
  of it ({100 * rf.accounted_peak / rf.measured_peak:.0f}% for full fine-tuning,
  {100 * rl.accounted_peak / rl.measured_peak:.0f}% for LoRA).
* At the reference batch activations dominate: more than half of the step's accounted peak and
  over five times the weights, gradients and state together; they grow with the batch, and LoRA
  keeps {100 * lora['activations'] / full['activations']:.0f}% of them.
""")

# %%
# 16 bytes a parameter (fp32 AdamW), counted by the books; 12 per trained entry for LoRA
assert full["weights_trainable"] + full["gradients"] + full["optimizer"] == 16 * n_full
assert lora["gradients"] + lora["optimizer"] == 12 * n_lora_trained
assert lora["weights_frozen"] == 4 * (n_lora_all - n_lora_trained)
assert all(v == 16.0 for v in per_param.values())                   # fp32 and ZeRO's mixed
# estimated == accounted for weights, gradients, optimizer state (and activations)
for rep in (rf, rl):
    for cat in ("weights_frozen", "weights_trainable", "gradients", "optimizer", "activations"):
        assert rep.estimated.bytes[cat] == rep.accounted[cat], (rep.method, cat)
    for phase in memory.PHASES:                                    # between operators: to the byte
        assert rep.phases_accounted[phase] == rep.phases_measured[phase][0]
    assert rep.accounted_peak <= rep.measured_peak                 # temporaries no book holds
    assert rep.accounted_peak >= 0.75 * rep.measured_peak
assert closed["total"] == full["activations"]
assert all(est == acc for est, acc in sweep.values())
# activations dominate at the reference batch, grow with it, and LoRA keeps most of them
assert rf.peak_breakdown["activations"] > 0.5 * rf.accounted_peak
assert full["activations"] > 5 * state_bytes
for t in sweep_T:
    assert all(sweep[a, t][1] < sweep[b, t][1] for a, b in zip(sweep_B, sweep_B[1:]))
assert 0.5 * full["activations"] < lora["activations"] < full["activations"]
assert lora["gradients"] + lora["optimizer"] < 0.05 * (full["gradients"] + full["optimizer"])
print("all claims hold")

# %% [markdown]
# ## Exercises
#
# 1. Profile full fine-tuning, BitFit (`BitFitConfig()`) and prompt tuning
#    (`PromptTuningConfig(num_virtual_tokens=20)`) on one batch of shape
#    `(16, 108)` (the characters and the virtual tokens fill `n_positions`).
#    Which categories shrink? Prompt tuning trains fewer than half as many
#    parameters as BitFit: why does it keep more activations?
# 2. How many bytes a parameter of training state do plain SGD and SGD with
#    momentum hold in fp32 (`optimizer="sgd"`, `"sgd_momentum"`)? Check with
#    `memory.estimate`.
# 3. Attention's $n_h B T^2$ overtakes the rest of a block's $16NC$ once
#    $n_h T > 16C$. At what sequence length is that for each preset in
#    `memory.PRESETS`? Compare it with each one's context (`n_positions`).
#
# Solutions: `lessons/solutions.md`, section "Lesson 3a".
