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
# # Lesson 5: LoRA, and the choices you make when you use it
#
# LoRA (Hu et al., 2021) freezes a weight $W$ (in × out) and learns its
# change as a product of two thin matrices:
#
# $$ y = xW + b + \gamma_r\,(xA)\,B, \qquad A \in \mathbb R^{in\times r},\
#    B \in \mathbb R^{r \times out},\ r \ll \min(in, out), $$
#
# with the scaling $\gamma_r = \alpha / r$ (or rsLoRA's $\alpha/\sqrt r$).
# $\Delta W = \gamma_r AB$ has rank at most $r$ and costs $r\,(in + out)$
# parameters instead of $in \cdot out$.
#
# Using LoRA means choosing a rank $r$, a scaling $\alpha$ and its
# convention, a learning rate, and which Linears to wrap. This lesson tries
# each choice on the `reverse` task.
#
# **What you will learn**
#
# 1. What `get_peft_model(base, LoraConfig(...))` puts into the model, and
#    the forward pass and merge it computes, written out in a few lines.
# 2. How low-rank a real full fine-tuning update is (LoRA's bet).
# 3. How $\alpha/r$ and $\alpha/\sqrt r$ interact with the learning rate.
# 4. Which modules to target, at an equal trainable budget.
# 5. What the rank buys, over several seeds.
# 6. What LoRA costs at inference, unmerged and merged, counted in FLOPs.

# %%
import numpy as np
from IPython.display import Markdown, display

from minipeft import Tensor, no_grad
from minipeft.tools import lessons
from minipeft.workflows.base import load_base
from minipeft.data import get_task
from minipeft.peft import FullFinetuneConfig, LoraConfig, get_peft_model

plt = lessons.setup()

# %% [markdown]
# ## 1. What LoRA injects
#
# `target_modules=["c_attn"]` matches the fused query/key/value projection
# of every block by name. Each match is replaced by a `LoraLinear` that
# holds the original Linear as `base_layer` (frozen) and one `lora_A` and
# `lora_B` per adapter name. The base model's code never mentions LoRA.

# %%
config = LoraConfig(r=8, lora_alpha=8, target_modules=["c_attn"])
pm = get_peft_model(load_base(), config)
pm.print_trainable_parameters()
print(pm.base_model.h[0].attn.c_attn)
for name, p in pm.named_parameters():
    if p.requires_grad and name.startswith("base_model.h.0."):
        print(f"  {name:50s} {p.shape}")

# %% [markdown]
# $A$ starts random and $B$ at zero, so $\Delta W = 0$: the wrapped model
# computes exactly what the base computes, bit for bit, before training.

# %%
task = get_task("reverse")
idx, targets = next(task.batches("val", 8, shuffle=False))
base = load_base()
identical_at_init = np.array_equal(pm(idx).numpy(), base(idx).numpy())
print("LoRA at initialisation equals the base, bit for bit:", identical_at_init)

# %% [markdown]
# ## 2. The mechanism, written out
#
# Here is all of LoRA, the formula above as NumPy: the forward pass (never
# forming the in × out product $AB$: $(xA)B$ costs $r\,(in + out)$
# multiply-adds a token) and the merge, which folds $\gamma_r AB$ into $W$
# once. We give one layer's $B$ random values (so the branch is not zero)
# and hold both functions against the package (`minipeft/peft/lora.py`,
# `LoraLinear.forward` and `merge`), with both scalings.

# %%
def scale(alpha, r, rslora=False):
    return alpha / (np.sqrt(r) if rslora else r)        # alpha / r, or rsLoRA's alpha / sqrt(r)


def lora_forward(x, W, b, A, B, alpha, r, rslora=False):
    r"""$y = xW + b + \gamma_r (xA) B$: the frozen Linear plus the low-rank branch."""
    return x @ W + b + scale(alpha, r, rslora) * ((x @ A) @ B)    # (..., in) -> (..., out)


def lora_merge(W, A, B, alpha, r, rslora=False):
    r"""$W + \gamma_r A B$: after this, $xW' + b$ is the forward above, with no branch."""
    return W + scale(alpha, r, rslora) * (A @ B)                   # (in, out)


