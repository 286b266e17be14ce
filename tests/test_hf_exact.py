"""HF import is exact or it refuses: every config.json field, every tensor, and the export mirror.

For each family nopejax imports, every field of the transformers config class (enumerated from
the class, so a field a future transformers adds fails `test_every_class_field_has_a_case` until
someone decides what it means) is set to a non-default value: either nopejax's logits equal
transformers' (fp32, <= 1e-4, the reference loaded by transformers from the same directory), or
the import refuses with one line naming the field, its value and the fix, before any weight is
read.
"""

import dataclasses
import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import nopejax
from nopejax import cli, config, hf, model, optimizer, tensorfile, validation

FAMILIES = {
    "smollm3": (transformers.SmolLM3Config, hf.FAMILIES["smollm3"]),
    "llama": (transformers.LlamaConfig, hf.FAMILIES["llama"]),
}
# tiny and odd: 5 layers (SmolLM3: RoPE x3, NoPE, RoPE), GQA 4 -> 2, head_dim 8, vocab 61
TINY = dict(vocab_size=61, hidden_size=32, intermediate_size=29, num_hidden_layers=5, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
            rope_parameters={"rope_type": "default", "rope_theta": 100.0})  # fmt: skip
SEQ = 37  # past the llama3 / yarn original length (32) below
DELETE = object()  # a case value: the field left out of config.json

