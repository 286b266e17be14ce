"""AI2 OLMo Hybrid 7B (OlmoHybridForCausalLM): the published shape.

Written from knowledge, not copied from the hub's config.json (no network here). Source of the sizes:
the defaults of transformers' `OlmoHybridConfig` (transformers 5.25, `models/olmo_hybrid/
configuration_olmo_hybrid.py`, `@auto_docstring(checkpoint="allenai/Olmo-Hybrid-7B")`), which its
docstring, and vLLM's copy of it (https://docs.vllm.ai/en/v0.18.1/api/vllm/transformers_utils/configs/
olmo_hybrid/), say yield a configuration similar to https://huggingface.co/allenai/Olmo-Hybrid-7B:
hidden 3840, 32 layers (Gated DeltaNet x3 then full attention, repeated: layer_types' default), 30
heads of 128 with 30 KV heads, intermediate 11008 (SwiGLU), vocab 100352, max_position_embeddings
65536, rms_norm_eps 1e-6, untied head; GDN: 30 key heads of int(0.75 * 3840 / 30) = 96, 30 value heads
of 2 * 96 = 192, conv kernel 4, linear_allow_neg_eigval true. Whether the published attention layers
rotate is not settled here: `rope_parameters` left out is RoPE at theta 10000 in transformers (the class
default), which this config keeps; NoPE (rope_theta null in config.json) is `m.no_rope_layers = (0,) * 32`
and changes no figure below (RoPE has no params).

As transformers computes it: attention layers are OLMo 2 blocks (post-norm, model.block = "post_norm")
with one RMSNorm over the whole q and k projections (model.qk_norm = "rms_proj"); GDN layers are pre-norm
(model.recurrent_block = "pre_norm"), their output norm's eps 1e-5. `nopejax export` writes an
OlmoHybridForCausalLM checkpoint (model.hf_family = "olmo_hybrid").

The 4-layer period is scanned 8 times (two traced layers per block: the GDN run and the attention layer).
`nopejax train --config configs/olmo_hybrid_7b.py --workdir /tmp/o --dry-run --topology v5p:2x2x4` (FSDP
over 16 chips, one 4096-token row per chip, full remat; 2026-12-06, JAX 0.10.2, libtpu 0.0.42.1, on 2 CPU
cores shared with other sessions at load 30-45): 7,430,870,688 params, 16.95 GiB per chip, 177.9 TFLOP
per chip per step, compile 4022 s wall (412 CPU-seconds: the wall time is the load's). The 32768-token
run with mesh.context=4 was not compiled to the end (docs/results/tpu-aot.md).
"""

from nopejax.config import base_config

L = 32


def get_config():
    cfg = base_config()
    m = cfg.model
    m.vocab_size = 100352
    m.d_model = 3840
    m.num_layers = L
    m.layer_types = tuple("full_attention" if (i + 1) % 4 == 0 else "gated_deltanet" for i in range(L))
    m.no_rope_layers = tuple(int((i + 1) % 4 == 0) for i in range(L))  # RoPE on the attention layers
    m.rope_theta = 10000.0
    m.num_heads = 30
    m.num_kv_heads = 30
    m.head_dim = 128
    m.d_ff = 11008
    m.qk_norm = "rms_proj"
    m.block = "post_norm"
    m.recurrent_block = "pre_norm"
    m.gdn_key_heads = 30
    m.gdn_value_heads = 30
    m.gdn_key_head_dim = 96
    m.gdn_value_head_dim = 192
    m.gdn_conv_kernel = 4
    m.gdn_chunk_size = 64
    m.gdn_allow_neg_eigval = True
    m.gdn_norm_eps = 1e-5
    m.rms_norm_eps = 1e-6
    m.tie_embeddings = False
    m.max_position_embeddings = 65536
    m.hf_family = "olmo_hybrid"
    m.remat = "full"
    cfg.train.seq_len = 4096
    cfg.train.global_batch_size = 16  # one 4K row per v5p chip of a 2x2x4 slice
    cfg.mesh.data = 1
    cfg.mesh.fsdp = -1
    return cfg
