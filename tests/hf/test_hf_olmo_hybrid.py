"""OLMo Hybrid beyond the contract suite: rows longer than transformers' 64-token GDN chunk, RoPE and NoPE
attention, allow_neg_eigval on and off, key and value widths that differ (the checkpoint's split convs),
greedy generation, what the format refuses, and the tiny and 7B configs. The references are
transformers' OlmoHybridConfig / OlmoHybridForCausalLM and their generate."""

import copy
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.torch
import torch
import transformers
from configs_loader import ROOT
from generate_parity import assert_greedy_equals_transformers

import nopejax
from nopejax import config, layers, model, tensorfile, validation

V = 61
SEQ = 75  # > transformers' 64-token chunk, not a multiple of it
KEY_DIM, VALUE_DIM = 2 * 5, 4 * 7  # differ: save_pretrained's equal-thirds conv split is not q | k | v


def reference(rope: bool, neg: bool, seed: int = 0):
    """A tiny random OlmoHybridForCausalLM, fp32, eager attention, sharp weights: GDN x3, attention, GDN, attention."""
    hf_cfg = transformers.OlmoHybridConfig(
        vocab_size=V, hidden_size=30, intermediate_size=37, num_hidden_layers=6, num_attention_heads=3,
        num_key_value_heads=1, max_position_embeddings=128, linear_num_key_heads=2, linear_num_value_heads=4,
        linear_key_head_dim=5, linear_value_head_dim=7, linear_conv_kernel_dim=3, linear_allow_neg_eigval=neg,
        layer_types=["linear_attention"] * 3 + ["full_attention", "linear_attention", "full_attention"],
        rope_parameters={"rope_type": "default", "rope_theta": 100.0 if rope else None},
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    hf_cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    ref = transformers.OlmoHybridForCausalLM(hf_cfg).float().eval()
    assert (ref.model.rotary_emb is not None) == rope
    with torch.no_grad():
        for name, p in ref.named_parameters():
            p.uniform_(0.5, 1.5) if "norm" in name else p.normal_(0.0, 0.25)
    return ref


def save_as_hub(ref, path) -> None:
    """save_pretrained, then the convs split q | k | v as the checkpoint holds them (save_pretrained cuts the
    concatenated conv into equal thirds; transformers concatenates either on load)."""
    ref.save_pretrained(path)
    (file,) = path.glob("*.safetensors")
    tensors = safetensors.torch.load_file(file)
    for name in [n for n in tensors if n.endswith("q_conv1d.weight")]:
        stem = name.removesuffix("q_conv1d.weight")
        w = torch.cat([tensors[f"{stem}{c}_conv1d.weight"] for c in "qkv"])
        for c, part in zip("qkv", torch.split(w, [KEY_DIM, KEY_DIM, VALUE_DIM])):
            tensors[f"{stem}{c}_conv1d.weight"] = part.contiguous()
    safetensors.torch.save_file(tensors, file, metadata={"format": "pt"})


def logits_of(ref, tokens_BS):
    with torch.no_grad():
        return ref(torch.tensor(np.asarray(tokens_BS), dtype=torch.long)).logits.numpy()


def fp32_tolerance(ref, tokens_BS, want) -> float:
    """Twice transformers' own fp32 rounding error on these tokens (its fp32 logits against its fp64 ones),
    at least 1e-4; refused above 1e-3, where fp32 is too ill-conditioned for the comparison to mean much."""
    rounding = np.abs(want - logits_of(copy.deepcopy(ref).double(), tokens_BS)).max()
    assert rounding < 1e-3, rounding
    return max(1e-4, 2 * rounding)


def our_logits(module, tokens_BS):
    graphdef, params = model.split(module)
    return np.asarray(jax.jit(lambda p, t: model.apply(graphdef, p, t))(params, jnp.asarray(tokens_BS)))


@pytest.mark.parametrize("rope,neg", [(True, True), (False, False)])  # RoPE and NoPE; beta in (0, 2) and (0, 1)
def test_from_hf_gives_transformers_logits_past_the_gdn_chunk(rope, neg, tmp_path):
    """75-token rows (two of transformers' 64-token chunks, the second partial): nopejax's fp32 logits are
    transformers' within twice transformers' own fp32 rounding error (its fp32 logits against its fp64 ones:
    measured 2.4e-4 and 2.5e-4 at these sharp weights; nopejax against transformers fp32: 1.6e-4); the
    export is the checkpoint bit for bit and loads in transformers' Auto class with the same logits."""
    ref = reference(rope, neg, seed=2 * rope + neg)
    save_as_hub(ref, tmp_path / "hf")
    ours = nopejax.from_hf(str(tmp_path / "hf"))
    m = ours.cfg
    assert m.gdn_allow_neg_eigval == neg and any(layers.rope_pattern(m)) == rope
    assert m.layer_types == ("gated_deltanet",) * 3 + ("full_attention", "gated_deltanet", "full_attention")
    tokens_BS = np.random.default_rng(0).integers(0, V, (2, SEQ)).astype(np.int32)
    want = logits_of(ref, tokens_BS)
    assert np.abs(want).max() > 1.0
    np.testing.assert_allclose(our_logits(ours, tokens_BS), want, atol=fp32_tolerance(ref, tokens_BS, want), rtol=0)

    nopejax.to_hf(ours, str(tmp_path / "back"))
    a, b = tensorfile.Reader(str(tmp_path / "hf")), tensorfile.Reader(str(tmp_path / "back"))
    assert sorted(a.names()) == sorted(b.names())
    for name in a.names():
        np.testing.assert_array_equal(a.get(name), b.get(name), err_msg=name)
    written = json.loads((tmp_path / "back" / "config.json").read_text())
    assert (written["rope_parameters"] is None) == (not rope)
    again = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "back", dtype=torch.float32, attn_implementation="eager"
    ).eval()
    assert type(again).__name__ == "OlmoHybridForCausalLM" and (again.model.rotary_emb is not None) == rope
    np.testing.assert_allclose(logits_of(again, tokens_BS), want, atol=1e-6, rtol=0)


