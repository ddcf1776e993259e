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
# # Lesson 9: the trade-offs
#
# Lessons 4 to 8 took the methods one family at a time. This one puts all
# nine side by side, fine-tuned from the same base on the same task with the
# same budget, in the table `minipeft compare` prints: a row per method, a
# group of columns per axis of the trade-off. Then it reads the table twice:
# once along the taxonomy (selective, reparameterization, additive), once
# along the five axes (parameter efficiency, memory efficiency, training
# speed, model quality, inference cost).
#
# **What you will learn**
#
# 1. How `minipeft compare` keeps a comparison fair: one budget of optimizer
#    steps for every method, the same batches in the same order, each
#    method's own learning rate, the test split touched once.
# 2. What a method's *family* decides before any training: whether it can
#    leave the model as a plain GPT, what it stores, what it adds at inference.
# 3. Which columns are *counts* (parameters, bytes, FLOPs: exact, the same
#    after a handful of steps as after thousands) and which are
#    *measurements* (quality, time: they need a real budget, several seeds,
#    one machine).
# 4. The central claim: **no method wins on every axis**. On the cost axes,
#    full fine-tuning is beaten everywhere by training the last block alone,
#    and an element mask by BitFit; what the two buy is quality.

# %%
import math
import os
import tempfile

import numpy as np
from IPython.display import Image, display

from minipeft.tools import lessons
from minipeft.workflows.base import load_base
from minipeft.workflows.compare import (CompareSettings, build_method, compare, default_configs,
                                        memory_batch)
from minipeft.data import get_task
from minipeft.io import load_tensors
from minipeft.peft.config import LR_GRID, best_known_lr
from minipeft.peft.model import ADAPTER_WEIGHTS
from minipeft.peft.selective import mask_state_bytes

plt = lessons.setup()

# %% [markdown]
# ## 1. The comparison
#
# `compare(settings)` fine-tunes a fresh copy of the shipped base with each
# method (the configs of `minipeft finetune`, `default_configs()`: LoRA on
# `c_attn`, Houlsby adapters, soft prompts, a random mask of every Linear in
# the blocks, the last block for layer selection; printed below) and
# measures every row the same way. The rules it prints above the table are
# the point:
#
# * **one budget**: the same number of optimizer steps of `batch_size`
#   examples, on the same batches in the same order, with the same schedule,
#   clipping and AdamW (the same *steps*, not the same wall time);
# * **each method's own learning rate**: a soft prompt needs steps a
#   thousand times larger than full fine-tuning's. `minipeft compare` picks
#   each rate from a small grid on the validation split; here, to run in a
#   few minutes, each method uses the middle of its grid (`LR_GRID`), the
#   rate known to work best on this base;
# * **the test split is scored once**, at the end.
#
# The nine methods here are the course's three families, lessons 4 to 8.
# `minipeft compare` also has rows for the methods that come later: QLoRA
# (lesson 12: LoRA on a quantized base), LoRA-FA and ladder side-tuning
# (lesson 13: the methods that cut activations).

# %%
COURSE = ("full", "bitfit", "layers", "mask", "lora", "adapter", "prompt", "prefix", "ia3")
settings = CompareSettings(
    task="sentiment", seeds=(0,), methods=COURSE,
    lr_grid={m: (best_known_lr(m),) for m in LR_GRID},     # no grid search: the best-known rate
    steps=lessons.pick(150, 8), warmup=lessons.pick(20, 2), eval_every=lessons.pick(25, 8),
    val_limit=lessons.pick(64, 16), test_limit=lessons.pick(200, 32),
    forget_batches=lessons.pick(8, 1), gen_prompts=lessons.pick(4, 1), gen_tokens=lessons.pick(32, 8))
result = compare(settings, progress=False)
rows = {r["method"]: r for r in result.rows}
ctx = result.context
for name, cfg in default_configs().items():
    if name in COURSE:
        print(f"{name:8s} {cfg}")
print()
print(result.table(wide=True))          # every column: the sections below read them all
lessons.say(f"One seed, {settings.steps} steps of {settings.batch_size} examples: enough to read the "
            "counts, not enough to rank close scores (exercise 1 adds seeds)"
            + (". In the fast setting the steps are too few to learn the task at all: read its "
               "counts, and run the full setting for the scores." if lessons.FAST else "."))

