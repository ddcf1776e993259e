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
# # Lesson 3b: what fits at scale
#
# Lesson 3a counted one training step of the tiny model: 16 bytes a trained
# parameter of weights, gradients and AdamW state, plus activations that
# grow with the batch. The same estimator (`memory.estimate`, a closed form
# that builds no arrays) works at any size. This lesson uses it where the
# count decides what a card can train.
#
# **What you will learn**
#
# 1. The course's rule of thumb, 1B parameters take about 4 GB to store and
#    about 24 GB to train (course notes), and the batch and sequence length
#    at which it holds.
# 2. Scaled up to 7B and 65B parameters: what LoRA, prompt tuning and BitFit
#    remove (gradients and optimizer state), what they keep (the frozen
#    weights and most activations), and which card (a 24 GB card, a 48 GB
#    card, an 80 GB card) each fits.
# 3. Gradient checkpointing: the lever that does cut activations, with
#    gradients identical to the last bit.

# %%
import numpy as np

from minipeft import memory
from minipeft.tools import lessons

plt = lessons.setup()
MiB, GiB = memory.MiB, memory.GiB
T = 128                                        # the reference sequence length (lesson 3a)

# %% [markdown]
# ## 1. The rule of thumb at 1B
#
# "1B parameters: about 4 GB to store, about 24 GB to train" (course notes).
# In fp32 that is 4 bytes a parameter to store and 16 bytes a parameter of
# training state, so the rule allots **8 bytes a parameter** to activations
# and temporaries. `memory.rule_of_thumb` finds, for a 1B GPT (LLaMA-1B's
# widths, GPT-2's layers), the batch at which activations and the other live
# arrays reach those 8 bytes a parameter, at four sequence lengths:

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


# %%
tokens = {t: rot[t]["batch"] * t for t in rot}
held = [t for t in rot if rot[t]["batch"] >= 1]
lessons.say(
    f"The 1B GPT has {n1b / 1e9:.2f} billion parameters. The rule holds at "
    + ", ".join(f"{tokens[t]:,.0f} tokens a step ({rot[t]['batch']:.1f} x {t})" for t in held)
    + (f"; at {max(rot):,d} positions a single sequence already takes more, "
       if max(rot) not in held else "; ")
    + "because attention's $T^2$ term grows faster than the rest. The picture: bytes a parameter "
    "(training state + activations, all added) against the tokens in the batch, with the rule's "
    "24 and the batches the table found. Each line is straight: at a fixed length, activations "
    "are affine in the batch; the longer the sequence, the steeper its line.")

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

# %%
r512 = rot[512]
lessons.say(
    "**What to notice:** each dot sits near where its line crosses the rule's 24 bytes a parameter, and "
    "the table's last column, the step's real peak, is lower than the rule's sum "
    f"({r512['estimate'].peak / GiB:.0f} GiB instead of {rule_sum(r512['estimate']) / GiB:.0f} at "
    "length 512), because backward frees each activation as the gradients appear, so the two are "
    "never all alive at once. The rule of thumb adds them anyway: a safe margin.")
for t in (256, 512, 1024):
    assert 6.5 < rot[t]["act_per_param"] < 9.5
    assert rot[t]["estimate"].peak < rule_sum(rot[t]["estimate"])

# %% [markdown]
# ## 2. Scaled up: 7B and 65B, and what PEFT changes
#
# Now the sizes people train. `memory.fit_table` estimates one training step
# (`batch_size=1`, `seq_len=512`, AdamW) of full fine-tuning, LoRA (`r=8` on
# `c_attn`), prompt tuning (`num_virtual_tokens=20`) and BitFit at 7B and
# 65B, in fp32, in mixed precision, and with the frozen weights at half a
# byte (`mixed-int4`, the rule of thumb for QLoRA's recipe, constants left
# out; lesson 12 counts NF4's exact bytes; full fine-tuning freezes nothing,
# so there it is mixed precision), and says which card each one fits.

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

# %%
s7 = parts(fit["7b", "full", "mixed"]["estimate"])[1]
s65 = parts(fit["65b", "full", "mixed"]["estimate"])[1]
s_peft = max(parts(fit[size, m, "mixed"]["estimate"])[1]
             for size in ("7b", "65b") for m in ("lora", "prompt", "bitfit"))
w65 = parts(fit["65b", "lora", "mixed"]["estimate"])[0]
a7 = {m: parts(fit["7b", m, "mixed"]["estimate"])[2] for m in ("full", "lora")}
lessons.say(f"""**What to notice**, per category:

* **Gradients and optimizer state** go from {s7 / GiB:,.0f} GiB (7B) and {s65 / GiB:,.0f} GiB
  (65B) to at most {s_peft / GiB:.2f} GiB: PEFT's big saving, 12 or 14 bytes for every frozen
  parameter.
* **The weights** stay: a frozen weight still has to be there for the forward and backward
  passes. At 65B they alone ({w65 / GiB:,.0f} GiB in 16 bits) fit no card; only storing them in
  4 bits (QLoRA) brings LoRA onto a 48 GB card.
* **Activations** shrink far less (7B LoRA keeps {a7['lora'] / GiB:.1f} of full fine-tuning's
  {a7['full'] / GiB:.1f} GiB). Each method still passes the gradient through every layer down to
  its first trained part, so attention, GELU and the LayerNorms keep what they keep. At a batch
  people train with, they are most of the step:""")
