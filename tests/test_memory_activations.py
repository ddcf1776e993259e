"""The methods that cut activations (LoRA-FA, LST) in the memory books: estimated equals
accounted to the byte, and the activations split into the backbone's and the method's.

The split is the ledger's: a buffer saved while a method's own modules run
(a wrapper's forward, LST's side network, a soft prompt's encoder) is the
method's, the rest the backbone's; the estimator's walk books the same way.
"""

from __future__ import annotations

import dataclasses
import gc

import numpy as np
import pytest

from minipeft import GPT, GPTConfig, memory
from minipeft.autograd import LEDGER
from minipeft.memory.activations import (
    VARIANTS,
    activation_rows,
    activations_against_length,
    format_activation_rows,
    long_config,
)
from minipeft.optim import AdamW
from minipeft.peft import get_peft_model
from minipeft.peft.config import METHODS, config_class, method_config
from minipeft.peft.config import VARIANTS as METHOD_VARIANTS
from minipeft.tools.cli import main

SMALL = dict(n_layer=2, n_head=4, n_embd=32, vocab_size=96, n_positions=64)

#: (model, batch, sequence): a small model, the reference configuration, and a long
#: sequence with positions to match (T = 512), each at its own odd-ish batch
POINTS = [
    (SMALL, 3, 16),
    (dict(n_layer=3, n_embd=48, n_head=4, vocab_size=96, n_positions=64), 2, 9),
    (dict(n_layer=4, n_head=4, n_embd=128, vocab_size=96, n_positions=128), 2, 128),
    ({**SMALL, "n_positions": 512}, 1, 512),
]
POINT_IDS = ["2x32-3x16", "3x48-2x9", "reference-2x128", "long-1x512"]

#: the new methods and their knob variants (a wider LST, LoRA-FA on several targets)
NEW = [
    ("lst", {}),
    ("lst", {"reduction_factor": 4, "side_num_heads": 4}),
    ("lora_fa", {}),
    ("lora_fa", {"r": 4, "target_modules": ["c_attn", "c_fc", "mlp.c_proj"]}),
]
NEW_IDS = ["lst", "lst-k4-h4", "lora_fa", "lora_fa-r4-3targets"]


@pytest.fixture(autouse=True)
def clean_books():
    gc.collect()
    yield
    gc.collect()
    assert LEDGER.nbytes() == 0, "a graph outlived its test"


def batch(b, t, vocab=96, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, vocab, (b, t)), rng.integers(0, vocab, (b, t))


def step(method, knobs, over, b, t, dropout=0.0, measure=False):
    cfg = GPTConfig(**over, dropout=dropout)
    model = get_peft_model(GPT(cfg, seed=0), method_config(method, **knobs)).train()
    opt = AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    return model, memory.profile_step(model, opt, batch(b, t), measure=measure)


# ---------------------------------------------------------------------------
# Estimated against accounted, to the byte
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("point", range(len(POINTS)), ids=POINT_IDS)
@pytest.mark.parametrize("method, knobs", NEW, ids=NEW_IDS)
def test_lst_and_lora_fa_are_estimated_to_the_byte(method, knobs, point):
    over, b, t = POINTS[point]
    _, rep = step(method, knobs, over, b, t)
    est = rep.estimated
    assert est.method == method
    for cat in memory.CATEGORIES[:7]:              # activations included
        assert est.bytes[cat] == rep.accounted[cat], cat
    assert est.activation_split == rep.activation_split
    assert sum(rep.activation_split.values()) == rep.accounted["activations"]


def test_lst_is_estimated_with_dropout_in_the_backbone():
    """The backbone's dropout draws masks under no_grad and keeps none."""
    _, rep = step("lst", {}, SMALL, 3, 16, dropout=0.1)
    assert rep.estimated.bytes["activations"] == rep.accounted["activations"]
    assert rep.estimated.activation_split == rep.activation_split


def test_lst_refuses_a_checkpointed_estimate_as_it_refuses_the_model():
    cfg = GPTConfig(**SMALL, gradient_checkpointing=True)
    with pytest.raises(ValueError, match="set gradient_checkpointing=False"):
        memory.estimate(cfg, "lst", batch_size=2, seq_len=8)