# with head_dim 8 and theta 100: one frequency kept, one smoothed, two divided by the factor
LLAMA3 = {"rope_type": "llama3", "rope_theta": 100.0, "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 32}  # fmt: skip
YARN = {"rope_type": "yarn", "rope_theta": 100.0, "factor": 4.0, "original_max_position_embeddings": 16}
LINEAR = {"rope_type": "linear", "rope_theta": 100.0, "factor": 3.0}

# field -> [(non-default value, "exact" or "refused")]; `None` keys of a family skip it
COMMON_CASES = {
    "transformers_version": [("4.54.0", "exact")],
    "output_hidden_states": [(True, "exact")],
    "return_dict": [(False, "exact")],
    "dtype": [("bfloat16", "exact")],
    "chunk_size_feed_forward": [(4, "exact")],
    "is_encoder_decoder": [(True, "refused")],
    "id2label": [({"0": "neg", "1": "pos", "2": "other"}, "exact")],
    "label2id": [({"neg": 0, "pos": 1, "other": 2}, "exact")],
    "problem_type": [("regression", "exact")],
    "vocab_size": [(71, "exact")],
    "hidden_size": [(40, "exact")],
    "intermediate_size": [(31, "exact")],
    "num_hidden_layers": [(6, "exact")],
    "num_attention_heads": [(8, "exact")],
    "num_key_value_heads": [(1, "exact"), (None, "exact")],
    "hidden_act": [("gelu_pytorch_tanh", "refused")],
    "max_position_embeddings": [(100, "exact")],
    "initializer_range": [(0.5, "exact")],
    "rms_norm_eps": [(0.3, "exact")],
    "use_cache": [(False, "exact")],
    "pad_token_id": [(7, "exact")],
    "bos_token_id": [(5, "exact")],
    "eos_token_id": [([2, 3], "exact")],
    "rope_parameters": [
        ({"rope_type": "default", "rope_theta": 37.0}, "exact"),
        (LINEAR, "exact"),
        (YARN, "exact"),
        (LLAMA3, "exact"),
        ({"rope_type": "dynamic", "rope_theta": 100.0, "factor": 2.0}, "refused"),
        ({"rope_type": "longrope", "rope_theta": 100.0, "short_factor": [1.0] * 4, "long_factor": [2.0] * 4,
          "original_max_position_embeddings": 16}, "refused"),
        ({**LINEAR, "partial_rotary_factor": 0.5}, "refused"),
        ({"rope_type": "default", "rope_theta": 100.0, "factor": 2.0}, "refused"),
    ],
    "attention_bias": [(True, "exact")],
    "attention_dropout": [(0.25, "exact")],
    "mlp_bias": [(True, "exact")],
    "head_dim": [(8, "exact"), (16, "refused")],  # 16 * 4 heads != hidden 32
    "architectures": [("OWN", "exact"), (["SmolLM3ForSequenceClassification"], "refused")],
    "tie_word_embeddings": [("FLIP", "exact")],
    # fields outside the class that real checkpoints carry
    "rope_theta": [(50.0, "exact")],  # rope_parameters' own rope_theta wins, as in transformers
    "original_max_position_embeddings": [(16, "exact")],  # read by yarn / llama3 only
    "partial_rotary_factor": [(0.5, "refused")],
    "pretraining_tp": [(2, "exact")],
    "max_window_layers": [(28, "exact")],
    "torch_dtype": [("bfloat16", "exact")],
}  # fmt: skip
CASES = {
    "smollm3": {
        **COMMON_CASES,
        # alone, neither makes a layer sliding (SmolLM3Config needs both); together: tests/test_layer_types.py
        "use_sliding_window": [(True, "exact")],
        "sliding_window": [(4, "exact")],
        "no_rope_layers": [([1, 0, 0, 1, 1], "exact"), ([1, 1, 0, 1, 1, 0, 1], "exact"), (DELETE, "exact"),
                           ([1, 2, 1, 0, 1], "refused"), ([1, 1], "refused")],
        "no_rope_layer_interval": [(2, "exact")],
        "layer_types": [(DELETE, "exact"), (["sliding_attention"] * 5, "refused"),  # sliding with no window
                        (["full_attention", "chunked_attention"] * 3, "refused")],
    },
    "llama": COMMON_CASES,
}  # fmt: skip
SHAPE_FIELDS = {"vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "attention_bias", "mlp_bias", "tie_word_embeddings",
                "no_rope_layer_interval"}  # fmt: skip


def class_defaults(cls) -> dict:
    return {f.name: f.default for f in dataclasses.fields(cls)}


def case_ids():
    for family, cases in CASES.items():
        for field, values in cases.items():
            for i, (value, outcome) in enumerate(values):
                yield pytest.param(family, field, value, id=f"{family}-{field}-{i}-{outcome}"), outcome


EXACT = [p for p, outcome in case_ids() if outcome == "exact"]
REFUSED = [p for p, outcome in case_ids() if outcome == "refused"]


def resolve(family: str, field: str, value):
    cls, _ = FAMILIES[family]
    if value == "FLIP":
        return not class_defaults(cls)[field]
    if value == "OWN":
        return [f"{cls.__name__.removesuffix('Config')}ForCausalLM"]
    return value


def saved_hf_model(tmp_path, family: str, field: str | None = None, value=None):
    """A tiny random transformers model saved to disk; config.json then carries `field` = `value`."""
    cls, _ = FAMILIES[family]
    kwargs = dict(TINY)
    if field in SHAPE_FIELDS:  # the weights must be built with it
        kwargs[field] = value
    model_cls = getattr(transformers, f"{cls.__name__.removesuffix('Config')}ForCausalLM")
    torch.manual_seed(len(str(field)) + len(str(value)))
    hf_model = model_cls(cls(**kwargs)).float().eval()
    with torch.no_grad():  # norms away from 1, biases away from 0, sharp attention: nothing can hide
        for name, p in hf_model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.25)
    path = tmp_path / "hf"
    hf_model.save_pretrained(path)
    if field is not None:
        edit_config(path, field, value)
    return path


def edit_config(path, field, value):
    cfg_path = path / "config.json"
    cfg = json.loads(cfg_path.read_text())
    if value is DELETE:
        cfg.pop(field, None)
    else:
        cfg[field] = value
    cfg_path.write_text(json.dumps(cfg))


def transformers_logits(path, tokens_BS):
    """The reference: what transformers makes of the directory on disk."""
    ref = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ref.config.return_dict = True  # only the output's container (transformers 5.24 breaks on False)
    with torch.no_grad():
        return ref(torch.tensor(tokens_BS, dtype=torch.long)).logits.numpy()