rng = np.random.default_rng(0)
x = rng.standard_normal((2, 5, 128)).astype(np.float32)
mechanism_gaps = {}
for rslora in (False, True):
    check = get_peft_model(load_base(), LoraConfig(r=8, lora_alpha=8, use_rslora=rslora))
    layer = check.base_model.h[0].attn.c_attn                      # a LoraLinear
    A, B = layer.lora_A._parameters["default"], layer.lora_B._parameters["default"]
    with no_grad():
        B.copy_(0.1 * rng.standard_normal(B.shape).astype(np.float32))
        package = layer(Tensor(x)).numpy()
    W, b = layer.base_layer.weight.numpy().copy(), layer.base_layer.bias.numpy()
    ours = lora_forward(x, W, b, A.numpy(), B.numpy(), 8, 8, rslora)
    check.merge_adapter()
    merged = layer.base_layer.weight.numpy()
    mechanism_gaps[rslora] = (float(np.abs(ours - package).max()),
                              float(np.abs(lora_merge(W, A.numpy(), B.numpy(), 8, 8, rslora)
                                           - merged).max()))
    print(f"use_rslora={rslora!s:5s} scaling {check.peft_config['default'].scaling:.3f}: "
          f"largest |ours - package| forward {mechanism_gaps[rslora][0]:.1e}, "
          f"merged weight {mechanism_gaps[rslora][1]:.1e}")

# %%
assert all(f < 1e-5 and m < 1e-6 for f, m in mechanism_gaps.values())

# %% [markdown]
# ## 3. How low-rank is a real full update?
#
# LoRA bets that the change fine-tuning needs is close to low rank. We can
# look: fine-tune *every* weight for a while, take
# $\Delta W = W_{ft} - W_{base}$ of each block's `c_attn` (128 × 384), and
# look at its singular values $\sigma_1 \ge \sigma_2 \ge \dots$ The share
# of the update's energy $\lVert\Delta W\rVert_F^2 = \sum_i \sigma_i^2$ in
# the top $k$ directions says how well a rank-$k$ matrix could stand in
# for it. A random Gaussian matrix of the same shape, which has no
# preferred directions, is the reference.

# %%
steps = lessons.pick(100, 10)            # every run below trains this many steps
n_val = lessons.pick(200, 50)            # validation examples for the answer loss
n_test = lessons.pick(200, 10)           # test words for exact match
zero_shot_loss = lessons.answer_loss(base, task, n_examples=n_val)
full = lessons.finetune_and_score(FullFinetuneConfig(), task, 1e-3, steps, n_test, n_val=n_val)
tuned = dict(full.model.base_model.named_parameters())
k = 8


def energy(s):
    return np.cumsum(s**2) / np.sum(s**2)     # share of ||.||_F^2 in the top 1, 2, ... directions


spectra, top_k, to_90 = {}, {}, {}
for i in range(base.config.n_layer):
    name = f"h.{i}.attn.c_attn.weight"
    delta = np.asarray(tuned[name].numpy(), np.float64) - base.state_dict()[name]   # (128, 384)
    spectra[i] = np.linalg.svd(delta, compute_uv=False)
    top_k[i], to_90[i] = energy(spectra[i])[k - 1], int(np.searchsorted(energy(spectra[i]), 0.9)) + 1
random_s = np.linalg.svd(np.random.default_rng(0).standard_normal((128, 384)), compute_uv=False)
random_top_k = energy(random_s)[k - 1]
for i in spectra:
    print(f"h.{i}.attn.c_attn: top {k} directions hold {top_k[i]:.0%} of the update's energy; "
          f"{to_90[i]} of {len(spectra[i])} reach 90%")
print(f"random 128 x 384 matrix: top {k} hold {random_top_k:.0%}")
print(f"full fine-tuning, {steps} steps: answer loss {zero_shot_loss:.2f} -> {full.answer_loss:.3f}")

fig, ax = plt.subplots()
for i, s in spectra.items():
    ax.semilogy(np.arange(1, len(s) + 1), s / s[0], ".-", ms=3, lw=0.6, label=f"h.{i}.attn.c_attn")
ax.semilogy(np.arange(1, 129), random_s / random_s[0], "k--", lw=1, label="random matrix")
ax.axvline(k + 0.5, color="gray", ls=":")
ax.set_xlabel("index i")
ax.set_ylabel(r"$\sigma_i / \sigma_1$")
ax.set_title(f"Singular values of full fine-tuning's update ({steps} steps)")
ax.legend(fontsize=8)
plt.show()

