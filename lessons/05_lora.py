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
# # Lesson 5: LoRA, a low-rank update beside a frozen weight
#
# LoRA (Hu et al., 2021) freezes a weight $W$ (in × out) and learns its
# change as a product of two thin matrices:
#
# $$ y = xW + b + \frac{\alpha}{r}\,(xA)\,B, \qquad A \in \mathbb R^{in\times r},\
#    B \in \mathbb R^{r \times out},\ r \ll \min(in, out). $$
#
# $\Delta W = \frac{\alpha}{r}AB$ has rank at most $r$ and costs
# $r\,(in + out)$ parameters instead of $in \cdot out$.
#
# **What you will learn**
#
# 1. What `get_peft_model(base, LoraConfig(...))` puts into the model, and
#    why it starts as the identity.
# 2. That the learned update really has rank $r$ (its singular values).
# 3. A rank sweep: quality against trainable parameters.
# 4. Merging: $W \leftarrow W + \Delta W$ gives the same outputs, with no
#    added inference cost, counted in FLOPs.

# %%
import numpy as np

from minipeft import lessons
from minipeft.workflows.base import load_base
from minipeft.data import get_task
from minipeft.peft import FullFinetuneConfig, LoraConfig, get_peft_model

plt = lessons.setup()

# %% [markdown]
# ## 1. What LoRA injects
#
# `target_modules=["c_attn"]` matches the fused query/key/value projection
# of each of the 4 blocks by name. Each match is replaced by a `LoraLinear`
# that holds the original Linear as `base_layer` (frozen) and one `lora_A`
# and `lora_B` per adapter name. The base model's code never mentions LoRA.

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
# ## 2. Training it, and the rank of what it learned
#
# Only $A$ and $B$ go to the optimizer. `lessons.finetune_and_score` trains
# the way `minipeft finetune` does (`minipeft.workflows.finetune.finetune`: wrap,
# AdamW over what trains, warmup and cosine decay), keeps the model in
# memory, and scores it. After training, the update of each layer,
# $\Delta W = \frac{\alpha}{r}AB$ (`delta_weight`), is a full 128 × 384
# matrix, but its singular values stop after $r$ of them.

# %%
steps = lessons.pick(200, 25)
n_test = lessons.pick(500, 100)
zero_shot_loss = lessons.answer_loss(base, task)
lora8 = lessons.finetune_and_score(LoraConfig(r=8, target_modules=["c_attn"]), task, 3e-3,
                                   steps, n_test).model
delta = lora8.base_model.h[0].attn.c_attn.delta_weight("default")
singular = np.linalg.svd(np.asarray(delta, dtype=np.float64), compute_uv=False)
print(f"Delta W of h.0.attn.c_attn: shape {delta.shape}, rank {np.linalg.matrix_rank(delta)}")
print("its largest 10 singular values:", np.array2string(singular[:10], precision=4))

fig, ax = plt.subplots()
ax.semilogy(np.arange(1, len(singular) + 1), singular, ".")
ax.axvline(8.5, color="gray", ls=":")
ax.set_xlabel("index")
ax.set_ylabel("singular value")
ax.set_title("The learned update of h.0.attn.c_attn (r = 8)")
plt.show()

# %% [markdown]
# ## 3. A rank sweep: quality against trainable parameters
#
# Each rank trains with the same steps and learning rate ($\alpha = r$, so
# the scaling $\alpha/r$ stays 1). The trainable count is
# $n_{layer} \cdot r\,(in + out) = 4 \cdot r \cdot (128 + 384) = 2048\,r$.
# Full fine-tuning (822,016 parameters) is the reference.

# %%
ranks = lessons.pick([1, 2, 4, 8, 16, 32, 64], [1, 4, 16])
sweep = {}
for r in ranks:
    run = lessons.finetune_and_score(LoraConfig(r=r, lora_alpha=r, target_modules=["c_attn"]),
                                     task, 3e-3, steps, n_test)
    sweep[r] = {"trainable": run.trainable, "answer loss": run.answer_loss,
                "exact match": run.score}
    print(f"r = {r:3d}: {sweep[r]['trainable']:>7,d} trainable, answer loss "
          f"{sweep[r]['answer loss']:.3f}, exact match {sweep[r]['exact match']:.3f}")
full_score = lessons.finetune_and_score(FullFinetuneConfig(), task, 1e-3, steps, n_test).score
print(f"full fine-tuning: 822,016 trainable, exact match {full_score:.3f}")

fig, ax = plt.subplots()
x = [sweep[r]["trainable"] for r in ranks]
ax.semilogx(x, [sweep[r]["exact match"] for r in ranks], "o-", label="LoRA on c_attn")
for r, xi in zip(ranks, x):
    ax.annotate(f"r={r}", (xi, sweep[r]["exact match"]), textcoords="offset points", xytext=(4, -12))