# ---------------------------------------------------------------------------------------------
# The enumeration is complete and the tables agree with transformers


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_class_field_has_a_row_with_the_class_default(family):
    cls, fam = FAMILIES[family]
    for name, default in class_defaults(cls).items():
        assert name in fam.fields, f"{cls.__name__}.{name} has no row in nopejax/hf/{family}.py"
        if fam.fields[name].read is not hf.harmless:  # a harmless row accepts any value, default or not
            assert fam.fields[name].default == default, name
    for name in cls().to_dict():  # what transformers writes, e.g. model_type, output_attentions
        assert name in fam.fields, name
    for name in transformers.GenerationConfig._get_default_generation_params():
        assert name in fam.fields, name
    assert fam.fields["rope_theta"].default == cls.default_theta


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_class_field_has_a_case(family):
    cls, _ = FAMILIES[family]
    missing = set(class_defaults(cls)) - set(CASES[family])
    assert not missing, f"fields of {cls.__name__} with no exact-or-refused case: {sorted(missing)}"


def test_default_configs_of_each_class_import():
    for cls, _ in FAMILIES.values():
        cfg = json.loads(cls(**TINY).to_json_string())
        m = hf.model_config_from_hf(cfg)
        assert (m.d_model, m.num_layers, m.num_kv_heads, m.rope_theta) == (32, 5, 2, 100.0)
        assert m.tie_embeddings == class_defaults(cls)["tie_word_embeddings"]


# ---------------------------------------------------------------------------------------------
# Each field: exact, or refused


