"""Qwen3.5 and Qwen3.5 MoE beyond the contract suite (tests/hf/test_hf_contract.py): logits on rows past the Gated
DeltaNet chunk, greedy generation, the unfused GDN projections, text mRoPE as partial RoPE, the multimodal
checkpoint (refused; its text model saved alone imports), the config.json fields Qwen3_5TextConfig resolves,
what the formats refuse, and the published 9B shape. References: transformers' Qwen3.5 classes (fp32, eager),
the checkpoint files they write, and the plain RoPE formula.
"""

import numpy as np
import pytest
import torch
import transformers
from configs_loader import ROOT
from generate_parity import assert_greedy_equals_transformers
from transformers.models.qwen3_5 import modeling_qwen3_5 as hf_qwen

import nopejax
from nopejax import config, layers, model, validation
from nopejax.mixers import gated_deltanet as gdn_lib

# 5 layers: GDN, attention, GDN, GDN, attention; 2 key heads of 5 serving 6 value heads of 3; partial RoPE 0.5 of
# head_dim 12 (6 dims, 3 frequencies) with one mRoPE section per stream, as the hub's configs carry them
SMALL = dict(
    vocab_size=61, hidden_size=30, intermediate_size=37, num_hidden_layers=5, num_attention_heads=3,
    num_key_value_heads=1, head_dim=12, max_position_embeddings=256, linear_num_key_heads=2,
    linear_num_value_heads=6, linear_key_head_dim=5, linear_value_head_dim=3, linear_conv_kernel_dim=4,
    tie_word_embeddings=False,
    layer_types=["linear_attention", "full_attention", "linear_attention", "linear_attention", "full_attention"],
    rope_parameters={"rope_type": "default", "rope_theta": 100.0, "partial_rotary_factor": 0.5,
                     "mrope_section": [1, 1, 1], "mrope_interleaved": True},
)  # fmt: skip
# Qwen3.5 MoE: every layer top-2 of 5 experts of 11, a shared expert two experts wide
MOE = dict(moe_intermediate_size=11, shared_expert_intermediate_size=22, num_experts=5, num_experts_per_tok=2)
FAMILIES = {
    "qwen3_5": (transformers.Qwen3_5TextConfig, transformers.Qwen3_5ForCausalLM, {}),
    "qwen3_5_moe": (transformers.Qwen3_5MoeTextConfig, transformers.Qwen3_5MoeForCausalLM, MOE),
}
SEQ = 83  # past transformers' GDN chunk of 64, and not a multiple of it


def _gentle(ref):
    """Norm offsets around 0 (scales 1 + w in [0.5, 1.5]), other weights normal(0, 0.1)."""
    with torch.no_grad():
        for name, p in ref.named_parameters():
            p.uniform_(-0.5, 0.5) if name.endswith("norm.weight") else p.normal_(0.0, 0.1)
    return ref


def reference(name: str, seed: int = 0):
    config_cls, model_cls, extra = FAMILIES[name]
    cfg = config_cls(**SMALL, **extra)
    cfg._attn_implementation, cfg._experts_implementation = "eager", "eager"
    torch.manual_seed(seed)
    return _gentle(model_cls(cfg).float().eval())


@pytest.fixture(scope="module", params=list(FAMILIES))
def saved(request, tmp_path_factory):
    ref = reference(request.param)
    path = tmp_path_factory.mktemp(request.param) / "hf"
    ref.save_pretrained(path)
    return request.param, ref, path