assert s_peft < 0.01 * min(s7, s65) and w65 > 80 * GiB
assert fit["65b", "lora", "mixed-int4"]["fits"][48] and not fit["65b", "lora", "mixed"]["fits"][80]
assert a7["lora"] > 0.5 * a7["full"]

# %%
real = {}
for ckpt in (False, True):
    for r in memory.fit_table(presets=("7b",), methods=("full", "lora", "prompt", "bitfit"),
                              dtypes=("mixed",), batch_size=16, seq_len=1024, cards=cards,
                              gradient_checkpointing=ckpt):
        real[r["method"], ckpt] = r
print("7B, mixed precision, batch 16 x 1024 (GiB):")
table_rows = []
for m in ("full", "lora", "prompt", "bitfit"):
    w, s, a = parts(real[m, False]["estimate"])
    a_ck = parts(real[m, True]["estimate"])[2]
    fits = [c for c in cards if real[m, False]["fits"][c]]
    fits_ck = [c for c in cards if real[m, True]["fits"][c]]
    table_rows.append([m, w / GiB, s / GiB, a / GiB, real[m, False]["peak"] / GiB,
                       str(fits or "-"), a_ck / GiB, real[m, True]["peak"] / GiB,
                       str(fits_ck or "-")])
print(lessons.table(table_rows, ["method", "weights", "grad+state", "activ.", "peak", "fits",
                                 "ckpt activ.", "ckpt peak", "ckpt fits"],
                    ["", ".1f", ".2f", ".1f", ".1f", "", ".1f", ".1f", ""]))
a_l, a_f = (parts(real[m, False]["estimate"])[2] for m in ("lora", "full"))
tok = real["lora", False]["estimate"]
lessons.say(
    f"At {16 * 1024:,d} tokens a step, LoRA's activations are {a_l / GiB:.0f} GiB, "
    f"{100 * a_l / a_f:.0f}% of full fine-tuning's: the PEFT method no longer decides the memory, "
    "the batch does. The right-hand columns show the lever that does cut activations.")

# %% [markdown]
# ## 3. Gradient checkpointing: trading compute for activations
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

# %%
w_s_full = sum(parts(real["full", True]["estimate"])[:2])
lessons.say(
    f"**What to notice:** the checkpointed bars are lower, activations by "
    f"{100 * (1 - ckpt.accounted['activations'] / plain.accounted['activations']):.0f}%, and the "
    f"largest gradient difference is {ck['max_grad_diff']:g}: identical, not merely close, "
    "because checkpointing replays the same computation in the same order. At 7B it is what makes "
    "LoRA at 16 x 1024 fit a 24 GB card (the table above), while full fine-tuning, with its "
    f"{w_s_full / GiB:.0f} GiB of weights and training state, still fits none: there "
    "checkpointing cuts the part that was not the problem.")
assert ck["max_grad_diff"] == 0.0
assert ckpt.accounted["activations"] < 0.5 * plain.accounted["activations"]
assert real["lora", True]["fits"][24] and not real["full", True]["fits"][80]

# %%
lessons.say(f"""## The claim, checked

* The rule of thumb: a 1B model takes about {e1b.bytes['weights_trainable'] / GiB:.1f} GiB to store
  and 16 bytes a parameter of training state, and the estimator finds batches at which
  activations add about 8 bytes a parameter more: {rule_sum(rot[512]['estimate']) / GiB:.0f} GiB or so
  in all.
* At 7B and 65B, LoRA, prompt tuning and BitFit cut gradients and optimizer state to under 1% of
  full fine-tuning's, but keep over half of its activations; at batch 1 x 512 in mixed precision
  they fit a 24 GB card at 7B (full fine-tuning fits no card), and at 65B they fit a 48 GB card
  only with 4-bit frozen weights.
* Gradient checkpointing cuts accounted activations by more than half with bit-identical
  gradients, and brings 7B LoRA at 16 x 1024 onto a 24 GB card.
""")

# %%
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
# 1. The reference model carries far more bytes a parameter of activations at
#    its reference batch than the 1B model does at the rule's batches (print
#    `act_per_param` for both). From the closed form, how many tokens a step
#    put a model of width $C$ at 8 bytes a parameter of activations (ignore
#    attention's square and the head)?
# 2. What is the largest batch of `seq_len=2048` sequences with which 7B LoRA
#    (mixed precision) fits a 24 GB card, with and without gradient
#    checkpointing? And 65B QLoRA (`dtype="mixed-int4"`) on an 80 GB card?
#
# Solutions: `lessons/solutions.md`, section "Lesson 3b".
