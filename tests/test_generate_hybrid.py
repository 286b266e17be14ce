"""Generation with Mamba2 layers beside attention: the cache of each mixer kind, chunked prefill, O(1) steps.

The reference is the model's own forward (`Decoder.__call__`, no cache) recomputed on the growing
sequence, one token at a time; tests/test_hybrid.py holds that forward to a layer-by-layer reference
and tests/test_mamba2.py holds the mixer to transformers.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers
from generate_parity import assert_greedy_equals_transformers

import nopejax
from nopejax import config, decode, model, train, validation
from nopejax.mixers.kinds import KINDS

V = 61
# Mamba2 with and without its FFN, an FFN-only layer, a RoPE and a NoPE attention layer (one with no
# FFN), Gated DeltaNet; runs of two equal recurrent layers are scanned
HYBRID = dict(
    layer_types=(
        "mamba2",
        "mamba2",
        "full_attention",
        "mlp",
        "mamba2",
        "full_attention",
        "gated_deltanet",
        "gated_deltanet",
    ),
    ffn_types=("dense", "dense", "dense", "dense", "none", "none", "dense", "dense"),
    no_rope_layers=(0, 0, 1, 0, 0, 0, 0, 0),
)
CHUNK = 16  # the prefill chunk: PROMPTS[1] is longer, so every row is prefilled in 2 chunks
PROMPTS = [np.random.default_rng(row).integers(1, V, n) for row, n in enumerate((5, 21, 12))]
N = 10  # new tokens


def tiny(**overrides):
    cfg = config.base_config()
    cfg.model.update(
        vocab_size=V, d_model=20, num_heads=2, num_kv_heads=1, head_dim=6, d_ff=14, dtype="float32",
        mamba_num_heads=4, mamba_head_dim=5, mamba_groups=2, mamba_state_size=3, mamba_chunk_size=4,
        gdn_key_heads=2, gdn_value_heads=4, gdn_key_head_dim=3, gdn_value_head_dim=5, gdn_chunk_size=4,
        gdn_allow_neg_eigval=True, num_layers=len(HYBRID["layer_types"]), init_std=0.2, rope_theta=100.0, **HYBRID,
    )  # fmt: skip
    cfg.model.update(**overrides)
    return validation.validate(cfg).model


FORWARD = jax.jit(model.apply, static_argnums=0)


def greedy_by_recomputation(module, prompt, n: int):
    """-> (ids [n], logits [n, V]): each token the argmax of a fresh forward over prompt + the tokens so far.

    The sequence is right-padded to one length so that one compile serves every step: a causal
    forward's row t does not read the rows after it."""
    graphdef, params = model.split(module)
    width = max(map(len, PROMPTS)) + N
    ids, logits = [], []
    for _ in range(n):
        seq = np.concatenate([prompt, ids]).astype(np.int32)
        tokens_1S = jnp.asarray(np.pad(seq, (0, width - len(seq)))[None])
        last_V = np.asarray(FORWARD(graphdef, params, tokens_1S))[0, len(seq) - 1]
        ids.append(int(last_V.argmax()))
        logits.append(last_V)
    return np.asarray(ids), np.stack(logits)


def generate(module, prompts, **kw):
    graphdef, params = model.split(module)
    return decode.generate_ids(graphdef, params, prompts, N, return_logits=True, prefill_chunk=CHUNK, **kw)


def test_hybrid_greedy_equals_recomputation():
    module = model.create(tiny(), seed=1)  # scanned: the runs of two Mamba2 layers under a scan, the rest unrolled
    for prompt in PROMPTS:  # alone: 5 and 12 tokens in one chunk, 21 in two
        ids, logits = generate(module, [prompt])
        want_ids, want_logits = greedy_by_recomputation(module, prompt, N)
        np.testing.assert_array_equal(ids[0], want_ids)
        np.testing.assert_allclose(logits[0], want_logits, atol=5e-6 * np.abs(want_logits).max(), rtol=0)


def test_hybrid_left_padded_batch_equals_prompts_alone():
    """Rows of 5 and 12 tokens behind 27 and 20 of padding: the first prefill chunk is all padding."""
    module = model.create(tiny(), seed=2)
    ids, logits = generate(module, PROMPTS)
    for row, prompt in enumerate(PROMPTS):
        ids_alone, logits_alone = generate(module, [prompt])
        np.testing.assert_array_equal(ids[row], ids_alone[0])
        np.testing.assert_allclose(logits[row], logits_alone[0], atol=5e-6 * np.abs(logits_alone).max(), rtol=0)