ax.semilogx([822_016], [full_score], "k*", ms=12, label="full fine-tuning")
ax.set_xlabel("trainable parameters")
ax.set_ylabel(f"exact match ({n_test} test words)")
ax.set_title(f"reverse after {steps} steps")
ax.legend()
plt.show()

# %% [markdown]
# ## 4. Merging: the update folded into the weight
#
# Unmerged, every token pays for the side branch: $(xA)B$ costs
# $2r\,(in + out)$ FLOPs per target per token (`extra_flops_per_token`).
# `merge_adapter()` adds $\frac{\alpha}{r}AB$ into $W$ once; the branch
# then stops running. We count the FLOPs of every matrix product the engine
# forms in one forward pass (`lessons.forward_flops`) for the base, the
# unmerged and the merged model.

# %%
n_tokens = idx.size
flops_base = lessons.forward_flops(base, idx)
extra_unmerged = lora8.active_method.extra_flops_per_token(lora8)
flops_unmerged, logits_unmerged = lessons.forward_flops(lora8, idx), lora8(idx).numpy()
lora8.merge_adapter()
extra_merged = lora8.active_method.extra_flops_per_token(lora8)
flops_merged, logits_merged = lessons.forward_flops(lora8, idx), lora8(idx).numpy()
gap = np.abs(logits_merged - logits_unmerged).max()
print(f"extra FLOPs per token: unmerged {extra_unmerged:,d}, merged {extra_merged}")
print(f"forward FLOPs for {n_tokens} tokens: base {flops_base:,d}, unmerged {flops_unmerged:,d} "
      f"(+{(flops_unmerged - flops_base) // n_tokens:,d} a token), merged {flops_merged:,d}")
print(f"largest |merged - unmerged| logit: {gap:.2e}")

# %% [markdown]
# `merge_and_unload()` goes one step further: it removes every wrapper and
# returns a plain GPT, with exactly the base's parameters, that writes what
# the adapter wrote.

# %%
prompts = np.stack([ids for _, ids in task.prompt_batches("test", 4)][0])
before = lora8.generate(prompts, task.max_new_tokens, temperature=0.0)
plain = lora8.merge_and_unload()
after = plain.generate(prompts, task.max_new_tokens, temperature=0.0)
print(type(plain).__name__, f"{plain.num_parameters():,d} parameters")
print("same answers after merge_and_unload:", np.array_equal(before, after))

fig, ax = plt.subplots()
ax.bar(["base", "LoRA unmerged", "LoRA merged"],
       [flops_base / n_tokens / 1e6, flops_unmerged / n_tokens / 1e6, flops_merged / n_tokens / 1e6],
       color=["C7", "C1", "C0"])
ax.set_ylabel("MFLOPs per token (forward)")
ax.set_title("Inference cost")
plt.show()

# %% [markdown]
# ## The claim, checked
#
# * LoRA on `c_attn` trains $2048\,r$ parameters and starts as the identity.
# * The learned $\Delta W$ has rank $r$.
# * It learns: every rank's held-out answer loss falls below the base's.
# * Unmerged, it adds exactly `extra_flops_per_token` FLOPs to every token
#   ($2r(in+out)$ per target); merged, it adds none (0 extra, FLOPs equal to
#   the base's to the last one) and its logits equal the unmerged ones within
#   float32 rounding.

# %%
assert identical_at_init
assert all(sweep[r]["trainable"] == 2048 * r for r in ranks)
assert np.linalg.matrix_rank(delta) == 8
assert all(s["answer loss"] < zero_shot_loss for s in sweep.values())
assert extra_unmerged == 4 * 2 * 8 * (128 + 384) and extra_merged == 0
assert flops_unmerged - flops_base == extra_unmerged * n_tokens
assert flops_merged == flops_base
assert gap < 1e-4
assert plain.num_parameters() == base.num_parameters() == 822_016
assert np.array_equal(before, after)
print("all claims hold")

# %% [markdown]
# ## Exercises
#
# 1. Put LoRA on every Linear (`target_modules=["c_attn", "c_proj", "c_fc"]`).
#    Compute the trainable count by hand for r = 4, then check it.
# 2. Keep $\alpha$ fixed at 8 and sweep r. Why does the best learning rate
#    now depend on r?
# 3. `unmerge_adapter()` subtracts $\Delta W$ again. Is the weight restored
#    bit for bit? Measure the largest difference, and explain it.
# 4. Compute a full fine-tuning's update of `h.0.attn.c_attn` and its
#    singular values. How many carry most of its energy?
#
# Solutions: `lessons/solutions.md`, section "Lesson 5".
