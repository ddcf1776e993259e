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
# # Lesson 7: soft prompts, prompt tuning and prefix tuning
#
# A prompt steers a model without changing a weight. Soft prompts learn
# the prompt instead of writing it: $P$ *virtual tokens* that exist only as
# vectors.
#
# * **Prompt tuning** (Lester et al., 2021) learns $P$ input embeddings and
#   puts them before the embedded input: the model sees $P + T$ positions.
# * **Prefix tuning** (Li and Liang, 2021) learns, for every layer, $P$
#   keys and $P$ values that every real token can attend to, as if a prefix
#   had been run before the input (through the key/value cache).
#
# **What you will learn**
#
# 1. What each trains: a few thousand numbers, and nothing of the base.
# 2. Why they are *not* cheap to train: the gradient must reach the bottom
#    of the model, so the activations are kept as in full fine-tuning. We
#    measure the activation ledger.
# 3. How they learn a task (and where they struggle on a model this small).
# 4. What they cost at inference: a longer context, counted in FLOPs.

# %%
import inspect

import numpy as np

from minipeft.tools import lessons
from minipeft.autograd import LEDGER, Tensor, ops
from minipeft.workflows.base import load_base
from minipeft.data import get_task
from minipeft.peft import (
    FullFinetuneConfig,
    LayerSelectConfig,
    LoraConfig,
    PrefixTuningConfig,
    PromptTuningConfig,
    get_peft_model,
)
from minipeft.peft.soft_prompts import PrefixTuningMethod

plt = lessons.setup()

# %% [markdown]
# ## 1. What they train
#
# With $P$ virtual tokens, width $C$ and $L$ layers, prompt tuning trains
# $PC$ numbers; prefix tuning $P \cdot L \cdot 2C$ (a key and a value of
# width $C$ per layer per virtual token). Prefix tuning is
# unstable when the prefixes are trained directly, so Li and Liang produce
# them with a small MLP from $P$ embeddings during training
# (`prefix_projection=True`); only the prefixes it produces are saved.

# %%
task = get_task("reverse")
base = load_base()
P, C, L = 20, 128, 4
soft = {
    "prompt tuning": PromptTuningConfig(num_virtual_tokens=P),
    "prefix tuning": PrefixTuningConfig(num_virtual_tokens=P),
    "prefix tuning + MLP": PrefixTuningConfig(num_virtual_tokens=P, prefix_projection=True),
}
trained, saved_size = {}, {}
for name, cfg in soft.items():
    pm = get_peft_model(load_base(), cfg)
    trained[name] = pm.get_nb_trainable_parameters()[0]
    saved_size[name] = sum(a.size for a in pm.active_method.state_dict(pm).values())
print(lessons.table([[n, trained[n], saved_size[n]] for n in soft],
                    ["", "trains (numbers)", "saves (numbers)"], ["", ",d", ",d"]))
lessons.say(f"With $P = {P}$, $C = {C}$ and $L = {L}$: prompt tuning trains $PC$ = "
            f"{trained['prompt tuning']:,d} numbers, prefix tuning $P L \\cdot 2C$ = "
            f"{trained['prefix tuning']:,d}.")

# %% [markdown]
# With zero virtual tokens both methods are the base itself, bit for bit.
# With $P > 0$ they change the output from the first step: unlike LoRA or
# adapters, a soft prompt has no "identity" initialisation.

# %%
idx, targets = next(task.batches("val", 8, shuffle=False))
identity = {name: np.array_equal(get_peft_model(load_base(), cfg)(idx).numpy(), base(idx).numpy())
            for name, cfg in (("prompt, P=0", PromptTuningConfig(num_virtual_tokens=0)),
                              ("prefix, P=0", PrefixTuningConfig(num_virtual_tokens=0)))}
print(identity)

# %% [markdown]
# ### The mechanism, on screen
#
# Prompt tuning is one concatenation. With the prompt $E \in \mathbb{R}^{P
# \times C}$ and the tokens' embeddings $X = \mathrm{wte}(idx)$, the base
# runs on $[E; X]$ (positions $0 .. P+T-1$) and the logits of the $P$
# virtual positions are dropped. Written out with the base's own
# embedding table, and checked against the package on the same input (a
# prompt moved away from its initialisation, so that the check means
# something):