def test_hybrid_cache_holds_each_mixer_kind_once():
    m = tiny()
    graphdef, params = model.split(model.create(m))
    tokens, pos, seg = decode.left_pad(PROMPTS, 0, CHUNK)
    T = tokens.shape[1] + N
    cache, _, _ = decode.prefill(graphdef, params, tokens, pos, seg, jax.random.key(0), decode.Sampling(),
                                 total_len=T, chunk=CHUNK, greedy=True)  # fmt: skip
    d, g = KINDS["mamba2"].dims(m), KINDS["gated_deltanet"].dims(m)
    assert cache.k_ABTKE.shape == cache.v_ABTKE.shape == (2, 3, T, 1, 6)  # the two attention layers of eight
    mamba, gdn = cache.recurrent["mamba2"], cache.recurrent["gated_deltanet"]
    assert mamba.conv_window_Bwu.shape == (3, 3, d.conv_kernel - 1, d.conv_dim)  # the three Mamba2 layers
    assert mamba.ssm_state_BHOE.shape == (3, 3, 4, 5, 3) and mamba.ssm_state_BHOE.dtype == jnp.float32
    assert gdn.state_BHEO.shape == (2, 3, 4, 3, 5) and gdn.conv_window_Bwu.shape == (2, 3, 3, g.conv_dim)
    # an attention-only model keeps one KV cache per layer and no recurrent cache
    plain = decode.empty_cache(
        tiny(layer_types=None, ffn_types=None, no_rope_layers=None, mamba_num_heads=0, gdn_key_heads=0), 3, T
    )
    assert plain.k_ABTKE.shape == (8, 3, T, 1, 6) and plain.recurrent == {}


def test_granite_greedy_equals_transformers_generate(tmp_path):
    """A tiny random Granite 4.0-H (MoE, NoPE, the muP multipliers) imported with `from_hf`: greedy
    tokens and their logits equal transformers' generate, alone and as a left-padded batch.
    Needs the granitemoehybrid family of nopejax/hf."""
    hf_cfg = transformers.GraniteMoeHybridConfig(
        vocab_size=V, hidden_size=30, intermediate_size=11, shared_intermediate_size=22, num_hidden_layers=5,
        num_attention_heads=3, num_key_value_heads=1, max_position_embeddings=64, num_local_experts=5,
        num_experts_per_tok=2, layer_types=["mamba", "attention", "mamba", "mamba", "attention"], mamba_n_heads=6,
        mamba_d_head=10, mamba_n_groups=2, mamba_d_state=7, mamba_chunk_size=4, embedding_multiplier=1.7,
        attention_multiplier=0.2, residual_multiplier=0.6, logits_scaling=1.3, position_embedding_type="nope",
        tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    hf_cfg._attn_implementation, hf_cfg._experts_implementation = "eager", "eager"
    torch.manual_seed(0)
    ref = transformers.GraniteMoeHybridForCausalLM(hf_cfg).float().eval()
    with torch.no_grad():  # sharp weights: clear argmax margins
        for name, p in ref.named_parameters():
            p.uniform_(0.5, 1.5) if "norm" in name else p.normal_(0.0, 0.25)
    ref.save_pretrained(tmp_path)
    assert_greedy_equals_transformers(nopejax.from_hf(str(tmp_path)), ref, ([PROMPTS[1]], PROMPTS), N, CHUNK)


def test_training_samples_a_hybrid(tmp_path):
    """train.sample_every on a hybrid whose params are sharded over fsdp: the greedy sample is logged."""
    cfg = config.base_config()
    cfg.model = tiny(vocab_size=384)  # the byte tokenizer's ids
    cfg.mesh.update(fsdp=2)
    cfg.train.update(steps=1, global_batch_size=8, seq_len=16, eval_every=0, log_every=1, sample_every=1)
    cfg.optim.update(warmup_steps=0, decay_steps=1)
    train.run(validation.validate(cfg), str(tmp_path), progress=False)
    with open(tmp_path / "metrics.jsonl") as f:
        samples = [r for r in map(json.loads, f) if "sample" in r]
    assert [r["step"] for r in samples] == [1] and samples[0]["sample"].startswith(decode.SAMPLE_PROMPT)
