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
# # Lesson 2: autograd by hand
#
# Every PEFT saving in this course comes from one place: the backward pass.
# A frozen weight saves memory and time only because the engine *skips*
# what its gradient would need. So before any PEFT method, we open the engine.
#
# **What you will learn**
#
# 1. What an operator is: a `Function` with its `forward` and `backward`
#    side by side, and `ctx.save_for_backward` for what backward needs.
# 2. How `backward()` walks the graph: a topological sort, done with a loop
#    (a deep graph would overflow Python's recursion limit).
# 3. The **activation ledger**: every array kept for backward is booked
#    there, and a frozen weight books less. We predict its bytes from the
#    shapes, to the byte.
# 4. Gradient checking: central differences in float64 prove a backward
#    right; in float32 they lie, and we measure by how much.

# %%
import sys

import numpy as np

from minipeft import GPT, GPTConfig, Tensor, backend, no_grad
from minipeft.tools import lessons
from minipeft.autograd import LEDGER, Function, gradcheck, vjp_check
from minipeft.autograd.tensor import _topological_order  # the engine's own walk
from minipeft.nn import Linear

plt = lessons.setup()

# %% [markdown]
# ## 1. A Function: forward and backward side by side
#
# The engine has no softplus, so we write one. $y = \log(1 + e^x)$ and
# $\frac{dy}{dx} = \sigma(x) = \frac{1}{1+e^{-x}}$.
#
# `forward` gets plain arrays and returns an array. `backward` gets
# $g = \partial L/\partial y$ and returns $\partial L/\partial x = g\,\sigma(x)$,
# so forward must keep $x$: that is `ctx.save_for_backward(x)`. Arrays are
# handled through their own module (`backend.xp(x)`), so the op would run
# on CuPy unchanged.

# %%
class Softplus(Function):
    r"""y = log(1 + e^x);  dy/dx = sigmoid(x)."""

    @staticmethod
    def forward(ctx, x):
        xp = backend.xp(x)
        ctx.save_for_backward(x)
        return xp.logaddexp(0.0, x)          # log(e^0 + e^x), stable for large x

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved
        xp = backend.xp(x)
        return g / (1.0 + xp.exp(-x))        # g * sigmoid(x)


x = Tensor(np.array([-3.0, -0.5, 0.0, 0.5, 3.0]), requires_grad=True, dtype=np.float64)
y = Softplus.apply(x)
y.sum().backward()
print("y      =", np.round(y.numpy(), 4))
print("x.grad =", np.round(x.grad, 4))
print("sigma  =", np.round(1 / (1 + np.exp(-x.numpy())), 4))

# %% [markdown]
# ## 2. The graph and its topological order
#
# `Function.apply` records a node (a `Context`) whenever an input needs a
# gradient. A node knows its *parents* (where to send input gradients) and
# what it saved, nothing else. `backward()` must visit every node after all
# of its consumers, so that each node's incoming gradient is complete before
# it is passed on: a reverse topological order.
#
# In $z = \sum \tanh(a b + a)$ the leaf `a` is used twice; its gradient is
# the sum of both paths: $\partial z/\partial a = (1-\tanh^2(ab+a))\,(b + 1)$.

# %%
rng = np.random.default_rng(0)
a = Tensor(rng.standard_normal(4), requires_grad=True, dtype=np.float64)
b = Tensor(rng.standard_normal(4), requires_grad=True, dtype=np.float64)
z = (a * b + a).tanh().sum()

order = _topological_order(z._node)
print(" -> ".join(node.name for node in order))
z.backward()
expected_a = (1 - np.tanh(a.numpy() * b.numpy() + a.numpy()) ** 2) * (b.numpy() + 1)
print("a.grad  ", np.round(a.grad, 6))
print("by hand ", np.round(expected_a, 6))

# %% [markdown]
# The walk is an explicit stack, not recursion. A chain of 5,000 ops is
# deeper than Python's default recursion limit (1,000), and backward still
# runs: $\frac{d}{dx} (1.0001^{5000} x) = 1.0001^{5000}$.

# %%
x = Tensor(np.array([1.0]), requires_grad=True, dtype=np.float64)
y = x
for _ in range(5000):
    y = y * 1.0001
