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
# # Lesson 6: bottleneck adapters, and the inference cost they add
#
# Adapters (Houlsby et al., 2019) were the first additive PEFT method: a
# small residual MLP inserted after a sublayer,
#
# $$ y' = y + f(y\,W_{down} + b_{down})\,W_{up} + b_{up}, \qquad
#    W_{down} \in \mathbb R^{C \times m},\ W_{up} \in \mathbb R^{m \times C},\ m \ll C. $$
#
# Houlsby et al. put one after the attention and one after the MLP of every
# block; Pfeiffer et al. (2020) keep only the one after the MLP, at half the
# cost and, they found, little loss.
#
# **What you will learn**
#
# 1. Where each placement inserts adapters, and how many parameters they train.
# 2. How the two placements learn the same task.
# 3. The adapter's forward pass, written out in four lines and checked
#    against the package's.
# 4. What adapters cost at inference, counted in FLOPs, and why (unlike
#    LoRA) that cost cannot be merged away.

# %%
import time

import numpy as np
from IPython.display import Markdown, display

from minipeft import Tensor, no_grad
from minipeft.tools import lessons
from minipeft.workflows.base import load_base
from minipeft.data import get_task
from minipeft.peft import AdapterConfig, LoraConfig, get_peft_model

plt = lessons.setup()

# %% [markdown]
# ## 1. Placement and size
#
# `AdapterConfig(placement=...)` names the Linear after which each adapter
# sits: the attention's output projection `attn.c_proj` and the MLP's
# `mlp.c_proj` (Houlsby), or `mlp.c_proj` alone (Pfeiffer). Each adapter has
# $2Cm + m + C$ parameters ($C$ = 128, the width; $m$ = 16 here). $W_{up}$
# and $b_{up}$ start at zero, so the adapter starts as the identity.

# %%
task = get_task("reverse")
base = load_base()
idx, targets = next(task.batches("val", 8, shuffle=False))
C, m = 128, 16
placements = {}
for placement in ("houlsby", "pfeiffer"):
    pm = get_peft_model(load_base(), AdapterConfig(bottleneck=m, placement=placement))
    wrapped = [name for name, _ in pm.active_method.wrappers(pm)]
    placements[placement] = {
        "model": pm,
        "adapters": len(wrapped),
        "trainable": pm.get_nb_trainable_parameters()[0],
        "identity": np.array_equal(pm(idx).numpy(), base(idx).numpy()),
    }
    print(f"{placement}: {len(wrapped)} adapters after {sorted({n.split('.', 2)[2] for n in wrapped})}")
    pm.print_trainable_parameters()
print(f"one adapter: 2Cm + m + C = {2 * C * m + m + C:,d} parameters")
print("both equal the base at initialisation:", all(p["identity"] for p in placements.values()))

# %% [markdown]
# ## 2. Learning the task
#
# Both placements train on `reverse` with the same steps and learning rate,
# the way `minipeft finetune` trains (`lessons.finetune_and_score`).

# %%
steps = lessons.pick(200, 30)
n_test = lessons.pick(500, 100)
zero_shot_loss = lessons.answer_loss(base, task)
histories, results = {}, {}
for placement in ("houlsby", "pfeiffer"):
    run = lessons.finetune_and_score(AdapterConfig(bottleneck=m, placement=placement), task,
                                     3e-3, steps, n_test)
    histories[placement] = run.history
    results[placement] = {"model": run.model, "answer loss": run.answer_loss,
                          "exact match": run.score}
    print(f"{placement}: answer loss {zero_shot_loss:.2f} -> {results[placement]['answer loss']:.3f}, "
          f"exact match {results[placement]['exact match']:.3f}")

fig, ax = plt.subplots()
for placement, h in histories.items():
    ax.plot(h.steps, h.losses, label=f"{placement} ({placements[placement]['trainable']:,d} params)")