# %%
display(Markdown(
    f"What to notice: the update's singular values fall far faster than a random matrix's. "
    f"Its top {k} directions (left of the dotted line) hold {min(top_k.values()):.0%} to "
    f"{max(top_k.values()):.0%} of its energy, a random matrix's {random_top_k:.0%}; yet it is "
    f"not of rank {k}: 90% takes {min(to_90.values())} to {max(to_90.values())} directions. "
    f"LoRA does not claim that full fine-tuning's update is low rank, only that a low-rank one "
    f"is enough for the task; the sections below test that."))

# %%
assert min(top_k.values()) > 2 * random_top_k
assert min(to_90.values()) > k
assert full.answer_loss < zero_shot_loss

# %% [markdown]
# ## 4. The scaling $\alpha$ and the learning rate
#
# The branch is multiplied by $\gamma_r$. LoRA's paper uses
# $\gamma_r = \alpha / r$ with $\alpha$ fixed while $r$ varies; rsLoRA
# (Kalajdzievski, 2023; `use_rslora=True`, as in Hugging Face peft) uses
# $\alpha/\sqrt r$, arguing that $\alpha/r$ shrinks the update too much at
# large ranks. Both agree at $r = 1$. With $\alpha = 8$ fixed we sweep the
# learning rate for a small and a large rank under each convention, and ask
# where the best rate lies.

# %%
alpha = 8
lrs = lessons.pick([3e-4, 1e-3, 3e-3, 1e-2, 3e-2], [3e-3, 1e-2, 3e-2])
alpha_ranks = [1, 64]
conventions = {"alpha / r": False, "alpha / sqrt(r)": True}
lr_loss = {}           # (convention, r) -> answer loss at each lr
for conv, rslora in conventions.items():
    for r in alpha_ranks:
        if rslora and r == 1:                       # the two conventions are one run at r = 1
            lr_loss[conv, r] = lr_loss["alpha / r", 1]
            continue
        cfg = LoraConfig(r=r, lora_alpha=alpha, use_rslora=rslora, target_modules=["c_attn"])
        lr_loss[conv, r] = [lessons.finetune_and_score(cfg, task, lr, steps, n_test,
                                                       n_val=n_val).answer_loss for lr in lrs]
best_lr = {key: lrs[int(np.argmin(v))] for key, v in lr_loss.items()}
print("answer loss at lr " + "  ".join(f"{lr:8.0e}" for lr in lrs))
for (conv, r), v in lr_loss.items():
    print(f"{conv:15s} r = {r:2d}  " + "  ".join(f"{x:8.3f}" for x in v)
          + f"   best lr {best_lr[conv, r]:.0e}")

fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), sharey=True)
for ax, conv in zip(axes, conventions):
    for j, r in enumerate(alpha_ranks):
        ax.loglog(lrs, lr_loss[conv, r], "o-", color=f"C{j}", label=f"r = {r}")
        ax.loglog([best_lr[conv, r]], [min(lr_loss[conv, r])], "*", color=f"C{j}", ms=14)
    ax.set_xlabel("learning rate")
    ax.set_title(rf"$\gamma_r$ = {conv.replace('sqrt(r)', '√r')}, α = {alpha}")
    ax.legend()
axes[0].set_ylabel("held-out answer loss")
plt.show()

# %%
def grid_steps(conv):
    """How far the best learning rate moves, in grid steps, from the smallest rank to the largest."""
    return abs(lrs.index(best_lr[conv, alpha_ranks[-1]]) - lrs.index(best_lr[conv, alpha_ranks[0]]))


shift = {conv: grid_steps(conv) for conv in conventions}
r_lo, r_hi = alpha_ranks[0], alpha_ranks[-1]
reach = {conv: min(lr_loss[conv, r_hi]) for conv in conventions}    # the best loss at r_hi
display(Markdown(
    f"What to notice (the stars): from r = {r_lo} to r = {r_hi}, the best learning rate moves by "
    f"{shift['alpha / r']} grid step(s) under α/r (from {best_lr['alpha / r', r_lo]:.0e} to "
    f"{best_lr['alpha / r', r_hi]:.0e}) and by {shift['alpha / sqrt(r)']} under α/√r (to "
    f"{best_lr['alpha / sqrt(r)', r_hi]:.0e}). With Adam, α/r is the convention that keeps the "
    f"learning rate transferable across ranks here: Adam's step on B has a size set by the "
    f"learning rate, whatever the scale, and the r columns of A add up their contributions, which "
    f"cancels much of the 1/r. Under α/√r a large rank takes larger steps and wants a smaller "
    f"rate. rsLoRA's own case is what a large rank reaches: at its best rate, r = {r_hi} reaches "
    f"{reach['alpha / r']:.3f} under α/r and {reach['alpha / sqrt(r)']:.3f} under α/√r "
    f"({'lower under α/√r' if reach['alpha / sqrt(r)'] < reach['alpha / r'] else 'no lower under α/√r'}"
    f"), so the convention changes both the rate to use and, a little, where a run can get to."))

