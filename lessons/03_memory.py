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
# # Lesson 3: why full fine-tuning is expensive
#
# A model that takes 4 GB to store takes about 24 GB to train. Training
# keeps, besides the weights, a gradient for every weight that trains, the
# optimizer's running averages of those gradients, and whatever the forward
# pass saved for the backward pass (lesson 2's activation ledger). This
# lesson counts each of those, on the tiny model where every byte can be
# checked, and then scales the count up to models with billions of
# parameters, where it decides what fits on which card.
#
# **What you will learn**
#
# 1. The categories of training memory (weights, gradients, optimizer state,
#    activations, other live arrays), counted three ways on one training
#    step of the reference model: by formula (*estimated*), by the engine's
#    own books (*accounted*) and by the memory allocator (*measured*); where
#    the three agree to the byte, and why they differ where they do.
# 2. The bytes-per-parameter rule: fp32 AdamW holds 4 + 4 + 8 = 16 bytes a
#    parameter before a single activation is saved, 12 of them only for what
#    trains.
# 3. Activations: what keeps them, how they grow with the batch and the
#    sequence, and why they dominate at the reference batch.
# 4. The course's rule of thumb (1B parameters: about 4 GB to store, about
#    24 GB to train), and the batch and sequence length at which it holds.
# 5. Scaled up to 7B and 65B parameters: what LoRA, prompt tuning and BitFit
#    remove (gradients and optimizer state), what they keep (the frozen
#    weights and most activations), and which cards (24, 48, 80 GB) each fits.
# 6. Gradient checkpointing: the lever that does cut activations, with
#    gradients identical to the last bit.

# %%
import tempfile
from pathlib import Path

import numpy as np
from IPython.display import Image, display

from minipeft import lessons, memory
from minipeft.base import load_base
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
# base, at the reference batch: 16 windows of 128 characters of the
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
#   the formula and the books count the same arrays, once from a shape-only
#   build of the model that the method plans itself into (no weights
#   allocated), once from the real model. The activations agree too: each
#   layer's `trace`, beside its `forward`, applies each operator's rule for
#   what it saves (a Linear keeps its input only if its weight trains,
#   attention keeps q, k, v and the exponentiated scores, GELU its
#   input...), as the engine does.
# * **Accounted against measured.** Between operators (start, end of
#   forward, end of backward, after the update) the allocator's bytes equal
#   the books' to the byte: no array escapes the books. Inside an operator
#   they do not: the measured peak is higher, because operators compute in
#   temporaries that no book holds while they run (GELU's backward works in
#   two scratch arrays of its input's size, 8 MiB here) and Python objects
#   (graph nodes, tensor wrappers) take memory too.
# * **The estimated peak** is a little above the accounted one: it assumes
#   the largest in-flight gradients sit beside *all* the activations, while
#   in the real step the head's and the top block's activations are already
#   freed when those gradients peak.
#
# The same table for LoRA differs in what trains. Side by side, the books:

# %%
print(f"{'category (MiB, accounted)':<30}{'full':>10}{'LoRA r=8':>10}")
for cat in memory.CATEGORIES:
    print(f"{memory.LABELS[cat]:<30}" + "".join(
        f"{reports[m].accounted[cat] / MiB:>10.3f}" for m in methods))
print(f"{'peak, accounted':<30}" + "".join(f"{reports[m].accounted_peak / MiB:>10.3f}"
                                           for m in methods))
print(f"{'peak, measured':<30}" + "".join(f"{reports[m].measured_peak / MiB:>10.3f}"
                                          for m in methods))
print()
print(reports["lora"].estimated.breakdown())

# %% [markdown]
# LoRA's gradients and optimizer state nearly vanish: 16,384 entries train
# instead of 822,016. Its activations shrink by much less: the frozen
# `c_proj`, `c_fc` and `mlp.c_proj` keep no input (no weight gradient will
# be formed), but attention, GELU and the LayerNorms must still pass the
# gradient down to block 0's LoRA, so they keep theirs.
#
# `memory.plot` draws the three views as stacked bars at each one's peak:
# the estimate, the books (by category) and the allocator (what was alive
# at the start, and what the step added up to its peak).

# %%
png = memory.plot([reports["full"], reports["lora"]],
                  str(Path(tempfile.mkdtemp(prefix="minipeft_lesson03_")) / "views.png"))
display(Image(filename=png))