@pytest.mark.parametrize("family,field,value", EXACT)
def test_honoured_field_gives_transformers_logits(tmp_path, family, field, value):
    value = resolve(family, field, value)
    path = saved_hf_model(tmp_path, family, field, value)
    ours = nopejax.from_hf(str(path))
    vocab = ours.cfg.vocab_size
    tokens_BS = np.random.default_rng(0).integers(0, vocab, (2, SEQ)).astype(np.int32)
    want = transformers_logits(path, tokens_BS)
    assert np.abs(want).max() > 1.0  # logits large enough that a wrong model cannot pass by accident
    np.testing.assert_allclose(np.asarray(ours(jnp.asarray(tokens_BS))), want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("family,field,value", REFUSED)
def test_unsupported_field_is_refused_before_any_weight_is_read(tmp_path, family, field, value):
    cls, _ = FAMILIES[family]
    value = resolve(family, field, value)
    path = tmp_path / "hf"
    path.mkdir()
    (path / "config.json").write_text(cls(**TINY).to_json_string())  # no safetensors at all
    edit_config(path, field, value)
    with pytest.raises(hf.HFConfigError) as err:
        nopejax.from_hf(str(path))
    message = str(err.value)
    assert f"`{err.value.field}`" in message and err.value.field.split(".")[0] == field, message
    assert repr(err.value.value) in message and "Fix:" in message and "\n" not in message
    if isinstance(value, dict) and "rope_type" in value:  # the offending key inside rope_parameters
        assert err.value.field.startswith("rope_parameters.")


def test_unknown_field_and_family_are_refused():
    cfg = json.loads(transformers.SmolLM3Config(**TINY).to_json_string())
    with pytest.raises(hf.HFConfigError, match=r"`attn_logit_softcapping`.*Fix: add one to nopejax/hf/smollm3\.py"):
        hf.model_config_from_hf({**cfg, "attn_logit_softcapping": 50.0})  # Gemma's, unknown to SmolLM3
    with pytest.raises(hf.HFConfigError, match=r"`quantization_config`.*'fp8'.*quantized.*Fix: import the unquantized"):
        hf.model_config_from_hf({**cfg, "quantization_config": {"quant_method": "fp8"}})
    with pytest.raises(hf.HFConfigError, match="`model_type` = 'qwen2'"):
        hf.model_config_from_hf({**cfg, "model_type": "qwen2"})


def test_transformers_4_rope_keys_are_read_as_transformers_does(tmp_path):
    """rope_theta + rope_scaling (transformers < 5) instead of rope_parameters: same logits."""
    path = saved_hf_model(tmp_path, "llama")
    cfg = json.loads((path / "config.json").read_text())
    del cfg["rope_parameters"]
    cfg.update(rope_theta=100.0, rope_scaling={k: v for k, v in LLAMA3.items() if k != "rope_theta"})
    (path / "config.json").write_text(json.dumps(cfg))
    ours = nopejax.from_hf(str(path))
    assert ours.cfg.rope_scaling["rope_type"] == "llama3" and ours.cfg.rope_theta == 100.0
    tokens_BS = np.random.default_rng(1).integers(0, 61, (1, SEQ)).astype(np.int32)
    np.testing.assert_allclose(np.asarray(ours(jnp.asarray(tokens_BS))), transformers_logits(path, tokens_BS),
                               atol=1e-4, rtol=0)  # fmt: skip


def test_biases_and_llama3_scaling_matter(tmp_path):
    """The parity above is not vacuous: the same model without biases or without llama3 differs."""
    path = saved_hf_model(tmp_path, "smollm3", "rope_parameters", LLAMA3)
    edit_config(path, "attention_bias", True)  # config only: the checkpoint then lacks the biases
    with pytest.raises(hf.HFTensorError, match=r"q_proj\.bias`: is missing"):
        nopejax.from_hf(str(path))
    edit_config(path, "attention_bias", False)
    ours = nopejax.from_hf(str(path))
    _, params = model.split(ours)
    unscaled_cfg = ours.cfg.as_configdict()
    unscaled_cfg.rope_scaling = None
    unscaled = hf.build(unscaled_cfg, params)
    tokens_BS = jnp.asarray(np.random.default_rng(2).integers(0, 61, (1, SEQ)), jnp.int32)
    assert np.abs(np.asarray(ours(tokens_BS)) - np.asarray(unscaled(tokens_BS))).max() > 1e-2

    path = saved_hf_model(tmp_path, "llama", "mlp_bias", True)
    ours = nopejax.from_hf(str(path))
    _, params = model.split(ours)
    params["layers"]["down_bias"] = np.zeros_like(params["layers"]["down_bias"])
    zeroed = hf.build(ours.cfg, params)
    assert np.abs(np.asarray(ours(tokens_BS)) - np.asarray(zeroed(tokens_BS))).max() > 1e-2


# ---------------------------------------------------------------------------------------------
# Tensors: every one consumed, none missing


def rewrite_tensors(path, change):
    """Rewrite the checkpoint's safetensors with `change(dict of arrays)` applied."""
    reader = tensorfile.Reader(str(path))
    arrays = {name: reader.get(name) for name in reader.names()}
    change(arrays)
    (path / "model.safetensors").unlink()
    tensorfile.write(str(path), [(n, a.shape, a.dtype) for n, a in arrays.items()], arrays.__getitem__)


def test_extra_tensor_is_an_error(tmp_path):
    path = saved_hf_model(tmp_path, "smollm3")
    rewrite_tensors(path, lambda t: t.update({"model.layers.2.self_attn.q_proj.bias": np.ones(32, np.float32)}))
    with pytest.raises(hf.HFTensorError, match=r"`model.layers.2.self_attn.q_proj.bias`: is not consumed.*Fix:"):
        nopejax.from_hf(str(path))


def test_missing_tensor_is_an_error(tmp_path):
    path = saved_hf_model(tmp_path, "smollm3")
    rewrite_tensors(path, lambda t: t.pop("model.layers.3.mlp.down_proj.weight"))
    with pytest.raises(hf.HFTensorError, match=r"`model.layers.3.mlp.down_proj.weight`: is missing.*Fix:"):
        nopejax.from_hf(str(path))


def test_wrong_shape_and_untied_head_are_errors(tmp_path):
    path = saved_hf_model(tmp_path, "smollm3")
    rewrite_tensors(path, lambda t: t.update({"model.norm.weight": np.ones(31, np.float32)}))
    with pytest.raises(hf.HFTensorError, match=r"`model.norm.weight`: has shape \(31,\), config.json implies"):
        nopejax.from_hf(str(path))
    path = saved_hf_model(tmp_path, "smollm3")  # tied, but a different lm_head saved as well
    rewrite_tensors(path, lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"] + 1}))
    with pytest.raises(hf.HFTensorError, match=r"`lm_head\.weight`: differs from model\.embed_tokens\.weight"):
        nopejax.from_hf(str(path))
    rewrite_tensors(path, lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"]}))
    assert nopejax.from_hf(str(path)).lm_head is None  # an equal copy is consumed as a check


# ---------------------------------------------------------------------------------------------
# Export: biases and llama3 round-trip through transformers; what SmolLM3 cannot say is refused


def test_export_with_biases_and_llama3_loads_in_transformers(tmp_path):
    cfg = config.base_config()
    cfg.model.update(vocab_size=61, d_model=30, num_heads=3, num_kv_heads=1, head_dim=10, d_ff=26, num_layers=5,
                     dtype="float32", attention_bias=True, mlp_bias=True, rope_theta=100.0,
                     rope_scaling={k: v for k, v in LLAMA3.items() if k != "rope_theta"})  # fmt: skip
    m = validation.validate(cfg).model
    _, params = model.split(model.create(m, seed=3))
    rng = np.random.default_rng(3)  # biases start at 0: give them values an export could lose
    for name in model.BIAS_PARAMS:
        params["layers"][name] = rng.normal(0, 0.5, params["layers"][name].shape).astype(np.float32)
    ours = hf.build(m, params)
    nopejax.to_hf(ours, str(tmp_path))
    tokens_BS = rng.integers(0, 61, (2, SEQ)).astype(np.int32)
    want = transformers_logits(tmp_path, tokens_BS)
    np.testing.assert_allclose(np.asarray(ours(jnp.asarray(tokens_BS))), want, atol=1e-4, rtol=0)
    back = nopejax.from_hf(str(tmp_path))  # and back: every tensor consumed, the same params
    _, back_params = model.split(back)
    for name in model.BIAS_PARAMS:
        np.testing.assert_array_equal(back_params["layers"][name], params["layers"][name])


def test_export_refuses_what_smollm3_cannot_express_before_writing(tmp_path):
    m = config.base_config().model
    m.a_future_field = "something SmolLM3 has no field for"  # what a new nopejax feature would add
    out = tmp_path / "out"
    with pytest.raises(config.ConfigError, match=r"`model\.a_future_field`.*no counterpart in transformers' SmolLM3"):
        hf.to_hf({}, str(out), m)  # refused before a single param is asked for
    assert not out.exists()
    for key in hf.EXPORTED_FIELDS | hf.RUNTIME_FIELDS:  # the tables name real fields only
        assert key in config.base_config().model, key


def test_biases_are_not_weight_decayed():
    m = config.base_config().model
    m.update(attention_bias=True, mlp_bias=True)
    mask = optimizer.decay_mask(model.split(model.create(m))[1], decay_embeddings=False)
    assert not any(mask["layers"][name] for name in model.BIAS_PARAMS)
    assert mask["layers"]["wq"]


def test_cli_import_refuses_in_one_line(tmp_path, capsys):
    path = tmp_path / "hf"
    path.mkdir()
    (path / "config.json").write_text(transformers.SmolLM3Config(**TINY, hidden_act="gelu").to_json_string())
    assert cli.main(["import-hf", str(path), "--workdir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("nopejax import-hf: error: HF config.json field `hidden_act` = 'gelu'")
    assert "\n" not in err
    assert not (tmp_path / "run").exists()