# %%
assert shift["alpha / r"] <= shift["alpha / sqrt(r)"]
assert best_lr["alpha / sqrt(r)", r_hi] < best_lr["alpha / sqrt(r)", r_lo]

# %% [markdown]
# ## 5. Which modules to target, at an equal budget
#
# LoRA's paper wrapped only the attention's query and value projections;
# QLoRA (Dettmers et al., 2023) found that wrapping every Linear matters
# more than the rank. To compare *where* fairly, give each choice the same
# number of trainable parameters: a target of shape in × out costs
# $r\,(in + out)$ per block, so the rank is chosen per set to equalise the
# totals. All use the convention $\alpha/r$ with $\alpha = 8$ and one
# learning rate: the best of section 4 at the largest rank.

# %%
target_sets = {"c_attn": ["c_attn"],
               "attention (c_attn + attn.c_proj)": ["c_attn", "attn.c_proj"],
               "all Linears": ["c_attn", "c_proj", "c_fc"]}
width = {"c_attn": 128 + 384, "attn.c_proj": 128 + 128, "mlp.c_fc": 128 + 512,
         "mlp.c_proj": 512 + 128}
per_rank = {"c_attn": width["c_attn"], "attention (c_attn + attn.c_proj)":
            width["c_attn"] + width["attn.c_proj"], "all Linears": sum(width.values())}
budget = 4 * 12 * width["c_attn"]                      # c_attn at r = 12, in all 4 blocks
target_rank = {name: max(1, round(budget / (4 * w))) for name, w in per_rank.items()}
lr_target = best_lr["alpha / r", alpha_ranks[-1]]
target_runs = {}
for name, modules in target_sets.items():
    cfg = LoraConfig(r=target_rank[name], lora_alpha=alpha, target_modules=modules)
    target_runs[name] = lessons.finetune_and_score(cfg, task, lr_target, steps, n_test, n_val=n_val)
    run = target_runs[name]
    print(f"{name:34s} r = {target_rank[name]:2d}: {run.trainable:>6,d} trainable, "
          f"answer loss {run.answer_loss:.3f}, exact match {run.score:.2f}")

fig, ax = plt.subplots()
names = list(target_sets)
ax.bar([f"{n.split(' (')[0]}\nr = {target_rank[n]}" for n in names],
       [target_runs[n].answer_loss for n in names], color=["C0", "C1", "C2"])
ax.set_ylabel("held-out answer loss")
ax.set_title(f"Where to put {budget:,d} trainable parameters (lr {lr_target:.0e})")
plt.show()

# %%
best_target = min(names, key=lambda n: target_runs[n].answer_loss)
display(Markdown(
    f"What to notice: the budgets match ({', '.join(f'{target_runs[n].trainable:,d}' for n in names)}"
    f" trainable), and where they go matters: the lowest loss is **{best_target}**, not `c_attn` "
    f"alone (" + ", ".join(f"{n.split(' (')[0]} {target_runs[n].answer_loss:.3f}" for n in names)
    + "). One learning rate for all three: a tuned rate per set could reorder close results."))

# %%
assert len({run.trainable for run in target_runs.values()}) == 1
assert target_runs[best_target].answer_loss < target_runs["c_attn"].answer_loss

# %% [markdown]
# ## 6. What the rank buys, over seeds
#
# One run is one draw: the batches' order and LoRA's random $A$ change from
# seed to seed, and so does the result. `lessons.finetune_seeds` trains the
# same configuration once per seed; we plot the mean and one standard
# deviation. Convention $\alpha/r$ ($\alpha = 8$), the learning rate of
# section 5; the trainable count is
# $n_{layer} \cdot r\,(in + out) = 4 \cdot r \cdot (128 + 384) = 2048\,r$.
# Full fine-tuning (section 3, one seed) is the reference.

# %%
ranks = lessons.pick([1, 4, 16, 64], [1, 64])
seeds = [0, 1, 2]
by_rank = {r: lessons.finetune_seeds(LoraConfig(r=r, lora_alpha=alpha, target_modules=["c_attn"]),
                                     task, lr_target, steps, n_test, seeds=seeds, n_val=n_val)
           for r in ranks}
