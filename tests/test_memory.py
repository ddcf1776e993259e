"""Memory accounting: the closed form against the engine's books, the books against the
allocator, PEFT's savings in bytes, gradient checkpointing, the presets and the CLI.

The three views are those of :mod:`minipeft.memory`: *estimated* (a formula),
*accounted* (the engine's own books during a real step) and *measured*
(tracemalloc on the CPU, CuPy's pool through a hook on the GPU).
"""

from __future__ import annotations

import dataclasses
import gc

import numpy as np
import pytest

from minipeft import GPT, GPTConfig, backend, memory
from minipeft.autograd import LEDGER
from minipeft.autograd.tensor import BACKWARD_HOOKS
from minipeft.optim import SGD, AdamW
from minipeft.peft import config_class, get_peft_model
from minipeft.tools.cli import main

SMALL = dict(n_layer=2, n_head=4, n_embd=32, vocab_size=96, n_positions=64)
B, T = 3, 16

#: every method, and the variants whose memory differs (DoRA, LoRA dropout,
#: an adapter's GELU, prefix projection, (IA)^3 on q as well, masks on some layers)
CASES = [
    ("full", {}),
    ("bitfit", {}),
    ("bitfit", {"target_modules": ["c_fc"]}),
    ("layers", {"layers": [-1]}),
    ("layers", {"components": ["attn", "ln_f"]}),
    ("mask", {}),
    ("mask", {"density": 0.3, "target_modules": ["c_attn"]}),
    ("lora", {}),
    ("lora", {"r": 4, "target_modules": ["c_attn", "mlp.c_proj"], "lora_dropout": 0.1}),
    ("lora", {"use_dora": True, "target_modules": ["c_attn", "c_fc"]}),
    ("adapter", {}),
    ("adapter", {"placement": "pfeiffer", "nonlinearity": "gelu"}),
    ("prompt", {"num_virtual_tokens": 5}),
    ("prefix", {"num_virtual_tokens": 5}),
    ("prefix", {"num_virtual_tokens": 5, "prefix_projection": True, "encoder_hidden_size": 16}),
    ("ia3", {}),
    ("ia3", {"scale_queries": True}),
]
IDS = [m + ("-" + "-".join(f"{k}" for k in kw) if kw else "") for m, kw in CASES]


def batch(b=B, t=T, vocab=96, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, vocab, (b, t)), rng.integers(0, vocab, (b, t))


def wrapped(method, knobs, device="cpu", seed=0, **over):
    cfg = GPTConfig(**{**SMALL, **over})
    pc = config_class(method)(**knobs)
    model = get_peft_model(GPT(cfg, seed=seed).to(device), pc).train()
    return model, pc


def adamw(model, **kw):
    return AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, **kw)


def close(a, b, rel):
    return abs(a - b) <= rel * max(abs(a), abs(b))


@pytest.fixture(autouse=True)
def clean_books():
    gc.collect()
    yield
    gc.collect()
    assert not BACKWARD_HOOKS, "a hook outlived its step"
    assert LEDGER.nbytes() == 0, "a graph outlived its test"


# ---------------------------------------------------------------------------
# Estimated against accounted, every method
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("method, knobs", CASES, ids=IDS)
def test_estimate_equals_the_books_for_every_method(method, knobs):
    model, _ = wrapped(method, knobs, dropout=0.1)
    rep = memory.profile_step(model, adamw(model), batch())
    est = rep.estimated
    assert est is not None and est.method == method
    for cat in ("weights_frozen", "weights_trainable", "gradients", "optimizer", "bookkeeping",
                "batch"):
        assert est.bytes[cat] == rep.accounted[cat], cat
    assert close(est.bytes["activations"], rep.accounted["activations"], 0.10)
    assert rep.accounted_peak <= rep.measured_peak
    # Between operators the allocator sees the books' arrays and (at the first
    # forward only) the seed state of the dropout layers' generators, made lazily.
    for phase in memory.PHASES:
        gap = rep.phases_measured[phase][0] - rep.phases_accounted[phase]
        assert 0 <= gap <= 64 * 7, phase
    assert "estimated" in rep.table() and "measured" in rep.table()


