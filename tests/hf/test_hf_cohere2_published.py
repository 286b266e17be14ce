"""Published Cohere2 config.json files (Command R7B, Tiny Aya) import, or are refused with the reason.

The files are in tests/data/hf_configs/ (whole config.json files in cohere2/), each with the address it
was read from and what of it could be read. The reference for what a file means is transformers' own
Cohere2Config, built from the same dict.
"""

import json

import pytest
import transformers
from configs_loader import ROOT

from nopejax import config, hf, layers, validation

DATA = ROOT / "tests" / "data" / "hf_configs"


def published(name: str) -> dict:
    """A file of tests/data/hf_configs/, whole config.json files under their family's directory."""
    (path,) = DATA.rglob(f"{name}.json")
    with open(path) as f:
        return json.load(f)


def transformers_layer_types(hf_config: dict) -> list[str]:
    return list(transformers.Cohere2Config(**hf_config).layer_types)


def assert_runs_what_transformers_runs(m, hf_config: dict) -> None:
    types = transformers_layer_types(hf_config)
    specs = layers.layer_specs(m)
    assert [s.attention == "sliding" for s in specs] == [t == "sliding_attention" for t in types]
    assert [s.use_rope for s in specs] == [t == "sliding_attention" for t in types]  # NoPE on the full layers
    ref = transformers.Cohere2Config(**hf_config)
    assert (m.d_model, m.num_heads, m.num_kv_heads, m.head_dim, m.d_ff, m.vocab_size) == (
        ref.hidden_size, ref.num_attention_heads, ref.num_key_value_heads, ref.head_dim, ref.intermediate_size,
        ref.vocab_size,
    )  # fmt: skip
    assert m.rope_theta == ref.rope_parameters["rope_theta"] and m.logit_scale == ref.logit_scale
    assert m.tie_embeddings == ref.tie_word_embeddings and m.sliding_window == ref.sliding_window
    assert (m.norm, m.block, m.rope_layout) == ("layernorm", "parallel", "interleaved")


def test_command_r7b_imports():
    """Command R7B's hub fields (layer_switch, use_parallel_block, use_parallel_embedding, rotary_pct, ...)
    all say what transformers computes, so the file imports as transformers reads it."""
    hf_config = published("command_r7b")["config"]
    m = hf.model_config_from_hf(hf_config)
    assert_runs_what_transformers_runs(m, hf_config)
    assert (m.num_layers, m.d_model, m.logit_scale, m.rope_theta) == (32, 4096, 0.25, 50000.0)


def test_tiny_aya_imports_as_configs_tiny_aya_3b():
    """Tiny Aya's config.json (the part of tiny-aya-earth's that was reachable, over tiny-aya-base's
    remaining hub fields) imports to the model configs/tiny_aya_3b.py describes, and exports back to it."""
    hf_config = {**published("tiny_random_aya_base")["config"], **published("tiny_aya_earth_head")["partial_config"]}
    m = hf.model_config_from_hf(hf_config)
    assert_runs_what_transformers_runs(m, hf_config)
    ours = validation.validate(config.load_config(str(ROOT / "configs" / "tiny_aya_3b.py"))).model
    assert layers.layer_specs(m) == layers.layer_specs(ours)
    assert hf.hf_config(m) == hf.hf_config(ours)


def test_tiny_random_aya_base_is_refused_for_its_contradiction():
    """Optimum's 2-layer Tiny Aya keeps sliding_window_pattern 4 and layer_switch 4 but runs layer_types
    [sliding, full]: transformers reads layer_types only, so the file says two things; refused, naming it.
    Without the two stale fields it imports as transformers runs it (heads * head_dim != hidden_size)."""
    hf_config = published("tiny_random_aya_base")["config"]
    with pytest.raises(hf.HFConfigError) as err:
        hf.model_config_from_hf(hf_config)
    assert err.value.field in ("sliding_window_pattern", "layer_switch") and "layer_types" in str(err.value)
    agreed = {k: v for k, v in hf_config.items() if k not in ("sliding_window_pattern", "layer_switch")}
    m = hf.model_config_from_hf(agreed)
    assert_runs_what_transformers_runs(m, agreed)
    assert m.num_heads * m.head_dim != m.d_model


@pytest.mark.parametrize(
    "field,agrees,disagrees",
    [
        ("layer_switch", 4, 3),  # the period of the full layers: 3 puts them at 2, 5, ...
        ("sliding_window_pattern", 4, 2),
        ("use_parallel_block", True, False),  # transformers' Cohere2 block is always parallel
        ("use_qk_norm", False, True),  # transformers' Cohere2 has no QK-norm
    ],
)
def test_cohere2_hub_fields_accept_only_what_transformers_computes(field, agrees, disagrees):
    hf_config = published("command_r7b")["config"]
    want = hf.model_config_from_hf(hf_config)
    assert hf.model_config_from_hf({**hf_config, field: agrees}) == want
    if field in ("layer_switch", "sliding_window_pattern"):  # with layer_types explicit they derive nothing
        hf_config = {**hf_config, "layer_types": transformers_layer_types(hf_config)}
    with pytest.raises(hf.HFConfigError) as err:
        hf.model_config_from_hf({**hf_config, field: disagrees})
    assert err.value.field == field and "Fix:" in str(err.value) and "\n" not in str(err.value)


def test_use_parallel_embedding_is_accepted_either_way():
    """A tensor-parallel split of the embedding table in Cohere's stack: the same function either way."""
    hf_config = published("command_r7b")["config"]
    want = hf.model_config_from_hf(hf_config)
    for value in (True, False):
        assert hf.model_config_from_hf({**hf_config, "use_parallel_embedding": value}) == want


@pytest.mark.parametrize("family", sorted({f.model_type for f in hf.FAMILIES.values()}))
def test_quantized_checkpoints_are_refused_without_advising_deletion(family):
    """A 4-bit Command R7B's quantization_config (any family): its weights are packed integers, so the
    error says quantized checkpoints are not imported and what to import instead, never to delete the field."""
    quant = published("command_r7b_4bit_quantization_config")["quantization_config"]
    hf_config = {**published("command_r7b")["config"], "quantization_config": quant}
    if family != "cohere2":
        hf_config = {"model_type": family, "quantization_config": quant}
    with pytest.raises(hf.HFConfigError) as err:
        hf.model_config_from_hf(hf_config)
    message = str(err.value)
    assert err.value.field == "quantization_config", message
    assert "quantized" in message and "bitsandbytes" in message and "unquantized" in message
    assert "delete" not in message and "remove" not in message
