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
# # Lesson 1: a tour of the tiny world
#
# Parameter-efficient fine-tuning (PEFT) adapts a pretrained model to a new
# task by training a small part of it. To see what that costs and buys we
# need a model we can train, measure and take apart on a laptop: a GPT-2
# shrunk to under a million parameters, pretrained on a small synthetic world.
#
# **What you will learn**
#
# 1. The model: GPT-2's architecture and parameter names, at the reference
#    size, and where its parameters sit.
# 2. The data: a 96-symbol character tokenizer, the pretraining corpus (a
#    toy world with fixed facts, arithmetic and word games), and the three
#    downstream tasks.
# 3. The shipped base: how well it learned the corpus (against a bigram
#    model), what it writes, and why it still fails the tasks: it
#    half-knows the answers but does not know it is being asked.

# %%
import numpy as np

from minipeft import GPT, GPTConfig
from minipeft.tools import lessons
from minipeft.workflows.base import base_info, load_base, validation_loss
from minipeft.data import (
    TASKS,
    CharTokenizer,
    Example,
    Task,
    bigram_cross_entropy,
    get_task,
    pretraining_text,
)
from minipeft.data.corpus import uniform_cross_entropy
from minipeft.workflows.evaluation import evaluate

plt = lessons.setup()

# %% [markdown]
# ## 1. The model
#
# `GPTConfig()` is the reference configuration: `n_layer=4` blocks,
# `n_embd=128` wide, `n_head=4` heads, `n_positions=128`, a vocabulary of
# `vocab_size=96` characters. The parameter names
# are GPT-2's (`h.0.attn.c_attn.weight` is the fused query/key/value
# projection, shape (128, 384)), so everything later (LoRA's
# `target_modules=["c_attn"]`, say) reads as it would on a real GPT-2.

# %%
config = GPTConfig()
print(config)
model = GPT(config)
print(lessons.table([[name, str(p.shape), p.size] for name, p in model.named_parameters()
                     if name.startswith(("wte", "wpe", "h.0.", "ln_f"))],
                    ["parameter", "shape", "size"], ["", "", ",d"]))
print(f"... blocks h.1 to h.{config.n_layer - 1} repeat h.0 ...")
n_params = model.num_parameters()
print(f"total: {n_params:,d} parameters, {4 * n_params / 1e6:.1f} MB in float32")

# %% [markdown]
# Where they sit, from the shapes: a block has $12C^2 + 13C$ (the attention's
# $3C^2 + C^2$, the MLP's $4C^2 + 4C^2$, biases and two LayerNorms), and the
# embeddings $VC + n_{pos}C$. The LM head is tied to `wte`, so it costs nothing.

# %%
C, L, V, P = config.n_embd, config.n_layer, config.vocab_size, config.n_positions
formula = V * C + P * C + L * (12 * C * C + 13 * C) + 2 * C
groups = {"token embedding": V * C, "position embedding": P * C,
          "attention (4 blocks)": L * (4 * C * C + 4 * C),
          "MLP (4 blocks)": L * (8 * C * C + 5 * C),
          "LayerNorms": L * 4 * C + 2 * C}
print(f"formula: {formula:,d}")
fig, ax = plt.subplots()
ax.barh(list(groups), [v / 1e3 for v in groups.values()])
ax.set_xlabel("thousands of parameters")
ax.set_title(f"The reference GPT: {n_params:,d} parameters")
plt.show()

# %% [markdown]
# ## 2. Characters in, characters out
#
# The tokenizer is one table: newline is id 0, then the 95 printable ASCII
# characters in code-point order. There is no padding token; padded
# positions get the target `-100`, which the loss ignores.

# %%
tok = CharTokenizer()
ids = tok.encode("the red fox.\n")
print(len(tok), ids.tolist(), repr(tok.decode(ids)))

# %% [markdown]
# ### The pretraining corpus: a small world worth learning
#
# Five kinds of lines: fixed facts about a world (the fox is always red and
# always lives in the north forest), people, arithmetic (`23+45=68`), word
# transforms (`reverse stone: enots`) and opinions (`the soup was bland, so
# ben was upset.`). The cell below counts the training and validation text.

# %%
train_text, val_text = pretraining_text("train"), pretraining_text("val")
print(f"train {len(train_text):,d} characters, validation {len(val_text):,d}")
print(val_text[:700])

