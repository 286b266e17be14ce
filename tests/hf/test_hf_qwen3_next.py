"""Qwen3-Next beyond the contract suite (tests/hf/test_hf_contract.py): logits on rows past the Gated DeltaNet
chunk, a bf16 round trip, the fused tensor layouts, the config.json fields transformers' Qwen3NextConfig
resolves (partial RoPE, layer types, MoE layers), what the format refuses, and the published 80B shape.
References: transformers' Qwen3-Next classes (fp32, eager), and the checkpoint files they write.
"""

import copy

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from configs_loader import ROOT
from generate_parity import assert_greedy_equals_transformers
from transformers.models.qwen3_next import modeling_qwen3_next as hf_qwen

import nopejax
from nopejax import config, layers, model, tensorfile, validation
from nopejax.hf import qwen3_next

# 5 layers: GDN, attention, GDN (dense: mlp_only_layers), GDN, attention; 2 key heads of 5 serving 6 value heads
# of 3; partial RoPE 0.5 of head_dim 12 given inside rope_parameters; un-normalised top-2 of 5 experts
SMALL = dict(
    vocab_size=61, hidden_size=30, intermediate_size=37, num_hidden_layers=5, num_attention_heads=3,
    num_key_value_heads=1, head_dim=12, max_position_embeddings=256, moe_intermediate_size=11,
    shared_expert_intermediate_size=11, num_experts=5, num_experts_per_tok=2, norm_topk_prob=False,
    mlp_only_layers=[2], linear_num_key_heads=2, linear_num_value_heads=6, linear_key_head_dim=5,
    linear_value_head_dim=3, linear_conv_kernel_dim=4, tie_word_embeddings=False,
    layer_types=["linear_attention", "full_attention", "linear_attention", "linear_attention", "full_attention"],
    rope_parameters={"rope_type": "default", "rope_theta": 100.0, "partial_rotary_factor": 0.5},
)  # fmt: skip
SEQ = 83  # past transformers' GDN chunk of 64, and not a multiple of it


def reference(seed: int = 0, **overrides):
    cfg = transformers.Qwen3NextConfig(**{**SMALL, **overrides})
    cfg._attn_implementation, cfg._experts_implementation = "eager", "eager"
    torch.manual_seed(seed)
    ref = transformers.Qwen3NextForCausalLM(cfg).float().eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():  # norm offsets around 0 (scales 1 + w in [0.5, 1.5])
            p.uniform_(-0.5, 0.5) if name.endswith("norm.weight") else p.normal_(0.0, 0.1)
    return ref


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    ref = reference()
    path = tmp_path_factory.mktemp("qwen3_next") / "hf"
    ref.save_pretrained(path)
    return ref, path


def test_from_hf_gives_transformers_logits_past_the_gdn_chunk(saved):
    ref, path = saved
    ours = nopejax.from_hf(str(path))
    m = ours.cfg
    assert [s.ffn for s in layers.layer_specs(m)] == ["moe", "moe", "dense", "moe", "moe"]
    assert (m.partial_rotary_factor, m.shared_expert_gate, m.attention_gate, m.norm_unit_offset) == (0.5, 1, 1, 1)
    tokens_BS = np.random.default_rng(0).integers(0, 61, (2, SEQ))
    with torch.no_grad():
        want = ref(torch.tensor(tokens_BS)).logits.numpy()
    graphdef, params = model.split(ours)
    got = np.asarray(model.apply(graphdef, params, tokens_BS.astype(np.int32)))
    assert np.abs(want).max() > 0.5
    # measured: 3.2e-6 on logits up to 2.2
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_bf16_checkpoint_round_trips_bit_for_bit_and_loads(saved, tmp_path):
    """The norm offsets are stored as they are (no 1 added and taken away), so a bf16 file comes back exact."""
    ref, _ = saved
    copy.deepcopy(ref).to(torch.bfloat16).save_pretrained(tmp_path / "bf16")  # the shared fixture stays fp32
    nopejax.to_hf(nopejax.from_hf(str(tmp_path / "bf16")), str(tmp_path / "back"), dtype="bfloat16")
    a, b = tensorfile.Reader(str(tmp_path / "bf16")), tensorfile.Reader(str(tmp_path / "back"))
    assert sorted(a.names()) == sorted(b.names())
    for name in a.names():
        assert a.dtype(name) == b.dtype(name) == "BF16", name
        np.testing.assert_array_equal(a.get(name), b.get(name), err_msg=name)
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back", dtype=torch.float32)
    assert type(again).__name__ == "Qwen3NextForCausalLM" and again.config.layer_types == SMALL["layer_types"]