# ---------------------------------------------------------------------------
# The split: what the backbone keeps, what the method keeps
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("ckpt", [False, True], ids=["plain", "checkpointed"])
@pytest.mark.parametrize("method, knobs", [
    ("full", {}), ("lora", {}), ("lora", {"lora_dropout": 0.1}), ("lora_fa", {}),
    ("adapter", {}), ("prompt", {"num_virtual_tokens": 5}),
    ("prefix", {"num_virtual_tokens": 5, "prefix_projection": True, "encoder_hidden_size": 16}),
    ("ia3", {}), ("bitfit", {}),
], ids=lambda v: v if isinstance(v, str) else "-".join(v) or "default")
def test_the_split_sums_to_the_activations_and_the_estimate_books_it_alike(method, knobs, ckpt):
    over = {**SMALL, "gradient_checkpointing": ckpt}
    _, rep = step(method, knobs, over, 3, 16, dropout=0.1)
    split = rep.activation_split
    assert set(split) == {"backbone", "method"}
    assert split["backbone"] + split["method"] == rep.accounted["activations"]
    assert rep.estimated.activation_split == split
    assert sum(rep.estimated.activation_split.values()) == rep.estimated.bytes["activations"]
    # Only the methods with modules of their own keep anything of their own: full
    # fine-tuning, BitFit and prompt tuning (a concatenation, which saves nothing) keep none.
    if method in ("full", "bitfit", "prompt"):
        assert split["method"] == 0
    else:
        assert split["method"] > 0


@pytest.mark.parametrize("r, targets", [(8, ["c_attn"]), (4, ["c_attn", "c_fc", "mlp.c_proj"])])
def test_lora_fa_keeps_n_r_floats_per_branch_where_lora_keeps_n_in_plus_r(r, targets):
    """The method's share is exactly each branch's stated floats plus its scaling's
    one 0-d number; the backbone's share is the same with A frozen or not."""
    N = 3 * 16
    shares = {}
    for method in ("lora", "lora_fa"):
        model, rep = step(method, {"r": r, "target_modules": targets}, SMALL, 3, 16)
        branch = model.active_method.branch_saved_floats(model, N)
        assert rep.activation_split["method"] == 4 * (sum(branch.values()) + len(branch))
        shares[method] = rep.activation_split
    assert shares["lora"]["backbone"] == shares["lora_fa"]["backbone"]
    n_in = {"c_attn": 32, "c_fc": 32, "mlp.c_proj": 128}
    per_layer = sum(n_in[t] for t in targets) * N * 4
    assert shares["lora"]["method"] - shares["lora_fa"]["method"] == SMALL["n_layer"] * per_layer


def test_lst_keeps_nothing_of_the_backbone_blocks():
    """LST's backbone share is the head alone (ln_f's xhat and 1/sigma, the cross-entropy's
    softmax, int64 targets and mask): the blocks under no_grad keep nothing. The method's
    share holds the ladders' L + 1 hidden states."""
    B, T = 3, 16
    model, rep = step("lst", {}, SMALL, B, T)
    N, C, V = B * T, SMALL["n_embd"], SMALL["vocab_size"]
    assert rep.activation_split["backbone"] == (N * C + N + N * V) * 4 + 9 * N
    ladders = model.active_method.ladder_saved_floats(model, B, T)
    assert rep.activation_split["method"] > 4 * ladders


def test_lst_saving_grows_with_the_sequence_and_its_side_attention_is_quadratic():
    """Against full fine-tuning, LST keeps less at every length; the side attention's
    (B, heads, T, T) per block is in the method's share."""
    seqs = (64, 128, 256, 512)
    curves = activations_against_length(batch_size=2, seq_lens=seqs,
                                        variants=[v for v in VARIANTS if v[0] in ("full", "lst")])
    saving = [f - s for f, s in zip(curves["full"], curves["lst"])]
    assert all(a < b for a, b in zip(saving, saving[1:]))
    e = {T: memory.estimate(long_config("reference", T), "lst", batch_size=2, seq_len=T)
         for T in (256, 512)}
    side = method_config("lst").side_config(long_config("reference"))
    # doubling T: everything linear in T doubles, the side attention's E quadruples, and
    # each gate's three (1,) numbers (1/T, g, 1 - g) stay
    gates = side.n_layer * 3 * 4
    linear = 2 * (e[256].activation_split["method"] - gates) + gates
    quad = side.n_layer * 2 * side.n_head * (512 * 512 - 2 * 256 * 256) * 4
    assert e[512].activation_split["method"] == linear + quad