# %% [markdown]
# The figure `minipeft compare` writes beside the table (`results.png`):
# on the left, the accounted memory of one training step at its peak, by
# category (the measured peak as a black tick); on the right, the test score
# against the trainable fraction of the parameters.

# %%
display(Image(result.figure_png()))

# %%
act_share = {x: result.peaks[x]["activations"] / sum(result.peaks[x].values()) for x in rows}
lessons.say("**What to notice:** on the left, activations are the largest part of every method's "
            f"bar ({100 * min(act_share.values()):.0f}% to {100 * max(act_share.values()):.0f}% of "
            "the peak), whatever the method trains; on the right, the scores of one seed"
            + (" after the fast setting's few steps, which say nothing yet about quality."
               if lessons.FAST else ", to be read with their noise (section 3)."))
assert all(max(result.peaks[x], key=result.peaks[x].get) == "activations" for x in rows)

# %% [markdown]
# ## 2. Read by family
#
# The package tags each config with its family (`config.family`), and
# `compare` copies it into every row. Full fine-tuning is the baseline: the
# selective limit where everything is selected.
#
# * **Selective** methods (BitFit, layer selection, element masks) train some
#   of the base's own weights, in place. After training the weights are a
#   plain GPT's: nothing runs at inference that did not run before, and there
#   is nothing to merge. Their file holds the chosen values (a mask's, their
#   positions too).
# * **Reparameterization** (LoRA) trains a low-rank update $\frac{\alpha}{r}AB$
#   that runs beside a frozen weight while training and folds into it
#   afterwards: no inference cost once merged.
# * **Additive** methods put new trainable parts into the model. Bottleneck
#   adapters are new layers in the path of every token; soft prompts are new
#   positions in every context. Neither can be folded into a weight. (IA)³ is
#   the exception: its vectors rescale the columns of existing weights, so
#   it merges like LoRA.
#
# Below, the table again, grouped by family, with two columns the table
# implies: whether the method can merge (`mergeable`), and the extra FLOPs a
# token pays *as deployed* (after merging where the method can).

# %%
FAMILIES = ("baseline", "selective", "reparameterization", "additive")
COLORS = dict(zip(FAMILIES, ("C7", "C0", "C1", "C2")))
order = [x for f in FAMILIES for x, row in rows.items() if row["family"] == f]
mergeable = {x: rows[x]["extra_flops_merged"] is not None for x in order}
deployed_flops = {x: rows[x]["extra_flops_merged"] if mergeable[x] else rows[x]["extra_flops"]
                  for x in order}

print(lessons.table(
    [[rows[x]["family"], x, rows[x]["trainable"], rows[x]["mem_grad_opt_bytes"],
      rows[x]["mem_accounted_peak_mib"], "yes" if mergeable[x] else "-", rows[x]["extra_flops"],
      deployed_flops[x], rows[x]["adapter_bytes"] / 1000, rows[x]["test_mean"]] for x in order],
    ["family", "method", "trainable", "grad+opt B", "peak MiB", "mergeable", "+FLOPs/tok",
     "deployed", "file KB", "test"],
    ["", "", ",d", ",d", ".1f", "", ",d", ",d", ".1f", ".3f"]))

# %% [markdown]
# ## 3. Read by axis
#
# ### Parameter efficiency: counts that follow from the configs
#
# Every number of the `trainable` column is a formula in the shapes
# ($L$ blocks, $C$ wide) and one knob of the config: LoRA's rank
# $r$ on the fused $C \to 3C$ projection, the adapters' width $m$, the $P$
# virtual tokens, (IA)³'s key, value and inner-MLP scales, the biases, one
# block's weights, a mask's density. None depends on how long training ran.

# %%
base = load_base()
L, C = base.config.n_layer, base.config.n_embd
configs = default_configs()
r, m, P = configs["lora"].r, configs["adapter"].bottleneck, configs["prompt"].num_virtual_tokens
mask_model = build_method(configs["mask"], 0)
masked = [(p.size, int(p.grad_mask.sum())) for _, p in mask_model.base_model.named_parameters()
          if getattr(p, "grad_mask", None) is not None]