def test_q_proj_holds_each_heads_query_then_its_gate():
    """Qwen3NextAttention views q_proj(h) as [.., H, 2E] and chunks it: our wq and attn_gate give those halves."""
    attn = hf_qwen.Qwen3NextAttention(transformers.Qwen3NextConfig(**SMALL), layer_idx=1)
    m = nopejax.hf.model_config_from_hf({**SMALL, "model_type": "qwen3_next"})
    ours = qwen3_next.LAYER_MAP[("wq", "attn_gate")].from_hf(
        {qwen3_next.Q_PROJ: attn.q_proj.weight.detach().numpy()}, m
    )
    h = torch.randn(7, 30)
    with torch.no_grad():
        query, gate = torch.chunk(attn.q_proj(h).view(7, 3, 24), 2, dim=-1)
    np.testing.assert_allclose(np.einsum("sd,dhe->she", h.numpy(), ours["wq"]), query.numpy(), atol=1e-6)
    np.testing.assert_allclose(np.einsum("sd,dhe->she", h.numpy(), ours["attn_gate"]), gate.numpy(), atol=1e-6)


def test_offset_rms_norm_is_transformers_in_bf16():
    """model.rms_norm with unit_offset: Qwen3NextRMSNorm's (x * (1 + w)) in fp32, then cast, bit for bit."""
    norm = hf_qwen.Qwen3NextRMSNorm(30, eps=1e-6)
    with torch.no_grad():
        norm.weight.uniform_(-0.5, 0.5)
    x = torch.randn(4, 30).to(torch.bfloat16)
    with torch.no_grad():
        want = norm(x).float().numpy()
    got = model.rms_norm(jnp.asarray(x.float().numpy(), jnp.bfloat16), norm.weight.detach().numpy(), 1e-6, True)
    np.testing.assert_array_equal(np.asarray(got, np.float32), want)