def test_save_pretrained_equal_thirds_conv_split_is_refused_by_shape(tmp_path):
    """Where key and value widths differ, save_pretrained's own file splits the conv in equal thirds, not
    q | k | v: nopejax reads the checkpoint layout only and refuses this one naming the tensor, in one line."""
    ref = reference(rope=False, neg=True)
    ref.save_pretrained(tmp_path)
    reader = tensorfile.Reader(str(tmp_path))
    assert reader.shape("model.layers.0.linear_attn.q_conv1d.weight") == ((2 * KEY_DIM + VALUE_DIM) // 3, 1, 3)
    with pytest.raises(nopejax.hf.HFTensorError) as err:
        nopejax.from_hf(str(tmp_path))
    assert "conv1d.weight" in err.value.field and "\n" not in str(err.value)


PROMPTS = [np.random.default_rng(row).integers(3, V, n) for row, n in enumerate((5, 21, 12))]
N = 10


def test_greedy_generate_equals_transformers_generate(tmp_path):
    """Greedy tokens and their logits equal transformers' generate (a GDN cache and a KV cache), alone and as
    a left-padded batch; nopejax prefills in 16-token chunks."""
    ref = reference(rope=True, neg=True, seed=5)
    save_as_hub(ref, tmp_path)
    assert_greedy_equals_transformers(nopejax.from_hf(str(tmp_path)), ref, ([PROMPTS[1]], PROMPTS), N)


# ---------------------------------------------------------------------------------------------
# config.json

SMALL = dict(
    model_type="olmo_hybrid", vocab_size=V, hidden_size=30, intermediate_size=37, num_hidden_layers=5,
    num_attention_heads=3, pad_token_id=0, eos_token_id=2,
)  # fmt: skip


def _transformers_rotates(given: dict, tmp_path) -> bool:
    (tmp_path / "config.json").write_text(json.dumps(given))
    return transformers.OlmoHybridModel(transformers.AutoConfig.from_pretrained(tmp_path)).rotary_emb is not None


@pytest.mark.parametrize(
    "rope",
    [{}, {"rope_parameters": None}, {"rope_theta": None},
     {"rope_parameters": {"rope_type": "default", "rope_theta": None}}, {"rope_theta": 500000.0},
     {"rope_theta": None, "rope_parameters": {"rope_type": "default", "rope_theta": 7.0}}],
)  # fmt: skip
def test_rope_or_nope_as_transformers_resolves_rope_theta(rope, tmp_path):
    """NoPE exactly where transformers builds no rotary embedding: the resolved rope_theta is null (an absent
    rope_parameters is RoPE at the class default 10000); the layer kinds and GDN sizes follow the class defaults."""
    given = {**SMALL, **rope}
    m = nopejax.hf.model_config_from_hf(given)
    rotates = _transformers_rotates(given, tmp_path)
    assert layers.rope_pattern(m) == (False, False, False, rotates, False)
    hf = transformers.AutoConfig.from_pretrained(tmp_path)
    if rotates:
        assert m.rope_theta == hf.rope_parameters["rope_theta"]
    assert m.layer_types == tuple({"linear_attention": "gated_deltanet"}.get(t, t) for t in hf.layer_types)
    assert (m.gdn_key_heads, m.gdn_value_heads, m.gdn_key_head_dim, m.gdn_value_head_dim) == (
        hf.linear_num_key_heads, hf.linear_num_value_heads, hf.linear_key_head_dim, hf.linear_value_head_dim
    )  # fmt: skip
    assert nopejax.hf.model_config_from_hf(nopejax.hf.hf_config(m)) == m


@pytest.mark.parametrize(
    "field,value",
    [
        ("layer_types", ["linear_attention", "sliding_attention", "full_attention"]),
        ("layer_types", ["linear_attention"] * 3),
        ("linear_num_value_heads", 5),
        ("mlp_bias", True),
    ],
)
def test_refused_fields_name_themselves_in_one_line(field, value):
    with pytest.raises(nopejax.hf.HFConfigError) as err:
        nopejax.hf.model_config_from_hf({**SMALL, "num_hidden_layers": 3, "linear_num_key_heads": 2, field: value})
    assert err.value.field == field and "\n" not in str(err.value)


def _tiny_config():
    return validation.validate(config.load_config(str(ROOT / "configs" / "tiny_hybrid_gdn.py")))


@pytest.mark.parametrize(
    "overrides,field",
    [
        ({"qk_norm": "rms"}, "model.qk_norm"),
        ({"block": "pre_norm"}, "model.block"),
        ({"recurrent_block": "post_norm"}, "model.recurrent_block"),
        ({"no_rope_layers": (0, 0, 0, 1, 0, 0, 0, 0)}, "model.no_rope_layers"),
        ({"layer_types": ("gated_deltanet",) * 3 + ("sliding_attention",) + ("gated_deltanet",) * 3
          + ("full_attention",), "sliding_window": 8}, "model.layer_types"),
        ({"gdn_norm_eps": 1e-6}, "model.gdn_norm_eps"),
    ],
)  # fmt: skip
def test_export_refuses_what_the_format_cannot_hold(overrides, field):
    m = _tiny_config().model
    m.update(overrides)
    with pytest.raises(config.ConfigError) as err:
        nopejax.hf.check_exportable(m)
    assert err.value.field == field and "\n" not in str(err.value)


def test_tiny_hybrid_config_exports_to_transformers_with_its_logits(tmp_path):
    """configs/tiny_hybrid_gdn.py (GDN x3 : NoPE attention) at its random init, on a 130-token row: the export
    loads in transformers (NoPE: no rotary embedding) and computes nopejax's logits.

    Only the head is sharpened (logits not all ~0): sharpening the projections too makes keys nearly
    parallel with beta near 2, where the chunked delta rule's (I + A)^-1 loses fp32 precision in
    both implementations alike (measured: logits apart by 7.0 from token 12 on)."""
    cfg = _tiny_config()
    module = model.create(cfg.model, seed=3)
    _, params = model.split(module)
    params["lm_head"] = np.asarray(params["lm_head"]) * 20.0
    module = nopejax.hf.build(cfg.model, jax.tree.map(np.asarray, params))
    nopejax.to_hf(module, str(tmp_path))
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, attn_implementation="eager")
    assert ref.model.rotary_emb is None
    tokens_BS = np.random.default_rng(1).integers(0, cfg.model.vocab_size, (1, 130)).astype(np.int32)
    want = logits_of(ref.eval(), tokens_BS)
    assert np.abs(want).max() > 1.0
    # measured: 1.3e-4 apart at logits up to ~11
    np.testing.assert_allclose(our_logits(module, tokens_BS), want, atol=fp32_tolerance(ref, tokens_BS, want), rtol=0)