#: two model shapes, each with its own batch shape (a 3-layer, 48-wide model at an odd
#: sequence length, so no count coincides by accident)
SHAPES = [(dict(), (3, 16)), (dict(n_layer=3, n_embd=48, n_head=4), (2, 9))]


@pytest.mark.parametrize("shape", [0, 1], ids=["2x32-3x16", "3x48-2x9"])
@pytest.mark.parametrize("ckpt", [False, True], ids=["plain", "checkpointed"])
@pytest.mark.parametrize("method, knobs", CASES, ids=IDS)
def test_activations_are_estimated_to_the_byte(method, knobs, ckpt, shape):
    """Every category but the other live arrays, activations included, equals the books exactly:
    the layers' traces state what each forward saves, with dropout and with checkpointing."""
    over, (b, t) = SHAPES[shape]
    model, _ = wrapped(method, knobs, dropout=0.1, gradient_checkpointing=ckpt, **over)
    rep = memory.profile_step(model, adamw(model), batch(b, t), measure=False)
    for cat in memory.CATEGORIES[:7]:
        assert rep.estimated.bytes[cat] == rep.accounted[cat], cat


@pytest.mark.parametrize("method, knobs", CASES, ids=IDS)
def test_each_method_plans_what_it_injects(method, knobs):
    """Method.plan, on the model's shape-only build, trains parameters of the same shapes as
    inject on a real model (the base's own by the same names), by the same selection code."""
    from minipeft.memory.estimate import _planned
    from minipeft.nn.module import base_name

    model, pc = wrapped(method, knobs)
    planned, base, plan = _planned(model.config, pc, training=True)
    real = {n: p for n, p in model.named_parameters() if p.requires_grad}
    real_base = {base_name(n.removeprefix("base_model.")) for n in real} & set(base)
    assert real_base == {n for n, p in base.items() if p.requires_grad}
    shapes = sorted([p.shape for n, p in base.items() if p.requires_grad]
                    + [p.shape for p in plan.added.values()])
    assert shapes == sorted(p.shape for p in real.values())
    # the planned model holds no memory for its weights: every parameter is one shared zero
    assert all(0 in p.data.strides or p.size <= 1 for p in planned.parameters())


def test_the_estimate_builds_no_weights_even_at_65b():
    import tracemalloc

    tracemalloc.start()
    try:
        e = memory.estimate("65b", "lora", batch_size=1, seq_len=512, use_dora=True)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert e.n_params > 6e10
    assert peak < 64 * 2**20          # the module tree and the walk, no 260 GB of weights


@pytest.mark.parametrize("method, knobs", [("full", {}), ("lora", {}), ("mask", {})])
def test_estimate_equals_the_books_on_every_backend(device, method, knobs):
    model, _ = wrapped(method, knobs, device=device)
    rep = memory.profile_step(model, adamw(model), batch())
    est = rep.estimated
    for cat in ("weights_frozen", "weights_trainable", "gradients", "optimizer", "bookkeeping",
                "batch"):
        assert est.bytes[cat] == rep.accounted[cat], cat
    assert close(est.bytes["activations"], rep.accounted["activations"], 0.10)
    # (on the GPU a mask's indices stay on the host, beside the device's pool)
    assert rep.accounted_peak - rep.elsewhere <= rep.measured_peak
    assert rep.measured_source == ("cupy MemoryHook" if device == "gpu" else "tracemalloc")
    if device != "gpu":  # (the pool rounds every allocation up to 512 bytes)
        # without dropout, the books and the allocator agree between operators, to the byte
        for phase in memory.PHASES:
            assert rep.phases_measured[phase][0] == rep.phases_accounted[phase], phase


