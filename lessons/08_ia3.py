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
# # Lesson 8: (IA)³, learned rescaling
#
# "Infused Adapter by Inhibiting and Amplifying Inner Activations" (Liu et
# al., 2022) trains no matrix at all. It learns three vectors per block that
# rescale activations element by element, all starting at one:
#
# $$ k' = l_k \odot k, \qquad v' = l_v \odot v, \qquad
#    \mathrm{MLP}(x) = \big(l_{ff} \odot \mathrm{GELU}(x W_{fc})\big)\, W_{proj}. $$
#
# **What you will learn**
#
# 1. Where the vectors sit in GPT-2, whose queries, keys and values come out
#    of one fused `c_attn` Linear, and why the paper's form trains fewer
#    parameters than the fused form.
# 2. The forward pass, written out in a few lines and checked against the
#    package's.
# 3. How that compares with every other method's count.
# 4. What the vectors learn on a task (a picture of the rescaling).
# 5. That (IA)³ merges into the weights: no inference cost after merging.

# %%
import numpy as np

from minipeft.tools import lessons
from minipeft.autograd import Tensor
from minipeft.workflows.base import load_base
from minipeft.data import get_task
from minipeft.peft import (
    AdapterConfig,
    BitFitConfig,
    IA3Config,
    LoraConfig,
    PrefixTuningConfig,
    PromptTuningConfig,
    get_peft_model,
)

plt = lessons.setup()

# %% [markdown]
# ## 1. Two forms on a fused projection
#
# GPT-2 computes $[q\,|\,k\,|\,v] = x\,W_{attn}$ with one (128 × 384)
# weight. The paper scales keys and values only: the last two thirds of
# that output ($2C$ numbers per block), with the first third multiplied by a
# constant one. A library that scales the fused output as a whole scales $q$
# too ($3C$ per block); that is Hugging Face peft's count for GPT-2
# (`scale_queries=True` here). The feed-forward vector scales the input of
# `mlp.c_proj` ($4C$ per block).

# %%
task = get_task("reverse")
base = load_base()
idx, targets = next(task.batches("val", 8, shuffle=False))
C, L = 128, 4
forms = {}
for name, cfg in (("paper (k, v, ff)", IA3Config()),
                  ("fused qkv (q, k, v, ff)", IA3Config(scale_queries=True))):
    pm = get_peft_model(load_base(), cfg)
    forms[name] = {"trainable": pm.get_nb_trainable_parameters()[0],
                   "identity": np.array_equal(pm(idx).numpy(), base(idx).numpy())}
    print(f"{name}:")
    pm.print_trainable_parameters()
    for pname, p in pm.named_parameters():
        if p.requires_grad and ".h.0." in pname:
            print(f"    {pname:48s} {p.shape}")

# %% [markdown]
# ### The forward pass, written out
#
# Each (IA)³ layer wraps a frozen Linear. Block 0's two, in numpy, on a
# random input, with vectors moved away from one (so that the check means
# something), against the package's layers on the same input:
#
# $$ [q \,|\, k \,|\, v] = xW_{attn} + b, \quad k \leftarrow l_k \odot k, \;
#    v \leftarrow l_v \odot v; \qquad
#    \mathrm{c\_proj}(h) = (l_{ff} \odot h)\,W_{proj} + b_{proj}. $$

# %%
rng = np.random.default_rng(0)
pm = get_peft_model(load_base(), IA3Config())
attn, proj = pm.base_model.h[0].attn.c_attn, pm.base_model.h[0].mlp.c_proj   # IA3Linear wrappers
for vec in (attn.ia3_l.default, proj.ia3_l.default):
    vec.data[...] = 1 + 0.1 * rng.standard_normal(vec.shape).astype(vec.data.dtype)
