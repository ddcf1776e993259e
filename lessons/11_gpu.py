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
# # Lesson 11: the GPU backend
#
# Every array in minipeft knows its own module: NumPy on the CPU, CuPy on an
# NVIDIA GPU. Compute code asks the data (`xp = backend.xp(a)`) and never
# imports NumPy for maths on tensor data, so the same lines run on both.
# There is no global "current device": a model moves with `.to("gpu")`.
#
# A third backend, **strict**, is NumPy underneath with CuPy's manners: it
# refuses what CuPy refuses (silent conversion to NumPy, mixing with NumPy
# arrays). The test suite runs on it everywhere, so the GPU path cannot rot
# on machines without a GPU, like the one this lesson may be running on.
#
# **What you will learn**
#
# 1. Which devices this machine has, and what the strict stand-in refuses.
# 2. That the same code computes the same numbers on every device, and how
#    equal: bit for bit where every entry is computed by the same arithmetic,
#    within a stated float32 bound where a product's terms may be summed in
#    another order (the CPU's threads, a GPU).
# 3. Speed: one training step per device; and, with a GPU, CuPy's memory
#    pool against the bytes the package accounts for.
#
# Without a GPU the lesson runs on the CPU and the strict stand-in, and
# says so.

# %%
import time

import numpy as np

from minipeft import backend
from minipeft.tools import lessons
from minipeft.autograd import LEDGER
from minipeft.autograd.parallel import get_num_threads, using_threads
from minipeft.workflows.base import load_base
from minipeft.data import CharTokenizer, lm_batches, pretraining_text
from minipeft.nn import GPT, GPTConfig
from minipeft.optim import AdamW
from minipeft.peft import FullFinetuneConfig, LoraConfig, get_peft_model

plt = lessons.setup()

# %% [markdown]
# ## 1. The devices here

# %%
has_gpu = backend.gpu_available()
if has_gpu:
    cp = backend.require_gpu()
    props = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
    print(f"GPU: {props['name'].decode()}, CuPy {cp.__version__}")
else:
    try:
        backend.require_gpu()
    except RuntimeError as exc:
        print(f"No GPU here ({exc})")
    print("This lesson runs on the CPU and on the strict stand-in instead; the GPU cells "
          "say what they would show.")
devices = ["cpu", "strict"] + (["gpu"] if has_gpu else [])
print("devices in this lesson:", devices)

# %% [markdown]
# The strict stand-in computes with NumPy but refuses, as CuPy does, an
# implicit trip to the host and an operation mixing device and host arrays.
# Explicit moves (`backend.to_device`, `backend.asnumpy`) are allowed.

# %%
a = backend.to_device(np.arange(4.0), "strict")
refusals = []
for what, attempt in (("np.asarray(device array)", lambda: np.asarray(a)),
                      ("device array + host array", lambda: a + np.ones(4))):
    try:
        attempt()
    except backend.StrictError as exc:
        refusals.append(what)
        print(f"{what}: refused -- {str(exc)[:90]}...")
print("explicit copy to the host:", backend.asnumpy(a * 2))

# %% [markdown]
# ## 2. The same code, the same numbers
#
# The shipped base with LoRA r=8, loaded onto each device; three training
# steps on the same batches of the pretraining corpus (`B=16` windows of `T=128`
# characters). We record the losses, the activation ledger after each
# forward pass and the logits of the trained model.

# %%
tok = CharTokenizer()
val_ids = tok.encode(pretraining_text("val"))
n_steps = 3
batches = [b for _, b in zip(range(n_steps), lm_batches(val_ids, 16, 128, seed=0))]


def three_steps(device):
    """LoRA r=8 on the shipped base, trained on `batches` on `device`."""
    pm = get_peft_model(load_base(device=device), LoraConfig(r=8))
    opt = AdamW(pm.trainable_parameters(), lr=3e-3)
    losses, saved = [], []
    for idx, targets in batches:
        before = LEDGER.nbytes()
        _, loss = pm(idx, targets)
        saved.append(LEDGER.nbytes() - before)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return {"losses": losses, "saved": saved,
            "logits": backend.asnumpy(pm(batches[0][0][:2]).data),
            "param device": next(iter(pm.parameters())).device}


print(f"the CPU engine runs on {get_num_threads()} thread(s)")
runs = {device: three_steps(device) for device in devices}
for device, run in runs.items():
    print(f"{device:6s} parameters on {run['param device']!r}: losses "
          + ", ".join(f"{v:.7f}" for v in run["losses"])
          + f"; saved for backward {run['saved'][0]:,d} B")