def test_a_second_step_counts_the_state_made_by_the_first():
    model, _ = wrapped("lora", {})
    opt = adamw(model)
    first = memory.profile_step(model, opt, batch())
    second = memory.profile_step(model, opt, batch(seed=1))
    scratch = sum(a.nbytes for _, _, a in memory._optimizer_arrays(opt))  # AdamW's work array
    assert scratch > 0
    assert first.phases_accounted["start"] + first.accounted["optimizer"] + scratch \
        == second.phases_accounted["start"]
    assert not second.estimated.first_step
    assert second.estimated.bytes["optimizer"] == second.accounted["optimizer"]


def test_sgd_and_int32_indices_are_estimated_exactly():
    for make in (lambda ps: SGD(ps, lr=0.1), lambda ps: SGD(ps, lr=0.1, momentum=0.9),
                 lambda ps: AdamW(ps, lr=1e-3, index_dtype="int32")):
        model, _ = wrapped("mask", {"density": 0.2})
        opt = make([p for p in model.parameters() if p.requires_grad])
        rep = memory.profile_step(model, opt, batch())
        assert rep.estimated.bytes["optimizer"] == rep.accounted["optimizer"] == opt.state_bytes()


# ---------------------------------------------------------------------------
# Bytes per parameter
# ---------------------------------------------------------------------------


def test_fp32_adamw_is_16_bytes_a_parameter_before_activations():
    cfg = GPTConfig(**SMALL)
    est = memory.estimate(cfg, "full")
    assert est.training_bytes_per_param == 16.0
    assert memory.estimate("7b", "full").training_bytes_per_param == 16.0
    assert memory.estimate("7b", "full", dtype="mixed").training_bytes_per_param == 16.0  # ZeRO
    # and in a real step: weights, gradients and AdamW's moments, counted by the books
    model, _ = wrapped("full", {})
    rep = memory.profile_step(model, adamw(model), batch())
    a = rep.accounted
    n = sum(p.size for p in model.parameters())
    assert a["weights_trainable"] + a["gradients"] + a["optimizer"] == 16 * n


@pytest.mark.parametrize("method, knobs", [c for c in CASES if c[0] not in ("full", "mask")],
                         ids=[i for i, c in zip(IDS, CASES) if c[0] not in ("full", "mask")])
def test_gradients_and_adamw_state_are_12_bytes_a_trainable_parameter(method, knobs):
    model, _ = wrapped(method, knobs)
    opt = adamw(model)
    rep = memory.profile_step(model, opt, batch())
    trainable, _ = model.get_nb_trainable_parameters()
    assert rep.accounted["gradients"] + opt.state_bytes() == 12 * trainable
    assert rep.accounted["gradients"] + rep.accounted["optimizer"] == 12 * trainable


@pytest.mark.parametrize("index_dtype, index_bytes", [("int64", 8), ("int32", 4)])
def test_masks_pay_a_full_gradient_state_for_the_selected_entries_and_their_index(index_dtype,
                                                                                index_bytes):
    model, _ = wrapped("mask", {"density": 0.1})
    opt = adamw(model, index_dtype=index_dtype)
    rep = memory.profile_step(model, opt, batch())
    masked = [p for p in model.parameters() if p.grad_mask is not None]
    n = sum(p.size for p in masked)
    k = sum(int(backend.asnumpy(p.grad_mask).sum()) for p in masked)
    assert rep.accounted["gradients"] == 4 * n                 # computed in full
    assert rep.accounted["optimizer"] == 8 * k + index_bytes * k
    assert opt.state_bytes() == 8 * k + index_bytes * k
    # the boolean masks (1 byte an entry) and the method's copies (k values, k int32 indices)
    assert rep.accounted["bookkeeping"] == n + 4 * k + 4 * k
    assert rep.estimated.bytes["bookkeeping"] == rep.accounted["bookkeeping"]