x = rng.standard_normal((2, 5, C)).astype(np.float32)                  # (B, T, C)
h = rng.standard_normal((2, 5, 4 * C)).astype(np.float32)              # (B, T, 4C): GELU's output
W, b = attn.base_layer.weight.numpy(), attn.base_layer.bias.numpy()     # (C, 3C), (3C,)
qkv = x @ W + b                                                         # (B, T, 3C): [q | k | v]
qkv[..., C:] *= attn.ia3_l.default.numpy()                              # k and v rescaled, q not
W2, b2 = proj.base_layer.weight.numpy(), proj.base_layer.bias.numpy()   # (4C, C), (C,)
out = (h * proj.ia3_l.default.numpy()) @ W2 + b2                        # (B, T, C)
gaps = (np.abs(qkv - attn(Tensor(x)).numpy()).max(), np.abs(out - proj(Tensor(h)).numpy()).max())
print(f"largest |mine - package|: c_attn {gaps[0]:.1e}, mlp.c_proj {gaps[1]:.1e}")
assert np.allclose(qkv, attn(Tensor(x)).numpy(), rtol=1e-5, atol=1e-5)
assert np.allclose(out, proj(Tensor(h)).numpy(), rtol=1e-5, atol=1e-5)

# %% [markdown]
# ## 2. Among the smallest
#
# The trainable counts of every method in the course, at the sizes the
# lessons use, from `get_nb_trainable_parameters()`:

# %%
methods = {
    "LoRA r=1 (c_attn)": LoraConfig(r=1),
    "prompt tuning (20 tokens)": PromptTuningConfig(num_virtual_tokens=20),
    "(IA)^3 paper": IA3Config(),
    "(IA)^3 fused qkv": IA3Config(scale_queries=True),
    "BitFit": BitFitConfig(),
    "LoRA r=8 (c_attn)": LoraConfig(r=8),
    "adapters, Pfeiffer (m=16)": AdapterConfig(placement="pfeiffer"),
    "prefix tuning (20 tokens)": PrefixTuningConfig(num_virtual_tokens=20),
    "adapters, Houlsby (m=16)": AdapterConfig(placement="houlsby"),
}
counts = {name: get_peft_model(load_base(), cfg).get_nb_trainable_parameters()[0]
          for name, cfg in methods.items()}
counts["full fine-tuning"] = base.num_parameters()
print(lessons.table([[name, n, 100 * n / base.num_parameters()]
                     for name, n in sorted(counts.items(), key=lambda kv: kv[1])],
                    ["method", "trainable", "% of the base"], ["", ",d", ".3f"]))

fig, ax = plt.subplots(figsize=(7, 4))
order = sorted(counts, key=counts.get)
ax.barh(order, [counts[n] for n in order],
        color=["C3" if "IA" in n else "C7" if "full" in n else "C0" for n in order])
ax.set_xscale("log")
ax.set_xlabel("trainable parameters")
ax.set_title("Trainable parameters by method")
plt.show()

# %%
fewer = [n for n in order if counts[n] < counts["(IA)^3 paper"]]
lessons.say("**What to notice:** the (IA)³ bars sit near the bottom. Only "
            + " and ".join(fewer) + " train fewer, and of those only LoRA merges. (IA)³ trains "
            "fewer parameters than BitFit, which has a bias for every output of every Linear and "
            "LayerNorm.")
assert set(fewer) == {"LoRA r=1 (c_attn)", "prompt tuning (20 tokens)"}
assert counts["(IA)^3 paper"] < counts["BitFit"]

# %% [markdown]
# ## 3. What the vectors learn
#
# Training moves each vector away from one. Like the other methods with very
# few parameters, (IA)³ takes larger steps (`lr=3e-2` here). It trains the
# way `minipeft finetune` does (`lessons.finetune_and_score`).

# %%
steps = lessons.pick(200, 30)
n_test = lessons.pick(500, 100)
zero_shot_loss = lessons.answer_loss(base, task)
run = lessons.finetune_and_score(IA3Config(), task, 3e-2, steps, n_test)
ia3, ia3_loss, ia3_score = run.model, run.answer_loss, run.score
print(f"(IA)^3 on reverse, {steps} steps: answer loss {zero_shot_loss:.2f} -> {ia3_loss:.3f}, "
      f"exact match {ia3_score:.3f}")

vectors = {"keys": [], "values": [], "feed-forward": []}
for i in range(L):
    attn = ia3.base_model.h[i].attn.c_attn.ia3_l.default.numpy()      # (2C,): k then v
    vectors["keys"].append(attn[:C])
    vectors["values"].append(attn[C:])
    vectors["feed-forward"].append(ia3.base_model.h[i].mlp.c_proj.ia3_l.default.numpy())