# How far apart, counted in float32 roundings (2**-23, relative) of the
# largest logit; the bound the claims below hold strict to
eps = float(np.finfo(np.float32).eps)
scale = float(np.abs(runs["cpu"]["logits"]).max())
ulps = 128
bound = ulps * eps * scale
for device in devices[1:]:
    gap = np.abs(runs[device]["logits"] - runs["cpu"]["logits"]).max()
    print(f"{device} against cpu: largest logit difference after training {gap:.2e} "
          f"({gap / (eps * scale):.1f} roundings of the largest logit, {scale:.1f})")
print(f"the bound for strict: {ulps} roundings, {bound:.2e}")

# The same three steps with the CPU engine on one thread
with using_threads(1):
    one_thread = {device: three_steps(device) for device in ("cpu", "strict")}
gap_1 = np.abs(one_thread["strict"]["logits"] - one_thread["cpu"]["logits"]).max()
print(f"one CPU thread, strict against cpu: largest logit difference {gap_1:.2e}")

# %% [markdown]
# Strict makes each matrix product whole, in one BLAS call, as CuPy hands a
# product to cuBLAS. The CPU engine on more than one thread cuts each large
# product into parts of rows, one per thread (`split_matmul`). An entry of a
# product is a sum of terms, and the order BLAS adds them in is its kernel's
# choice: OpenBLAS picks a kernel for your CPU, and some machines force one
# (`OPENBLAS_CORETYPE=Haswell`). Some kernels sum a slice of rows exactly as
# they sum the whole, others do not; then the products differ by a rounding
# or two, and three training steps carry that into the logits. So the claim
# that holds everywhere is a bound: strict's logits are within 128 float32
# roundings of the largest logit of the CPU's (what is printed above).
#
# Bit for bit holds where every entry gets the same arithmetic: on one CPU
# thread both make each product whole, and the rest is elementwise work and
# sums within a row, which give the same bits however the rows are cut. A GPU
# sums in its own order (cuBLAS, its own reductions), so it agrees within
# float32 rounding too. The ledger books the same bytes everywhere: it counts
# each array's own size, not the pool's rounded blocks.
#
# ## 3. Speed
#
# One training step (forward, backward, AdamW) timed on each device, for
# full fine-tuning and LoRA, on the reference model and batch. GPU work is
# queued, so each timing waits for it (`backend.synchronize`). The numbers
# are this machine's (shown, never asserted). With a GPU we also time a
# model of GPT-2 small's width and depth, where the GPU has enough work to
# be worth it.

# %%
def median_step_ms(model, batch, steps):
    opt = AdamW(model.trainable_parameters(), lr=1e-4)
    times = []
    for i in range(steps + 1):                       # the first step warms up
        backend.synchronize()
        t0 = time.perf_counter()
        _, loss = model(*batch)
        loss.backward()
        opt.step()
        opt.zero_grad()
        backend.synchronize()
        if i:
            times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times))


timed_steps = lessons.pick(5, 2)
speed = {}
for device in devices:
    for method, cfg in (("full", FullFinetuneConfig()), ("LoRA r=8", LoraConfig(r=8))):
        pm = get_peft_model(load_base(device=device), cfg)
        speed[device, method] = median_step_ms(pm, batches[0], timed_steps)
        print(f"reference model, {device:6s} {method:9s} {speed[device, method]:8.1f} ms per step "
              f"({16 * 128 / speed[device, method] * 1e3:,.0f} tokens/s)")

if has_gpu:
    big = GPTConfig(n_layer=12, n_head=12, n_embd=768, n_positions=512)
    big_batch = next(lm_batches(val_ids, 8, 512, seed=0))
    for device in ("cpu", "gpu"):
        model = GPT(big, seed=0).to(device)
        speed[device, "GPT-2 small size"] = median_step_ms(
            get_peft_model(model, LoraConfig(r=8)), big_batch, lessons.pick(3, 1))
        print(f"GPT-2-small-sized model (85M), {device}, LoRA: "
              f"{speed[device, 'GPT-2 small size']:.0f} ms per step")

fig, ax = plt.subplots()
labels = [f"{d}\n{m}" for d, m in speed]
ax.bar(labels, list(speed.values()), color=[f"C{devices.index(d)}" for d, _ in speed])
ax.set_yscale("log")
ax.set_ylabel("ms per training step")
ax.set_title("One training step, by device" + ("" if has_gpu else " (no GPU on this machine)"))
plt.show()

# %% [markdown]
# **What to notice:** one training loop, unchanged, ran on every device
# here; only the arrays moved. The heights are this machine's timings, read
# as an indication and never asserted (a busy machine moves them).

