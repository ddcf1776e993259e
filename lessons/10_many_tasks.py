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
# # Lesson 10: many tasks, one base
#
# A fine-tuned copy of a model per task is a copy of *all* its weights per
# task. With PEFT the base stays frozen and shared, and each task adds a
# small file that can be loaded, switched and removed at will. The frozen
# base brings a second gift: it cannot forget what it knew.
#
# **What you will learn**
#
# 1. How to train one LoRA adapter per task and save only the adapter.
# 2. What that saves on disk: kilobytes per task against megabytes.
# 3. How one `PeftModel` holds several adapters over one base and switches
#    between them (`load_adapter`, `set_adapter`, `disable_adapter`), and that
#    switching never touches the base.
# 4. Catastrophic forgetting, measured: the pretraining corpus's loss after
#    full fine-tuning, against a LoRA adapter active and detached.

# %%
import os
import shutil
import tempfile

import numpy as np

from minipeft import lessons
from minipeft.base import BASE_PATH, load_base, validation_loss
from minipeft.data import CharTokenizer, get_task, pretraining_text
from minipeft.evaluation import evaluate
from minipeft.optim import AdamW, LRSchedule
from minipeft.peft import FullFinetuneConfig, LoraConfig, PeftModel, get_peft_model
from minipeft.peft.model import fingerprint
from minipeft.train import train

plt = lessons.setup()

# %% [markdown]
# ## 1. One adapter per task
#
# The same recipe for each of the three tasks: LoRA r=8 on `c_attn`, AdamW
# with warmup and cosine decay, the same number of steps. Each adapter is
# saved on its own with `save_pretrained`.

# %%
TASKS = ("sentiment", "addition", "reverse")
steps = lessons.pick(200, 25)
tok = CharTokenizer()


def recipe(model, task, lr):
    opt = AdamW(model.trainable_parameters(), lr=lr, weight_decay=0.0)
    return train(model, opt, task.batches("train", 16, seed=0, epochs=None), steps,
                 schedule=LRSchedule(lr, steps, min(20, steps // 5), min_lr=lr / 10), clip=1.0,
                 progress=False)


workdir = tempfile.mkdtemp(prefix="minipeft_lesson10_")
adapters, trained = {}, {}
for name in TASKS:
    pm = get_peft_model(load_base(), LoraConfig(r=8, target_modules=["c_attn"]))
    history = recipe(pm, get_task(name), 3e-3)
    trained[name] = pm
    adapters[name] = os.path.join(workdir, name)
    pm.save_pretrained(adapters[name])
    print(f"{name:9s} trained {steps} steps, last loss {history.last_loss:.3f}, saved to "
          f"{adapters[name]}: {sorted(os.listdir(adapters[name]))}")

# %% [markdown]
# ## 2. Kilobytes against megabytes
#
# An adapter folder holds its config (JSON) and its weights (safetensors):
# here 4 × (128 × 8 + 8 × 384) numbers in float32. A fully fine-tuned model
# must store every weight: we save one too (what its values are does not
# change its size), and compare.

# %%
full_dir = os.path.join(workdir, "full_copy")
get_peft_model(load_base(), FullFinetuneConfig()).save_pretrained(full_dir)


def folder_bytes(path):
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))


adapter_bytes = {name: folder_bytes(path) for name, path in adapters.items()}
full_bytes = folder_bytes(full_dir)
base_bytes = os.path.getsize(BASE_PATH)
for name, b in adapter_bytes.items():
    print(f"LoRA adapter for {name:9s} {b / 1024:7.1f} KiB")
print(f"full fine-tuned copy       {full_bytes / 1024:7.1f} KiB   (the shipped base: "
      f"{base_bytes / 1024:.1f} KiB)")

n = np.arange(1, 21)
fig, ax = plt.subplots()
ax.plot(n, n * full_bytes / 1e6, label="a full copy per task")
ax.plot(n, (base_bytes + n * np.mean(list(adapter_bytes.values()))) / 1e6,
        label="one base + an adapter per task")
ax.set_xlabel("tasks")
ax.set_ylabel("MB on disk")
ax.set_title("Storage for many tasks")
ax.legend()
plt.show()

