"""Nemotron-H's config.json beyond the contract suite: the names transformers' NemotronHConfig resolves
(legacy aliases, the layer pattern, inf in JSON), the fields it ignores, and what the format refuses.
The reference is transformers' own config class and model."""

import json
import math

import pytest
import torch
import transformers
from configs_loader import ROOT

import nopejax
from nopejax import config, layers, validation

HUB_FIELDS = {  # fields the hub's Nemotron-H config.json files carry for NVIDIA's remote code
    "attention_head_dim": 10, "rms_norm_eps": 1e-05, "time_step_rank": 256, "residual_in_fp32": True,
    "auto_map": {"AutoConfig": "configuration_nemotron_h.NemotronHConfig"},
}  # fmt: skip
SMALL = dict(
    model_type="nemotron_h", vocab_size=61, hidden_size=30, intermediate_size=37, num_attention_heads=3,
    num_key_value_heads=1, head_dim=10, mamba_num_heads=6, mamba_head_dim=5, n_groups=3, ssm_state_size=7,
)  # fmt: skip


def test_legacy_names_and_pattern_resolve_as_transformers_resolves_them():
    """The older names win over the current ones and legacy layer kinds are remapped, as in NemotronHConfig."""
    given = {
        **SMALL, "layers_block_type": ["mamba", "attention", "mlp", "mamba"], "n_groups": 6, "mamba_n_groups": 3,
        "chunk_size": 8, "mamba_chunk_size": 5, "mamba_d_conv": 3, "mamba_conv_bias": False,
        "time_step_limit": [0.0, {"__float__": "Infinity"}], "mamba_dt_limit": [0.01, 7.0], **HUB_FIELDS,
    }  # fmt: skip
    hf = transformers.AutoConfig.for_model(**{k: v for k, v in given.items() if k != "time_step_limit"})
    m = nopejax.hf.model_config_from_hf(given)
    kinds = {
        "linear_attention": ("mamba2", "none"),
        "full_attention": ("full_attention", "none"),
        "mlp": ("mlp", "dense"),
    }
    assert list(zip(m.layer_types, m.ffn_types)) == [kinds[t] for t in hf.layers_block_type]
    assert (m.mamba_groups, m.mamba_chunk_size, m.mamba_conv_kernel) == (hf.n_groups, hf.chunk_size, hf.conv_kernel)
    assert m.mamba_conv_bias == hf.use_conv_bias and m.mamba_time_step_limit == tuple(hf.time_step_limit)
    assert not any(layers.rope_pattern(m)) and m.rms_norm_eps == hf.layer_norm_epsilon


def test_the_pattern_string_and_json_infinity():
    m = nopejax.hf.model_config_from_hf(
        {**SMALL, "hybrid_override_pattern": "M*-", "time_step_limit": [0.0, {"__float__": "Infinity"}]}
    )
    assert m.layer_types == ("mamba2", "full_attention", "mlp") and m.mamba_time_step_limit is None


def test_moe_layers_are_refused_in_one_line_naming_the_pattern():
    with pytest.raises(nopejax.hf.HFConfigError) as err:
        nopejax.hf.model_config_from_hf({**SMALL, "hybrid_override_pattern": "M*E-"})
    assert err.value.field == "hybrid_override_pattern" and "SwiGLU" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    "field,value", [("attention_head_dim", 64), ("rms_norm_eps", 1e-6), ("mlp_hidden_act", "silu")]
)
def test_hub_fields_that_disagree_with_what_transformers_computes_are_refused(field, value):
    with pytest.raises(nopejax.hf.HFConfigError) as err:
        nopejax.hf.model_config_from_hf({**SMALL, "hybrid_override_pattern": "M*-", field: value})
    assert err.value.field == field


def test_tie_word_embeddings_never_ties_so_the_head_is_read():
    """NemotronHForCausalLM keeps its own lm_head whatever tie_word_embeddings says: nopejax reads it untied."""
    hf = transformers.AutoConfig.for_model(**SMALL, hybrid_override_pattern="-", tie_word_embeddings=True)
    ref = transformers.NemotronHForCausalLM(hf)
    assert ref.lm_head.weight.data_ptr() != ref.model.embeddings.weight.data_ptr()
    assert not torch.equal(ref.lm_head.weight, ref.model.embeddings.weight)
    m = nopejax.hf.model_config_from_hf({**SMALL, "hybrid_override_pattern": "-", "tie_word_embeddings": True})
    assert m.tie_embeddings is False


def _nemotron(**overrides):
    m = nopejax.hf.model_config_from_hf({**SMALL, "hybrid_override_pattern": "M*-"})
    m.update(overrides)
    return m


@pytest.mark.parametrize(
    "overrides,field",
    [
        ({"mlp_activation": "swiglu"}, "model.mlp_activation"),
        ({"ffn_types": ("dense", "none", "dense")}, "model.ffn_types"),
        ({"no_rope_layers": (1, 1, 1)}, "model.no_rope_layers"),
        ({"tie_embeddings": True}, "model.tie_embeddings"),
        ({"attention_scale": 0.5}, "model.attention_scale"),
    ],
)
def test_export_refuses_what_the_format_cannot_hold(overrides, field):
    with pytest.raises(config.ConfigError) as err:
        nopejax.hf.check_exportable(_nemotron(**overrides))
    assert err.value.field == field and "\n" not in str(err.value)


def test_export_config_imports_back_to_the_same_model(tmp_path):
    m = _nemotron(mamba_time_step_limit=(0.0, 3.0), mlp_bias=True)
    back = nopejax.hf.model_config_from_hf(nopejax.hf.hf_config(m))
    assert back == m
    written = nopejax.hf.hf_config(_nemotron())
    assert written["time_step_limit"] == [0.0, {"__float__": "Infinity"}]  # as transformers 5 writes inf
    (tmp_path / "config.json").write_text(json.dumps(written))
    assert transformers.AutoConfig.from_pretrained(tmp_path).time_step_limit[1] == math.inf


def test_the_8b_config_exports_and_imports_back():
    """configs/nemotron_h_8b.py is a Nemotron-H model the format holds: its config.json imports to the same layers."""
    cfg = validation.validate(config.load_config(str(ROOT / "configs" / "nemotron_h_8b.py")))
    written = nopejax.hf.hf_config(cfg.model)
    assert written["layers_block_type"].count("linear_attention") == 24 and written["mlp_hidden_act"] == "relu2"
    back = nopejax.hf.model_config_from_hf(written)
    assert layers.layer_specs(back) == layers.layer_specs(cfg.model)
    assert nopejax.hf.hf_config(back) == written
    block, repeats, tail = layers.block_structure(layers.layer_specs(cfg.model))
    assert (len(block), repeats, len(tail)) == (11, 4, 8)  # the traced layers the docs quote
