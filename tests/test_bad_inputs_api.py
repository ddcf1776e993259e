"""Bad input through the Python API, one row per kind: the call, the error, the words of the fix.

Every row is ``(kind, call, error class, fragment, knob)``: ``call()`` must
raise ``error`` with ``fragment`` in its message (the part that says what to
change), and ``knob`` is the name a reader would look for. The rows cover
every config class and knob (NaN, infinities, wrong types, out of range,
values the model cannot take), saved configs edited by hand, the optimizers,
the schedule and the training loop, the loss on a batch with nothing to
predict, and generation.

A wrong type raises :class:`minipeft.validate.KnobTypeError`, which is a
``TypeError`` and a ``ValueError`` at once: rows that expect either hold.
"""

from __future__ import annotations

import json
import math
import os
import tempfile

import numpy as np
import pytest
from peft_cases import small_base, tokens

from minipeft import GPTConfig
from minipeft.nn.module import Parameter
from minipeft.optim import SGD, AdamW, LRSchedule, clip_grad_norm_, cosine_with_warmup
from minipeft.peft import (
    AdapterConfig,
    BitFitConfig,
    IA3Config,
    LayerSelectConfig,
    LoraConfig,
    MaskConfig,
    PeftModel,
    PrefixTuningConfig,
    PromptTuningConfig,
    config_class,
    config_from_dict,
    get_peft_model,
)
from minipeft.peft.config import CONFIG_FORMAT
from minipeft.workflows.finetune import FinetuneSettings
from minipeft.workflows.train import evaluate_loss, train

NAN, INF = math.nan, math.inf


def _mutated(config, **changes):
    """A config whose fields were reassigned after construction (no check ran then)."""
    for k, v in changes.items():
        setattr(config, k, v)
    return config


def _peft(config):
    return get_peft_model(small_base(), config)


def _param():
    return Parameter(np.ones(3, dtype=np.float32))


def _batches(n=4):
    idx = tokens((2, 5))
    return [(idx, idx)] * n


def _train(**kw):
    pm = get_peft_model(small_base(), LoraConfig(r=2))
    opt = AdamW(pm.trainable_parameters(), lr=1e-3)
    return train(pm, opt, _batches(), kw.pop("steps", 2), progress=False, **kw)


def _lora_dict(**changes):
    """What a saved LoraConfig's dict holds today (format 1), with ``changes`` applied."""
    d = {"peft_type": "LORA", "r": 2, "lora_alpha": 4.0, "lora_dropout": 0.0,
         "target_modules": ["c_attn"], "use_dora": False, "init_seed": 0}
    d.update(changes)
    return {k: v for k, v in d.items() if v is not _DROP}


_DROP = object()


#: a saved LoRA config as its file holds it (lora_alpha 4.0, to be edited by hand)
_LORA_TEXT = ('{"peft_type": "LORA", "r": 2, "lora_alpha": 4.0, "lora_dropout": 0, '
              '"target_modules": ["c_attn"], "use_dora": false, "init_seed": 0}')


def _from_text(text):
    """config_from_dict of a hand-edited file's text (Python's json reads NaN and Infinity)."""
    return config_from_dict(json.loads(text))


def _load_edited(edit):
    """Save a LoRA adapter, edit its adapter_config.json's config by hand, load it again."""
    folder = tempfile.mkdtemp()
    get_peft_model(small_base(), LoraConfig(r=2)).save_pretrained(folder)
    path = os.path.join(folder, "adapter_config.json")
    with open(path, encoding="utf-8") as f:
        meta = json.load(f)
    edit(meta["config"])
    with open(path, "w", encoding="utf-8") as f:
        f.write(json.dumps(meta))                 # NaN is written as the bare word NaN
    return PeftModel.from_pretrained(small_base(), folder)


def _set(key, value):
    def edit(d):
        if value is _DROP:
            del d[key]
        else:
            d[key] = value
    return edit


def _model_loss(idx, targets):
    return small_base()(idx, targets)


V = ValueError
T = TypeError