# %% [markdown]
# ## 3. One base, three adapters, switched
#
# `PeftModel.from_pretrained` wraps a base with a saved adapter (it checks
# the base's fingerprint first: an adapter made for another base is
# refused). `load_adapter` adds more under their own names; `set_adapter`
# chooses which one applies. We score every adapter on every task (the
# held-out answer loss), and the bare base under `disable_adapter()`.

# %%
served = PeftModel.from_pretrained(load_base(), adapters["sentiment"], adapter_name="sentiment")
for name in TASKS[1:]:
    served.load_adapter(adapters[name], adapter_name=name)
print("adapters:", list(served.adapters), "active:", served.active_adapter)

print_before = fingerprint(served.base_model)
n_val = lessons.pick(200, 100)
losses = np.zeros((len(TASKS) + 1, len(TASKS)))        # rows: adapters, then the bare base
for i, adapter in enumerate(TASKS):
    served.set_adapter(adapter)
    for j, name in enumerate(TASKS):
        losses[i, j] = lessons.answer_loss(served, get_task(name), n_examples=n_val)
with served.disable_adapter():
    for j, name in enumerate(TASKS):
        losses[-1, j] = lessons.answer_loss(served, get_task(name), n_examples=n_val)
base_untouched = fingerprint(served.base_model) == print_before

fig, ax = plt.subplots(figsize=(5.5, 4))
im = ax.imshow(losses, cmap="viridis_r")
ax.set_xticks(range(len(TASKS)), TASKS)
ax.set_yticks(range(len(TASKS) + 1), [f"{t} adapter" for t in TASKS] + ["no adapter"])
for (i, j), v in np.ndenumerate(losses):
    ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="w" if v > losses.mean() else "k")
ax.set_xlabel("evaluated on")
ax.set_title("Held-out answer loss")
fig.colorbar(im)
plt.show()

# %% [markdown]
# Each task is best served by its own adapter, and the same base serves all
# three. What each adapter writes, switched in on the same model:

# %%
n_test = lessons.pick(500, 100)
scores = {}
for name in TASKS:
    served.set_adapter(name)
    task = get_task(name)
    scores[name] = evaluate(served, task, "test", limit=n_test)
    ids = tok.encode(task.examples("test")[0].prompt)[None]
    out = served.generate(ids, task.max_new_tokens, temperature=0.0, stop_token=0)
    print(f"[{name} adapter] {task.examples('test')[0].prompt!r} -> "
          f"{tok.decode(out[0, ids.shape[1]:]).strip()!r}   ({task.metric} {scores[name]:.3f})")

# %% [markdown]
# ## 4. Catastrophic forgetting, measured
#
# Fine-tuning on a narrow task pulls a model towards it, and what it knew
# drifts. We measure what it knew by the loss on the *pretraining* corpus's
# validation text, after fine-tuning on `reverse`:
#
# * full fine-tuning, at three learning rates (it changes the base itself);
# * LoRA at two learning rates, with the adapter active, and detached
#   (`disable_adapter()`).
#
# Each run is placed by how well it learned the task (held-out answer loss)
# and how much it forgot.

# %%
corpus_batches = lessons.pick(8, 2)
val_ids = tok.encode(pretraining_text("val"))
reverse = get_task("reverse")


def corpus_loss(model):
    """Cross-entropy on the pretraining corpus's validation text (its first batches)."""
    return validation_loss(model, val_ids, batches=corpus_batches)


base_corpus_loss = corpus_loss(load_base())
points = {}
for lr in lessons.pick([1e-4, 3e-4, 1e-3], [1e-4, 1e-3]):
    full = get_peft_model(load_base(), FullFinetuneConfig())
    recipe(full, reverse, lr)
    points["full", lr] = (lessons.answer_loss(full, reverse), corpus_loss(full))
    if lr == 1e-3:
        full_fast = full
try:
    with full_fast.disable_adapter():
        pass
    full_detachable = True
except ValueError as exc:
    full_detachable = False
    print("disable_adapter() after full fine-tuning:", exc)
detached = {}
for lr in (1e-3, 3e-3):
    lora = trained["reverse"] if lr == 3e-3 else get_peft_model(load_base(), LoraConfig(r=8))
    if lr != 3e-3:
        recipe(lora, reverse, lr)
    points["LoRA active", lr] = (lessons.answer_loss(lora, reverse), corpus_loss(lora))
    with lora.disable_adapter():
        detached[lr] = corpus_loss(lora)
        points["LoRA detached", lr] = (lessons.answer_loss(lora, reverse), detached[lr])