by_formula = {
    "full": base.num_parameters(),
    "bitfit": L * (3 * C + C + 4 * C + C + 2 * C) + C,   # c_attn, attn/mlp c_proj, c_fc, ln_1, ln_2; ln_f
    "layers": 12 * C * C + 13 * C,                       # one block
    "mask": sum(k for _, k in masked),                   # round(density * n) of each weight
    "lora": L * r * (C + 3 * C),
    "adapter": 2 * L * (2 * C * m + m + C),              # Houlsby: two a block
    "prompt": P * C,
    "prefix": L * 2 * P * C,                             # a key and a value per layer
    "ia3": L * (2 * C + 4 * C),
}
by_count = sorted(order, key=lambda x: rows[x]["trainable"])
print(lessons.table([[x, rows[x]["trainable"], rows[x]["trainable_pct"], by_formula[x]]
                     for x in by_count],
                    ["method", "trainable", "% of the base", "by formula"],
                    ["", ",d", ".4f", ",d"]))

# %% [markdown]
# ### Memory efficiency: the optimizer's bytes follow the count, the peak does not
#
# `grad+opt` is what the trainable count decides: with fp32 AdamW, **12
# bytes a trainable number** (4 of gradient, 8 of moments), for every method
# that freezes whole tensors. An element mask is the exception
# (lesson 4): its gradient is computed in full for every weight it touches,
# then masked, and AdamW keeps a moment pair and an int64 index for each
# selected entry (`mask_state_bytes`).
#
# The *peak* is another matter. At this size its largest part, for every
# method, is activations, which depend on how far back the gradient must flow
# and what each operator must save, not on how many numbers train: the peak
# column does not follow the trainable column. Prompt tuning also runs its
# $P$ virtual tokens through every layer, so its activations are those of a
# longer sequence ($T + P$ positions, printed below) than prefix tuning's,
# whose keys and values are given, not computed.

# %%
peaks = result.peaks
print(lessons.table(
    [[x, rows[x]["mem_grad_opt_bytes"], 12 * rows[x]["trainable"], rows[x]["mem_accounted_peak_mib"],
      peaks[x]["activations"] / 2**20, (peaks[x]["weights_frozen"] + peaks[x]["weights_trainable"])
      / 2**20] for x in by_count],
    ["method", "grad+opt B", "12 x trainable", "peak MiB", "activations MiB", "weights MiB"],
    ["", ",d", ",d", ".1f", ".1f", ".1f"]))
mask_books = sum(s["masked_gradient"] + s["masked_adam_state"] + s["indices"]
                 for s in (mask_state_bytes(n, k) for n, k in masked))
print(f"the mask: 4 x {sum(n for n, _ in masked):,d} entries of gradient + 16 x {by_formula['mask']:,d} "
      f"selected (moments, index) = {mask_books:,d} bytes")
T = ctx["memory_seq_len"]
print(f"activations at the peak, prompt / prefix tuning: "
      f"{peaks['prompt']['activations'] / peaks['prefix']['activations']:.3f} "
      f"(positions: ({T} + {P}) / {T} = {(T + P) / T:.3f})")

# %% [markdown]
# ### Training speed: a count behind the clock
#
# `ms/step` is a measurement of this machine, with whatever else runs on it;
# `steps>=` needs a budget long enough to reach the target. Behind both lies
# a count: the FLOPs of every matrix product one training step forms
# (`lessons.step_flops`, on the batch the memory was profiled on). The
# forward pass of a selective method is the base's, to the last FLOP (and so
# is (IA)³'s: its scaling is elementwise, not a matrix product); LoRA,
# adapters and prefixes add their inference FLOPs to every token; prompt
# tuning runs a longer sequence. In backward, **frozen means not computed**:
# every method that freezes whole tensors skips their weight-gradient
# products, while a mask computes them in full and then masks them.

# %%
batch = memory_batch(get_task(settings.task), settings.batch_size, settings.seeds[0])
flops = {x: lessons.step_flops(build_method(configs[x], 0, batch=batch), batch) for x in order}
tokens = flops["full"]["tokens"]
print(lessons.table([[x, flops[x]["forward"] / 1e9, flops[x]["backward"] / 1e9,
                      flops[x]["backward"] / flops[x]["forward"], rows[x]["ms_per_step"]]
                     for x in order],
                    ["method", "forward GFLOPs", "backward GFLOPs", "backward / forward", "ms/step"],
                    ["", ".3f", ".3f", ".2f", ".0f"]))