for r, s in by_rank.items():
    (m, sd), (em, esd) = s.answer_loss, s.score
    print(f"r = {r:2d}: {s.trainable:>7,d} trainable, answer loss {m:.3f} ± {sd:.3f}, "
          f"exact match {em:.2f} ± {esd:.2f}  ({len(seeds)} seeds)")
print(f"full fine-tuning: {full.trainable:,d} trainable, answer loss {full.answer_loss:.3f}")

fig, ax = plt.subplots()
x = [by_rank[r].trainable for r in ranks]
ax.errorbar(x, [by_rank[r].answer_loss[0] for r in ranks],
            yerr=[by_rank[r].answer_loss[1] for r in ranks], fmt="o-", capsize=4,
            label=f"LoRA on c_attn (mean ± sd, {len(seeds)} seeds)")
for r, xi in zip(ranks, x):
    ax.annotate(f"r={r}", (xi, by_rank[r].answer_loss[0]), textcoords="offset points",
                xytext=(4, 6))
ax.plot([full.trainable], [full.answer_loss], "k*", ms=12, label="full fine-tuning")
ax.set_xscale("log")
ax.set_yscale("log")
ax.set_xlabel("trainable parameters")
ax.set_ylabel("held-out answer loss")
ax.set_title(f"reverse after {steps} steps")
ax.legend(fontsize=8)
plt.show()

# %%
means = {r: by_rank[r].answer_loss[0] for r in ranks}
sds = {r: by_rank[r].answer_loss[1] for r in ranks}
r1, best_rank = ranks[0], min(ranks, key=means.get)
gain = means[r1] - means[best_rank]                     # what the best rank buys over r = 1
noise = float(np.hypot(sds[r1], sds[best_rank]))        # the spread of that difference
beyond = ("" if best_rank == ranks[-1] else
          f" Beyond it, more rank buys nothing at this rate: r = {ranks[-1]} reaches "
          f"{means[ranks[-1]]:.3f} ± {sds[ranks[-1]]:.3f}.")
display(Markdown(
    f"What to notice: from r = {r1} to r = {best_rank} ({best_rank // r1}× the parameters) the "
    f"mean loss falls from {means[r1]:.3f} ± {sds[r1]:.3f} to {means[best_rank]:.3f} ± "
    f"{sds[best_rank]:.3f}, a gain of {gain:.3f} against a seed spread of {noise:.3f} for the "
    f"difference ({'more' if gain > 2 * noise else 'not more'} than twice it, the rule by which "
    f"`minipeft compare` calls two results separated).{beyond} Full fine-tuning (one seed) "
    f"reaches {full.answer_loss:.3f} with "
    f"{full.trainable / by_rank[best_rank].trainable:.0f}× the best rank's parameters."
    + (" In the fast setting (two ranks, a few steps) the seeds spread about as much as the ranks "
       "differ, so it checks only that the larger rank's mean is lower; the full setting also "
       "checks that the gain exceeds its spread." if lessons.FAST else "")))

# %%
assert all(by_rank[r].trainable == 2048 * r for r in ranks)
assert all(sds[r] > 0 for r in ranks)                      # seeds really differ
assert all(means[r] < zero_shot_loss / 2 for r in ranks)   # every rank learns most of the way
assert means[ranks[-1]] < means[r1]                        # more rank, lower loss
assert full.answer_loss < min(means.values())
if not lessons.FAST:
    assert gain > noise                                    # ... by more than the seeds' spread

# %% [markdown]
# ## 7. The cost at inference, unmerged and merged
#
# Unmerged, every token pays for the branch: $(xA)B$ costs $2r\,(in + out)$
# FLOPs per target (`extra_flops_per_token`), which is exactly twice the
# trainable count, whichever modules are targeted. `merge_adapter()` adds
# $\gamma_r AB$ into $W$ once; the branch then stops running. We count the
# FLOPs of every matrix product the engine forms in one forward pass
# (`lessons.forward_flops`), and plot what each adds to the base: the
# added FLOPs alone, since beside the base's they would not show.