y.sum().backward()
print(f"recursion limit {sys.getrecursionlimit()}, chain of 5,000 ops: "
      f"x.grad = {x.grad[0]:.6f}, 1.0001**5000 = {1.0001 ** 5000:.6f}")
deep_grad_ok = np.isclose(x.grad[0], 1.0001 ** 5000, rtol=1e-12)

# %% [markdown]
# ## 3. The activation ledger
#
# Everything a node saves goes through `ctx.save_for_backward`, which books
# the arrays in `LEDGER` (counted once per underlying buffer) and releases
# them the moment that node's backward has run. So the ledger answers
# "what does the graph keep alive?" exactly.
#
# A two-layer MLP, $\ell = \operatorname{mean}\big((\mathrm{GELU}(x W_1 + b_1) W_2 + b_2)^2\big)$,
# on a batch of $N = 64$ rows of width $C = 128$ with a hidden width of $4C$. Each op
# keeps only what a gradient that will really be computed needs:
#
# | op | keeps | for |
# |---|---|---|
# | `linear` 1 | $x$ (64×128) | $\partial W_1 = x^\top g$, only if $W_1$ trains |
# | `gelu` | its input $h$ (64×512) | $\partial h$, only if something below trains |
# | `linear` 2 | its input $a$ (64×512) | $\partial W_2 = a^\top g$, only if $W_2$ trains |
# | `linear` 2 | $W_2$ (512×128) | $\partial a = g W_2^\top$, only if something below trains |
# | `pow` | its output (64×128) | the square's derivative |
#
# We predict the bytes from this table, then measure them.

# %%
rng = np.random.default_rng(0)
layer1, layer2 = Linear(128, 512, rng=rng), Linear(512, 128, rng=rng)
x = Tensor(rng.standard_normal((64, 128)).astype(np.float32))
f32 = 4  # bytes


def loss_fn():
    return (layer2(layer1(x).gelu()) ** 2).mean()


predicted = {
    "both layers train": f32 * (64 * 128 + 64 * 512 + 64 * 512 + 512 * 128 + 64 * 128),
    "layer 1 frozen": f32 * (64 * 512 + 64 * 128),               # a for dW2, pow's output
    "layer 2 frozen": f32 * (64 * 128 + 64 * 512 + 512 * 128 + 64 * 128),  # no a: W2 is frozen
}
measured, after_backward, w1_grad = {}, {}, {}
for case in predicted:
    layer1.unfreeze()
    layer2.unfreeze()
    if case == "layer 1 frozen":
        layer1.freeze()
    if case == "layer 2 frozen":
        layer2.freeze()
    before = LEDGER.nbytes()
    loss = loss_fn()
    measured[case] = LEDGER.nbytes() - before
    loss.backward()
    after_backward[case] = LEDGER.nbytes() - before
    w1_grad[case] = "None" if layer1.weight.grad is None else str(layer1.weight.grad.shape)
    layer1.zero_grad()
    layer2.zero_grad()
print(lessons.table([[c, predicted[c], measured[c], after_backward[c], w1_grad[c]] for c in predicted],
                    ["", "predicted (B)", "measured (B)", "after backward (B)", "W1.grad"],
                    ["", ",d", ",d", ",d", ""]))

# %% [markdown]
# Freezing the *first* layer frees more than its own input: nothing below
# `gelu` needs a gradient any more, so `gelu` records no node at all, and
# `linear` 2 need not keep $W_2$ for $\partial a$. Freezing the *last* layer
# frees only its input $a$, because the gradient must still flow through it
# to reach layer 1. Remember this for soft prompts (lesson 7): a trainable
# part at the very bottom makes every layer above keep its activations.

# %%
fig, ax = plt.subplots()
ax.bar(list(measured), [v / 1024 for v in measured.values()], color=["C0", "C2", "C1"])
ax.set_ylabel("saved for backward (KiB)")
ax.set_title("The activation ledger after the forward pass")
plt.show()

# %%
lessons.say("**What to notice:** freezing layer 1 saves the most "
            f"({(measured['both layers train'] - measured['layer 1 frozen']) / 1024:.0f} KiB of "
            f"{measured['both layers train'] / 1024:.0f}), freezing layer 2 the least "
            f"({(measured['both layers train'] - measured['layer 2 frozen']) / 1024:.0f} KiB), "
            "and each bar is exactly the table's prediction.")
