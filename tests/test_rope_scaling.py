"""RoPE scaling (HF `rope_scaling`: linear, yarn, llama3): equal to transformers, NoPE layers untouched."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

import nopejax
from nopejax import config, hf, model
from nopejax import rope as rope_lib

HEAD_DIM, THETA, ORIGINAL = 22, 500.0, 16  # head_dim / 2 = 11 frequencies: odd on purpose

SCALINGS = {
    "linear_x2": {"rope_type": "linear", "factor": 2.0},
    "linear_x5.5": {"rope_type": "linear", "factor": 5.5},
    "yarn_x4": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": ORIGINAL},
    "yarn_x8_betas": {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": ORIGINAL,
                      "beta_fast": 16, "beta_slow": 2},
    "yarn_x4_mscale": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": ORIGINAL,
                       "mscale": 0.7, "mscale_all_dim": 0.5},
    "yarn_x3_attention_factor_no_truncate": {"rope_type": "yarn", "factor": 3.0, "attention_factor": 1.3,
                                             "original_max_position_embeddings": ORIGINAL, "truncate": False},
    "llama3_x8": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": ORIGINAL},
    # wavelengths 2 pi .. 1800 against bounds 8 and 32: some kept, some smoothed, some divided
    "llama3_x4_all_branches": {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 0.5, "high_freq_factor": 2.0,
                               "original_max_position_embeddings": ORIGINAL},
}  # fmt: skip


def smollm3_config(scaling: dict, no_rope_layers=(1, 0, 1), vocab=97, heads=3, kv_heads=1):
    return transformers.SmolLM3Config(
        vocab_size=vocab,
        hidden_size=heads * HEAD_DIM,
        intermediate_size=37,
        num_hidden_layers=len(no_rope_layers),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=HEAD_DIM,
        max_position_embeddings=int(ORIGINAL * scaling["factor"]),
        rope_parameters={**scaling, "rope_theta": THETA},
        no_rope_layers=list(no_rope_layers),
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )


@pytest.mark.parametrize("name", list(SCALINGS))
def test_frequencies_equal_transformers(name):
    scaling = SCALINGS[name]
    if scaling["rope_type"] == "llama3":  # all three of llama3's branches are taken
        inv_freq = rope_lib.default_inv_freq(HEAD_DIM, THETA)
        wavelen = 2 * np.pi / inv_freq
        bounds = ORIGINAL / scaling["high_freq_factor"], ORIGINAL / scaling["low_freq_factor"]
        if name == "llama3_x4_all_branches":
            assert (wavelen < bounds[0]).any() and (wavelen > bounds[1]).any()
            assert ((wavelen > bounds[0]) & (wavelen < bounds[1])).any()
    want_inv_freq, want_factor = ROPE_INIT_FUNCTIONS[scaling["rope_type"]](smollm3_config(scaling), "cpu")
    ours = rope_lib.make_rope(HEAD_DIM, THETA, scaling)
    np.testing.assert_allclose(ours.inv_freq, want_inv_freq.numpy(), rtol=1e-6, atol=0)
    assert ours.attention_factor == pytest.approx(want_factor, rel=1e-12)
    assert ours.inv_freq.dtype == np.float32


def small_model_cfg(pattern, scaling=None):
    m = config.base_config().model
    m.update(vocab_size=97, d_model=3 * HEAD_DIM, num_layers=len(pattern), num_heads=3, num_kv_heads=1)
    m.update(head_dim=HEAD_DIM, d_ff=37, rope_theta=THETA, dtype="float32", attention_impl="xla")
    m.no_rope_layers = tuple(pattern)
    m.rope_scaling = scaling
    return m


def logits_with(pattern, scaling, tokens_BS):
    """The same random weights (seed 0) run with and without `scaling`."""
    _, params = model.split(model.create(small_model_cfg(pattern), seed=0))
    module = hf.build(small_model_cfg(pattern, scaling), params)
    return np.asarray(module(jnp.asarray(tokens_BS)))


@pytest.mark.parametrize("name", ["linear_x2", "yarn_x4", "llama3_x8"])
def test_scaling_leaves_nope_layers_untouched(name):
    tokens_BS = np.random.default_rng(0).integers(0, 97, (2, 41)).astype(np.int32)  # 41 > ORIGINAL
    all_nope = (0, 0, 0)
    np.testing.assert_array_equal(
        logits_with(all_nope, None, tokens_BS), logits_with(all_nope, SCALINGS[name], tokens_BS)
    )
    for pattern in [(1, 1, 1), (0, 0, 1)]:  # any RoPE layer sees the new frequencies
        diff = np.abs(logits_with(pattern, None, tokens_BS) - logits_with(pattern, SCALINGS[name], tokens_BS))
        assert diff.max() > 1e-3, pattern


@pytest.mark.parametrize("name", ["linear_x5.5", "yarn_x4", "yarn_x4_mscale", "llama3_x4_all_branches"])
@pytest.mark.parametrize("pattern", [(1, 0, 1), (1, 1, 1, 0)])
def test_logits_match_transformers_with_scaling(tmp_path, name, pattern):
    """A hybrid SmolLM3 with rope_scaling, past the original length: ours vs transformers, fp32."""
    torch.manual_seed(len(name) + len(pattern))
    hf_model = transformers.SmolLM3ForCausalLM(smollm3_config(SCALINGS[name], pattern)).float().eval()
    with torch.no_grad():  # sharper attention, so a wrong frequency moves the logits well past atol
        for param_name, p in hf_model.named_parameters():
            if "q_proj" in param_name or "k_proj" in param_name:
                p.mul_(6.0)
    hf_model.save_pretrained(tmp_path)
    ours = nopejax.from_hf(str(tmp_path))
    assert dict(ours.cfg.rope_scaling)["factor"] == SCALINGS[name]["factor"]
    tokens_BS = np.random.default_rng(1).integers(0, 97, (2, 53)).astype(np.int32)
    with torch.no_grad():
        want = hf_model(torch.tensor(tokens_BS, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(np.asarray(ours(jnp.asarray(tokens_BS))), want, atol=1e-4, rtol=0)