# %%
n_tokens = idx.size
flops_base = lessons.forward_flops(base, idx)
added = {}
for name, run in target_runs.items():
    added[f"{name.split(' (')[0]}, r = {target_rank[name]}"] = (
        (lessons.forward_flops(run.model, idx) - flops_base) // n_tokens)
lora = target_runs["attention (c_attn + attn.c_proj)"].model
extra_unmerged = lora.active_method.extra_flops_per_token(lora)
logits_unmerged = lora(idx).numpy()
lora.merge_adapter()
extra_merged = lora.active_method.extra_flops_per_token(lora)
flops_merged, logits_merged = lessons.forward_flops(lora, idx), lora(idx).numpy()
added[f"attention, r = {target_rank['attention (c_attn + attn.c_proj)']}, merged"] = (
    (flops_merged - flops_base) // n_tokens)
gap = float(np.abs(logits_merged - logits_unmerged).max())
print(f"base: {flops_base // n_tokens:,d} forward FLOPs per token")
for name, a in added.items():
    print(f"  {name:30s} +{a:>7,d} a token (+{a / (flops_base / n_tokens):.2%})")
print(f"largest |merged - unmerged| logit: {gap:.2e}")

fig, ax = plt.subplots()
ax.bar(list(added), list(added.values()), color=["C0", "C1", "C2", "C7"])
for i, a in enumerate(added.values()):
    ax.annotate(f"+{a / (flops_base / n_tokens):.1%}", (i, a), ha="center",
                textcoords="offset points", xytext=(0, 3))
ax.set_ylim(0, 1.15 * max(added.values()))               # room for the labels
ax.set_ylabel("added forward FLOPs per token")
ax.set_title(f"What LoRA adds to the base's {flops_base // n_tokens:,d} FLOPs a token")
ax.tick_params(axis="x", labelrotation=15)
plt.show()

# %%
share = added[f"attention, r = {target_rank['attention (c_attn + attn.c_proj)']}"] / (
    flops_base / n_tokens)
display(Markdown(
    f"What to notice: the three unmerged bars are equal, because equal trainable budgets add "
    f"equal FLOPs ({share:.1%} of the base's here), and the merged bar is empty: merged, LoRA "
    f"costs exactly what the base costs, and its logits match the unmerged ones to {gap:.0e}."))

# %%
assert all(a == 2 * budget for name, a in added.items() if "merged" not in name)
assert extra_unmerged * n_tokens == 2 * budget * n_tokens and extra_merged == 0
assert flops_merged == flops_base
assert gap < 1e-4

# %% [markdown]
# `merge_and_unload()` goes one step further: it removes every wrapper and
# returns a plain GPT, with exactly the base's parameters, that writes what
# the adapter wrote.

# %%
prompts = np.stack([ids for _, ids in task.prompt_batches("test", 4)][0])
before = lora.generate(prompts, task.max_new_tokens, temperature=0.0)
plain = lora.merge_and_unload()
after = plain.generate(prompts, task.max_new_tokens, temperature=0.0)
print(type(plain).__name__, f"{plain.num_parameters():,d} parameters")
print("same answers after merge_and_unload:", np.array_equal(before, after))

# %% [markdown]
# ## The claim, checked
#
# * LoRA on `c_attn` trains $2048\,r$ parameters and starts as the identity;
#   its forward and merge are the few lines of section 2.
# * A full fine-tuning update is far from random but not low rank; a
#   low-rank update still learns the task.
# * Unmerged, LoRA adds exactly `extra_flops_per_token` FLOPs to every
#   token, twice its trainable count; merged, it adds none and its logits
#   equal the unmerged ones within float32 rounding.
#
# (Each section's own claims were checked beneath its plot.)

# %%
assert identical_at_init
assert plain.num_parameters() == base.num_parameters() == full.trainable
assert np.array_equal(before, after)
print("all claims hold")

# %% [markdown]
# ## Exercises
#
# 1. Put LoRA on every Linear (`target_modules=["c_attn", "c_proj", "c_fc"]`).
#    Compute the trainable count by hand for r = 4, then check it.
# 2. Repeat section 4 with $\alpha = r$ (the scaling is then 1 at every
#    rank). Where does the best learning rate go as r grows, and why?
# 3. `unmerge_adapter()` subtracts $\Delta W$ again. Is the weight restored
#    bit for bit? Measure the largest difference, and explain it.
# 4. Truncate the full fine-tuning update of section 3 to its top 8
#    singular directions in every block's `c_attn` (and keep every other
#    weight fine-tuned). How much of the answer loss does the truncation
#    cost?
#
# Solutions: `lessons/solutions.md`, section "Lesson 5".