fig, axes = plt.subplots(1, 3, figsize=(9, 3), sharey=True)
for ax, (name, per_layer) in zip(axes, vectors.items()):
    ax.hist([v for v in per_layer], bins=30, stacked=True, label=[f"block {i}" for i in range(L)])
    ax.set_title(f"$l$ of the {name}")
    ax.set_xlabel("scale")
axes[0].set_ylabel("entries")
axes[-1].legend(fontsize=7)
fig.suptitle("Learned rescaling vectors (all start at 1)")
fig.tight_layout()
plt.show()

# %%
spread = {name: max(np.abs(v - 1).max() for v in per_layer) for name, per_layer in vectors.items()}
lessons.say(f"**What to notice:** after {steps} steps the held-out answer loss fell from "
            f"{zero_shot_loss:.2f} to {ia3_loss:.3f}, and the histograms have spread away from 1: "
            "the largest move is " + ", ".join(f"{v:.3f} for the {n}" for n, v in spread.items())
            + ".")
assert ia3_loss < zero_shot_loss and max(spread.values()) > 0.01

# %% [markdown]
# ## 4. Merging
#
# Both kinds of scaling fold into a weight: scaling an output is
# $(xW + b) \odot l = x\,(W\,\mathrm{diag}\,l) + b \odot l$, scaling an input is
# $(x \odot l)\,W = x\,(\mathrm{diag}(l)\,W)$. Unmerged, (IA)³ costs one
# multiply per scaled feature per token; merged, nothing. We count the FLOPs
# of every matrix product in one forward pass (`lessons.forward_flops`).

# %%
extra_unmerged = ia3.active_method.extra_flops_per_token(ia3)
logits_unmerged = ia3(idx).numpy()
ia3.merge_adapter()
extra_merged = ia3.active_method.extra_flops_per_token(ia3)
flops_merged, logits_merged = lessons.forward_flops(ia3, idx), ia3(idx).numpy()
flops_base = lessons.forward_flops(base, idx)
gap = np.abs(logits_merged - logits_unmerged).max()
print(f"extra FLOPs per token: unmerged {extra_unmerged:,d}, merged {extra_merged}")
print(f"matrix-product FLOPs merged {flops_merged:,d} vs base {flops_base:,d}")
print(f"largest |merged - unmerged| logit: {gap:.2e}")

# %%
lessons.say(f"""## The claim, checked

* The paper's form trains $L(2C + 4C)$ = {forms['paper (k, v, ff)']['trainable']:,d} parameters;
  scaling the fused $q, k, v$ output trains $L(3C + 4C)$ =
  {forms['fused qkv (q, k, v, ff)']['trainable']:,d}; both start as the identity, and the forward
  written out above equals the package's.
* (IA)³ is among the smallest: fewer than BitFit and LoRA r=8,
  {100 * counts['(IA)^3 paper'] / base.num_parameters():.2f}% of the base.
* It learns, and it merges: logits equal within float32 rounding (largest gap {gap:.1e}), no extra
  FLOPs once merged.""")

# %%
assert forms["paper (k, v, ff)"]["trainable"] == L * (2 * C + 4 * C) == 3_072
assert forms["fused qkv (q, k, v, ff)"]["trainable"] == L * (3 * C + 4 * C) == 3_584
assert all(f["identity"] for f in forms.values())
assert counts["(IA)^3 paper"] < counts["BitFit"] < counts["LoRA r=8 (c_attn)"]
assert counts["(IA)^3 paper"] < 0.005 * base.num_parameters()
assert ia3_loss < zero_shot_loss
assert any(np.abs(v - 1).max() > 0.01 for vs in vectors.values() for v in vs)
assert extra_unmerged == 3_072 and extra_merged == 0 and flops_merged == flops_base
assert gap < 1e-4
print("all claims hold")

# %% [markdown]
# ## Exercises
#
# 1. Train the fused form (`scale_queries=True`) for the same steps. Do the
#    query scales move as much as the key scales?
# 2. Scale only the feed-forward activations:
#    `IA3Config(target_modules=["mlp.c_proj"], feedforward_modules=["mlp.c_proj"])`.
#    How many parameters, and how well does it learn?
# 3. Unmerge after merging (`unmerge_adapter()`): is the base restored bit
#    for bit? What could make division by $l$ dangerous?
# 4. Why can't (IA)³ on a LayerNorm'd residual stream be merged as simply?
#
# Solutions: `lessons/solutions.md`, section "Lesson 8".