# %% [markdown]
# ### The downstream tasks: the same skills, asked differently
#
# Each task reuses a skill the corpus teaches, in a format the corpus never
# uses. Every example is one line, `prompt + answer + "\n"`; the loss covers
# the answer only.

# %%
for name in TASKS:
    task = get_task(name)
    print(f"{name}: {task.description} ({task.metric}); {task.sizes}; "
          f"majority baseline {task.majority_baseline('test'):.3f}")
    for ex in task.examples("train")[:3]:
        print(f"    {ex.prompt!r} -> {ex.answer!r}")

reverse = get_task("reverse")
idx, targets = next(reverse.batches("train", 2, shuffle=False))
print("\none training batch of `reverse` (idx, then targets; '~' = ignored):")
for row_i, row_t in zip(idx, targets):
    print("   ", repr(tok.decode(row_i)))
    print("   ", repr("".join("~" if t < 0 else tok.decode([t]) for t in row_t)))

# %% [markdown]
# ## 3. The shipped base
#
# `load_base()` loads the model `minipeft pretrain` made (next-character
# prediction on the corpus; its file records the recipe, printed below). Its file records its
# validation loss and a character-bigram model's. We measure both again:
# the loss on the validation text (all of it, or its first batches in the
# fast setting), and the bigram model's, counted from the training text.

# %%
base = load_base()
info = base_info()
val_ids = tok.encode(val_text)
val_batches = lessons.pick(None, 6)          # None: the whole validation text
base_loss = validation_loss(base, val_ids, batches=val_batches)
bigram_loss = bigram_cross_entropy(train_text, val_text, tok)
uniform_loss = uniform_cross_entropy()
print("pretrained with:", info["recipe"])
print(f"stored in the file: base {info['val_loss']:.4f}, bigram {info['bigram_val_loss']:.4f}")
print(f"measured now:       base {base_loss:.4f}, bigram {bigram_loss:.4f}, "
      f"uniform guess ln(96) = {uniform_loss:.4f}  (nats per character)")
print(f"the base is {100 * (1 - base_loss / bigram_loss):.1f}% below the bigram model")

fig, ax = plt.subplots()
ax.bar(["uniform", "bigram", "shipped base"], [uniform_loss, bigram_loss, base_loss],
       color=["C7", "C1", "C0"])
ax.set_ylabel("validation cross-entropy (nats/char)")
ax.set_title("What the base learned")
plt.show()

# %%
lessons.say(f"**What to notice:** the shipped base's bar is the lowest by far: "
            f"{base_loss:.3f} nats a character, {100 * (1 - base_loss / bigram_loss):.0f}% below the "
            f"bigram model's {bigram_loss:.3f}, which is itself below the uniform guess's "
            f"{uniform_loss:.3f}.")
assert base_loss < 0.7 * bigram_loss < uniform_loss

# %% [markdown]
# ### Where the loss goes, character by character
#
# A mean hides what was learned. Per character, the model is surprised
# where the world offers a choice: which animal a line is about, the letters
# of a made-up word, the numbers of a sum. Once the subject is named, the
# fact that follows costs nothing (the red fox lives in the north forest),
# and once the word is written, neither does its reversal. The digits of a
# sum stay uncertain: addition is the skill the base learned worst.

# %%
lines = ["the red fox lives in the north forest.\n", "23+45=68\n", "reverse qzvk: kvzq\n"]
fig, axes = plt.subplots(len(lines), 1, figsize=(7.5, 6))
for ax, line in zip(axes, lines):
    ids = tok.encode("\n" + line)                         # a line starts after a newline
    logits = base(ids[None, :-1]).numpy()[0]              # (T, V)
    logp = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
    surprise = -logp[np.arange(len(ids) - 1), ids[1:]]    # nats for each next character
    ax.bar(range(len(surprise)), surprise)
    ax.set_xticks(range(len(surprise)), [repr(c)[1:-1] for c in line], fontsize=8)
    ax.set_ylabel("nats")
axes[0].set_title("Loss of each character, given the ones before it")
fig.tight_layout()
plt.show()


def surprise_of(line):
    ids = tok.encode("\n" + line)
    logits = base(ids[None, :-1]).numpy()[0]              # (T, V)
    logp = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
    return -logp[np.arange(len(ids) - 1), ids[1:]]        # nats for each next character