ax.set_yscale("log")
ax.set_xlabel("step")
ax.set_ylabel("training loss")
ax.set_title("reverse with bottleneck adapters (m = 16)")
ax.legend()
plt.show()

# %% [markdown]
# What to notice: both placements learn the task from the same start; the
# held-out answer loss of each ends far below the base's zero-shot loss.

# %%
assert all(r["answer loss"] < zero_shot_loss / 2 for r in results.values())
assert all(h.losses[-1] < h.losses[0] for h in histories.values())

# %% [markdown]
# ## 3. The mechanism, written out
#
# Here is the whole adapter, the formula above as NumPy: the frozen Linear,
# down into the bottleneck, the nonlinearity, back up, added to the
# Linear's output. We run it on a random input with the weights the
# Houlsby adapter after `h.0.mlp.c_proj` has just learned, and hold it
# against that layer of the package (`minipeft/peft/adapters.py`,
# `BottleneckAdapter.forward`).

# %%
def adapter_forward(x, W, b, W_down, b_down, W_up, b_up, f=lambda z: np.maximum(z, 0.0)):
    r"""$y' = y + f(y W_{down} + b_{down}) W_{up} + b_{up}$ with $y = xW + b$ (ReLU by default)."""
    y = x @ W + b                      # (B, T, C): the frozen Linear, as in the base
    h = f(y @ W_down + b_down)         # (B, T, m): into the bottleneck
    return y + h @ W_up + b_up         # (B, T, C): back out, added to y (the residual)


layer = results["houlsby"]["model"].base_model.h[0].mlp.c_proj    # a BottleneckAdapter


def weights(store):
    return store._parameters["default"].numpy()


x = np.random.default_rng(0).standard_normal((2, 5, layer.in_features)).astype(np.float32)
ours = adapter_forward(x, layer.base_layer.weight.numpy(), layer.base_layer.bias.numpy(),
                       weights(layer.adapter_down), weights(layer.adapter_down_bias),
                       weights(layer.adapter_up), weights(layer.adapter_up_bias))
with no_grad():
    package = layer(Tensor(x)).numpy()
forward_gap = float(np.abs(ours - package).max())
up_norm = float(np.linalg.norm(weights(layer.adapter_up)))
print(f"{type(layer).__name__} after h.0.mlp.c_proj: |W_up| = {up_norm:.3f} (trained, no longer 0)")
print(f"largest |ours - package| over {ours.size:,d} outputs: {forward_gap:.1e}")

# %% [markdown]
# ## 4. The cost at inference
#
# An adapter sits *in series*, after a nonlinearity $f$: no weight of the
# base can absorb it. Every token pays for its two products, $2 \cdot 2Cm$
# FLOPs per adapter (`extra_flops_per_token`), forever. LoRA's branch, by
# contrast, is linear and merges into $W$ (lesson 5). We count the FLOPs of
# every matrix product in one forward pass (`lessons.forward_flops`).

# %%
n_tokens = idx.size
flops = {"base": lessons.forward_flops(base, idx)}
extra = {}
for placement in ("houlsby", "pfeiffer"):
    pm = results[placement]["model"]
    flops[placement] = lessons.forward_flops(pm, idx)
    extra[placement] = pm.active_method.extra_flops_per_token(pm)
lora = get_peft_model(load_base(), LoraConfig(r=8))
flops["LoRA r=8, unmerged"] = lessons.forward_flops(lora, idx)
lora.merge_adapter()
flops["LoRA r=8, merged"] = lessons.forward_flops(lora, idx)
for name, f in flops.items():
    print(f"{name:20s} {f / n_tokens:>12,.0f} FLOPs per token  (+{(f - flops['base']) / n_tokens:,.0f})")

try:
    results["houlsby"]["model"].merge_adapter()
    merge_refused = False
except ValueError as exc:
    merge_refused = True
    print("\nmerge_adapter():", exc)

fig, ax = plt.subplots()
names = list(flops)
ax.bar(names, [(flops[n] - flops["base"]) / n_tokens for n in names],
       color=["C7", "C1", "C2", "C3", "C0"])