assert measured == predicted
assert measured["layer 1 frozen"] < measured["layer 2 frozen"] < measured["both layers train"]

# %% [markdown]
# ## 4. Gradient checks, and why float32 finite differences lie
#
# A central difference $\frac{f(x+h) - f(x-h)}{2h}$ has a truncation error
# $O(h^2)$ and a rounding error of about $\epsilon_{mach}|f|/h$. In float64
# ($\epsilon \approx 10^{-16}$) a step $h = 10^{-6}$ makes both tiny. In
# float32 ($\epsilon \approx 6\cdot 10^{-8}$) the rounding term alone is
# about $6\cdot 10^{-8} / 10^{-6} \approx 10^{-1}$ at that step. We sweep $h$ for softplus at $x = 0.7$ in both
# dtypes, against the exact derivative $\sigma(0.7)$.

# %%
x0 = 0.7
exact = 1 / (1 + np.exp(-x0))
steps = np.logspace(-12, -1, 45)
fd_error = {}
for dt in (np.float32, np.float64):
    errs = []
    for h in steps:
        xp_, xm_ = Tensor(np.array([x0 + h], dtype=dt)), Tensor(np.array([x0 - h], dtype=dt))
        with no_grad():
            fp, fm = Softplus.apply(xp_).numpy()[0], Softplus.apply(xm_).numpy()[0]
        # the step the arrays really took, (x+h) - (x-h), rounded like them
        span = float(xp_.numpy()[0]) - float(xm_.numpy()[0])
        errs.append(abs((float(fp) - float(fm)) / span - exact) if span else np.inf)
    fd_error[np.dtype(dt).name] = np.array(errs)

at = np.argmin(abs(steps - 1e-6))
for name, errs in fd_error.items():
    print(f"{name}: error at h=1e-6 {errs[at]:.2e}; best {errs.min():.2e} at h={steps[errs.argmin()]:.0e}")

fig, ax = plt.subplots()
for name, errs in fd_error.items():
    ax.loglog(steps, errs, marker=".", label=name)
ax.axvline(1e-6, color="gray", ls=":", label="h = 1e-6")
ax.set_xlabel("step h")
ax.set_ylabel("|finite difference - exact|")
ax.set_title("Central differences of softplus at x = 0.7")
ax.legend()
plt.show()

# %%
best = {name: (errs.min(), steps[errs.argmin()]) for name, errs in fd_error.items()}
lessons.say(
    "**What to notice:** the float64 curve is the familiar V: rounding on the left, truncation on "
    f"the right, a minimum of {best['float64'][0]:.1e} near $h$ = {best['float64'][1]:.0e}. The "
    f"float32 curve bottoms out at {best['float32'][0]:.1e}, "
    f"{best['float32'][0] / best['float64'][0]:,.0f} times higher, and at $h = 10^{{-6}}$ its "
    f"error is {fd_error['float32'][at]:.1e} against a derivative of {exact:.2f}. A check built on "
    "it would pass wrong gradients and fail right ones. That is why `gradcheck` refuses float32:")
assert best["float32"][0] > 1e3 * best["float64"][0] and fd_error["float32"][at] > 1e-3

# %%
try:
    gradcheck(lambda t: Softplus.apply(t), [Tensor(np.ones(3, dtype=np.float32), requires_grad=True)])
    refused = False
except TypeError as exc:
    refused = True
    print("TypeError:", exc)

# %% [markdown]
# In float64 it checks every entry, and it catches a backward that forgets
# the incoming gradient `g` (a common slip):

# %%
class BrokenSoftplus(Softplus):
    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved
        return 1.0 / (1.0 + backend.xp(x).exp(-x))   # forgot the factor g


x64 = Tensor(np.linspace(-2, 2, 6), requires_grad=True, dtype=np.float64)
print("Softplus passes:", gradcheck(lambda t: Softplus.apply(t), [x64]))
try:
    gradcheck(lambda t: BrokenSoftplus.apply(t), [x64])
    caught = False
except AssertionError as exc:
    caught = True
    print("BrokenSoftplus:", exc)