# %%
pt = get_peft_model(load_base(), PromptTuningConfig(num_virtual_tokens=P))
E = pt.active_method.encoder(pt).embedding
E.data += 0.1 * np.random.default_rng(0).standard_normal(E.shape).astype(E.data.dtype)
base_gpt = pt.base_model
B_, T_ = idx.shape
X = base_gpt.wte.weight.numpy()[idx]                                   # (B, T, C)
embeds = np.concatenate([np.broadcast_to(E.numpy(), (B_, P, C)), X], axis=1)  # (B, P+T, C)
mine = base_gpt(inputs_embeds=Tensor(embeds)).numpy()[:, P:]           # (B, T, V): real positions
theirs = pt(idx).numpy()
print(f"largest |mine - package| logit: {np.abs(mine - theirs).max():.2e}")
assert mine.shape == theirs.shape and np.allclose(mine, theirs, rtol=1e-5, atol=1e-5)

# %% [markdown]
# Prefix tuning adds nothing to the sequence. Its $P \times L \cdot 2C$
# matrix is cut into, for each layer $l$, $P$ keys $K^{(l)}_p$ and $P$
# values $V^{(l)}_p$ per head, which attention puts before the tokens' own:
#
# $$ \mathrm{softmax}\Big(\frac{q\,[K^{(l)}_p; K]^\top}{\sqrt{d}}\Big)\,[V^{(l)}_p; V]. $$
#
# The package builds them as a read-only key/value cache; its own source:

# %%
print(inspect.getsource(PrefixTuningMethod.cache))

# %% [markdown]
# ## 2. Few parameters, all the activations
#
# The trainable vectors sit at the very bottom (prompt tuning: before the
# first block) or inside every attention (prefix tuning). To reach them the
# gradient must flow back through every layer, so every layer keeps what
# its input gradient needs (lesson 2). We read the activation ledger after
# the forward pass of one training batch, and the number of input-gradient
# products the Linears form (`linear.dx`), for the soft prompts and three
# references: full fine-tuning, LoRA r=8 on `c_attn`, and the last block
# alone.

# %%
batch = next(task.batches("train", 16, shuffle=False))
compared = {"full fine-tuning": FullFinetuneConfig(), "LoRA r=8": LoraConfig(r=8),
            "last block only": LayerSelectConfig(layers=[-1]), **soft}
memory = {}
for name, cfg in compared.items():
    pm = get_peft_model(load_base(), cfg)
    ops.counters.clear()
    before = LEDGER.nbytes()
    _, loss = pm(*batch)
    memory[name] = {"trainable": pm.get_nb_trainable_parameters()[0],
                    "saved": LEDGER.nbytes() - before}
    loss.backward()
    memory[name]["dx products"] = ops.counters["linear.dx"]
print(lessons.table([[n, r["trainable"], r["saved"] / 1e6, r["dx products"]]
                     for n, r in memory.items()],
                    ["", "trains", "saved for backward (MB)", "dx products"],
                    ["", ",d", ".1f", "d"]))

fig, ax = plt.subplots()
for name, r in memory.items():
    ax.scatter(r["trainable"], r["saved"] / 1e6, s=50)
    ax.annotate(name, (r["trainable"], r["saved"] / 1e6), textcoords="offset points",
                xytext=(5, 3), fontsize=8)
ax.set_xscale("log")
ax.set_xlabel("trainable parameters")
ax.set_ylabel("saved for backward (MB)")
ax.set_title("Training memory does not follow the trainable count")
plt.show()

# %%
full = memory["full fine-tuning"]
lessons.say(
    "**What to notice:** the points do not fall from left to right. Prompt tuning trains "
    f"{100 * memory['prompt tuning']['trainable'] / full['trainable']:.1f}% of the parameters and "
    f"keeps *more* activations than full fine-tuning ({memory['prompt tuning']['saved'] / 1e6:.1f} "
    f"MB against {full['saved'] / 1e6:.1f}): every layer now runs over $P$ more positions, and "
    "every layer must pass its input gradient down. Prefix tuning keeps about as much as LoRA "
    f"({memory['prefix tuning']['saved'] / 1e6:.1f} and {memory['LoRA r=8']['saved'] / 1e6:.1f} "
    "MB). Only stopping the backward pass early (the last block alone) saves activation memory.")
