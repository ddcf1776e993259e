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
# # Lesson 13: where the memory really goes
#
# Lesson 3 counted a training step's memory and found that PEFT removes the
# gradients and the optimizer state, and keeps most of the activations. At
# this size the activations are most of the step, and they grow with the
# sequence, the attention's with its square. This lesson asks which levers
# cut them, by how much, and at what price.
#
# **What you will learn**
#
# 1. The activations of six variants (full fine-tuning, LoRA, LoRA-FA,
#    ladder side-tuning, prompt tuning, gradient checkpointing), estimated,
#    accounted and measured, split into what the *backbone* keeps and what
#    the *method's own modules* keep.
# 2. Why LoRA cannot cut them: the gradient passes through every block above
#    the lowest adapter, so LayerNorm, GELU and attention keep what they
#    saved. Frozen Linears keep nothing, and LoRA's branch keeps x for ∂A.
# 3. LoRA-FA: A frozen, the branch keeps xA (r floats a token) instead of x
#    and xA (in + r), read off the activation ledger.
# 4. Ladder side-tuning (LST): the backbone runs under `no_grad` and keeps
#    nothing; a narrow side network trains beside it. Its mechanism in a few
#    lines, asserted equal to the package, and its cut against the sequence
#    length.
# 5. Gradient checkpointing as the general-purpose lever, and each lever's
#    price in step FLOPs and time.
# 6. Which lever shrinks which of the five categories of training memory.

# %%
import time

import numpy as np

from minipeft import memory, no_grad
from minipeft.tools import lessons
from minipeft.autograd import ops
from minipeft.workflows.base import load_base
from minipeft.memory.activations import (
    VARIANTS,
    activation_rows,
    activations_against_length,
    format_activation_rows,
    long_config,
)
from minipeft.optim import AdamW
from minipeft.peft import LoraConfig, LSTConfig, get_peft_model, method_config

plt = lessons.setup()
MiB = memory.MiB
B = lessons.pick(16, 2)                 # the reference batch is 16; the fast setting runs 2
T = 128                                 # the reference context

# %% [markdown]
# ## 1. Six variants, three views, split by owner
#
# `memory.profile_step` runs one training step and keeps the engine's books;
# the activation ledger also notes, for every array saved for backward,
# *who* saved it: the **backbone** (the base model's own layers) or the
# **method** (a wrapper's forward, LST's side network, a soft prompt's
# encoder). The estimator's walk over the model's `trace` methods books the
# same split, so the two can be compared to the byte. One step of each
# variant on a fresh reference-sized GPT (memory depends on shapes, not on
# the weights' values):

# %%
rows = activation_rows("reference", batch_size=B, seq_len=T)
print(format_activation_rows(rows, "reference", B))
by = {r["variant"]: r for r in rows}
state = {}
for name in ("full", "lora"):
    e = memory.estimate("reference", name, batch_size=B, seq_len=T)
    state[name] = e.bytes["gradients"] + e.bytes["optimizer"]
    print(f"{name}: gradients + AdamW state {state[name] / MiB:.3f} MiB, "
          f"activations {by[name]['act_acc'] / MiB:.2f} MiB")

# %%
assert all(r["act_est"] == r["act_acc"] for r in rows)
assert all((r["backbone_est"], r["method_est"]) == (r["backbone_acc"], r["method_acc"]) for r in rows)
assert all(r["backbone_acc"] + r["method_acc"] == r["act_acc"] for r in rows)
assert all(r["peak_acc"] <= r["peak_meas"] for r in rows)
assert by["lora"]["act_acc"] > 10 * state["lora"] and by["full"]["act_acc"] > state["full"]

# %% [markdown]
# Estimated equals accounted for every variant, and so does the split. For
# LoRA the activations are many times its gradients and optimizer state;
# even for full fine-tuning they are the larger part. The
# measured peak sits above the accounted one by what no book holds:
# temporaries inside operators (GELU's backward scratch, attention's) and
# Python's own objects; for LST also the backbone's throw-away arrays,
# which its `no_grad` forward makes and drops block by block.
#
# ## 2. Why LoRA cannot cut the activations
#
# LoRA on `c_attn` freezes every weight of the base. A frozen Linear keeps
# nothing for backward (its weight gradient $x^\top g$ is never formed, and
# the input's gradient $g W^\top$ needs only W), so the four Linears' inputs
# go. Everything else stays: to reach block 0's adapter, the gradient has to
# pass back through every LayerNorm, GELU and attention above it, and each
# of those needs what it saved. The estimator's breakdown, by what keeps it:

# %%
e_full = memory.estimate("reference", "full", batch_size=B, seq_len=T)
e_lora = memory.estimate("reference", "lora", batch_size=B, seq_len=T)
keys = sorted(set(e_full.activation_items) | set(e_lora.activation_items),
              key=lambda k: -e_full.activation_items.get(k, 0))
print(f"{'kept by (summed over blocks)':<30}{'full':>9}{'lora':>9}   MiB")
for k in keys:
    print(f"{k:<30}{e_full.activation_items.get(k, 0) / MiB:>9.2f}"
          f"{e_lora.activation_items.get(k, 0) / MiB:>9.2f}")

# %%
kept = ("attention", "mlp gelu", "ln_2", "ln_f", "cross entropy")
assert all(e_full.activation_items[k] == e_lora.activation_items[k] for k in kept)
assert e_lora.activation_items["ln_1"] == 3 / 4 * e_full.activation_items["ln_1"]   # not block 0's
linears = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
assert all(k in e_full.activation_items and k not in e_lora.activation_items for k in linears)
assert e_lora.activation_split["method"] > 0

# %% [markdown]
# Attention, GELU, `ln_2`, `ln_f` and the cross-entropy keep exactly what
# they keep in full fine-tuning; the four Linears keep nothing (nor does the
# tied head, now that `wte` is frozen). Only block 0's `ln_1` is spared: its
# input comes from the frozen embeddings and no gradient needs to go below
# it. What LoRA keeps of its own is the branch: $x$ for
# $\partial A = x^\top (g B^\top)$ and $xA$ for $\partial B = (xA)^\top g$.
#
# The *lowest* adapter decides how far down the gradient must go. Put the
# single adapter in block k only (`target_modules=["h.k.attn.c_attn"]`),
# and the blocks below it keep nothing at all: no gradient needs to pass
# them.

# %%
lowest = {k: memory.estimate("reference", LoraConfig(target_modules=[f"h.{k}.attn.c_attn"]),
                             batch_size=B, seq_len=T).bytes["activations"] for k in range(4)}
for k, v in lowest.items():
    print(f"LoRA in block {k} only: activations {v / MiB:6.2f} MiB")
per_block = lowest[0] - lowest[1]
print(f"each block below the adapter spares {per_block / MiB:.2f} MiB")

# %%
assert lowest[0] > lowest[1] > lowest[2] > lowest[3]
assert lowest[0] - lowest[1] == lowest[1] - lowest[2] == lowest[2] - lowest[3]

# %% [markdown]
# ## 3. LoRA-FA: the branch keeps r floats a token, not in + r
#
# LoRA-FA (Zhang et al., 2023) freezes A at its random start and trains B
# only: `LoraConfig(freeze_A=True)`, or the method name `lora_fa`. With A
# frozen, $xA$ needs no weight gradient, so its product keeps nothing of x
# (the engine's rule, nothing new built for it), and $(xA)B$ keeps the
# r-wide $xA$ for $\partial B$. Each branch states what it keeps
# (`branch_saved_floats`), and the ledger's method share is exactly that,
# plus one 0-d number a branch for the scaling:

# %%
N = B * T
share = {}
for name in ("lora", "lora_fa"):
    pm = get_peft_model(load_base(), method_config(name, r=8))
    floats = pm.active_method.branch_saved_floats(pm, N)
    share[name] = by[name]["method_acc"]
    print(f"{name:<8} per branch {next(iter(floats.values())):>9,d} floats x {len(floats)} "
          f"branches; the ledger's method share {share[name]:>10,d} bytes")
    assert share[name] == 4 * (sum(floats.values()) + len(floats))
print(f"LoRA-FA's branch keeps r / (in + r) = 8 / {128 + 8} = {share['lora_fa'] / share['lora']:.4f}"
      " of LoRA's")

# %%
assert abs(share["lora_fa"] / share["lora"] - 8 / (128 + 8)) < 1e-3
assert by["lora_fa"]["backbone_acc"] == by["lora"]["backbone_acc"]

