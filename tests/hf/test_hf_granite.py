"""Granite 4.0-H beyond the contract suite (which runs the MoE, NoPE variant): the dense variant (no
experts: the shared SwiGLU alone) with RoPE and a tied head, the layer-kind names transformers
remaps, the hub's extra fields, and what the format refuses. The reference is transformers' own
config class and model."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from configs_loader import ROOT

import nopejax
from nopejax import config, layers, model, tensorfile, validation

SMALL = dict(
    model_type="granitemoehybrid", vocab_size=61, hidden_size=30, intermediate_size=11, num_hidden_layers=5,
    num_attention_heads=3, num_key_value_heads=1, mamba_n_heads=6, mamba_n_groups=2, mamba_d_state=7,
    mamba_chunk_size=4, shared_intermediate_size=22, num_local_experts=5, num_experts_per_tok=2,
    layer_types=["mamba", "attention", "mamba", "mamba", "attention"],
)  # fmt: skip
SEQ = 13  # over the 4-token SSD chunks: longer than one, not a multiple


def _reference(path, **overrides):
    """A random fp32 transformers Granite 4.0-H of SMALL's sizes, saved to `path`."""
    kw = {k: v for k, v in {**SMALL, **overrides}.items() if k != "model_type"}
    cfg = transformers.GraniteMoeHybridConfig(**kw)
    cfg._attn_implementation, cfg._experts_implementation = "eager", "eager"
    torch.manual_seed(0)
    ref = transformers.GraniteMoeHybridForCausalLM(cfg).float().eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            p.uniform_(0.5, 1.5) if "norm" in name else p.normal_(0.0, 0.25)
    ref.save_pretrained(path)
    return ref


def _logits(ref, tokens_BS):
    with torch.no_grad():
        return ref(torch.tensor(tokens_BS, dtype=torch.long)).logits.numpy()


def test_dense_rope_tied_variant_is_exact_both_ways(tmp_path):
    """num_local_experts 0 (transformers runs the shared SwiGLU alone), RoPE on the attention layers, a tied
    head, the muP multipliers away from 1: from_hf gives transformers' logits, to_hf writes back every tensor
    bit for bit, and the Auto class loads the export with the same logits."""
    ref = _reference(
        tmp_path / "hf", num_local_experts=0, position_embedding_type="rope", tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 100.0}, embedding_multiplier=2.5,
        attention_multiplier=0.15, residual_multiplier=0.4, logits_scaling=2.2, attention_bias=True,
    )  # fmt: skip
    ours = nopejax.from_hf(str(tmp_path / "hf"))
    m = ours.cfg
    assert m.num_experts == 0 and m.d_ff == 22 and m.tie_embeddings and m.attention_bias
    assert [s.use_rope for s in layers.layer_specs(m)] == [False, True, False, False, True]
    assert (m.embed_scale, m.attention_scale, m.residual_scale, m.logit_scale) == (2.5, 0.15, 0.4, 1 / 2.2)
    tokens_BS = np.random.default_rng(0).integers(0, 61, (2, SEQ)).astype(np.int32)
    want = _logits(ref, tokens_BS)
    assert np.abs(want).max() > 1.0
    graphdef, params = model.split(ours)
    got = jax.jit(lambda p, t: model.apply(graphdef, p, t))(params, jnp.asarray(tokens_BS))
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=0)

    nopejax.to_hf(ours, str(tmp_path / "back"))
    a, b = tensorfile.Reader(str(tmp_path / "hf")), tensorfile.Reader(str(tmp_path / "back"))
    assert sorted(a.names()) == sorted(b.names()) and "model.layers.0.shared_mlp.input_linear.weight" in a.names()
    for name in a.names():
        np.testing.assert_array_equal(a.get(name), b.get(name), err_msg=name)
    again = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "back", dtype=torch.float32, attn_implementation="eager", experts_implementation="eager"
    ).eval()
    assert type(again).__name__ == "GraniteMoeHybridForCausalLM" and again.config.num_local_experts == 0
    np.testing.assert_allclose(_logits(again, tokens_BS), want, atol=1e-6, rtol=0)


def test_layer_kind_names_both_spellings_and_the_defaults_resolve_as_transformers_does():
    """The hub's "mamba"/"attention" and transformers 5's "linear_attention"/"full_attention" are one layout;
    layer_types absent is every layer Mamba2; mamba_d_head "auto" is expand * hidden / heads."""
    new_names = ["linear_attention", "full_attention", "full_attention", "linear_attention", "linear_attention"]
    for types in (SMALL["layer_types"], new_names):
        kw = {k: v for k, v in SMALL.items() if k != "model_type"}
        hf = transformers.GraniteMoeHybridConfig(**{**kw, "layer_types": types})
        m = nopejax.hf.model_config_from_hf({**SMALL, "layer_types": types})
        assert [t == "mamba2" for t in m.layer_types] == [t == "linear_attention" for t in hf.layers_block_type]
        assert m.mamba_head_dim == hf.mamba_d_head == 10 and not any(layers.rope_pattern(m))
    m = nopejax.hf.model_config_from_hf({k: v for k, v in SMALL.items() if k != "layer_types"})
    assert m.layer_types == ("mamba2",) * 5 and m.num_shared_experts == 2 and m.expert_d_ff == 11