ROWS = [
    # -- LoraConfig ----------------------------------------------------------------
    ("lora alpha nan", lambda: LoraConfig(lora_alpha=NAN), V, "lora_alpha must be positive", "lora_alpha"),
    ("lora alpha inf", lambda: LoraConfig(lora_alpha=INF), V, "lora_alpha must be positive", "lora_alpha"),
    ("lora alpha -inf", lambda: LoraConfig(lora_alpha=-INF), V, "lora_alpha must be positive", "lora_alpha"),
    ("lora alpha str", lambda: LoraConfig(lora_alpha="16"), T, "lora_alpha must be positive", "lora_alpha"),
    ("lora alpha bool", lambda: LoraConfig(lora_alpha=True), T, "lora_alpha must be positive", "lora_alpha"),
    ("lora alpha zero", lambda: LoraConfig(lora_alpha=0), V, "lora_alpha must be positive", "lora_alpha"),
    ("lora r str", lambda: LoraConfig(r="8"), T, "r must be a positive integer", "r"),
    ("lora r float", lambda: LoraConfig(r=2.0), T, "(a float: write 2)", "r"),
    ("lora r bool", lambda: LoraConfig(r=True), T, "r must be a positive integer", "r"),
    ("lora r zero", lambda: LoraConfig(r=0), V, "r must be a positive integer", "r"),
    ("lora dropout nan",
     lambda: LoraConfig(lora_dropout=NAN), V, "lora_dropout must be in [0, 1)", "lora_dropout"),
    ("lora dropout one",
     lambda: LoraConfig(lora_dropout=1.0), V, "lora_dropout must be in [0, 1)", "lora_dropout"),
    ("lora dropout negative",
     lambda: LoraConfig(lora_dropout=-0.1), V, "lora_dropout must be in [0, 1)", "lora_dropout"),
    ("lora use_dora yes",
     lambda: LoraConfig(use_dora="yes"), T, "use_dora must be True or False", "use_dora"),
    ("lora use_dora 1", lambda: LoraConfig(use_dora=1), T, "use_dora must be True or False", "use_dora"),
    ("lora targets str",
     lambda: LoraConfig(target_modules="c_attn"), T, "a single name still goes in a list", "target_modules"),
    ("lora targets empty",
     lambda: LoraConfig(target_modules=[]),
     V, "target_modules is empty: name at least one", "target_modules"),
    ("lora targets blank entry",
     lambda: LoraConfig(target_modules=[""]),
     V, "target_modules must be a list of module names", "target_modules"),
    ("lora targets int entry",
     lambda: LoraConfig(target_modules=[3]),
     T, "target_modules must be a list of module names", "target_modules"),
    ("lora init_seed negative",
     lambda: LoraConfig(init_seed=-1), V, "init_seed must be a non-negative integer", "init_seed"),
    ("lora rank above layer",
     lambda: _peft(LoraConfig(r=17)), V, "largest allowed r for these target_modules is 16", "r=17"),
    ("lora rank above one of two layers",
     lambda: _peft(LoraConfig(r=20, target_modules=["c_fc"])), V, "(in 16, out 64)", "r=20"),
    ("lora unknown target",
     lambda: _peft(LoraConfig(target_modules=["q_proj"])), V, "within each block", "q_proj"),
    ("lora knob changed after construction",
     lambda: _peft(_mutated(LoraConfig(r=2), lora_alpha=NAN)),
     V, "lora_alpha must be positive", "lora_alpha"),
    # -- AdapterConfig -------------------------------------------------------------
    ("adapter bottleneck zero",
     lambda: AdapterConfig(bottleneck=0), V, "bottleneck must be a positive integer", "bottleneck"),
    ("adapter bottleneck float",
     lambda: AdapterConfig(bottleneck=4.0), T, "(a float: write 4)", "bottleneck"),
    ("adapter placement unknown",
     lambda: AdapterConfig(placement="middle"), V, "placement must be 'houlsby' or 'pfeiffer'", "placement"),
    ("adapter placement None",
     lambda: AdapterConfig(placement=None), T, "placement must be 'houlsby' or 'pfeiffer'", "placement"),
    ("adapter nonlinearity unknown",
     lambda: AdapterConfig(nonlinearity="swish"), V, "'relu', 'gelu' or 'tanh'", "nonlinearity"),
    ("adapter init_seed str",
     lambda: AdapterConfig(init_seed="0"), T, "init_seed must be a non-negative integer", "init_seed"),
    # -- PromptTuningConfig --------------------------------------------------------
    ("prompt tokens negative",
     lambda: PromptTuningConfig(num_virtual_tokens=-1),
     V, "num_virtual_tokens must be a non-negative integer", "num_virtual_tokens"),
    ("prompt tokens float",
     lambda: PromptTuningConfig(num_virtual_tokens=3.0), T, "(a float: write 3)", "num_virtual_tokens"),
    ("prompt init unknown",
     lambda: PromptTuningConfig(prompt_tuning_init="ZEROS"),
     V, "'VOCAB', 'TEXT' or 'RANDOM'", "prompt_tuning_init"),
    ("prompt TEXT without text",
     lambda: PromptTuningConfig(prompt_tuning_init="TEXT"),
     V, "needs prompt_tuning_init_text", "prompt_tuning_init_text"),
    ("prompt text unused",
     lambda: PromptTuningConfig(prompt_tuning_init_text="hi"),
     V, "set prompt_tuning_init='TEXT' or drop the text", "prompt_tuning_init_text"),
    ("prompt text blank",
     lambda: PromptTuningConfig(prompt_tuning_init="TEXT", prompt_tuning_init_text="  "),
     V, "prompt_tuning_init_text must be a non-empty string", "prompt_tuning_init_text"),
    ("prompt too long for the model",
     lambda: _peft(PromptTuningConfig(num_virtual_tokens=16)),
     V, "exceed n_positions=16", "num_virtual_tokens"),
    # -- PrefixTuningConfig --------------------------------------------------------
    ("prefix hidden zero",
     lambda: PrefixTuningConfig(encoder_hidden_size=0),
     V, "encoder_hidden_size must be a positive integer", "encoder_hidden_size"),
    ("prefix projection yes",
     lambda: PrefixTuningConfig(prefix_projection="yes"),
     T, "prefix_projection must be True or False", "prefix_projection"),
    ("prefix tokens nan",
     lambda: PrefixTuningConfig(num_virtual_tokens=NAN),
     T, "num_virtual_tokens must be a non-negative integer", "num_virtual_tokens"),
    ("prefix too long for the model",
     lambda: _peft(PrefixTuningConfig(num_virtual_tokens=16)),
     V, "exceed n_positions=16", "num_virtual_tokens"),
    # -- MaskConfig ----------------------------------------------------------------
    ("mask density nan", lambda: MaskConfig(density=NAN), V, "density must be in (0, 1]", "density"),
    ("mask density zero", lambda: MaskConfig(density=0.0), V, "density must be in (0, 1]", "density"),
    ("mask density above one", lambda: MaskConfig(density=1.5), V, "density must be in (0, 1]", "density"),
    ("mask density str", lambda: MaskConfig(density="0.1"), T, "density must be in (0, 1]", "density"),
    ("mask selection unknown",
     lambda: MaskConfig(selection="best"), V, "'random', 'magnitude' or 'gradient'", "selection"),
    ("mask seed negative", lambda: MaskConfig(seed=-1), V, "seed must be a non-negative integer", "seed"),
    ("mask targets empty",
     lambda: MaskConfig(target_modules=[]), V, "target_modules is empty", "target_modules"),
    # -- BitFitConfig --------------------------------------------------------------
    ("bitfit targets empty",
     lambda: BitFitConfig(target_modules=[]), V, "None means no filter", "target_modules"),
    ("bitfit targets str",
     lambda: BitFitConfig(target_modules="c_attn"),
     T, "a single name still goes in a list", "target_modules"),
    ("bitfit unknown target",
     lambda: _peft(BitFitConfig(target_modules=["q_proj"])), V, "within each block", "q_proj"),
    # -- LayerSelectConfig ---------------------------------------------------------
    ("layers selects nothing",
     lambda: LayerSelectConfig(), V, "set layers, components, param_types or patterns", "layers"),
    ("layers unknown component",
     lambda: LayerSelectConfig(components=["head"]), V, "choose from ['attn'", "components"),
    ("layers unknown param type",
     lambda: LayerSelectConfig(param_types=["gain"]), V, "choose from ['weight', 'bias']", "param_types"),
    ("layers float index",
     lambda: LayerSelectConfig(layers=[1.0]), T, "layers must be a list of block indices", "layers"),
    ("layers str",
     lambda: LayerSelectConfig(layers="0"), T, "layers must be a list of block indices", "layers"),
    ("layers bad regex",
     lambda: LayerSelectConfig(patterns=["("]), V, "is not a regular expression", "patterns"),
    ("layers index beyond the model",
     lambda: _peft(LayerSelectConfig(layers=[5])), V, "out of range for a model with 2 blocks", "layers"),
    # -- IA3Config -----------------------------------------------------------------
    ("ia3 targets empty",
     lambda: IA3Config(target_modules=[]), V, "target_modules is empty", "target_modules"),
    ("ia3 scale_queries 1",
     lambda: IA3Config(scale_queries=1), T, "scale_queries must be True or False", "scale_queries"),
    ("ia3 feedforward str",
     lambda: IA3Config(feedforward_modules="mlp.c_proj"),
     T, "a single name still goes in a list", "feedforward_modules"),
    ("ia3 feedforward not targeted",
     lambda: _peft(IA3Config(target_modules=["c_attn"], feedforward_modules=["mlp.c_proj"])),
     V, "feedforward_modules must be among target_modules", "feedforward_modules"),
    # -- GPTConfig (the base model) --------------------------------------------------
    ("gpt dropout nan",
     lambda: GPTConfig(dropout=NAN), V, "GPTConfig.dropout must be in [0, 1)", "dropout"),
    ("gpt layer_norm_epsilon inf",
     lambda: GPTConfig(layer_norm_epsilon=INF), V, "layer_norm_epsilon must be positive",
     "layer_norm_epsilon"),
    ("gpt gradient_checkpointing yes",
     lambda: GPTConfig(gradient_checkpointing="yes"), T, "must be True or False",
     "gradient_checkpointing"),
    ("gpt n_layer float",
     lambda: GPTConfig(n_layer=2.0), T, "n_layer must be a positive integer", "n_layer"),
    # -- method names and model entry points ----------------------------------------
    ("unknown method name", lambda: config_class("lorra"), V, "choose from full, bitfit", "lorra"),
    ("config given as a dict",
     lambda: get_peft_model(small_base(), {"r": 8}), T, "expected a PEFT config", "config"),
    # -- saved configs, as dicts and as hand-edited files ---------------------------
    ("file lora_alpha NaN",
     lambda: _from_text(_LORA_TEXT.replace("4.0", "NaN")),
     V, "lora_alpha must be positive", "lora_alpha"),
    ("file lora_alpha Infinity",
     lambda: _from_text(_LORA_TEXT.replace("4.0", "Infinity")),
     V, "lora_alpha must be positive", "lora_alpha"),
    ("file missing r (format 1)",
     lambda: config_from_dict(_lora_dict(r=_DROP)), V, "lacks the required field(s) ['r']", "'r'"),
    ("file missing dropout (explicit format 1)",
     lambda: config_from_dict(_lora_dict(lora_dropout=_DROP, format=1)),
     V, "lacks the required field(s) ['lora_dropout']", "lora_dropout"),
    ("file missing a mask field",
     lambda: config_from_dict({"peft_type": "MASK", "target_modules": ["c_attn"], "density": 0.1,
                               "selection": "random"}),
     V, "lacks the required field(s) ['seed']", "seed"),
    ("file unknown field",
     lambda: config_from_dict(_lora_dict(lora_aplha=4.0)), V, "has no fields ['lora_aplha']", "lora_aplha"),
    ("file r as a string",
     lambda: config_from_dict(_lora_dict(r="8")), T, "r must be a positive integer", "r"),
    ("file use_dora as a string",
     lambda: config_from_dict(_lora_dict(use_dora="true")), T, "use_dora must be True or False", "use_dora"),
    ("file targets as a string",
     lambda: config_from_dict(_lora_dict(target_modules="c_attn")),
     T, "a single name still goes in a list", "target_modules"),
    ("file future format",
     lambda: config_from_dict(_lora_dict(format=CONFIG_FORMAT + 1)), V, "upgrade minipeft to load it",
     "format"),
    ("file format not an integer",
     lambda: config_from_dict(_lora_dict(format="1")), V, "format must be a positive integer", "format"),
    ("file unknown peft_type",
     lambda: config_from_dict(_lora_dict(peft_type="LORRA")), V, "known types are", "peft_type"),
    ("file without peft_type",
     lambda: config_from_dict(_lora_dict(peft_type=_DROP)), V, "known types are", "peft_type"),
    ("file config not an object",
     lambda: config_from_dict(["LORA", 2]), T, "must be a JSON object", "config"),
    ("adapter folder, lora_alpha NaN",
     lambda: _load_edited(_set("lora_alpha", NAN)), V, "lora_alpha must be positive", "lora_alpha"),
    ("adapter folder, r missing",
     lambda: _load_edited(_set("r", _DROP)), V, "lacks the required field(s) ['r']", "'r'"),
    # -- optimizers, schedule, clipping ------------------------------------------------
    ("adamw lr nan", lambda: AdamW([_param()], lr=NAN), V, "lr must be a finite number >= 0", "lr"),
    ("adamw lr negative",
     lambda: AdamW([_param()], lr=-1e-3), V, "lr must be a finite number >= 0", "learning rate"),
    ("adamw lr str", lambda: AdamW([_param()], lr="1e-3"), T, "lr must be a finite number >= 0", "lr"),
    ("adamw beta2 one",
     lambda: AdamW([_param()], betas=(0.9, 1.0)), V, "betas[1] must be in [0, 1)", "betas"),
    ("adamw beta1 nan",
     lambda: AdamW([_param()], betas=(NAN, 0.999)), V, "betas[0] must be in [0, 1)", "betas"),
    ("adamw betas not a pair", lambda: AdamW([_param()], betas=0.9), T, "betas must be a pair", "betas"),
    ("adamw eps zero", lambda: AdamW([_param()], eps=0.0), V, "eps must be a finite number > 0", "eps"),
    ("adamw eps nan", lambda: AdamW([_param()], eps=NAN), V, "eps must be a finite number > 0", "eps"),
    ("adamw weight_decay nan",
     lambda: AdamW([_param()], weight_decay=NAN),
     V, "weight_decay must be a finite number >= 0", "weight_decay"),
    ("adamw weight_decay negative",
     lambda: AdamW([_param()], weight_decay=-0.1),
     V, "weight_decay must be a finite number >= 0", "weight_decay"),
    ("group weight_decay inf",
     lambda: AdamW([{"params": [_param()], "weight_decay": INF}]),
     V, "weight_decay must be a finite number >= 0", "weight_decay"),
    ("sgd momentum one",
     lambda: SGD([_param()], lr=0.1, momentum=1.0), V, "momentum must be in [0, 1)", "momentum"),
    ("sgd momentum nan",
     lambda: SGD([_param()], lr=0.1, momentum=NAN), V, "momentum must be in [0, 1)", "momentum"),
    ("clip max_norm nan",
     lambda: clip_grad_norm_([_param()], NAN), V, "max_norm must be a finite number > 0", "max_norm"),
    ("clip max_norm zero",
     lambda: clip_grad_norm_([_param()], 0.0), V, "max_norm must be a finite number > 0", "max_norm"),
    ("schedule warmup beyond total",
     lambda: LRSchedule(base_lr=1.0, total_steps=5, warmup_steps=6),
     V, "warmup_steps must be an integer in [0, total_steps=5]", "warmup_steps"),
    ("schedule warmup float",
     lambda: LRSchedule(base_lr=1.0, total_steps=5, warmup_steps=2.5),
     T, "warmup_steps must be an integer", "warmup_steps"),
    ("schedule total zero",
     lambda: cosine_with_warmup(0, 0, 0, 1.0), V, "total_steps must be a positive integer", "total_steps"),
    ("schedule base_lr nan",
     lambda: LRSchedule(base_lr=NAN, total_steps=5), V, "base_lr must be a finite number >= 0", "base_lr"),
    # -- the training loop -------------------------------------------------------------
    ("train steps float", lambda: _train(steps=2.5), T, "steps must be a positive integer", "steps"),
    ("train clip nan", lambda: _train(clip=NAN), V, "clip must be a finite number > 0", "clip"),
    ("train eval_every zero",
     lambda: _train(eval_every=0, eval_fn=lambda m: 0.0),
     V, "eval_every must be a positive integer", "eval_every"),
    ("train schedule gives nan",
     lambda: _train(schedule=lambda s: NAN),
     V, "the schedule's lr at step 0 must be a finite number >= 0", "lr"),
    ("evaluate n_batches zero",
     lambda: evaluate_loss(small_base(), _batches(), 0),
     V, "n_batches must be a positive integer", "n_batches"),
    # -- finetune settings -------------------------------------------------------------
    ("finetune lr nan",
     lambda: FinetuneSettings(lr=NAN).validate(), V, "or None for the method's best known rate", "lr"),
    ("finetune lr inf",
     lambda: FinetuneSettings(lr=INF).validate(), V, "or None for the method's best known rate", "lr"),
    ("finetune weight_decay nan",
     lambda: FinetuneSettings(weight_decay=NAN).validate(),
     V, "weight_decay must be a finite number >= 0", "weight_decay"),
    ("finetune clip nan",
     lambda: FinetuneSettings(clip=NAN).validate(), V, "or None for no clipping", "clip"),
    ("finetune steps float",
     lambda: FinetuneSettings(steps=2.5).validate(), T, "steps must be an integer >= 1", "steps"),
    ("finetune batch_size bool",
     lambda: FinetuneSettings(batch_size=True).validate(),
     T, "batch_size must be an integer >= 1", "batch_size"),
    ("finetune warmup negative",
     lambda: FinetuneSettings(warmup=-1).validate(), V, "warmup must be an integer >= 0", "warmup"),
    ("finetune eval_limit zero",
     lambda: FinetuneSettings(eval_limit=0).validate(), V, "None scores the whole test split", "eval_limit"),
    # -- the loss and generation ---------------------------------------------------------
    ("loss every target ignored",
     lambda: _model_loss(tokens((2, 5)), np.full((2, 5), -100)),
     V, "needs at least one position to predict", "ignore_index"),
    ("loss custom ignore_index, all ignored",
     lambda: small_base()(tokens((2, 5)), np.full((2, 5), 7), ignore_index=7),
     V, "needs at least one position to predict", "ignore_index"),
    ("loss empty batch",
     lambda: _model_loss(np.zeros((0, 5), np.int64), np.zeros((0, 5), np.int64)),
     V, "the batch is empty", "empty"),
    ("loss zero-length sequences",
     lambda: _model_loss(np.zeros((2, 0), np.int64), np.zeros((2, 0), np.int64)),
     V, "the batch is empty", "empty"),
    ("generate temperature nan",
     lambda: small_base().generate(tokens((1, 2)), 3, temperature=NAN),
     V, "temperature must be a finite number >= 0", "temperature"),
    ("generate temperature str",
     lambda: small_base().generate(tokens((1, 2)), 3, temperature="1"),
     T, "temperature must be a finite number >= 0", "temperature"),
    ("generate top_k float",
     lambda: small_base().generate(tokens((1, 2)), 3, top_k=2.5),
     T, "top_k must be a positive integer", "top_k"),
]