# %% [markdown]
# ## 2. Sixteen bytes a parameter
#
# For every parameter that trains, fp32 AdamW keeps the weight (4 bytes), its
# gradient (4) and two moments (4 + 4): **16 bytes**, whatever the batch.
# A frozen parameter costs only its weight. So PEFT's saving on this part is
# 12 bytes for every parameter it freezes. We check both on the books of the
# step we just ran.

# %%
full, lora = reports["full"].accounted, reports["lora"].accounted
n_full = models["full"].num_parameters()
n_lora_trained, n_lora_all = models["lora"].get_nb_trainable_parameters()
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
# (4 + 4 + 4): 16 bytes again. Only *frozen* weights get cheaper, down to a
# byte or half a byte when stored in 8 or 4 bits (QLoRA). The recipes the
# estimator knows:

# %%
moments = memory.OPTIMIZERS["adamw"]
print(f"{'recipe':<7}{'weight':>7}{'grad':>6}{'master':>8}{'moments':>9}{'trained':>9}"
      f"{'frozen':>8}   bytes a parameter")
for name, p in memory.DTYPES.items():
    trained = p.weight + p.grad + p.master + moments * p.moment
    print(f"{name:<7}{p.weight:>7g}{p.grad:>6g}{p.master:>8g}{moments * p.moment:>9g}"
          f"{trained:>9g}{p.frozen:>8g}")
per_param = {(size, dt): memory.estimate(size, "full", dtype=dt, batch_size=1,
                                         seq_len=64).training_bytes_per_param
             for size in ("reference", "7b") for dt in ("fp32", "mixed")}
print("\nestimated weights + gradients + AdamW state per parameter, full fine-tuning:", per_param)

# %% [markdown]
# ## 3. Activations: the part that grows with the batch
#
# The 16 bytes a parameter do not depend on the batch. The activations do:
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
# gradients and AdamW state, 16 bytes x 822,016.

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

# %% [markdown]
# The activations pass the weights, gradients and state together at a few
# hundred tokens, and at the reference batch (2,048 tokens) they are most of
# the step's peak. The tiny model is an extreme case: its activations per
# token are about $64LC$ bytes against $16 \cdot 12LC^2$ bytes of training
# state, so the wider the model, the more tokens it takes for activations to
# catch up. Which is where the rule of thumb comes in.
#
# ## 4. The rule of thumb at 1B
#
# "1B parameters: about 4 GB to store, about 24 GB to train." In fp32 that
# is 4 bytes to store and 16 of training state, so the rule allots **8 bytes a
# parameter** to activations and temporaries. `memory.rule_of_thumb` finds,
# for a 1B GPT (LLaMA-1B's widths, GPT-2's layers; 1.08 billion parameters),
# the batch at which activations and the other live arrays reach those 8
# bytes, at four sequence lengths:

# %%
rows = memory.rule_of_thumb("1b", seq_lens=(256, 512, 1024, 2048))
print(memory.format_rule_of_thumb(rows))
rot = {r["seq_len"]: r for r in rows}
e1b = rows[0]["estimate"]
n1b = e1b.n_params
train_state_1b = e1b.bytes["weights_trainable"] + e1b.bytes["gradients"] + e1b.bytes["optimizer"]


def rule_sum(e):
    """The rule's sum: training state plus activations and other live arrays, all added."""
    return sum(e.bytes[c] for c in ("weights_trainable", "gradients", "optimizer",
                                    "activations", "other"))


# %% [markdown]
# The rule holds at 2,000 to 2,600 tokens a step (about 10 x 256, 5 x 512 or
# 2 x 1024); at 2,048 positions a single sequence already takes more,
# because attention's $T^2$ term grows faster than the rest. The picture:
# bytes a parameter (training state + activations, all added) against the
# tokens in the batch, with the rule's 24 and the batches the table found.
# Each line is straight: at a fixed length, activations are affine in the
# batch; the longer the sequence, the steeper its line.