def test_from_hf_gives_transformers_logits_past_the_gdn_chunk(saved):
    name, ref, path = saved
    ours = nopejax.from_hf(str(path))
    m = ours.cfg
    assert m.hf_family == name
    assert [s.mixer for s in layers.layer_specs(m)] == ["gated_deltanet", "attention", "gated_deltanet",
                                                        "gated_deltanet", "attention"]  # fmt: skip
    assert {s.ffn for s in layers.layer_specs(m)} == {"moe" if name == "qwen3_5_moe" else "dense"}
    assert (m.partial_rotary_factor, m.attention_gate, m.norm_unit_offset) == (0.5, 1, 1)
    tokens_BS = np.random.default_rng(0).integers(0, 61, (2, SEQ))
    with torch.no_grad():
        want = ref(torch.tensor(tokens_BS)).logits.numpy()
    graphdef, params = model.split(ours)
    got = np.asarray(model.apply(graphdef, params, tokens_BS.astype(np.int32)))
    assert np.abs(want).max() > 0.5
    # measured: 1.1e-5 (dense) and 4.4e-6 (MoE) on logits up to 2.4
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_greedy_generation_equals_transformers_generate(saved):
    """KV cache on the attention layers, the GDN conv window and state on the others: greedy tokens and their
    logits as transformers' generate, alone over two prefill chunks and as a left-padded batch."""
    _, ref, path = saved
    prompts = [np.random.default_rng(row).integers(3, 61, n) for row, n in enumerate((21, 6))]
    assert_greedy_equals_transformers(nopejax.from_hf(str(path)), ref, ([prompts[0]], prompts), 8)


def test_the_unfused_gdn_projections_are_ours():
    """Qwen3_5GatedDeltaNet's in_proj_qkv(h) is q | k | v (the conv's channels), in_proj_z / _b / _a are our g, b,
    a projections: QWEN3_5_TENSORS gives them, and to_qwen3_5 writes the same tensors back."""
    cfg = transformers.Qwen3_5TextConfig(**SMALL)
    mixer = hf_qwen.Qwen3_5GatedDeltaNet(cfg, layer_idx=0)
    d = gdn_lib.GatedDeltaNetDims(d_model=30, key_heads=2, value_heads=6, key_head_dim=5, value_head_dim=3)
    state = {k: v.detach().numpy() for k, v in mixer.state_dict().items()}
    ours = gdn_lib.from_hf(state, d, tensors=gdn_lib.QWEN3_5_TENSORS)
    h = torch.randn(7, 30)
    with torch.no_grad():
        q, k, v = torch.split(mixer.in_proj_qkv(h), [10, 10, 18], dim=-1)
        want = {"q_proj": q, "k_proj": k, "v_proj": v, "g_proj": mixer.in_proj_z(h), "b_proj": mixer.in_proj_b(h),
                "a_proj": mixer.in_proj_a(h)}  # fmt: skip
    for name, w in want.items():
        np.testing.assert_allclose(h.numpy() @ np.asarray(ours[name]), w.numpy(), atol=1e-6, err_msg=name)
    back = gdn_lib.to_qwen3_5({k: np.asarray(v) for k, v in ours.items()}, d)
    assert back.keys() == state.keys()
    for name, w in state.items():
        np.testing.assert_array_equal(back[name], w, err_msg=name)


def test_text_mrope_is_ordinary_partial_rope():
    """For text Qwen3_5TextModel hands its rotary embedding three equal position streams: the cos / sin are the
    plain partial-RoPE formula whatever mrope_section says. Unequal streams (vision tokens) would differ."""
    cfg = transformers.Qwen3_5TextConfig(**SMALL)
    rotary = hf_qwen.Qwen3_5TextRotaryEmbedding(cfg)
    positions_S = torch.arange(40) * 7
    x = torch.zeros(1, 40, 30)
    cos, sin = rotary(x, positions_S[None, None].expand(3, 1, -1))
    rotated = int(12 * 0.5)
    inv_freq = 100.0 ** (-np.arange(0, rotated, 2) / rotated)
    angle_SF = positions_S.numpy()[:, None] * inv_freq
    np.testing.assert_allclose(cos[0].numpy(), np.cos(np.concatenate([angle_SF, angle_SF], -1)), atol=1e-5)
    np.testing.assert_allclose(sin[0].numpy(), np.sin(np.concatenate([angle_SF, angle_SF], -1)), atol=1e-5)
    streams = torch.stack([positions_S, positions_S + 3, positions_S])[:, None]  # the height stream moved
    assert not torch.allclose(rotary(x, streams)[0], cos)