# %%
assert {d for d, _ in speed} == set(devices)              # every device ran the same steps
lessons.say(f"The same step ran on {', '.join(devices)}"
            + ("." if has_gpu else "; with no GPU here, the strict stand-in plays CuPy's part."))

# %% [markdown]
# ### Memory: what the package counts against what CuPy holds
#
# CuPy allocates device memory from a pool and keeps freed blocks for reuse,
# so the pool's `used_bytes()` (blocks handed out now) and `total_bytes()`
# (blocks held, used or not) are what the GPU spends. What the package can
# account for is parameters, gradients, optimizer state and the ledger's
# activations. On the CPU there is no pool to read.

# %%
accounted = {}
pool = {}
device = "gpu" if has_gpu else "cpu"
pm = get_peft_model(load_base(device=device), FullFinetuneConfig())
opt = AdamW(pm.trainable_parameters(), lr=1e-4)
params_bytes = sum(p.nbytes for p in pm.parameters())
if has_gpu:
    mempool = cp.get_default_memory_pool()
    mempool.free_all_blocks()
    pool["after the model moved"] = mempool.used_bytes()
LEDGER.reset_peak()
start = LEDGER.nbytes()
_, loss = pm(*batches[0])
activation_bytes = LEDGER.nbytes() - start
if has_gpu:
    pool["after forward"] = mempool.used_bytes()
loss.backward()
grad_bytes = sum(p.grad.nbytes for p in pm.parameters() if p.grad is not None)
opt.step()
if has_gpu:
    backend.synchronize()
    pool["after the step (gradients kept)"] = mempool.used_bytes()
    pool["held by the pool"] = mempool.total_bytes()
accounted = {"parameters": params_bytes, "gradients": grad_bytes,
             "AdamW state": opt.state_bytes(), "saved activations (peak)": activation_bytes}
for name, b in accounted.items():
    print(f"{name:28s} {b / 1e6:8.2f} MB")
if has_gpu:
    for name, b in pool.items():
        print(f"CuPy pool, {name:32s} {b / 1e6:8.2f} MB")
else:
    print("(no GPU: CuPy's memory pool cannot be read on this machine; the accounted bytes "
          "are the same on every device)")
opt.zero_grad()

# %% [markdown]
# ## The claim, checked
#
# * The strict stand-in refuses the two things CuPy refuses.
# * The same code runs on every device present: on strict the losses and
#   logits are within 128 float32 roundings of the CPU's (the order a product
#   is summed in is the BLAS kernel's), and bit for bit with the CPU engine on
#   one thread; on a GPU (when there is one) they agree within float32
#   rounding.
# * The activation ledger books the same bytes on every device.
# * With a GPU, the pool holds at least the parameters once the model has
#   moved, and at least parameters + gradients + optimizer state after a step.

# %%
assert refusals == ["np.asarray(device array)", "device array + host array"]
assert np.allclose(runs["strict"]["losses"], runs["cpu"]["losses"], rtol=ulps * eps, atol=0)
assert np.abs(runs["strict"]["logits"] - runs["cpu"]["logits"]).max() <= bound
assert one_thread["strict"]["losses"] == one_thread["cpu"]["losses"]
assert np.array_equal(one_thread["strict"]["logits"], one_thread["cpu"]["logits"])
assert all(r["saved"] == runs["cpu"]["saved"] for r in runs.values())
assert all(r["param device"] == d for d, r in runs.items())
if has_gpu:
    assert np.allclose(runs["gpu"]["losses"], runs["cpu"]["losses"], rtol=1e-4)
    assert np.abs(runs["gpu"]["logits"] - runs["cpu"]["logits"]).max() < 1e-3
    assert pool["after the model moved"] >= params_bytes
    assert pool["after the step (gradients kept)"] >= (params_bytes + grad_bytes
                                                       + opt.state_bytes())
print("all claims hold" + ("" if has_gpu else " (on cpu and strict: no GPU here)"))

# %% [markdown]
# ## Exercises
#
# 1. On a GPU, find the batch size at which a reference-model step on the GPU
#    becomes faster than on the CPU.
# 2. Move a trained `PeftModel` from the GPU back to the CPU (`pm.to("cpu")`,
#    then `opt.to("cpu")`) and check it writes the same answers.
# 3. Write a function that works on NumPy arrays but fails on strict ones
#    (hint: `float(a)` of a vector, or `np.asarray`). Fix it with
#    `backend.xp(a)`.
# 4. With a GPU, compare `used_bytes()` before and after `mempool.free_all_blocks()`
#    and `total_bytes()`. Which one does `nvidia-smi` report?
#
# Solutions: `lessons/solutions.md`, section "Lesson 11".