# %% [markdown]
# The branch's saving is real, and small: the backbone's share, which
# LoRA-FA does not touch, is most of the activations.
#
# ## 4. Ladder side-tuning: leave the backbone out of backward
#
# LST (Sung et al., 2022) trains nothing inside the backbone. The backbone
# runs under `no_grad` (it records no graph and keeps nothing); a side
# network of width $d = D/8 = 16$ reads its hidden states through trainable
# down-projections ("ladders"), mixes them in with learned gates
# $g_i = \sigma(\alpha_i / T)$, and writes back before the frozen final
# LayerNorm:
#
# $$ s_0 = \mathrm{down}_0(h_0),\quad
#    s_i = g_i\,\mathrm{down}_i(h_i) + (1 - g_i)\, f_i(s_{i-1}),\quad
#    \text{logits} = \mathrm{ln\_f}\big(h_L + \mathrm{up}(s_L)\big) W_{te}^\top $$
#
# The mechanism in a few lines, over the package's own modules (`wrapped` is
# the base's block behind the tap LST installs), held against the package's
# forward. The up-projection starts at zero (the wrapped model is the base);
# we give it random values first so that the side network shows.

# %%
pm = get_peft_model(load_base(), LSTConfig())
side, base = pm.lst_side.default, pm.base_model
rng = np.random.default_rng(0)
side.up.weight.data = rng.normal(0, 0.05, side.up.weight.shape).astype(np.float32)
for layer in side.layers:
    layer.alpha.data = rng.normal(0, 0.3, 1).astype(np.float32)
idx = rng.integers(0, 96, (2, 32))

with no_grad():
    h = base.wte(idx) + base.wpe(np.arange(idx.shape[1]))         # h_0: (B, T, D)
    s = side.embed_ladder(h)                                      # s_0: (B, T, d)
    for i, tap in enumerate(base.h):
        h = tap.wrapped(h)                                        # backbone block i
        layer = side.layers[i]
        g = ops.sigmoid(layer.alpha * (1.0 / side.temperature))   # the gate, (1,)
        s = g * layer.ladder(h) + (1.0 - g) * layer.block(s)      # the side block
    by_hand = (base.ln_f.wrapped(h + side.up(s)) @ base.wte.weight.T).data
    package = pm(idx).data
    plain = base.ln_f.wrapped(h) @ base.wte.weight.T
print("largest difference from the package:", float(np.abs(by_hand - package).max()))
print("largest change from the base's logits:", float(np.abs(package - plain.data).max()))

# %%
assert np.allclose(by_hand, package, rtol=1e-5, atol=1e-5)
assert np.abs(package - plain.data).max() > 1e-3              # the side network did something

# %% [markdown]
# What LST keeps for backward: the L + 1 hidden states its ladders read
# (N·D floats each, for the ladders' weight gradients), its own blocks'
# activations at width d, and the head's (ln_f and the cross-entropy). Its
# side blocks are GPT-2 blocks of their own config:

# %%
sc = method_config("lst").side_config(memory.preset("reference"))
lst_pm = get_peft_model(load_base(), LSTConfig())
print(f"side network: {sc.n_layer} blocks, width {sc.n_embd}, {sc.n_head} heads of "
      f"{sc.n_embd // sc.n_head}; ladders keep "
      f"{lst_pm.active_method.ladder_saved_floats(lst_pm, B, T) * 4 / MiB:.2f} MiB; "
      f"the backbone's share {by['lst']['backbone_acc'] / MiB:.2f} MiB (the head only), "
      f"the method's {by['lst']['method_acc'] / MiB:.2f} MiB")
print(f"activations at T = {T}: LST {by['lst']['act_acc'] / MiB:.2f} MiB, "
      f"{by['lst']['act_acc'] / by['full']['act_acc']:.2f} of full fine-tuning's, "
      f"{by['lst']['act_acc'] / by['lora']['act_acc']:.2f} of LoRA's")

# %%
Vb = 96
assert by["lst"]["backbone_acc"] == (N * 128 + N + N * Vb) * 4 + 9 * N       # ln_f, cross-entropy
assert by["lst"]["act_acc"] < by["lora_fa"]["act_acc"] < by["lora"]["act_acc"] < by["full"]["act_acc"]
assert by["lst"]["act_acc"] < 0.5 * by["lora"]["act_acc"]

# %% [markdown]
# ## 5. Against the sequence length
#
# The estimate answers at any length (each point with `n_positions` raised to
# match, and a soft prompt's 20 virtual tokens on top). The tests hold it to
# the books to the byte up to T = 512; the same check runs here at one long
# point.

# %%
seqs = lessons.pick((64, 128, 256, 512, 1024), (64, 128, 256, 512))
curves = activations_against_length("reference", batch_size=B, seq_lens=seqs)
fig, ax = plt.subplots()
for name, ys in curves.items():
    ax.plot(seqs, np.array(ys) / MiB, marker="o", label=name)