def test_the_7b_config_exports_and_imports_back():
    """configs/olmo_hybrid_7b.py is an OLMo Hybrid model the format holds: transformers' config class builds
    the same sizes from its config.json, which imports to the same layers."""
    cfg = validation.validate(config.load_config(str(ROOT / "configs" / "olmo_hybrid_7b.py")))
    written = nopejax.hf.hf_config(cfg.model)
    hf = transformers.OlmoHybridConfig(**{k: v for k, v in written.items() if k not in ("architectures", "model_type")})
    default = transformers.OlmoHybridConfig()
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "vocab_size", "layer_types", "linear_num_key_heads", "linear_num_value_heads", "linear_key_head_dim",
                "linear_value_head_dim", "linear_conv_kernel_dim", "linear_allow_neg_eigval", "rms_norm_eps",
                "max_position_embeddings", "rope_parameters", "tie_word_embeddings"):  # fmt: skip
        assert getattr(hf, key) == getattr(default, key), key
    back = nopejax.hf.model_config_from_hf(written)
    assert layers.layer_specs(back) == layers.layer_specs(cfg.model)
    assert nopejax.hf.hf_config(back) == written
    block, repeats, tail = layers.block_structure(layers.layer_specs(cfg.model))
    assert (len(block), repeats, len(tail)) == (4, 8, 0)