# %%
fig, ax = plt.subplots()
for i, t in enumerate(rot):
    bs = np.arange(1, 8192 // t + 1)
    per = [rule_sum(memory.estimate("1b", "full", batch_size=int(b), seq_len=t)) / n1b for b in bs]
    ax.plot(bs * t, per, color=f"C{i}", label=f"T = {t}")
    r = rot[t]
    ax.scatter([r["batch_int"] * t], [rule_sum(r["estimate"]) / n1b], color=f"C{i}", zorder=3)
ax.axhline(16, color="k", ls="--", lw=0.8, label="weights + gradients + AdamW: 16")
ax.axhline(24, color="C3", ls=":", label="the rule of thumb: 24")
ax.set_xlabel("tokens in the batch (B x T)")
ax.set_ylabel("bytes a parameter")
ax.set_title(f"1B GPT ({n1b / 1e9:.2f}B parameters), full fine-tuning in fp32")
ax.legend(fontsize=7)
plt.show()

# %% [markdown]
# Note the table's last column: the step's real peak is lower than the
# rule's sum (about 20 GiB instead of 24), because backward frees each
# activation as the gradients appear, so the two are never all alive at
# once. The rule of thumb adds them anyway: a safe margin.
#
# ## 5. Scaled up: 7B and 65B, and what PEFT changes
#
# Now the sizes people train. `memory.fit_table` estimates one training step
# (batch 1 x 512, AdamW) of full fine-tuning, LoRA (r = 8 on `c_attn`),
# prompt tuning (20 virtual tokens) and BitFit at 7B and 65B, in fp32, in
# mixed precision, and with the frozen weights at half a byte (`mixed-int4`,
# the rule of thumb for QLoRA's recipe, constants left out; lesson 12 counts
# NF4's exact bytes; full fine-tuning freezes nothing, so there it is mixed
# precision), and says which card each one fits.

# %%
cards = (24, 48, 80)
fit = {(r["preset"], r["method"], r["dtype"]): r
       for r in memory.fit_table(presets=("7b", "65b"), methods=("full", "lora", "prompt", "bitfit"),
                                 dtypes=("fp32", "mixed", "mixed-int4"), batch_size=1, seq_len=512,
                                 cards=cards)}
print(memory.format_fit_table(list(fit.values())))


def parts(e):
    """Weights; gradients + optimizer state + method copies; activations + other live arrays."""
    b = e.bytes
    return (b["weights_frozen"] + b["weights_trainable"],
            b["gradients"] + b["optimizer"] + b["bookkeeping"], b["activations"] + b["other"])


# %% [markdown]
# In a picture, mixed precision (and LoRA on a 4-bit base), with the three
# cards as lines. The bars stack every category; the black mark is the
# estimated peak, which for full fine-tuning sits below the top of its bar:
# the gradients and the activations are never all alive at once.

# %%
bars = [("full", "mixed"), ("lora", "mixed"), ("prompt", "mixed"), ("bitfit", "mixed"),
        ("lora", "mixed-int4")]
fig, axes = plt.subplots(1, 2, figsize=(9, 3.8))
for ax, size, top in zip(axes, ("7b", "65b"), (110, 300)):
    for j, (m, dt) in enumerate(bars):
        e, bottom = fit[size, m, dt]["estimate"], 0.0
        for k, (label, v) in enumerate(zip(("weights", "gradients + state", "activations + other"),
                                           parts(e))):
            ax.bar(j, v / GiB, bottom=bottom, color=f"C{k}", label=label if j == 0 else None)
            bottom += v / GiB
        ax.plot([j - 0.4, j + 0.4], [e.peak / GiB] * 2, color="k", lw=2,
                label="estimated peak" if j == 0 else None)
        if bottom > top:                      # a bar taller than the panel: say how tall
            ax.text(j, 0.97 * top, f"peak\n{e.peak / GiB:,.0f}\nGiB", ha="center", va="top",
                    fontsize=7, color="w")
    for c, ls in zip(cards, (":", "--", "-.")):
        ax.axhline(c, color="k", ls=ls, lw=0.8)
        ax.text(len(bars) - 0.5, c, f"{c} GB", fontsize=7, va="bottom", ha="right")
    ax.set_ylim(0, top)
    ax.set_xticks(range(len(bars)), [f"{m}\n{dt}" for m, dt in bars], fontsize=8)
    ax.set_title(f"{size}: one step, batch 1 x 512", fontsize=9)
axes[0].set_ylabel("GiB (categories stacked)")
axes[1].legend(fontsize=7, loc="upper right")
fig.tight_layout()
plt.show()

# %% [markdown]
# Read it per category:
#
# * **Gradients and optimizer state** go from 86 GiB (7B) and 844 GiB (65B)
#   to a few hundredths or tenths of a GiB: PEFT's big saving, 12 or 14 bytes
#   for every frozen parameter.
# * **The weights** stay: a frozen weight still has to be there for the
#   forward and backward passes. At 65B they alone (120 GiB in 16 bits) fit
#   no card; only storing them in 4 bits (QLoRA) brings LoRA onto a 48 GB card.
# * **Activations** shrink far less. Each method still passes the gradient
#   through every layer down to its first trained part, so attention, GELU
#   and the LayerNorms keep what they keep. At batch 1 x 512 that is a
#   couple of GiB; at a batch people train with, it is most of the step:

# %%
real = {}
for ckpt in (False, True):
    for r in memory.fit_table(presets=("7b",), methods=("full", "lora", "prompt", "bitfit"),
                              dtypes=("mixed",), batch_size=16, seq_len=1024, cards=cards,
                              gradient_checkpointing=ckpt):
        real[r["method"], ckpt] = r
print("7B, mixed precision, batch 16 x 1024 (GiB):")
print(f"{'method':<8}{'weights':>9}{'grad+state':>12}{'activ.':>9}{'peak':>8}"
      f"{'fits':>14}   with checkpointing: activ., peak, fits")
for m in ("full", "lora", "prompt", "bitfit"):
    w, s, a = parts(real[m, False]["estimate"])
    a_ck = parts(real[m, True]["estimate"])[2]
    fits = [c for c in cards if real[m, False]["fits"][c]]
    fits_ck = [c for c in cards if real[m, True]["fits"][c]]
    print(f"{m:<8}{w / GiB:>9.1f}{s / GiB:>12.2f}{a / GiB:>9.1f}{real[m, False]['peak'] / GiB:>8.1f}"
          f"{str(fits or '-'):>14}   {a_ck / GiB:>6.1f}, {real[m, True]['peak'] / GiB:5.1f}, "
          f"{fits_ck or '-'}")

# %% [markdown]
# At 16,384 tokens a step, LoRA's activations are over 70 GiB, three
# quarters of full fine-tuning's: the PEFT method no longer decides the
# memory, the batch does. The right-hand columns show the lever that does cut
# activations.
#
# ## 6. Gradient checkpointing: trading compute for activations
#
# With gradient checkpointing each block keeps only its input during the
# forward pass; backward runs the block's forward again (under the same
# dropout masks) to get its activations back, one block at a time. The
# memory of $L$ blocks' activations becomes $L$ inputs plus one block's
# activations; the price is a second forward pass of every block.
# `memory.checkpointing_tradeoff` profiles a step both ways from the same
# weights and batch, times three more of each (shown, not asserted: the
# time is this machine's) and compares the gradients.

# %%
ck = memory.checkpointing_tradeoff("reference", "full", batch_size=lessons.pick(16, 8), seq_len=T)
print(memory.format_checkpointing(ck))
plain, ckpt = ck["plain"], ck["checkpointed"]

fig, ax = plt.subplots()
labels = ["activations,\naccounted", "peak,\naccounted", "peak,\nmeasured"]
for k, (name, rep) in enumerate((("plain", plain), ("checkpointed", ckpt))):
    vals = [rep.accounted["activations"], rep.accounted_peak, rep.measured_peak]
    ax.bar(np.arange(3) + 0.4 * k, np.array(vals) / MiB, 0.4, label=name)
ax.set_xticks(np.arange(3) + 0.2, labels)
ax.set_ylabel("MiB")
ax.set_title(f"Gradient checkpointing, batch {plain.batch_size} x {plain.seq_len}: "
             f"largest gradient difference {ck['max_grad_diff']:g}", fontsize=9)
ax.legend()
plt.show()

# %% [markdown]
# The gradients are identical, not merely close: checkpointing replays the
# same computation in the same order. At 7B it is what makes LoRA at
# 16 x 1024 fit a 24 GB card (the table above), while full fine-tuning, with
# its 98 GiB of weights and training state, still fits none: there
# checkpointing cuts the part that was not the problem.
#
# ## The claim, checked
#
# * fp32 AdamW holds exactly 16 bytes a trained parameter before
#   activations (4 + 4 + 8, counted by the books), and so does ZeRO's mixed
#   precision (2 + 2 + 12); LoRA pays 12 bytes of gradient and state per
#   trained parameter and 4 per frozen one.
# * Estimated equals accounted, to the byte, for weights, gradients and
#   optimizer state (and here for activations too, at every point of the
#   sweep); between operators the allocator agrees with the books to the
#   byte; the accounted peak is never above the measured one, and within
#   25% of it.
# * At the reference batch activations dominate: they are more than half of
#   the step's accounted peak and over five times the weights, gradients and
#   state together; they grow with the batch, and LoRA keeps most of them.
# * The rule of thumb: a 1B model takes about 4 GiB to store and 16 bytes a
#   parameter of training state, and the estimator finds batches at which
#   activations add about 8 more: 24 GiB or so in all.
# * At 7B and 65B, LoRA, prompt tuning and BitFit cut gradients and optimizer
#   state to under 1% of full fine-tuning's, but keep over half of its
#   activations; at batch 1 x 512 in mixed precision they fit a 24 GB card at
#   7B (full fine-tuning fits no card), and at 65B they fit a 48 GB card
#   only with 4-bit frozen weights.
# * Gradient checkpointing cuts accounted activations by more than half with
#   bit-identical gradients, and brings 7B LoRA at 16 x 1024 onto a 24 GB card.

# %%
rf, rl = reports["full"], reports["lora"]
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
# the rule of thumb at 1B: ~4 GiB to store, 16 bytes of state, ~8 of activations, ~24 GiB
assert 3.9 * GiB < e1b.bytes["weights_trainable"] < 4.5 * GiB
assert train_state_1b == 16 * n1b
for t in (256, 512, 1024):
    r = rot[t]
    assert 6.5 < r["act_per_param"] < 9.5
    assert 1800 < r["batch"] * t < 2800                            # tokens a step
    assert 20 * GiB < rule_sum(r["estimate"]) < 28 * GiB
    assert r["estimate"].peak < rule_sum(r["estimate"])            # the rule adds; the peak is lower
# 7B and 65B: PEFT shrinks gradients + state, not activations; what fits where
for size in ("7b", "65b"):
    _, s_full, a_full = parts(fit[size, "full", "mixed"]["estimate"])
    assert not any(fit[size, "full", dt]["fits"][c] for dt in ("fp32", "mixed") for c in cards)
    for m in ("lora", "prompt", "bitfit"):
        _, s, a = parts(fit[size, m, "mixed"]["estimate"])
        assert s < 0.01 * s_full and a > 0.5 * a_full, (size, m)
        if size == "7b":
            assert fit[size, m, "mixed"]["fits"][24] and not fit[size, m, "fp32"]["fits"][24]
        else:
            assert not fit[size, m, "mixed"]["fits"][80]
            assert fit[size, m, "mixed-int4"]["fits"][48] and \
                not fit[size, m, "mixed-int4"]["fits"][24]
# gradient checkpointing: identical gradients, activations cut by more than half
assert ck["max_grad_diff"] == 0.0
assert ckpt.accounted["activations"] < 0.5 * plain.accounted["activations"]
assert ckpt.accounted["gradients"] == plain.accounted["gradients"]
assert ckpt.estimated.bytes["activations"] == ckpt.accounted["activations"]
assert ckpt.measured_peak < plain.measured_peak
assert not real["lora", False]["fits"][80] and real["lora", True]["fits"][24]
assert not real["full", True]["fits"][80]
print("all claims hold")

# %% [markdown]
# ## Exercises
#
# 1. Profile full fine-tuning, BitFit (`BitFitConfig()`) and prompt tuning
#    (`PromptTuningConfig(num_virtual_tokens=20)`) on one batch of 16 x 108
#    (108 characters and 20 virtual tokens fill the 128 positions). Which
#    categories shrink? Prompt tuning trains fewer than half as many
#    parameters as BitFit: why does it keep more activations?
# 2. How many bytes a parameter of training state do plain SGD and SGD with
#    momentum hold in fp32 (`optimizer="sgd"`, `"sgd_momentum"`)? Check with
#    `memory.estimate`.
# 3. Attention's $n_h B T^2$ overtakes the rest of a block's $16NC$ once
#    $n_h T > 16C$. At what sequence length is that for each preset in
#    `memory.PRESETS`? Compare it with each one's context (`n_positions`).
# 4. The reference model is at about 106 bytes a parameter of activations at
#    16 x 128, the 1B model at 8 bytes with 2,000 to 2,600 tokens. From the
#    closed form, how many tokens a step put a model of width $C$ at 8 bytes
#    a parameter of activations (ignore attention's square and the head)?
# 5. What is the largest batch of 2,048-token sequences with which 7B LoRA
#    (mixed precision) fits a 24 GB card, with and without gradient
#    checkpointing? And 65B QLoRA (`dtype="mixed-int4"`) on an 80 GB card?
#
# Solutions: `lessons/solutions.md`, section "Lesson 3".