fig, ax = plt.subplots()
for x in order:
    total = (flops[x]["forward"] + flops[x]["backward"]) / 1e9
    ax.scatter(total, rows[x]["ms_per_step"], color=COLORS[rows[x]["family"]])
    ax.annotate(x, (total, rows[x]["ms_per_step"]), textcoords="offset points", xytext=(4, 3),
                fontsize=8)
ax.set_xlabel(f"GFLOPs of one training step (batch 16 x {T}), counted")
ax.set_ylabel("ms per step, measured")
ax.set_title("Training speed: the count behind the clock")
ax.legend([plt.Line2D([], [], ls="", marker="o", color=COLORS[f]) for f in FAMILIES], FAMILIES,
          fontsize=7)
plt.show()

# %%
step_total = {x: flops[x]["forward"] + flops[x]["backward"] for x in order}
cheapest, dearest = min(order, key=step_total.get), max(order, key=step_total.get)
lessons.say(f"**What to notice:** along the counted axis, {cheapest} sits leftmost "
            f"({step_total[cheapest] / 1e9:.2f} GFLOPs a step: the backward pass stops at the last "
            f"block) and {dearest} rightmost ({step_total[dearest] / 1e9:.2f}); the mask lies right "
            "of every method that freezes whole tensors. The vertical axis is this machine's clock: "
            "shown, not checked.")
assert cheapest == "layers"
assert all(step_total[x] < step_total["mask"] < step_total["full"] for x in order
           if x not in ("mask", "full"))

# %% [markdown]
# ### Model quality: a measurement, to be read with its noise
#
# The score on the test split, beside two baselines: always answering the
# majority label, and the base model as it is (which never answers in the
# task's format: 0). With one seed and a short budget these numbers move by
# several points from seed to seed (exercise 1): read large gaps, not
# rankings. (The README's table averages three seeds; this run has one.)

# %%
by_score = sorted(order, key=lambda x: -rows[x]["test_mean"])
print(lessons.table([[x, rows[x]["test_mean"]] for x in by_score]
                    + [["majority baseline", ctx["majority"]], ["base zero-shot", ctx["zero_shot"]]],
                    [f"test {ctx['metric']} ({ctx['n_test']} examples, {settings.steps} steps)", ""],
                    ["", ".3f"]))
above = [x for x in by_score if rows[x]["test_mean"] > ctx["majority"]]
lessons.say(
    "In this run " + ", ".join(f"{x} {rows[x]['test_mean']:.2f}" for x in by_score)
    + f"; {len(above)} of {len(order)} methods score above the majority baseline "
    f"({ctx['majority']:.2f})"
    + (f". {settings.steps} steps (the fast setting) are too few for any claim about quality; "
       "the full setting trains long enough to read it." if lessons.FAST else
       f". Soft prompts need more than {settings.steps} steps for $P$ vectors to steer a base that "
       "has never seen the task."))

# %% [markdown]
# ### Inference cost: merged, built in, or a longer context
#
# Per token, against the base's weight products (`base_flops`), the extra
# FLOPs (`extra_flops_per_token`) are fixed by the structure:
#
# * selective methods and full fine-tuning: 0, always;
# * LoRA: $2r(C + 3C)$ per target unmerged, **0 merged**; (IA)³: one multiply
#   per scaled channel, **0 merged**;
# * bottleneck adapters: $4Cm$ per adapter, two per block, for ever;
# * soft prompts: each token's query meets $P$ more keys and mixes $P$ more
#   values in every layer, $4LCP$ (and prompt tuning runs its $P$ tokens
#   through the model once per sequence, in the prefill).
#
# The `ms/token` column measures the same thing on this machine; at this
# size Python's overhead per operator hides most of it.

# %%
print(lessons.table([[x, rows[x]["extra_flops"],
                      f"{rows[x]['extra_flops_merged']:,d}" if mergeable[x] else "-",
                      100 * deployed_flops[x] / ctx["base_flops"]] for x in order],
                    ["method", "+FLOPs/token", "merged", "+% as deployed"], ["", ",d", "", ".1f"]))