@pytest.mark.parametrize(
    "given",
    [
        {},  # Qwen3NextConfig's 0.25
        {"partial_rotary_factor": 0.5},  # transformers 4's top-level field
        {"partial_rotary_factor": 0.5, "rope_parameters": {"rope_type": "default", "rope_theta": 7.0,
                                                           "partial_rotary_factor": 0.75}},
        {"rope_theta": 5e6, "rope_scaling": None},
        {"rope_theta": 1e6,
         "rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}},
    ],
)  # fmt: skip
def test_rope_fields_resolve_as_qwen3_next_config(given):
    base = {k: v for k, v in SMALL.items() if k != "rope_parameters"} | {"head_dim": 16}
    hf = transformers.Qwen3NextConfig(**base, **{k: (dict(v) if isinstance(v, dict) else v) for k, v in given.items()})
    m = nopejax.hf.model_config_from_hf({**base, **given, "model_type": "qwen3_next"})
    assert m.partial_rotary_factor == hf.rope_parameters["partial_rotary_factor"]
    assert m.rope_theta == hf.rope_parameters["rope_theta"]
    assert (m.rope_scaling or {}).get("rope_type", "default") == hf.rope_parameters["rope_type"]


@pytest.mark.parametrize(
    "fields",
    [{"decoder_sparse_step": 2}, {"decoder_sparse_step": 3, "mlp_only_layers": [2]}, {"mlp_only_layers": [0, 4]},
     {"num_experts": 0}, {"decoder_sparse_step": 9}, {"layer_types": None, "full_attention_interval": 2}],
)  # fmt: skip
def test_layers_are_those_transformers_builds(fields):
    given = {**SMALL, "mlp_only_layers": [], **fields}
    hf = transformers.Qwen3NextConfig(**given)
    m = nopejax.hf.model_config_from_hf({**given, "model_type": "qwen3_next"})
    cfg = config.base_config()
    cfg.model = m
    validation.validate(cfg)
    built = [hf_qwen.Qwen3NextDecoderLayer(hf, i) for i in range(5)]
    assert [s.ffn for s in layers.layer_specs(m)] == [
        "moe" if isinstance(layer.mlp, hf_qwen.Qwen3NextSparseMoeBlock) else "dense" for layer in built
    ]
    assert [s.mixer for s in layers.layer_specs(m)] == [
        "gated_deltanet" if hasattr(layer, "linear_attn") else "attention" for layer in built
    ]
    back = nopejax.hf.model_config_from_hf(nopejax.hf.hf_config(m))
    assert layers.layer_specs(back) == layers.layer_specs(m)


@pytest.mark.parametrize(
    "fields,field",
    [
        ({"shared_expert_intermediate_size": 15}, "shared_expert_intermediate_size"),
        ({"attention_bias": True}, "attention_bias"),
        ({"layer_types": ["linear_attention", "sliding_attention"] + ["full_attention"] * 3}, "layer_types"),
        ({"hidden_act": "gelu"}, "hidden_act"),
    ],
)
def test_what_nopejax_cannot_compute_is_refused_in_one_line(fields, field):
    with pytest.raises(nopejax.hf.HFConfigError) as err:
        nopejax.hf.model_config_from_hf({**SMALL, **fields, "model_type": "qwen3_next"})
    assert err.value.field == field and "\n" not in str(err.value)


def _small(**overrides):
    m = nopejax.hf.model_config_from_hf({**SMALL, "model_type": "qwen3_next"})
    m.update(overrides)
    return m


@pytest.mark.parametrize(
    "overrides,field",
    [
        ({"norm_unit_offset": False}, "model.norm_unit_offset"),
        ({"shared_expert_gate": False}, "model.shared_expert_gate"),
        ({"attention_gate": False}, "model.attention_gate"),
        ({"router": "sigmoid"}, "model.router"),
        ({"no_rope_layers": (0,) * 5}, "model.no_rope_layers"),
        ({"gdn_allow_neg_eigval": True}, "model.gdn_allow_neg_eigval"),
        ({"block": "sandwich"}, "model.block"),
    ],
)
def test_export_refuses_what_the_format_cannot_hold(overrides, field):
    with pytest.raises(config.ConfigError) as err:
        nopejax.hf.check_exportable(_small(**overrides))
    assert err.value.field == field and "\n" not in str(err.value)


def test_export_refuses_a_nonzero_expert_bias(saved, tmp_path):
    ours = nopejax.from_hf(str(saved[1]))
    ours.layers["expert_bias"][...] = ours.layers["expert_bias"][...].at[0, 1].set(0.5)
    with pytest.raises(config.ConfigError, match="nonzero expert bias"):
        nopejax.to_hf(ours, str(tmp_path / "out"))
    assert not (tmp_path / "out" / "config.json").exists()


def test_the_80b_config_is_the_published_shape():
    """configs/qwen3_next_80b_a3b.py has transformers' parameter count for the same config.json (nopejax adds
    the expert bias, zero and not exported) and exports a config.json that imports back to it."""
    cfg = validation.validate(config.load_config(str(ROOT / "configs" / "qwen3_next_80b_a3b.py")))
    written = nopejax.hf.hf_config(cfg.model)
    assert written["layer_types"].count("full_attention") == 12 and written["mlp_only_layers"] == []
    back = nopejax.hf.model_config_from_hf(written)
    assert layers.layer_specs(back) == layers.layer_specs(cfg.model)
    assert nopejax.hf.hf_config(back) == written
    with torch.device("meta"):
        hf = transformers.Qwen3NextForCausalLM(transformers.Qwen3NextConfig(**{
            k: v for k, v in written.items() if k not in ("architectures", "model_type", "torch_dtype")}))  # fmt: skip
    hf_count = sum(p.numel() for p in hf.parameters())
    m = cfg.model
    assert model.param_count(m) - m.num_layers * m.num_experts == hf_count == 79_674_391_296
    block, repeats, tail = layers.block_structure(layers.layer_specs(m))
    assert (len(block), repeats, len(tail)) == (4, 12, 0)


def test_greedy_generation_equals_transformers_generate(saved):
    """The imported model decodes as transformers' generate does (KV cache on the attention layers, the GDN
    conv window and state on the others): greedy tokens and their logits, alone over two prefill chunks and
    as a left-padded batch."""
    ref, path = saved
    prompts = [np.random.default_rng(row).integers(3, 61, n) for row, n in enumerate((21, 6))]
    assert_greedy_equals_transformers(nopejax.from_hf(str(path)), ref, ([prompts[0]], prompts), 8)
