r"""Gradients of every method's trainable parameters through the whole model, in float64.

The check is a random projection (:func:`minipeft.autograd.vjp_check`): for
random u over the trainable parameters and the loss of ``model(idx, targets)``,
the central difference along u must equal :math:`\langle \nabla L, u\rangle`
from one backward pass. Zero-initialised parameters (LoRA's B, the adapters'
up-projections) are perturbed first: with B = 0 the gradient of A is zero and
a check of it would pass whatever backward did.

Element masks are special: the gradient is the true gradient times the mask,
so it is checked against the full gradient and with a projection u that is
zero outside the mask.
"""

from __future__ import annotations

import numpy as np
import pytest
from peft_cases import CASES, MASKS, batch, host, perturb, small_base, wrap

from minipeft import backend
from minipeft.autograd import no_grad, vjp_check
from minipeft.peft import PrefixTuningConfig, get_peft_model

# every test here runs on the fast path and on the reference ops (conftest.py)
pytestmark = pytest.mark.usefixtures("engine_path")

DENSE = [n for n in CASES if n not in MASKS]


def _loss_fn(pm, idx, targets):
    def fn(*_):
        return pm(idx, targets)[1]
    return fn


@pytest.mark.parametrize("name", DENSE)
def test_trainable_gradients_pass_the_projection_check(name, device):
    pm = wrap(name, device=device, dtype=np.float64)
    perturb(pm, scale=0.1)
    params = pm.trainable_parameters()
    assert params and all(p.dtype == np.float64 for p in params)
    idx, targets = batch()
    # the check is not trivial: every trainable parameter gets a non-zero gradient
    _, loss = pm(idx, targets)
    loss.backward()
    for n, p in pm.named_parameters():
        if p.requires_grad:
            assert np.abs(host(p.grad)).max() > 0, f"{n} has an all-zero gradient"
    pm.zero_grad()
    assert vjp_check(_loss_fn(pm, idx, targets), params, trials=2)


def test_the_projection_check_catches_a_wrong_gradient(monkeypatch):
    # scale LoRA's output gradient in backward only: the check must notice
    from minipeft.peft import lora
    pm = wrap("lora", dtype=np.float64)
    perturb(pm)
    idx, targets = batch()
    original = lora.LoraLinear.forward

    def wrong(self, x):
        out = original(self, x)
        # the same value forward (out - out.detach() is zero), 1.5 times the gradient backward
        return out + (out - out.detach()) * 0.5

    monkeypatch.setattr(lora.LoraLinear, "forward", wrong)
    with pytest.raises(AssertionError, match="random-projection check failed"):
        vjp_check(_loss_fn(pm, idx, targets), pm.trainable_parameters(), trials=1)


@pytest.mark.parametrize("projection", [False, True], ids=["plain", "projection"])
def test_prefix_gradients_with_a_batch_of_one_and_longer_prefixes(projection):
    # a different P and a batch of one (the broadcast of the prefix over the batch)
    pm = get_peft_model(small_base(dtype=np.float64),
                        PrefixTuningConfig(num_virtual_tokens=5, prefix_projection=projection,
                                           encoder_hidden_size=6))
    perturb(pm)
    idx, targets = batch()
    assert vjp_check(_loss_fn(pm, idx[:1], targets[:1]), pm.trainable_parameters(), trials=2)


def _masked_projection_check(pm, idx, targets, eps=1e-6, seed=0):
    """<grad, u> from backward against the central difference along u, u zero off the mask."""
    rng = np.random.default_rng(seed)
    params = pm.trainable_parameters()
    us = []
    for p in params:
        u = rng.standard_normal(p.shape)
        if p.grad_mask is not None:
            u = u * host(p.grad_mask)
        us.append(u)
    for p in params:
        p.grad = None
    _, loss = pm(idx, targets)
    loss.backward()
    lhs = sum(float((host(p.grad) * u).sum()) for p, u in zip(params, us))
    hosts = [host(p) for p in params]

    def at(sign):
        for p, h, u in zip(params, hosts, us):
            p.data = backend.to_device(h + sign * eps * u, p.device)
        with no_grad():
            return float(host(pm(idx, targets)[1]))

    rhs = (at(+1) - at(-1)) / (2 * eps)
    for p, h in zip(params, hosts):
        p.data = backend.to_device(h, p.device)
        p.grad = None
    assert abs(lhs - rhs) <= 1e-9 + 1e-6 * max(abs(lhs), abs(rhs)), (lhs, rhs)
    return lhs


@pytest.mark.parametrize("name", MASKS)
def test_masked_gradient_is_the_true_gradient_times_the_mask(name, device):
    pm = wrap(name, device=device, dtype=np.float64)
    method = pm.adapters["default"]
    idx, targets = batch()
    # the true (unmasked) gradient of the same weights
    masks = {n: p.grad_mask for n, p in method.params.items()}
    for p in method.params.values():
        p.grad_mask = None
    _, loss = pm(idx, targets)
    loss.backward()
    full = {n: host(p.grad) for n, p in method.params.items()}
    pm.zero_grad()
    for n, p in method.params.items():
        p.grad_mask = masks[n]
    _, loss = pm(idx, targets)
    loss.backward()
    for n, p in method.params.items():
        m = host(masks[n])
        assert np.array_equal(host(p.grad), full[n] * m)
        assert np.abs(full[n][~m]).max() > 0      # the mask really removes something
    pm.zero_grad()
    # and the masked gradient is right along every direction inside the mask
    assert _masked_projection_check(pm, idx, targets) != 0


def test_the_masked_check_catches_a_gradient_that_leaks_outside_the_mask():
    # a full projection u is not orthogonal to what the mask removes: with the
    # mask the backward side misses the off-mask part of <grad, u>
    pm = wrap("mask_random", dtype=np.float64)
    idx, targets = batch()
    params = pm.trainable_parameters()
    with pytest.raises(AssertionError, match="random-projection check failed"):
        vjp_check(_loss_fn(pm, idx, targets), params, trials=1)


def _grads_of(name, **over):
    """Loss and gradients of one training step of the named case on a float64 base."""
    from peft_cases import config_of

    from minipeft.peft import LoraConfig
    if name == "lora_dropout":
        config, kwargs = LoraConfig(r=2, lora_dropout=0.3, target_modules=["c_attn", "c_fc"]), {}
    else:
        config, kwargs = config_of(name)
    pm = get_peft_model(small_base(dtype=np.float64, **over), config, **kwargs)
    perturb(pm)
    idx, targets = batch()
    _, loss = pm(idx, targets)
    loss.backward()
    return host(loss), {n: host(p.grad) for n, p in pm.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", ["lora", "lora_dropout", "dora", "adapter_houlsby", "ia3",
                                  "prompt", "prefix", "prefix_projection", "bitfit",
                                  "mask_random"])
def test_gradient_checkpointing_gives_the_same_gradients(name):
    # with dropout on (the model's and LoRA's own): the recomputation in backward
    # must replay the very masks the forward drew
    loss, grads = _grads_of(name, dropout=0.2)
    loss_ck, grads_ck = _grads_of(name, dropout=0.2, gradient_checkpointing=True)
    assert loss_ck == loss
    assert set(grads_ck) == set(grads) and grads
    for n in grads:
        np.testing.assert_allclose(grads_ck[n], grads[n], rtol=1e-10, atol=1e-12, err_msg=n)