# %% [markdown]
# ### Two more columns: storage and forgetting
#
# An adapter file (`save_pretrained`) holds the trained numbers and a small
# JSON header: 4 bytes a trainable number in float32 (a mask also stores an
# int32 position for each), against a full checkpoint's 4 bytes for every
# number of the model. We save each method's adapter, untrained (the size
# does not depend on the values), and compare its tensors with the count.
# The forgetting columns are lesson 10's subject. "dloss on" is the rise
# of the pretraining corpus's loss with the adapter active, the model as it
# is used: every method forgets some, and read at one equal budget of steps
# the column cannot say whether a frozen base forgets less. Each method
# runs at its own rate (the lr column: PEFT's are one to three orders of
# magnitude above full fine-tuning's) and learns the task to a different
# degree; lesson 10 traces learning against forgetting along training and
# compares the methods at matched task quality. "detached" is the base
# again by construction, and a detached adapter does not do the task.

# %%
files = {}
with tempfile.TemporaryDirectory() as d:
    for x in order:
        pm = build_method(configs[x], 0, batch=batch)
        pm.save_pretrained(os.path.join(d, x))
        path = os.path.join(d, x, ADAPTER_WEIGHTS)
        tensors, _ = load_tensors(path)
        files[x] = {"file": os.path.getsize(path), "tensors": sum(a.nbytes for a in tensors.values())}
print(lessons.table([[x, files[x]["file"], files[x]["tensors"],
                      files[x]["tensors"] / rows[x]["trainable"], 100 * rows[x]["adapter_fraction"]]
                     for x in by_count],
                    ["method", "file B", "tensors B", "B a trainable number",
                     f"% of a full checkpoint ({ctx['full_bytes']:,d} B)"],
                    ["", ",d", ",d", ".0f", ".1f"]))

# %% [markdown]
# ## 4. The table drawn by family
#
# One panel per axis, one bar per method, coloured by family; shorter is
# better everywhere except quality. (Training speed is drawn as the counted
# FLOPs of a step, inference cost as the extra FLOPs a token pays as
# deployed.)

# %%
panels = [
    ("trainable parameters", lambda x: rows[x]["trainable"], True),
    ("memory: MiB at the peak", lambda x: rows[x]["mem_accounted_peak_mib"], False),
    ("training: GFLOPs a step", lambda x: (flops[x]["forward"] + flops[x]["backward"]) / 1e9, False),
    (f"quality: test {ctx['metric']}", lambda x: rows[x]["test_mean"], False),
    ("inference: +kFLOPs/token", lambda x: deployed_flops[x] / 1e3, False),
]
fig, axes = plt.subplots(1, len(panels), figsize=(13, 3.6), sharey=True)
ys = np.arange(len(order))[::-1]
for ax, (title, value, log) in zip(axes, panels):
    ax.barh(ys, [value(x) for x in order], color=[COLORS[rows[x]["family"]] for x in order])
    ax.set_title(title, fontsize=9)
    if log:
        ax.set_xscale("log")
axes[0].set_yticks(ys)
axes[0].set_yticklabels(order)
axes[3].axvline(ctx["majority"], color="grey", ls="--", lw=1)
handles = [plt.Rectangle((0, 0), 1, 1, color=COLORS[f]) for f in FAMILIES]
fig.legend(handles, FAMILIES, loc="lower center", ncol=4, frameon=False, fontsize=8)
fig.tight_layout(rect=(0, 0.08, 1, 1))
plt.show()

# %%
peak_min = min(order, key=lambda x: rows[x]["mem_accounted_peak_bytes"])
train_min = min(order, key=lambda x: rows[x]["trainable"])
lessons.say(f"**What to notice:** no method has the shortest bar in every cost panel: {train_min} "
            f"trains the fewest numbers, {peak_min} has the lowest peak, and "
            f"{sum(deployed_flops[x] == 0 for x in order)} methods add nothing at inference.")
assert train_min != peak_min and train_min == "prompt" and peak_min == "layers"

# %% [markdown]
# ## 5. No method wins on every axis
#
# Take the axes on which the table holds counts, exact and independent of
# how long training ran, lower being better on each: trainable parameters,
# gradient and optimizer bytes, the accounted peak, the FLOPs of a training
# step, the extra FLOPs a token pays as deployed, the adapter file. A method
# *dominates* another if it is at least as good on every one of them and
# better on at least one.
#
# * No method is best on all six: prompt tuning trains and stores the least,
#   but the last block alone has the lowest peak and the cheapest step, and
#   several methods add nothing at inference.
# * Two methods are dominated: **full fine-tuning** (the last block alone
#   among the methods that dominate it) and the **element mask** (by
#   BitFit). On the cost axes they have no case. What they buy is on the one
#   axis left out, quality (section 3; read it in the full setting).
#
# That is the trade-off in one sentence: the cheap methods are cheap on
# different axes, and the expensive ones pay for quality.