@pytest.mark.parametrize("call, error, fragment",
                         [pytest.param(c, e, f, id=k) for k, c, e, f, _ in ROWS])
def test_bad_api_input_is_refused_with_the_fix(call, error, fragment):
    with pytest.raises(error) as info:
        call()
    assert fragment in str(info.value), f"{fragment!r} not in {str(info.value)!r}"


def test_the_table_has_many_distinct_kinds():
    kinds = [row[0] for row in ROWS]
    assert len(kinds) == len(set(kinds)) >= 60


def test_a_refused_rank_leaves_the_base_untouched():
    base = small_base()
    names = [n for n, _ in base.named_modules()]
    flags = [p.requires_grad for p in base.parameters()]
    with pytest.raises(ValueError, match="r=17 is too large for h.0.attn.c_attn"):
        get_peft_model(base, LoraConfig(r=17))
    assert [n for n, _ in base.named_modules()] == names
    assert [p.requires_grad for p in base.parameters()] == flags
    get_peft_model(base, LoraConfig(r=16))        # min(in, out) itself is allowed


def test_what_the_rules_accept_is_normalised():
    # an int where a float is meant is exact; NumPy scalars are the numbers they hold
    c = LoraConfig(r=np.int64(4), lora_alpha=16, lora_dropout=np.float32(0.25),
                   target_modules=("c_attn",), use_dora=np.bool_(False))
    assert (type(c.r), type(c.lora_alpha), type(c.use_dora)) == (int, float, bool)
    assert c.lora_alpha == 16.0 and c.target_modules == ["c_attn"]
    assert json.loads(json.dumps(c.to_dict())) == c.to_dict()