def _mm_config():
    vision = dict(depth=1, hidden_size=16, intermediate_size=20, num_heads=2, out_hidden_size=30, patch_size=4,
                  num_position_embeddings=16)  # fmt: skip
    return transformers.Qwen3_5Config(text_config=SMALL, vision_config=vision)


def test_the_multimodal_checkpoint_is_refused_and_its_text_model_saved_alone_imports(tmp_path):
    """The hub's layout (Qwen3_5ForConditionalGeneration: model_type qwen3_5, text_config, vision tower and
    model.language_model.* tensors) is refused in one line naming the fix; the fix's directory imports and
    computes the multimodal model's text logits."""
    torch.manual_seed(1)
    mm = _gentle(transformers.Qwen3_5ForConditionalGeneration(_mm_config()).float().eval())
    mm.save_pretrained(tmp_path / "mm")
    with pytest.raises(nopejax.hf.HFConfigError) as err:
        nopejax.from_hf(str(tmp_path / "mm"))
    message = str(err.value)
    assert err.value.field == "model_type" and "\n" not in message
    assert "Qwen3_5ForCausalLM.from_pretrained(dir).save_pretrained(text_dir)" in message
    transformers.Qwen3_5ForCausalLM.from_pretrained(tmp_path / "mm").save_pretrained(tmp_path / "text")
    ours = nopejax.from_hf(str(tmp_path / "text"))
    tokens_BS = np.random.default_rng(2).integers(0, 61, (2, 19))
    with torch.no_grad():
        want = mm(input_ids=torch.tensor(tokens_BS)).logits.numpy()
    graphdef, params = model.split(ours)
    got = np.asarray(model.apply(graphdef, params, tokens_BS.astype(np.int32)))
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)  # measured: 2.9e-6 on logits up to 2.4


def test_the_multimodal_moe_checkpoint_is_refused_naming_its_text_class():
    with pytest.raises(nopejax.hf.HFConfigError, match=r"Qwen3_5MoeForCausalLM\.from_pretrained\(dir\)"):
        nopejax.hf.model_config_from_hf({"model_type": "qwen3_5_moe", "text_config": {**SMALL, **MOE}})


@pytest.mark.parametrize(
    "given",
    [
        {},  # Qwen3_5TextConfig's 0.25
        {"partial_rotary_factor": 0.5},  # a top-level field
        {"partial_rotary_factor": 0.5, "rope_parameters": {"rope_type": "default", "rope_theta": 7.0,
                                                           "partial_rotary_factor": 0.75, "mrope_section": [2, 1, 1]}},
        {"rope_parameters": {"rope_type": "default", "rope_theta": 1e7, "mrope_section": [11, 11, 10],
                             "mrope_interleaved": True}},
    ],
)  # fmt: skip
def test_rope_fields_resolve_as_qwen3_5_text_config(given):
    base = {k: v for k, v in SMALL.items() if k != "rope_parameters"} | {"head_dim": 16}
    copied = {k: (dict(v) if isinstance(v, dict) else v) for k, v in given.items()}  # the class writes into dicts
    hf = transformers.Qwen3_5TextConfig(**base, **copied)
    m = nopejax.hf.model_config_from_hf({**base, **given, "model_type": "qwen3_5_text"})
    assert m.partial_rotary_factor == hf.rope_parameters["partial_rotary_factor"]
    assert m.rope_theta == hf.rope_parameters["rope_theta"]
    assert m.rope_scaling is None and hf.rope_parameters["rope_type"] == "default"