# %%
COST_AXES = {
    "trainable": lambda x: rows[x]["trainable"],
    "grad+opt bytes": lambda x: rows[x]["mem_grad_opt_bytes"],
    "accounted peak": lambda x: rows[x]["mem_accounted_peak_bytes"],
    "step FLOPs": lambda x: flops[x]["forward"] + flops[x]["backward"],
    "deployed FLOPs/token": lambda x: deployed_flops[x],
    "file bytes": lambda x: rows[x]["adapter_bytes"],
}
costs = {x: [f(x) for f in COST_AXES.values()] for x in order}


def dominates(a, b):
    """a is at least as cheap as b on every cost axis, and cheaper on one."""
    return all(u <= v for u, v in zip(costs[a], costs[b])) and costs[a] != costs[b]


best = {axis: sorted(x for x in order if costs[x][i] == min(c[i] for c in costs.values()))
        for i, axis in enumerate(COST_AXES)}
print(lessons.table([[axis, ", ".join(winners)] for axis, winners in best.items()],
                    ["cost axis", "cheapest"]))
dominated = {b: sorted(a for a in order if dominates(a, b)) for b in order}
dominated = {b: by for b, by in dominated.items() if by}
for b, by in dominated.items():
    print(f"{b} is dominated on every cost axis by {', '.join(by)}")
print("not dominated:", ", ".join(x for x in order if x not in dominated))

# %%
lessons.say(f"""## The claim, checked

Every check below is a count, a byte or a FLOP: it holds after {settings.steps} steps as after
many more, on any machine. Scores are only checked to be scores, and times not at all.

* Parameters: each row's count is its formula; the order is prompt < (IA)³ < BitFit < mask < LoRA
  < prefix < adapters < last block < full.
* Memory: prompt tuning trains {rows['layers']['trainable'] / rows['prompt']['trainable']:.0f} times
  fewer numbers than the last block and peaks higher; the rest is below.""")

# %% [markdown]
#
# * Memory: gradients and optimizer state are 12 bytes a trainable number
#   for every method that freezes whole tensors; the mask's are its full
#   gradients plus 16 bytes a selected entry. Activations are the largest
#   part of every method's peak, and the peak does not follow the count
#   (above). Prompt tuning's longer context shows in its activations, above
#   prefix tuning's.
# * Training: the selective methods' and (IA)³'s forward FLOPs are the
#   base's; LoRA's,
#   the adapters' and the prefix's add exactly their per-token FLOPs; prompt
#   tuning's forward grows at least with its longer sequence. Every freezing
#   method's backward is below the mask's, which is below full fine-tuning's.
# * Inference: 0 extra FLOPs for selective methods, and for LoRA and (IA)³
#   merged; $4Cm$ per adapter per token; $4LCP$ for soft prompts.
# * Storage: each file's tensors are 4 bytes a trainable number (8 for a
#   mask), and its size is the table's; the full model's file is a full
#   checkpoint. Detached, every adapter gives the base's loss back.
# * No method is cheapest on every cost axis; the last block dominates full
#   fine-tuning and BitFit the mask.