for (kind, lr), (task_loss, forgot) in points.items():
    print(f"{kind:14s} lr {lr:.0e}: answer loss on reverse {task_loss:6.3f}   "
          f"corpus loss {forgot:.4f}  (base {base_corpus_loss:.4f})")

fig, ax = plt.subplots()
markers = {"full": "s", "LoRA active": "o", "LoRA detached": "x"}
for kind, marker in markers.items():
    pts = [(lr, v) for (k, lr), v in points.items() if k == kind]
    ax.scatter([v[0] for _, v in pts], [v[1] for _, v in pts], marker=marker, s=60, label=kind)
    for lr, v in pts:
        ax.annotate(f"{lr:.0e}", v, textcoords="offset points", xytext=(5, 3), fontsize=8)
ax.axhline(base_corpus_loss, color="gray", ls=":", label="the base")
ax.set_xscale("log")
ax.set_xlabel("answer loss on reverse (lower: learned more)")
ax.set_ylabel("pretraining corpus loss (higher: forgot more)")
ax.set_title("Learning against forgetting")
ax.legend(fontsize=8)
plt.show()

# %% [markdown]
# Every fine-tuned model that runs with its change applied forgets some of
# the corpus: full fine-tuning, and LoRA while its adapter is active. How
# much depends on the learning rate and the steps (a gentle full
# fine-tuning can forget less than an eager adapter). What only the frozen
# base guarantees is the way back: detached, the adapter leaves the model
# *exactly* the base, at every learning rate, while a fully fine-tuned model
# has no base left to return to, short of a second full copy.

# %%
prompt = tok.encode("the red fox lives in")[None]
with trained["reverse"].disable_adapter():
    remembered = trained["reverse"].generate(prompt, 20, temperature=0.0, stop_token=0)
drifted = full_fast.generate(prompt, 20, temperature=0.0, stop_token=0)
for name, out in (("full fine-tuning (1e-3)", drifted), ("LoRA detached", remembered)):
    print(f"{name:24s} 'the red fox lives in' -> {tok.decode(out[0, prompt.shape[1]:]).strip()!r}")

# %% [markdown]
# ## The claim, checked
#
# * An adapter costs kilobytes: each folder holds under `0.03 * full_bytes` bytes, `full_bytes` being a full copy's.
# * One base serves three tasks: each adapter beats the bare base on its own
#   task, and is the best of the three there; switching leaves the base's
#   weights bit for bit as they were (same fingerprint).
# * Forgetting: every run applied to the model raises the corpus loss above
#   the base's (full fine-tuning at every learning rate, LoRA while
#   active); detached, the LoRA adapter gives the base's loss exactly, and
#   full fine-tuning cannot be detached at all.

# %%
assert all(b < 0.03 * full_bytes for b in adapter_bytes.values())
assert full_bytes > base_bytes * 0.99
assert base_untouched
for j in range(len(TASKS)):
    assert losses[j, j] < losses[-1, j]                  # better than the bare base
    assert losses[j, j] == losses[:len(TASKS), j].min()  # its own adapter is best
assert all(v[1] > base_corpus_loss for (k, _), v in points.items() if k != "LoRA detached")
assert all(v == base_corpus_loss for v in detached.values())
assert not full_detachable
print("all claims hold")

# %% [markdown]
# The adapters and the full copy were written to a temporary folder; we
# remove it.

# %%
shutil.rmtree(workdir)

# %% [markdown]
# ## Exercises
#
# 1. Add a fourth adapter, (IA)³ on `reverse`, to the same `PeftModel`. How
#    big is its folder? Can it share the base with the LoRA adapters?
# 2. `delete_adapter("addition")`, then score `addition` again. What does the
#    model fall back to?
# 3. Fine-tune fully with a ten times smaller learning rate. Does it forget
#    less, and does it still learn the task?
# 4. Try to load the reverse adapter onto a base whose `wte` was changed by
#    one entry. Read the error.
#
# Solutions: `lessons/solutions.md`, section "Lesson 10".