ax.set_xscale("log", base=2)
ax.set_yscale("log")
ax.set_xlabel("sequence length T")
ax.set_ylabel(f"saved activations, MiB (batch {B})")
ax.set_title("Reference GPT: activations of one training step against T")
ax.legend(fontsize=8)
plt.show()
for name, ys in curves.items():
    print(f"{name:<10}" + "".join(f"{y / MiB:>10.1f}" for y in ys))
cross = next((t for t, a, b in zip(seqs, curves["lst"], curves["full+ckpt"]) if b < a), None)
print(f"LST keeps {min(l / f for l, f in zip(curves['lst'], curves['full']))*100:.0f}% to "
      f"{max(l / f for l, f in zip(curves['lst'], curves['full']))*100:.0f}% of full "
      f"fine-tuning's; checkpointed full fine-tuning keeps less than LST from T = {cross}")
long_rows = activation_rows(long_config("reference", 512), batch_size=1, seq_len=512,
                            variants=[v for v in VARIANTS if v[0] in ("lst", "lora_fa")])
print(format_activation_rows(long_rows, long_config("reference", 512), 1))

# %% [markdown]
# **What to notice:** every line grows with T, and the PEFT methods that
# train inside the backbone (LoRA, LoRA-FA, prompt tuning) stay close to
# full fine-tuning at every length; LST's line is the lowest of the PEFT
# methods everywhere, but checkpointed full fine-tuning drops below it as T
# grows: LST's side attention keeps its (B, 2, T, T) scores in every one of
# its `n_layer` blocks, while checkpointing holds one block's attention at a time.

# %%
for i, _ in enumerate(seqs):
    assert curves["lst"][i] < curves["lora_fa"][i] < curves["lora"][i] < curves["full"][i]
    assert curves["prompt"][i] > curves["lora_fa"][i]
    assert curves["lst"][i] < 0.5 * curves["full"][i]
assert cross is not None and curves["full+ckpt"][-1] < curves["lst"][-1]
assert all(r["act_est"] == r["act_acc"] for r in long_rows)

# %% [markdown]
# ## 6. The price: step FLOPs and time
#
# A cut in memory is paid somewhere. Checkpointing recomputes every block's
# forward in backward; LST skips the backbone's backward entirely (no
# gradient goes into it), but runs a second network beside it, at inference
# too, and cannot be merged. `lessons.step_flops` counts every matrix
# product one forward and backward forms (machine-independent); the step
# time beside it is the median of three untraced steps on this machine
# (one in the fast setting), a rough indication only (a busy machine moves
# it). Every variant gets the same batch of 108-token rows, so that prompt
# tuning's 20 virtual tokens fit the `n_positions=128` positions.

# %%
def one_step(model, opt, batch):
    _, loss = model(*batch)
    loss.backward()
    opt.step()
    opt.zero_grad()


rng = np.random.default_rng(1)
batch = (rng.integers(0, 96, (B, T - 20)), rng.integers(0, 96, (B, T - 20)))
price = {}
for name, method, ckpt in VARIANTS:
    base_model = load_base()
    base_model.config.gradient_checkpointing = ckpt
    model = get_peft_model(base_model, method_config(method)).train()
    opt = AdamW(model.trainable_parameters(), lr=0.0)
    flops = lessons.step_flops(model, batch)
    one_step(model, opt, batch)                                  # warm-up
    seconds = []
    for _ in range(lessons.pick(3, 1)):
        t0 = time.perf_counter()
        one_step(model, opt, batch)
        seconds.append(time.perf_counter() - t0)
    price[name] = {**flops, "ms": 1000 * float(np.median(seconds)),
                   "infer": model.active_method.extra_flops_per_token(model)}
print(f"{'variant':<10}{'forward GFLOP':>14}{'backward GFLOP':>15}{'ms/step':>9}"
      f"{'+inference FLOPs/token':>24}")
for name, p in price.items():
    print(f"{name:<10}{p['forward'] / 1e9:>14.3f}{p['backward'] / 1e9:>15.3f}{p['ms']:>9.0f}"
          f"{p['infer']:>24,d}")

# %%
full_total = price["full"]["forward"] + price["full"]["backward"]
totals = {n: p["forward"] + p["backward"] for n, p in price.items()}
assert totals["lst"] == min(totals.values())                          # the fewest products
assert price["lst"]["backward"] < 0.5 * price["lora"]["backward"]
assert price["full+ckpt"]["backward"] > price["full"]["backward"]     # the recomputed forward
assert price["lst"]["infer"] > 0 and price["full"]["infer"] == 0

