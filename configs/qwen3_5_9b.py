"""Qwen3.5-9B, its text model (Qwen3_5ForCausalLM): the published shape.

Written from knowledge, not copied from the hub's config.json (no network here). Sources: the defaults of
transformers' `Qwen3_5TextConfig` (transformers 5.25, `models/qwen3_5/configuration_qwen3_5.py`, whose
docstring calls them "the Qwen3.5-9B style configuration"): hidden 4096, 32 layers with
full_attention_interval 4, 16 attention heads / 4 KV heads of head_dim 256, partial_rotary_factor 0.25,
intermediate_size 12288 (dense SwiGLU), Gated DeltaNet with 16 key heads / 32 value heads of 128 and conv
kernel 4, vocab 248320, rms_norm_eps 1e-6; and from memory of the model card and config.json of
https://huggingface.co/Qwen/Qwen3.5-9B ("8 x (3 x (Gated DeltaNet -> FFN) -> 1 x (Gated Attention ->
FFN))", rotary dimension 64, native context 262,144): text_config rope_theta 1e7 with mrope_section [11, 11,
10] interleaved (ordinary partial RoPE for text: nopejax/hf/qwen3_5.py), max_position_embeddings 262144,
untied embeddings (the tie flag is remembered, not checked; the smaller Qwen3.5 models tie theirs).

As transformers' Qwen3_5ForCausalLM computes it: pre-norm blocks whose RMSNorm weights (block, final, q/k)
scale by 1 + w (model.norm_unit_offset); q_proj also emits a per-head sigmoid output gate
(model.attention_gate). `nopejax export` writes a Qwen3_5ForCausalLM checkpoint (model.hf_family =
"qwen3_5"); the hub's multimodal directory imports once its text model is saved alone (hf/qwen3_5.py).

The 4-layer period is scanned 8 times. 8,953,803,264 params, transformers' count for the same config.json
(tests/hf/test_hf_qwen3_5.py). Not compiled for TPU here: the comparable OLMo Hybrid 7B dry run needed 67
minutes on this machine's shared CPU cores (docs/results/tpu-aot.md).
"""

from nopejax.config import base_config

L = 32


def get_config():
    cfg = base_config()
    m = cfg.model
    m.vocab_size = 248320
    m.d_model = 4096
    m.num_layers = L
    m.layer_types = tuple("full_attention" if (i + 1) % 4 == 0 else "gated_deltanet" for i in range(L))
    m.no_rope_layers = tuple(int(t == "full_attention") for t in m.layer_types)  # every attention layer rotates
    m.num_heads = 16
    m.num_kv_heads = 4
    m.head_dim = 256
    m.partial_rotary_factor = 0.25
    m.rope_theta = 10_000_000.0
    m.qk_norm = "rms"
    m.attention_gate = True
    m.norm_unit_offset = True
    m.d_ff = 12288
    m.gdn_key_heads = 16
    m.gdn_value_heads = 32
    m.gdn_key_head_dim = 128
    m.gdn_value_head_dim = 128
    m.gdn_conv_kernel = 4
    m.rms_norm_eps = 1e-6
    m.tie_embeddings = False
    m.max_position_embeddings = 262144
    m.hf_family = "qwen3_5"
    m.remat = "full"
    cfg.train.seq_len = 4096
    cfg.train.global_batch_size = 16  # one 4K row per v5p chip of a 2x2x4 slice
    cfg.mesh.data = 1
    cfg.mesh.fsdp = -1
    return cfg