def test_peft_shrinks_gradients_and_state_but_activations_only_where_inputs_need_no_saving():
    reps = {}
    for method, knobs in [("full", {}), ("lora", {}), ("bitfit", {}),
                          ("prompt", {"num_virtual_tokens": 2})]:
        model, _ = wrapped(method, knobs)
        reps[method] = memory.profile_step(model, adamw(model), batch(t=T))
    act = {m: r.accounted["activations"] for m, r in reps.items()}
    train = {m: r.accounted["gradients"] + r.accounted["optimizer"] for m, r in reps.items()}
    assert all(train[m] < train["full"] / 10 for m in ("lora", "bitfit", "prompt"))
    # frozen Linears keep no inputs for weight gradients: fewer activations...
    assert act["bitfit"] < act["lora"] < act["full"]
    # ...but backpropagation still needs most of them
    assert act["bitfit"] > 0.5 * act["full"]
    # prompt tuning backpropagates through every layer, over more positions
    assert act["prompt"] > act["bitfit"]


# ---------------------------------------------------------------------------
# Activations: the closed form at several points
# ---------------------------------------------------------------------------

# (batch, sequence, layers, width, heads); the last one has n_h T > 16 C: T^2 dominates
POINTS = [(2, 16, 2, 32, 4), (4, 24, 3, 48, 4), (1, 8, 4, 64, 2), (2, 64, 1, 16, 8)]


@pytest.mark.parametrize("b, t, n_layer, n_embd, n_head", POINTS)
@pytest.mark.parametrize("method", ["full", "lora"])
def test_activation_estimate_within_10_percent_of_the_ledger(b, t, n_layer, n_embd, n_head, method):
    model, _ = wrapped(method, {}, n_layer=n_layer, n_embd=n_embd, n_head=n_head)
    rep = memory.profile_step(model, adamw(model), batch(b, t), measure=False)
    assert close(rep.estimated.bytes["activations"], rep.accounted["activations"], 0.10)
    if method == "full":
        closed = memory.full_finetuning_activations(model.config, b, t)["total"]
        assert close(closed, rep.accounted["activations"], 0.10)


def test_the_attention_square_dominates_at_the_long_point():
    b, t, n_layer, n_embd, n_head = POINTS[-1]
    cfg = GPTConfig(**{**SMALL, "n_layer": n_layer, "n_embd": n_embd, "n_head": n_head})
    parts = memory.full_finetuning_activations(cfg, b, t)
    square = 4 * n_layer * n_head * b * t * t
    assert square > parts["total"] / 2
    assert n_head * t > 16 * n_embd


def test_the_ledger_keeps_weights_that_the_activation_row_leaves_out():
    model, _ = wrapped("lora", {})
    rep = memory.profile_step(model, adamw(model), batch(), measure=False)
    # frozen Linears keep their weight (for the input's gradient), LayerNorms their gain
    assert rep.ledger_parameter_bytes > 0
    assert rep.ledger_parameter_bytes <= rep.accounted["weights_frozen"] + \
        rep.accounted["weights_trainable"]


# ---------------------------------------------------------------------------
# Accounted against measured, at the reference configuration
# ---------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("method", ["full", "lora"])
def test_accounted_peak_is_at_most_measured_and_within_25_percent_at_the_reference(method):
    model = get_peft_model(GPT(GPTConfig(), seed=0), config_class(method)()).train()
    rep = memory.profile_step(model, adamw(model), batch(16, 128))
    assert rep.accounted_peak <= rep.measured_peak
    assert rep.accounted_peak >= 0.75 * rep.measured_peak, rep.table()
    gaps = {what: why for what, _, why in rep.gaps()}
    assert "temporaries" in gaps["peak: measured - accounted"]


# ---------------------------------------------------------------------------
# Gradient checkpointing
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("method, knobs", [("full", {}), ("lora", {"lora_dropout": 0.1}),
                                           ("prefix", {"num_virtual_tokens": 4})])