assert memory["prompt tuning"]["saved"] >= full["saved"]
assert abs(memory["prefix tuning"]["saved"] - memory["LoRA r=8"]["saved"]) < 0.1 * full["saved"]
assert memory["last block only"]["saved"] < full["saved"] / 3

# %% [markdown]
# ## 3. Learning the task
#
# Soft prompts need large steps. We train prompt tuning twice, from rows of
# the vocabulary's embeddings (the default) and from the embeddings of a
# text that says what to do, and prefix tuning with its MLP, on `reverse`,
# the way `minipeft finetune` trains (`lessons.finetune_and_score`).

# %%
steps = lessons.pick(300, 30)
n_test = lessons.pick(500, 100)
zero_shot_loss = lessons.answer_loss(base, task)
runs = {
    "prompt tuning": (soft["prompt tuning"], 3e-2),
    "prompt tuning, text init": (PromptTuningConfig(
        num_virtual_tokens=P, prompt_tuning_init="TEXT",
        prompt_tuning_init_text="reverse the word: "), 3e-2),
    "prefix tuning + MLP": (soft["prefix tuning + MLP"], 1e-2),
}
histories, results = {}, {}
for name, (cfg, lr) in runs.items():
    run = lessons.finetune_and_score(cfg, task, lr, steps, n_test)
    histories[name] = run.history
    results[name] = {"model": run.model, "answer loss": run.answer_loss, "exact match": run.score}
print(lessons.table([[n, zero_shot_loss, r["answer loss"], r["exact match"]]
                     for n, r in results.items()],
                    ["", "answer loss, base", "after training", "exact match"],
                    ["", ".2f", ".3f", ".3f"]))

fig, ax = plt.subplots()
for name, h in histories.items():
    ax.plot(h.steps, h.losses, label=name)
ax.set_yscale("log")
ax.set_xlabel("step")
ax.set_ylabel("training loss")
ax.set_title("reverse with soft prompts")
ax.legend()
plt.show()

# %%
loss_of = {n: r["answer loss"] for n, r in results.items()}
lessons.say(
    "**What to notice:** prompt tuning learns the *format* at once (a few letters, then a newline) "
    "and the skill slowly: a few vectors at the input must steer every layer of a model this small. "
    "Starting from a text that says what to do helps, and prefix tuning, which speaks to every "
    f"layer's attention directly, learns fastest of the three. After {steps} steps the held-out "
    "answer loss is " + ", ".join(f"{loss_of[n]:.3f} for {n}" for n in results)
    + "; exact match " + ", ".join(f"{results[n]['exact match']:.2f}" for n in results)
    + (" (in the fast setting few steps are taken and no whole word is answered yet: the loss "
       "ranks them; run the full setting to see exact matches)" if lessons.FAST else "")
    + ". Lester et al. (2021) found prompt tuning matches full fine-tuning only on models of "
    "billions of parameters.")
assert loss_of["prefix tuning + MLP"] < loss_of["prompt tuning, text init"] < loss_of["prompt tuning"]
if not lessons.FAST:
    assert results["prefix tuning + MLP"]["exact match"] > results["prompt tuning"]["exact match"]
#
# ## 4. The cost at inference: a longer context
#
# Prompt tuning runs every layer over $P$ more positions, so a forward pass
# over $T$ tokens costs what the base pays for $P + T$. Prefix tuning adds
# no positions to the Linears, only $P$ more keys and values to every
# attention: $2 \cdot 2PC$ FLOPs per token per layer (scores and weighted
# sum). We count the FLOPs of every matrix product (`lessons.forward_flops`),
# and sweep $P$.

# %%
forward_flops = lessons.forward_flops
x = idx                                        # (8, T) prompts of the validation split
T = x.shape[1]
longer = np.concatenate([np.zeros((x.shape[0], P), dtype=x.dtype), x], axis=1)  # (8, P+T)
flops_base = forward_flops(base, x)
flops_base_longer = forward_flops(base, longer)
flops_prompt = forward_flops(get_peft_model(load_base(), soft["prompt tuning"]), x)
flops_prefix = forward_flops(get_peft_model(load_base(), soft["prefix tuning"]), x)
print(lessons.table([["base", flops_base], ["base on P+T positions", flops_base_longer],
                     ["prompt tuning", flops_prompt], ["prefix tuning", flops_prefix]],
                    [f"forward on T = {T}", "FLOPs"], ["", ",d"]))
