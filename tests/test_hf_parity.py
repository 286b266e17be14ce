"""Logits parity with transformers' SmolLM3ForCausalLM, and HF <-> nopejax round trips."""

import json

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers

import nopejax
from nopejax import config, hf, layers, tensorfile, validation

# (layers, heads, kv_heads, interval or explicit list, tied): odd sizes hide fewer shape bugs
CASES = {
    "interval4_gqa4_tied": (8, 4, 1, 4, True),
    "interval2_mha_untied": (6, 3, 3, 2, False),
    "explicit_nonperiodic": (5, 6, 2, (1, 0, 0, 1, 1), True),
    "depth_not_multiple": (7, 4, 1, 4, False),
    "all_nope": (3, 4, 2, (0, 0, 0), True),
    "all_rope": (3, 4, 4, 0, False),
}


def tiny_hf_config(layers, heads, kv_heads, pattern, tied, vocab=97, head_dim=8, seed=0):
    kw = dict(no_rope_layers=list(pattern)) if isinstance(pattern, tuple) else dict(no_rope_layer_interval=pattern)
    if pattern == 0:  # HF has no "interval 0": spell out all-RoPE
        kw = dict(no_rope_layers=[1] * layers)
    return transformers.SmolLM3Config(
        vocab_size=vocab,
        hidden_size=heads * head_dim,
        intermediate_size=37,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        rope_parameters={"rope_type": "default", "rope_theta": 500.0},
        tie_word_embeddings=tied,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        **kw,
    )


def make_hf_model(tmp_path, case):
    torch.manual_seed(sum(map(ord, case)))
    hf_cfg = tiny_hf_config(*CASES[case])
    hf_model = transformers.SmolLM3ForCausalLM(hf_cfg).float().eval()
    with torch.no_grad():  # HF inits norms to 1: randomise them so a swapped norm cannot pass
        for name, p in hf_model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    path = tmp_path / "hf"
    hf_model.save_pretrained(path)
    return hf_model, path


def hf_logits(hf_model, tokens):
    with torch.no_grad():
        return hf_model(torch.tensor(np.asarray(tokens), dtype=torch.long)).logits.numpy()


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(tmp_path, case):
    hf_model, path = make_hf_model(tmp_path, case)
    model = nopejax.from_hf(str(path))
    tokens = np.random.default_rng(0).integers(0, 97, (2, 23)).astype(np.int32)
    ours = np.asarray(model(jnp.asarray(tokens)))
    assert ours.shape == (2, 23, 97)
    np.testing.assert_allclose(ours, hf_logits(hf_model, tokens), atol=1e-4, rtol=0)
    # the pattern survived the trip into our config
    assert list(layers.rope_pattern(model.cfg)) == [bool(x) for x in hf_model.config.no_rope_layers]


@pytest.mark.parametrize("case", ["interval4_gqa4_tied", "depth_not_multiple"])
def test_round_trip_is_exact(tmp_path, case):
    hf_model, path = make_hf_model(tmp_path, case)
    model = nopejax.from_hf(str(path))
    out = tmp_path / "back"
    nopejax.to_hf(model, str(out))
    a, b = tensorfile.Reader(str(path)), tensorfile.Reader(str(out))
    names = [n for n in a.names() if not (hf_model.config.tie_word_embeddings and n == "lm_head.weight")]
    assert sorted(names) == sorted(b.names())
    for name in names:
        np.testing.assert_array_equal(a.get(name), b.get(name), err_msg=name)
    # and transformers loads the export as SmolLM3 with the same pattern and logits
    again = transformers.AutoModelForCausalLM.from_pretrained(out).float().eval()
    assert type(again).__name__ == "SmolLM3ForCausalLM"
    assert list(again.config.no_rope_layers) == list(hf_model.config.no_rope_layers)
    tokens = np.arange(19).reshape(1, 19) % 97
    np.testing.assert_allclose(hf_logits(again, tokens), hf_logits(hf_model, tokens), atol=1e-6)


def test_export_of_random_model_loads_in_transformers(tmp_path):
    cfg = config.base_config()
    m = cfg.model
    m.update(
        vocab_size=61, d_model=30, num_heads=3, num_kv_heads=1, head_dim=10, d_ff=26, num_layers=5, dtype="float32"
    )
    m.tie_embeddings = False
    validation.validate(cfg)
    model = nopejax.model.create(m, seed=3)
    nopejax.to_hf(model, str(tmp_path), token_ids={"bos": 1, "eos": 2, "pad": 0})
    assert json.loads((tmp_path / "config.json").read_text())["no_rope_layers"] == [1, 1, 1, 0, 1]
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).float().eval()
    tokens = np.random.default_rng(1).integers(0, 61, (3, 11))
    np.testing.assert_allclose(
        np.asarray(model(jnp.asarray(tokens, jnp.int32))), hf_logits(hf_model, tokens), atol=1e-4
    )


def test_sharded_safetensors_round_trip(tmp_path):
    arrays = {f"t{i}": np.random.default_rng(i).normal(size=(i + 2, 3)).astype(np.float32) for i in range(5)}
    specs = [(n, a.shape, a.dtype) for n, a in arrays.items()]
    files = tensorfile.write(str(tmp_path), specs, arrays.__getitem__, max_shard_bytes=100)
    assert len(files) > 1 and (tmp_path / "model.safetensors.index.json").exists()
    reader = tensorfile.Reader(str(tmp_path))
    for n, a in arrays.items():
        np.testing.assert_array_equal(reader.get(n), a)
    bf16 = arrays["t3"].astype(ml_dtypes.bfloat16)
    (tmp_path / "bf16").mkdir()
    tensorfile.write(str(tmp_path / "bf16"), [("w", bf16.shape, bf16.dtype)], lambda _: bf16)
    np.testing.assert_array_equal(tensorfile.Reader(str(tmp_path / "bf16")).get("w"), bf16)


def test_yarn_config_maps_to_rope_scaling():
    hf_cfg = hf.hf_config(_yarn_model_cfg())
    back = hf.model_config_from_hf(hf_cfg)
    assert back.rope_scaling["rope_type"] == "yarn" and back.rope_scaling["factor"] == 4.0


def _yarn_model_cfg():
    m = config.base_config().model
    m.rope_scaling = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128}
    return m