def test_checkpointing_gives_identical_gradients_and_fewer_activations(method, knobs):
    cfg = GPTConfig(**{**SMALL, "n_layer": 3, "dropout": 0.1})
    pc = config_class(method)(**knobs)
    res = memory.checkpointing_tradeoff(cfg, pc, batch_size=B, seq_len=T)
    plain, ckpt = res["plain"], res["checkpointed"]
    assert res["max_grad_diff"] == 0.0
    assert ckpt.accounted["activations"] < 0.7 * plain.accounted["activations"]
    assert ckpt.measured_peak < plain.measured_peak
    assert ckpt.accounted["gradients"] == plain.accounted["gradients"]
    for rep in (plain, ckpt):
        assert close(rep.estimated.bytes["activations"], rep.accounted["activations"], 0.10)
    assert ckpt.seconds > 0 and plain.seconds > 0          # measured, never compared here
    assert "checkpointed" in memory.format_checkpointing(res)


# ---------------------------------------------------------------------------
# The estimator at every size
# ---------------------------------------------------------------------------


def test_presets_have_the_parameter_counts_people_quote():
    assert memory.estimate("gpt2").n_params == 124_439_808      # GPT-2 small, tied head
    assert 1.0e9 <= memory.estimate("1b").n_params <= 1.3e9
    assert 6.4e9 <= memory.estimate("7b").n_params <= 6.8e9
    assert 6.3e10 <= memory.estimate("65b", seq_len=512).n_params <= 6.6e10
    assert memory.estimate("reference").n_params == GPT(GPTConfig()).num_parameters()


def test_the_rule_of_thumb_one_billion_parameters_four_to_store_about_24_to_train():
    rows = memory.rule_of_thumb("1b", seq_lens=(512,))
    (row,) = rows
    e = row["estimate"]
    assert 3.9 < e.bytes["weights_trainable"] / memory.GiB < 4.5     # ~4 GB to store
    assert e.training_bytes_per_param == 16.0
    assert 6.5 < row["act_per_param"] < 9.5                          # ~8 more a parameter
    total = sum(e.bytes[c] for c in ("weights_trainable", "gradients", "optimizer",
                                     "activations", "other"))
    assert 20 * memory.GiB < total < 28 * memory.GiB                 # ~24 GB to train
    assert "rule of thumb" in memory.format_rule_of_thumb(rows)


def test_what_fits_on_a_card_at_7b_and_65b():
    rows = {(r["preset"], r["method"], r["dtype"]): r for r in memory.fit_table()}
    assert not rows["7b", "full", "fp32"]["fits"][80]
    assert rows["7b", "lora", "mixed"]["fits"][24]
    assert rows["7b", "prompt", "mixed"]["fits"][24]
    assert rows["7b", "bitfit", "mixed"]["fits"][24]
    assert not rows["65b", "lora", "mixed"]["fits"][80]
    assert rows["65b", "lora", "mixed-int4"]["fits"][48]            # QLoRA's claim
    assert "65b" in memory.format_fit_table(list(rows.values()))


def test_estimates_scale_as_the_formulas_say():
    e1 = memory.estimate("reference", "full", batch_size=4, seq_len=32)
    e2 = memory.estimate("reference", "full", batch_size=8, seq_len=32)
    # activations grow with the batch; weights and state do not
    assert e2.bytes["activations"] > 1.9 * e1.bytes["activations"]
    assert e2.bytes["optimizer"] == e1.bytes["optimizer"]
    q = memory.estimate("7b", "lora", dtype="mixed-int4", batch_size=1, seq_len=512)
    assert q.bytes["weights_frozen"] < 0.2 * memory.estimate("7b", "lora", dtype="fp32",
                                                             batch_size=1, seq_len=512
                                                             ).bytes["weights_frozen"]
    ck = memory.estimate("7b", "full", batch_size=1, seq_len=512, gradient_checkpointing=True)
    assert ck.bytes["activations"] < memory.estimate("7b", "full", batch_size=1,
                                                     seq_len=512).bytes["activations"] / 3