# %%
assert [r["method"] for r in result.rows] == list(settings.methods)
assert {rows[x]["family"] for x in order} == set(FAMILIES)
assert {x for x in order if rows[x]["family"] == "additive"} == {"adapter", "prompt", "prefix", "ia3"}
# parameter efficiency
assert all(rows[x]["trainable"] == by_formula[x] for x in order)
assert by_count == ["prompt", "ia3", "bitfit", "mask", "lora", "prefix", "adapter", "layers", "full"]
# memory efficiency
assert all(rows[x]["mem_grad_opt_bytes"] == 12 * rows[x]["trainable"] for x in order if x != "mask")
assert rows["mask"]["mem_grad_opt_bytes"] == mask_books > 12 * rows["mask"]["trainable"]
assert all(max(peaks[x], key=peaks[x].get) == "activations" for x in order)
assert rows["prompt"]["trainable"] < rows["layers"]["trainable"] / 70
assert rows["prompt"]["mem_accounted_peak_bytes"] > rows["layers"]["mem_accounted_peak_bytes"]
assert peaks["prompt"]["activations"] > peaks["prefix"]["activations"]
# training speed (counted)
fwd = {x: flops[x]["forward"] for x in order}
bwd = {x: flops[x]["backward"] for x in order}
assert fwd["bitfit"] == fwd["layers"] == fwd["mask"] == fwd["full"] == fwd["ia3"]
assert all(fwd[x] - fwd["full"] == rows[x]["extra_flops"] * tokens for x in ("lora", "adapter", "prefix"))
assert fwd["prompt"] * T >= fwd["full"] * (T + P)
assert all(bwd[x] < bwd["mask"] for x in order if x not in ("mask", "full"))
assert bwd["mask"] < bwd["full"]
assert min(order, key=lambda x: bwd[x]) == "layers"
# model quality: measured; only checked to be a score
assert all(math.isfinite(rows[x]["test_mean"]) and 0.0 <= rows[x]["test_mean"] <= 1.0 for x in order)
assert 0.0 <= ctx["majority"] <= 1.0 and 0.0 <= ctx["zero_shot"] <= 1.0
# inference cost
assert all(rows[x]["extra_flops"] == 0 and not mergeable[x] for x in ("full", "bitfit", "layers", "mask"))
assert rows["lora"]["extra_flops"] == L * 2 * r * (C + 3 * C) and rows["lora"]["extra_flops_merged"] == 0
assert rows["ia3"]["extra_flops"] == by_formula["ia3"] and rows["ia3"]["extra_flops_merged"] == 0
assert rows["adapter"]["extra_flops"] == 2 * L * 4 * C * m and not mergeable["adapter"]
assert rows["prompt"]["extra_flops"] == rows["prefix"]["extra_flops"] == 4 * L * C * P
assert {x for x in order if deployed_flops[x] > 0} == {"adapter", "prompt", "prefix"}
# storage, and forgetting with the adapter detached
assert all(files[x]["file"] == rows[x]["adapter_bytes"] for x in order)
assert all(files[x]["tensors"] == (8 if x == "mask" else 4) * rows[x]["trainable"] for x in order)
assert files["full"]["tensors"] == 4 * base.num_parameters()
assert 0.99 < rows["full"]["adapter_bytes"] / ctx["full_bytes"] < 1.01
assert all(rows[x]["adapter_fraction"] < 0.05 for x in order if x not in ("full", "layers"))
assert all(abs(rows[x]["dloss_detached_mean"]) < 1e-6 for x in order if x != "full")
# no method wins on every axis
assert not any(all(x in winners for winners in best.values()) for x in order)
assert "layers" in dominated["full"] and "bitfit" in dominated["mask"]
print("all claims hold")

# %% [markdown]
# ## Exercises
#
# 1. **Noise.** Run the comparison for LoRA and (IA)³ only
#    (`methods=("lora", "ia3")`) with `seeds=(0, 1, 2)` and the full split
#    (`test_limit=None`), and read the footer: is their difference beyond two
#    standard deviations? How large is one method's spread over seeds?
# 2. **A bigger LoRA.** Pass `configs={"lora": LoraConfig(r=64,
#    target_modules=["c_attn"])}`. Predict each count column before running
#    (trainable, grad+opt, extra FLOPs unmerged and merged, file bytes). Is
#    LoRA still cheaper than adapters on parameters?
# 3. **Half the adapters.** Pfeiffer placement
#    (`AdapterConfig(placement="pfeiffer")`) keeps only the adapter after the
#    MLP. Which columns change, and by exactly how much?
# 4. **Equal time instead of equal steps.** From the `ms/step` column, how
#    many steps would each method get in the time full fine-tuning takes for
#    its `steps`? Which method gains most, and why (section 3's FLOPs)?
# 5. **Quality as a seventh axis.** Add the test score (higher is better) to
#    `COST_AXES` and recompute which methods are dominated in the full-size
#    run. What happens to full fine-tuning and the mask?
#
# Solutions: `lessons/solutions.md`, section "Lesson 9".