ax.set_ylabel("extra FLOPs per token (forward)")
ax.set_title("What each method adds to every token at inference")
ax.tick_params(axis="x", labelrotation=20)
plt.show()

# %% [markdown]
# What to notice: the merged LoRA's bar is empty (it adds nothing), and the
# Houlsby bar is exactly twice the Pfeiffer one (twice the adapters).

# %%
assert flops["LoRA r=8, merged"] == flops["base"] < flops["LoRA r=8, unmerged"]
assert flops["houlsby"] - flops["base"] == 2 * (flops["pfeiffer"] - flops["base"]) > 0
share = {p: extra[p] * n_tokens / flops["base"] for p in ("pfeiffer", "houlsby")}
display(Markdown(f"Here the extra is {share['pfeiffer']:.1%} (Pfeiffer) and "
                 f"{share['houlsby']:.1%} (Houlsby) of the base's forward FLOPs."))

# %% [markdown]
# On a real GPU the larger cost is latency: at batch size 1, each adapter
# is two more small kernels run one after the other, in every layer. The
# wall-clock time of greedy generation on this machine (shown, not
# asserted):

# %%
prompts = next(ids for _, ids in task.prompt_batches("test", 32))
for name, model in (("base", base), ("pfeiffer", results["pfeiffer"]["model"]),
                    ("houlsby", results["houlsby"]["model"])):
    t0 = time.perf_counter()
    out = model.generate(prompts, task.max_new_tokens, temperature=0.0)
    ms = 1e3 * (time.perf_counter() - t0) / task.max_new_tokens
    print(f"{name:9s} {ms:6.1f} ms per generated position (batch of {len(prompts)})")

# %% [markdown]
# ## The claim, checked
#
# * Houlsby places 2 adapters per block, Pfeiffer 1, each of
#   $2Cm + m + C$ parameters.
# * Both start as the identity and both learn the task.
# * The four-line forward above is the package's adapter: the same outputs
#   within float32 rounding, with a trained (non-zero) $W_{up}$.
# * Each adds exactly `extra_flops_per_token` FLOPs to every token
#   ($4Cm$ per adapter: Houlsby twice Pfeiffer), and they cannot be merged:
#   the cost stays. A merged LoRA adds none.

# %%
per_adapter = 2 * C * m + m + C
assert placements["houlsby"]["adapters"] == 8 and placements["pfeiffer"]["adapters"] == 4
assert placements["houlsby"]["trainable"] == 8 * per_adapter == 33_920
assert placements["pfeiffer"]["trainable"] == 4 * per_adapter == 16_960
assert all(p["identity"] for p in placements.values())
assert all(r["answer loss"] < zero_shot_loss for r in results.values())
assert up_norm > 0 and forward_gap < 1e-4
for placement in ("houlsby", "pfeiffer"):
    assert flops[placement] - flops["base"] == extra[placement] * n_tokens
assert extra["houlsby"] == 2 * extra["pfeiffer"] == 8 * 4 * C * m
assert merge_refused
assert flops["LoRA r=8, merged"] == flops["base"] < flops["LoRA r=8, unmerged"]
print("all claims hold")

# %% [markdown]
# ## Exercises
#
# 1. Sweep the bottleneck $m \in \{4, 16, 64\}$ for the Pfeiffer placement.
#    How do trainable parameters, extra FLOPs and exact match scale?
# 2. Try `nonlinearity="gelu"` and `"tanh"`. Does the choice matter here?
# 3. At which bottleneck would a Houlsby adapter add as many FLOPs per token
#    as a whole block of the base?
# 4. Why is a LoRA with `target_modules=["mlp.c_proj"]` mergeable while a
#    Pfeiffer adapter after the same Linear is not? Write the two outputs
#    as functions of the Linear's input.
#
# Solutions: `lessons/solutions.md`, section "Lesson 6".