@pytest.mark.parametrize("kwargs, message", [
    (dict(method="nope"), "unknown method 'nope'"),
    (dict(dtype="fp8"), "unknown dtype 'fp8'"),
    (dict(config="13b"), "unknown preset '13b'"),
    (dict(optimizer="adam2"), "unknown optimizer"),
    (dict(seq_len=129), "does not fit the model: seq_len 129 exceeds n_positions=128"),
    (dict(method="prompt", seq_len=120), r"120 \+ 20 virtual tokens = 140"),
    (dict(batch_size=0), "batch_size must be a positive integer"),
    (dict(method="lora", target_modules=["q_proj"]), r"\['q_proj'\] matched no Linear"),
])
def test_bad_input_is_a_clear_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        memory.estimate(**{"config": "reference", **kwargs})


def test_unknown_knobs_are_refused():
    with pytest.raises(TypeError, match="LoraConfig has no knobs"):
        memory.estimate("reference", "lora", rank=8)


# ---------------------------------------------------------------------------
# The picture and the command
# ---------------------------------------------------------------------------


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    model, _ = wrapped("lora", {})
    rep = memory.profile_step(model, adamw(model), batch())
    path = memory.plot([rep], str(tmp_path / "lora.png"))
    assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("method", ["full", "bitfit", "layers", "mask", "lora", "adapter", "prompt",
                                    "prefix", "ia3"])
def test_cli_prints_the_three_views_for_every_method(method, capsys):
    args = ["memory", "--method", method, "--batch-size", "2", "--seq-len", "16"]
    if method == "lora":
        args += ["--r", "8"]
    assert main(args) == 0
    out = capsys.readouterr().out
    for word in ("estimated", "accounted", "measured", "activations (saved, peak)",
                 "peak over the step"):
        assert word in out
    assert out.startswith(method)


def test_cli_all_methods_with_a_picture_and_checkpointing(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    png = tmp_path / "all.png"
    assert main(["memory", "--method", "all", "--batch-size", "1", "--seq-len", "8",
                 "--png", str(png)]) == 0
    out = capsys.readouterr().out
    assert "peak meas." in out and png.exists()
    assert main(["memory", "--method", "lora", "--batch-size", "1", "--seq-len", "8",
                 "--checkpointing"]) == 0
    assert "largest gradient difference: 0" in capsys.readouterr().out


def test_cli_estimates_large_presets_and_prints_the_fit_table(capsys):
    assert main(["memory", "--config", "7b", "--method", "lora", "--batch-size", "1",
                 "--seq-len", "512", "--dtype", "mixed", "--fit"]) == 0
    out = capsys.readouterr().out
    assert "rule of thumb" in out and "does it fit?" in out and "not profiled" in out


@pytest.mark.parametrize("args, message", [
    (["--method", "nope"], "unknown method 'nope'"),
    (["--dtype", "fp8"], "unknown dtype 'fp8'"),
    (["--config", "13b"], "unknown preset '13b'"),
    (["--seq-len", "200"], "does not fit the model"),
    (["--batch-size", "0"], "batch_size must be a positive integer"),
    (["--estimate-only", "--png", "x.png"], "none was profiled"),
])
def test_cli_bad_input_is_one_clear_line(args, message, capsys):
    assert main(["memory", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("minipeft: error: ") and message in err


def test_profile_step_leaves_no_hooks_and_gradients_in_place():
    model, _ = wrapped("lora", {}, dropout=0.0)
    cfg = dataclasses.replace(model.config)
    assert cfg == model.config
    memory.profile_step(model, adamw(model), batch())
    assert not BACKWARD_HOOKS
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_a_plain_gpt_is_full_fine_tuning():
    model = GPT(GPTConfig(**SMALL), seed=0).train()
    rep = memory.profile_step(model, adamw(model), batch())
    assert rep.method == "full"
    assert rep.estimated.bytes["gradients"] == rep.accounted["gradients"] == 4 * model.num_parameters()