def test_todays_saved_configs_load_and_new_ones_carry_their_format():
    # a config dict as saved before it carried a format number: version 1
    assert config_from_dict(_lora_dict()) == LoraConfig(r=2, lora_alpha=4.0)
    d = LoraConfig(r=2).to_dict()
    assert d["format"] == CONFIG_FORMAT and config_from_dict(d) == LoraConfig(r=2)


def test_a_field_added_by_a_later_format_takes_its_default(monkeypatch):
    from dataclasses import dataclass

    import minipeft.peft.config as C
    from minipeft.validate import Float, Int, knob

    @dataclass
    class Later(C.PeftConfig):
        r: int = knob(8, Int(low=1))
        scale: float = knob(0.5, Float(low=0.0), since=2)

    monkeypatch.setattr(C, "CONFIG_FORMAT", 2)
    assert Later.from_dict({"r": 4}).scale == 0.5              # version 1: scale did not exist
    assert Later.from_dict({"r": 4, "format": 2, "scale": 1.0}).scale == 1.0
    with pytest.raises(ValueError, match=r"lacks the required field\(s\) \['scale'\]"):
        Later.from_dict({"r": 4, "format": 2})
    with pytest.raises(ValueError, match="scale must be a finite number >= 0"):
        Later.from_dict({"r": 4, "format": 2, "scale": math.nan})