print(f"prefix tuning adds {(flops_prefix - flops_base) // x.size:,d} FLOPs per token "
      f"= 4 P C L = {4 * P * C * L:,d}")

sweep_P = lessons.pick([0, 5, 10, 20, 40, 60], [0, 10, 40])
per_token = {"prompt tuning": [], "prefix tuning": []}
for p in sweep_P:
    per_token["prompt tuning"].append(
        forward_flops(get_peft_model(load_base(), PromptTuningConfig(num_virtual_tokens=p)), x) / x.size)
    per_token["prefix tuning"].append(
        forward_flops(get_peft_model(load_base(), PrefixTuningConfig(num_virtual_tokens=p)), x) / x.size)

fig, ax = plt.subplots()
for name, values in per_token.items():
    ax.plot(sweep_P, np.array(values) / 1e6, "o-", label=name)
ax.set_xlabel("virtual tokens P")
ax.set_ylabel("MFLOPs per real token (forward)")
ax.set_title(f"Inference cost for prompts of {T} characters")
ax.legend()
plt.show()

# %%
n_pos = base.config.n_positions
lessons.say(
    "**What to notice:** both lines rise with $P$, prompt tuning's far faster: it runs every "
    "Linear over the extra positions, prefix tuning only attention. The context window pays too: "
    f"with $P = {P}$ of the {n_pos} positions taken by virtual tokens, the longest input the model "
    f"can read is {n_pos - P} characters, and at generation time the key/value cache holds $P$ "
    f"more positions per layer ($P \\cdot L \\cdot 2C$ numbers, {P * L * 2 * C * 4 / 1024:g} KiB in "
    "float32 here).")
assert all(np.all(np.diff(v) > 0) for v in per_token.values())
assert np.all(np.diff(per_token["prompt tuning"]) > np.diff(per_token["prefix tuning"]))

# %%
lessons.say(f"""## The claim, checked

* Prompt tuning trains $PC$ = {trained['prompt tuning']:,d} numbers, prefix tuning
  $P L \\cdot 2C$ = {trained['prefix tuning']:,d} (the MLP only while training); with $P = 0$ both
  are the base, bit for bit.
* Both pass the gradient through every block: prompt tuning forms all
  {memory['prompt tuning']['dx products']} input-gradient products and keeps at least as many
  activation bytes as full fine-tuning; prefix tuning keeps more than half as many. The last block
  alone keeps under a third.
* Both learn (held-out answer loss below the base's).
* At inference, prompt tuning on $T$ tokens costs exactly what the base costs on $P + T$; prefix
  tuning adds exactly $4PCL$ FLOPs per token.""")

# %%
assert trained["prompt tuning"] == P * C == 2_560
assert trained["prefix tuning"] == P * L * 2 * C == 20_480
assert saved_size["prefix tuning + MLP"] == 20_480 < trained["prefix tuning + MLP"]
assert all(identity.values())
full = memory["full fine-tuning"]
assert memory["prompt tuning"]["dx products"] == full["dx products"] == 16
assert memory["prompt tuning"]["saved"] >= full["saved"]
assert memory["prefix tuning"]["saved"] > 0.5 * full["saved"]
assert memory["last block only"]["saved"] < full["saved"] / 3
assert memory["prompt tuning"]["trainable"] < 0.01 * full["trainable"]
assert all(r["answer loss"] < zero_shot_loss for r in results.values())
assert flops_prompt == flops_base_longer > flops_base
assert flops_prefix - flops_base == 4 * P * C * L * x.size
assert all(np.all(np.diff(v) > 0) for v in per_token.values())
print("all claims hold")

# %% [markdown]
# ## Exercises
#
# 1. Initialise prompt tuning from text (`prompt_tuning_init="TEXT"`,
#    `prompt_tuning_init_text="reverse the word: "`). Does starting from
#    real embeddings help?
# 2. Train prefix tuning *without* the MLP at learning rates `lr=3e-3` and `lr=3e-2`.
#    What goes wrong?
# 3. How many virtual tokens can prompt tuning use with the longest
#    `reverse` example? Find the error message when you exceed it.
# 4. For a batch of one prompt of $T = 10$ characters, what fraction of a forward
#    pass's FLOPs does prompt tuning with $P = 20$ spend on virtual tokens?
#
# Solutions: `lessons/solutions.md`, section "Lesson 7".