def test_lst_estimate_counts_the_no_grad_temporaries_apart():
    e = memory.estimate("reference", "lst", batch_size=2, seq_len=64)
    B, T, C, nh = 2, 64, 128, 4
    assert e.no_grad_temporaries == (B * T * 3 * C + B * nh * T * (T + 1)) * 4
    assert memory.estimate("reference", "lora", batch_size=2, seq_len=64).no_grad_temporaries == 0
    assert "throw-away" in e.table()


# ---------------------------------------------------------------------------
# Names, the table and the command line
# ---------------------------------------------------------------------------


def test_lora_fa_is_a_method_name_for_a_lora_config():
    assert "lora_fa" in METHODS and "lst" in METHODS
    assert config_class("lora_fa") is config_class("lora")
    assert method_config("lora_fa").freeze_A and method_config("lora_fa", r=4).r == 4
    assert method_config("lora_fa").method == "lora_fa" and method_config("lora").method == "lora"
    assert METHOD_VARIANTS["lora_fa"] == ("LORA", {"freeze_A": True})
    assert memory.estimate("reference", "lora_fa").peft_config.freeze_A


def test_activation_rows_are_exact_for_all_six_variants():
    cfg = dataclasses.replace(memory.preset("reference"), n_layer=2, n_embd=32, n_positions=48)
    rows = activation_rows(cfg, batch_size=2, seq_len=32)
    assert [r["variant"] for r in rows] == [v[0] for v in VARIANTS]
    for r in rows:
        assert r["act_est"] == r["act_acc"], r["variant"]
        assert (r["backbone_est"], r["method_est"]) == (r["backbone_acc"], r["method_acc"])
        assert r["peak_acc"] <= r["peak_meas"]
    by = {r["variant"]: r for r in rows}
    assert by["prompt"]["seq_len"] == 48 - 20            # room for its 20 virtual tokens
    assert by["lst"]["act_acc"] < by["lora_fa"]["act_acc"] < by["lora"]["act_acc"] \
        < by["full"]["act_acc"]
    assert by["full+ckpt"]["act_acc"] < by["full"]["act_acc"]
    text = format_activation_rows(rows, cfg, 2)
    assert "estimated = accounted to the byte" in text and "full+ckpt" in text


@pytest.mark.parametrize("method", ["lst", "lora_fa"])
def test_cli_memory_profiles_the_new_methods(method, capsys):
    assert main(["memory", "--method", method, "--batch-size", "2", "--seq-len", "16"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(method)
    assert "exact (0 bytes)" in out and "activations;" in out.split("exact (0 bytes)")[1]
    assert "kept by the backbone" in out


def test_cli_memory_activations_table_estimate_only(capsys):
    assert main(["memory", "--activations", "--estimate-only", "--seq-len", "512",
                 "--batch-size", "2"]) == 0
    out = capsys.readouterr().out
    assert "n_positions 512" in out
    for name, _, _ in VARIANTS:
        assert any(line.startswith(name + " ") for line in out.splitlines()), name


def test_cli_memory_all_with_checkpointing_leaves_lst_out(capsys):
    assert main(["memory", "--method", "all", "--estimate-only", "--gradient-checkpointing",
                 "--batch-size", "1", "--seq-len", "8"]) == 0
    assert "lst left out" in capsys.readouterr().out


@pytest.mark.parametrize("method, knobs", NEW, ids=NEW_IDS)
def test_the_new_methods_plan_what_they_inject(method, knobs):
    """Method.plan on the shape-only build trains arrays of the shapes inject trains, keeps
    LoRA-FA's A as a frozen addition, and holds no memory for any weight."""
    from minipeft.memory.estimate import _planned

    pc = method_config(method, **knobs)
    real = get_peft_model(GPT(GPTConfig(**SMALL), seed=0), pc)
    planned, base, plan = _planned(real.config, pc, training=True)
    assert not any(p.requires_grad for p in base.values())        # no base parameter trains
    trains = sorted(p.shape for p in plan.added.values() if p.requires_grad)
    assert trains == sorted(p.shape for p in real.parameters() if p.requires_grad)
    frozen_added = sum(p.size for p in plan.added.values() if not p.requires_grad)
    assert frozen_added == sum(p.size for n, p in real.named_parameters()
                               if n.endswith("lora_A.default")) * (method == "lora_fa")
    assert all(0 in p.data.strides or p.size <= 1 for p in planned.parameters())