def test_layers_are_those_transformers_builds():
    given = {**SMALL, "layer_types": None, "full_attention_interval": 2}
    hf = transformers.Qwen3_5TextConfig(**given)
    m = nopejax.hf.model_config_from_hf({**given, "model_type": "qwen3_5_text"})
    built = [hf_qwen.Qwen3_5DecoderLayer(hf, i) for i in range(5)]
    assert [s.mixer for s in layers.layer_specs(m)] == [
        "gated_deltanet" if hasattr(layer, "linear_attn") else "attention" for layer in built
    ]


@pytest.mark.parametrize(
    "model_type,fields,field",
    [
        ("qwen3_5_text", {"rope_parameters": {"rope_type": "default", "mrope_section": [1, 1]}},
         "rope_parameters.mrope_section"),
        ("qwen3_5_text", {"attn_output_gate": False}, "attn_output_gate"),
        ("qwen3_5_text", {"attention_bias": True}, "attention_bias"),
        ("qwen3_5_text", MOE, "moe_intermediate_size"),  # no row: the dense model has no experts
        ("qwen3_5_moe_text", {**MOE, "num_experts": 0}, "num_experts"),
        ("qwen3_5_moe_text", {**MOE, "shared_expert_intermediate_size": 15}, "shared_expert_intermediate_size"),
        ("qwen3_5_moe_text", {**MOE, "norm_topk_prob": False}, "norm_topk_prob"),
        ("qwen3_5_moe_text", {**MOE, "mlp_only_layers": [2]}, "mlp_only_layers"),
    ],
)  # fmt: skip
def test_what_nopejax_cannot_compute_is_refused_in_one_line(model_type, fields, field):
    with pytest.raises(nopejax.hf.HFConfigError) as err:
        nopejax.hf.model_config_from_hf({**SMALL, **fields, "model_type": model_type})
    assert err.value.field == field and "\n" not in str(err.value)


@pytest.mark.parametrize(
    "model_type,overrides,field",
    [
        ("qwen3_5_text", {"attention_gate": False}, "model.attention_gate"),
        ("qwen3_5_text", {"norm_unit_offset": False}, "model.norm_unit_offset"),
        ("qwen3_5_moe_text", {"router_normalize": False}, "model.router_normalize"),
        ("qwen3_5_moe_text", {"shared_expert_gate": False}, "model.shared_expert_gate"),
    ],
)
def test_export_refuses_what_the_format_cannot_hold(model_type, overrides, field):
    extra = MOE if model_type == "qwen3_5_moe_text" else {}
    m = nopejax.hf.model_config_from_hf({**SMALL, **extra, "model_type": model_type})
    m.update(overrides)
    with pytest.raises(config.ConfigError) as err:
        nopejax.hf.check_exportable(m)
    assert err.value.field == field and "\n" not in str(err.value)


def test_the_9b_config_is_the_published_shape():
    """configs/qwen3_5_9b.py has transformers' parameter count for the same config.json and exports a
    config.json that imports back to it."""
    cfg = validation.validate(config.load_config(str(ROOT / "configs" / "qwen3_5_9b.py")))
    written = nopejax.hf.hf_config(cfg.model)
    assert written["layer_types"].count("full_attention") == 8 and written["architectures"] == ["Qwen3_5ForCausalLM"]
    back = nopejax.hf.model_config_from_hf(written)
    assert layers.layer_specs(back) == layers.layer_specs(cfg.model)
    assert nopejax.hf.hf_config(back) == written
    with torch.device("meta"):
        hf = transformers.Qwen3_5ForCausalLM(transformers.Qwen3_5TextConfig(**{
            k: v for k, v in written.items() if k not in ("architectures", "model_type", "torch_dtype")}))  # fmt: skip
    assert model.param_count(cfg.model) == sum(p.numel() for p in hf.parameters()) == 8_953_803_264
    block, repeats, tail = layers.block_structure(layers.layer_specs(cfg.model))
    assert (len(block), repeats, len(tail)) == (4, 8, 0)