# %% [markdown]
# LST forms the fewest products of all: its backward never enters the
# backbone. Whether its step is also the fastest on the clock depends on
# the machine: the side network is many small products and elementwise ops,
# where the engine's per-op overhead weighs more than its FLOPs; the
# printed times are one run's, not a benchmark (`minipeft bench` is).
# Checkpointing pays one more forward of every block. And LST's side network
# runs at inference too: the FLOPs per token in the last column, never
# merged away, where LoRA and LoRA-FA merge to zero.
#
# ## 7. Which lever shrinks which category
#
# The five categories of training memory, and the lever for each. The
# ratios below are the estimator's, against full fine-tuning at the
# reference batch; a lever "shrinks" a category when it at least halves it.
# QLoRA stores the frozen Linears in NF4 with double quantization (lesson
# 12) and computes in float32 here; its dequantized weight is a temporary of
# one layer's size, made per product (the estimator's `temporaries`).

# %%
def cats(e):
    b = e.bytes
    return {"weights": b["weights_frozen"] + b["weights_trainable"], "gradients": b["gradients"],
            "optimizer": b["optimizer"], "activations": b["activations"]}


levers = {
    "full fine-tuning": memory.estimate("reference", "full", batch_size=B, seq_len=T),
    "LoRA (PEFT)": memory.estimate("reference", "lora", batch_size=B, seq_len=T),
    "QLoRA (NF4 base)": memory.estimate("reference", "lora", batch_size=B, seq_len=T, quantize="nf4"),
    "LoRA-FA": memory.estimate("reference", "lora_fa", batch_size=B, seq_len=T),
    "LST": memory.estimate("reference", "lst", batch_size=B, seq_len=T),
    "checkpointing": memory.estimate("reference", "full", batch_size=B, seq_len=T,
                                     gradient_checkpointing=True),
}
ref = cats(levers["full fine-tuning"])
print(f"{'lever':<18}" + "".join(f"{c:>13}" for c in ref) + f"{'temporaries':>13}")
table = {}
for name, e in levers.items():
    c = cats(e)
    table[name] = {k: c[k] / ref[k] for k in ref}
    temp = f"+{e.bytes['temporaries'] / 1024:.0f} KiB" if e.bytes.get("temporaries") else "-"
    print(f"{name:<18}" + "".join(f"{table[name][k]:>13.3f}" for k in ref) + f"{temp:>13}")

# %%
shrinks = {name: {k for k, v in row.items() if v < 0.5} for name, row in table.items()}  # halved
print(shrinks)
assert shrinks["QLoRA (NF4 base)"] >= {"weights", "gradients", "optimizer"}
assert levers["QLoRA (NF4 base)"].bytes["temporaries"] > 0 == levers["LoRA (PEFT)"].bytes["temporaries"]
assert "weights" not in shrinks["LoRA (PEFT)"] and {"gradients", "optimizer"} <= shrinks["LoRA (PEFT)"]
assert "activations" in shrinks["checkpointing"] and "gradients" not in shrinks["checkpointing"]
assert "activations" in shrinks["LST"] and "activations" not in shrinks["LoRA (PEFT)"]
assert table["LoRA-FA"]["activations"] < table["LoRA (PEFT)"]["activations"]

# %% [markdown]
# | category | lever | its price |
# |---|---|---|
# | weights | quantization of the frozen weights (int8, NF4/int4) | a dequantized copy per product (temporaries), rounding error |
# | gradients, optimizer state | PEFT: train few parameters | quality on hard tasks |
# | activations | gradient checkpointing | one more forward per step |
# | activations | LST: the backbone under `no_grad` | a side network at inference, unmergeable, a random start |
# | activations (the branch) | LoRA-FA: A frozen | B alone must carry the update |
# | temporaries | (what quantization adds: the dequantized weight) | |
#
# ## Exercises
#
# 1. **Fewer side heads.** Estimate LST with `LSTConfig(side_num_heads=1)` and
#    with `side_num_heads=4` at T = 1024. How much of the method's share is the
#    side attention's $T^2$ term? Does one head bring LST below checkpointing?
# 2. **A wider side network.** `reduction_factor=4` doubles the side width.
#    Predict the change in the trainable count and in the ladders' share
#    before running it.
# 3. **LoRA everywhere.** Put LoRA and LoRA-FA on all four Linears
#    (`target_modules=["c_attn", "c_proj", "c_fc"]`, which matches both
#    c_proj). What share of the activations is the method's now, and what is
#    LoRA-FA's saving in MiB?
# 4. **Checkpointing LoRA.** Estimate LoRA with `gradient_checkpointing=True`.
#    Which of the six variants is it closest to, and why can LST not be
#    checkpointed?
#
# Solutions: `lessons/solutions.md`, section "Lesson 13".