def classify(row) -> tuple[str, str]:
    """How one row's call behaves, and the message: ``clear`` (a ValueError or TypeError whose
    message holds the row's fragment or names its knob), ``unclear`` (one that does neither),
    ``traceback`` (any other exception) or ``silent`` (accepted)."""
    kind, call, error, fragment, knob = row
    try:
        call()
    except (ValueError, TypeError) as exc:
        msg = f"{type(exc).__name__}: {exc}"
        named = fragment in str(exc) or knob.lower() in str(exc).lower()
        return ("clear" if named else "unclear"), msg
    except Exception as exc:  # noqa: BLE001 - what the table classifies
        return "traceback", f"{type(exc).__name__}: {exc}"
    return "silent", "accepted"


if __name__ == "__main__":
    # Classify every row against the minipeft on sys.path, e.g. an older checkout:
    #   cd OTHER && PYTHONPATH=OTHER:THIS/tests python THIS/tests/test_bad_inputs_api.py
    import collections
    import sys
    import warnings

    import minipeft

    warnings.simplefilter("ignore")
    counts = collections.Counter()
    for row in ROWS:
        verdict, msg = classify(row)
        counts[verdict] += 1
        if "-v" in sys.argv or verdict != "clear":
            print(f"{verdict:9s} {row[0]:42s} {msg[:150]}")
    print(f"minipeft from {os.path.dirname(minipeft.__file__)}: {len(ROWS)} kinds, "
          + ", ".join(f"{k} {counts[k]}" for k in ("clear", "unclear", "traceback", "silent")))