# %% [markdown]
# ### A whole GPT, one number per check
#
# Element by element does not scale to a model. `vjp_check` uses a random
# projection: for random directions $u$ (one per parameter) and $v$ (on
# the output), the finite difference of $\langle v, f(\theta + h u)\rangle$
# must equal $\langle J^\top v, u\rangle$ from a single backward pass. We
# run it on a small GPT in float64, then do the same projection by hand in
# float32 to see the error the dtype alone brings.

# %%
cfg = GPTConfig(n_layer=2, n_head=2, n_embd=32, n_positions=16)
rng = np.random.default_rng(1)
idx = rng.integers(0, cfg.vocab_size, (2, 16))
targets = rng.integers(0, cfg.vocab_size, (2, 16))

small = GPT(cfg, seed=0).to(dtype=np.float64)
params = list(small.parameters())
print("float64 vjp_check on the whole GPT:",
      vjp_check(lambda *_: small(idx, targets)[1], params, trials=2))

directions = [rng.standard_normal(p.shape) for p in params]
relative_error = {}
for dt in (np.float64, np.float32):
    model = GPT(cfg, seed=0).to(dtype=dt)
    ps = list(model.parameters())
    us = [u.astype(dt) for u in directions]
    _, loss = model(idx, targets)
    loss.backward()
    exact = sum(float((p.grad.astype(np.float64) * u).sum()) for p, u in zip(ps, us))
    start = [p.data.copy() for p in ps]
    errs = []
    for h in (1e-2, 1e-3, 1e-4, 1e-5, 1e-6):
        values = []
        for sign in (+1, -1):
            for p, w, u in zip(ps, start, us):
                p.data = w + dt(sign * h) * u
            with no_grad():
                values.append(model(idx, targets)[1].item())
        errs.append(abs((values[0] - values[1]) / (2 * h) - exact) / abs(exact))
    relative_error[np.dtype(dt).name] = errs
    print(f"{np.dtype(dt).name}: relative error of the projected derivative for "
          f"h = 1e-2 .. 1e-6: " + ", ".join(f"{e:.1e}" for e in errs))

# %%
lessons.say(f"""## The claim, checked

* The ledger holds exactly the bytes the table predicts, for every choice of frozen layers, and
  nothing once backward has run.
* Backward walks a long chain of ops (longer than Python's recursion limit) without recursion.
* In float64, central differences at $h=10^{{-6}}$ agree with backward to
  {fd_error['float64'][at]:.0e}; in float32 the same step is off by {fd_error['float32'][at]:.0e}
  (relative, on a whole GPT: {relative_error['float32'][-1]:.0e}, against float64's
  {relative_error['float64'][-1]:.0e}), and no step brings a single softplus closer than
  {fd_error['float32'].min():.0e}, more than a thousand times worse than float64's best.""")

# %%
assert measured == predicted, (measured, predicted)
assert all(v == 0 for v in after_backward.values())
assert deep_grad_ok
assert np.allclose(a.grad, expected_a, rtol=1e-12, atol=0)
assert refused and caught
assert fd_error["float64"][at] < 1e-8 and fd_error["float32"][at] > 1e-3
assert fd_error["float32"].min() > 1e-7 > 1e3 * fd_error["float64"].min()
assert relative_error["float64"][-1] < 1e-6 < 1e-2 < relative_error["float32"][-1]
print("all claims hold")

# %% [markdown]
# ## Exercises
#
# 1. Write a `Cube` Function ($y = x^3$) and check it with `gradcheck`.
#    Which array does it need to save?
# 2. `Softplus.forward` saves its input. Save the *output* $y$ instead and
#    write backward from $y$ alone (hint: $\sigma(x) = 1 - e^{-y}$). Check it.
# 3. In the MLP, let the *input* `x` require a gradient (as a soft prompt's
#    embeddings do) and freeze both layers. Predict the ledger's bytes, then
#    measure them.
# 4. Where is the float32 curve lowest? Compare that step with
#    $(3\epsilon)^{1/3}$, $\epsilon = 2^{-24}$, the step that balances the two
#    error terms.
#
# Solutions: `lessons/solutions.md`, section "Lesson 2".