def test_hub_fields_are_accepted_where_transformers_ignores_them():
    hub = {"init_method": "mup", "normalization_function": "rmsnorm", "router_aux_loss_coef": 0.0,
           "rope_scaling": None, "rope_theta": 10000}  # fmt: skip
    assert nopejax.hf.model_config_from_hf({**SMALL, **hub}) == nopejax.hf.model_config_from_hf(SMALL)


@pytest.mark.parametrize(
    "overrides,field",
    [
        ({"shared_intermediate_size": 23}, "shared_intermediate_size"),  # not a whole number of experts
        ({"position_embedding_type": "alibi"}, "position_embedding_type"),
        ({"layer_types": ["mamba", "sliding_attention", "mamba", "mamba", "attention"]}, "layer_types"),
        ({"layer_types": ["mamba", "attention"]}, "layer_types"),  # transformers wants one per layer
        ({"normalization_function": "layernorm"}, "normalization_function"),
        ({"mlp_bias": True}, "mlp_bias"),  # no row: transformers' Granite 4.0-H MLPs have no biases
        ({"mamba_d_head": 7}, "mamba_d_head"),  # 6 x 7 != 2 x 30
    ],
)
def test_what_transformers_would_not_compute_as_nopejax_does_is_refused_in_one_line(overrides, field):
    with pytest.raises(nopejax.hf.HFConfigError) as err:
        nopejax.hf.model_config_from_hf({**SMALL, **overrides})
    assert err.value.field == field and "\n" not in str(err.value)


def _granite(**overrides):
    m = nopejax.hf.model_config_from_hf(SMALL)
    m.update(overrides)
    return m


@pytest.mark.parametrize(
    "overrides,field",
    [
        ({"ffn_types": ("dense", "moe", "moe", "moe", "moe")}, "model.ffn_types"),  # dense and MoE layers
        ({"no_rope_layers": (0, 1, 0, 0, 0)}, "model.no_rope_layers"),  # one RoPE, one NoPE attention layer
        ({"router": "sigmoid"}, "model.router"),
        ({"router_normalize": False}, "model.router_normalize"),
        ({"num_shared_experts": 0}, "model.num_shared_experts"),
        ({"expert_bias_rate": 1e-3}, "model.expert_bias_rate"),
        ({"mamba_head_dim": 7}, "model.mamba_head_dim"),  # 6 x 7 is not a multiple of 30
        ({"qk_norm": "rms"}, "model.qk_norm"),
    ],
)
def test_export_refuses_what_the_format_cannot_hold(overrides, field, tmp_path):
    with pytest.raises(config.ConfigError) as err:
        nopejax.to_hf({}, str(tmp_path / "out"), _granite(**overrides))
    assert err.value.field == field and "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()


def test_export_refuses_a_trained_expert_bias(tmp_path):
    m = _granite()
    params = {"layers": {"expert_bias": np.full((5, 5), 0.1, np.float32)}}
    with pytest.raises(config.ConfigError, match="GraniteMoeHybrid format has no expert bias"):
        nopejax.to_hf(params, str(tmp_path / "out"), m)
    assert not (tmp_path / "out").exists()


def test_export_config_imports_back_to_the_same_model():
    m = _granite(mamba_time_step_limit=(0.0, 3.0), mamba_conv_bias=False, attention_bias=True)
    hf = nopejax.hf.hf_config(m)
    assert hf["layer_types"] == SMALL["layer_types"] and hf["position_embedding_type"] == "nope"
    assert json.loads(json.dumps(hf)) == hf  # plain JSON
    assert nopejax.hf.model_config_from_hf(hf) == m


def test_tiny_hybrid_config_exports_a_model_transformers_runs_with_its_logits(tmp_path):
    """configs/tiny_hybrid.py (Mamba2 x3 : NoPE attention, dense, tied) as `nopejax export` writes it: the Auto
    class loads it and computes nopejax's logits, on rows of 100 tokens over SSD chunks of 32."""
    cfg = config.load_config(str(ROOT / "configs" / "tiny_hybrid.py"))
    cfg.model.update(init_std=0.2)  # logits well away from 0
    m = validation.validate(cfg).model
    ours = model.create(m, seed=0)
    nopejax.to_hf(ours, str(tmp_path / "hf"))
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "hf", dtype=torch.float32, attn_implementation="eager"
    ).eval()
    assert ref.config.layer_types == ["linear_attention"] * 3 + ["full_attention"] + ["linear_attention"] * 3 + [
        "full_attention"]  # fmt: skip
    assert ref.config.num_local_experts == 0 and ref.config.position_embedding_type == "nope"
    tokens_BS = np.random.default_rng(0).integers(0, m.vocab_size, (2, 100)).astype(np.int32)
    want = _logits(ref, tokens_BS)
    assert np.abs(want).max() > 1.0
    graphdef, params = model.split(ours)
    got = jax.jit(lambda p, t: model.apply(graphdef, p, t))(params, jnp.asarray(tokens_BS))
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-4 * np.abs(want).max(), rtol=0)