fox, total, rev = (surprise_of(line) for line in lines)
fact = fox[len("the red fox lives in "):]                  # " the north forest." after the subject
answer, digits = rev[len("reverse qzvk: "):], total[len("23+45="):-1]
lessons.say(f"**What to notice:** the tall bars are choices: the animal, the made-up word, the "
            f"digits. The fact after the subject costs {fact.mean():.3f} nats a character on "
            f"average, the reversal of the written word {answer.mean():.3f}, and the sum's digits "
            f"{digits.mean():.2f}: addition is the skill the base learned worst.")
assert fact.mean() < 0.1 and answer.mean() < 0.1 < 1.0 < digits.mean()

# %% [markdown]
# ### Generating text
#
# `generate` runs the prompt once, keeps every layer's keys and values in a
# cache, and then feeds one new character at a time. Without the cache it
# recomputes the whole sequence at every step: slower, the same tokens.

# %%
prompts = ["the red fox lives in", "ada is a", "reverse mop: ", "the soup was bland, so"]
for prompt in prompts:
    ids = tok.encode(prompt)[None]
    out = base.generate(ids, 40, temperature=0.0, stop_token=0)
    print(repr(prompt), "->", repr(tok.decode(out[0, ids.shape[1]:]).split("\n")[0]))

start = tok.encode("\n")[None]
sampled = base.generate(start, 120, temperature=0.8, top_k=20, seed=0)
print("\nsampled from a newline:\n" + tok.decode(sampled[0]))

ids = tok.encode("reverse stone: ")[None]
with_cache = base.generate(ids, 30, temperature=0.0)
without_cache = base.generate(ids, 30, temperature=0.0, use_cache=False)
print("cache and no cache give the same tokens:", np.array_equal(with_cache, without_cache))

# %% [markdown]
# ### It half-knows the answers
#
# The base reverses words when asked in its own format, `reverse mop: `.
# The `reverse` task asks `spell mop backwards: `. We score the base
# zero-shot on the same test words in both formats, with the package's own
# scorer (greedy answers, exact match). A task is just examples and a
# metric, so the corpus-format version is a `Task` we build on the spot.

# %%
n_test = lessons.pick(500, 100)
words = [ex.prompt.split()[1] for ex in reverse.examples("test")[:n_test]]
own_format = [Example(f"reverse {w}: ", w[::-1]) for w in words]
own = Task("reverse_own_format", "exact_match", "the corpus's wording",
           {"train": own_format, "val": [], "test": own_format})
zero_shot_task_format = evaluate(base, reverse, "test", limit=n_test)
zero_shot_own_format = evaluate(base, own, "test")
print(f"base on {n_test} test words: 'spell w backwards: ' {zero_shot_task_format:.3f}   "
      f"'reverse w: ' {zero_shot_own_format:.3f}")

# %% [markdown]
# That gap is what the rest of the course closes with a few thousand
# trained parameters: not a new skill, a new way of being asked.
#
# ## The claim, checked

# %%
lessons.say(f"""* The reference GPT has exactly $VC + n_{{pos}}C + L(12C^2 + 13C) + 2C$ = {formula:,d}
  parameters.
* The shipped base has learned its world: its validation loss is
  {100 * (1 - base_loss / bigram_loss):.0f}% below the bigram model's (the bar it was built to
  clear: more than 30% below).
* Generation with the key/value cache writes the same tokens as without.
* The base reverses most words in the corpus's format ({zero_shot_own_format:.2f}) and (almost)
  none in the task's ({zero_shot_task_format:.2f}): it half-knows the answer.""")

# %%
assert n_params == formula == 822_016
assert base_loss < 0.7 * bigram_loss < uniform_loss
assert abs(bigram_loss - info["bigram_val_loss"]) < 1e-4
assert np.array_equal(with_cache, without_cache)
assert zero_shot_own_format > 0.5 and zero_shot_task_format < 0.05
print("all claims hold")

# %% [markdown]
# ## Exercises
#
# 1. Count the parameters of GPT-2 small from the formula ($L=12$, $C=768$,
#    $V=50257$, $n_{pos}=1024$) and compare with the 124M everyone quotes.
# 2. Ask the base about the world: `"where does the frog live?"`. Then ask
#    something the corpus never says. What does it do?
# 3. Score the base on `addition` in both formats (`what is 23 plus 45? `
#    and `23+45=`). Does it half-know addition as well as reversal?
# 4. Sample from `"\n"` at `temperature=0.2`, `0.8` and `1.5`. Which kinds of
#    lines survive high temperature?
#
# Solutions: `lessons/solutions.md`, section "Lesson 1".
