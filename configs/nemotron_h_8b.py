"""NVIDIA Nemotron-H-8B (NemotronHForCausalLM, Base-8K): the published shape.

Source: config.json of nvidia/Nemotron-H-8B-Base-8K
(https://huggingface.co/nvidia/Nemotron-H-8B-Base-8K), as copied into NVIDIA's Megatron-Bridge
tests (NVIDIA-NeMo/Megatron-Bridge, tests/unit_tests/models/nemotronh/test_nemotron_h_bridge.py,
fixture `nemotronh_8b_config_dict`): hidden 4096, hybrid_override_pattern
"M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M-" (52 layers: 24 Mamba2, 4 attention,
24 MLP), 32 heads / 8 KV heads of attention_head_dim 128, intermediate_size 21504 with
mlp_hidden_act relu2, mamba_num_heads 128 of mamba_head_dim 64, n_groups 8, ssm_state_size 128,
conv_kernel 4, chunk_size 128, use_conv_bias true, use_bias / mamba_proj_bias false,
layer_norm_epsilon 1e-5, vocab 131072, untied embeddings, max_position_embeddings 8192.

As transformers' NemotronHForCausalLM computes it: each layer is one pre-norm sublayer; the
attention layers have no RoPE (NoPE: the Mamba2 layers carry order); the MLP is not gated,
relu(x W_up)^2 W_down (model.mlp_activation = "relu2"). `nopejax export` writes a
NemotronHForCausalLM checkpoint (model.hf_family = "nemotron_h").

The pattern is not periodic: the block plan (layers.block_structure) scans an 11-layer block 4
times and unrolls an 8-layer tail, 19 traced layers. `nopejax train --config configs/nemotron_h_8b.py
--workdir /tmp/n --dry-run --topology v5p:2x2x4` (2026-12-06, jax 0.10.2, compiled on 2 shared CPU
cores): 8,100,852,736 params, 38.06 GiB per chip, compile 398 s; 64 rows of 8K per step ran out of
HBM (101.5 GiB of temporaries per chip), hence 16.
"""

from nopejax.config import base_config

PATTERN = "M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M-"
KINDS = {"M": ("mamba2", "none"), "*": ("full_attention", "none"), "-": ("mlp", "dense")}


def get_config():
    cfg = base_config()
    m = cfg.model
    m.vocab_size = 131072
    m.d_model = 4096
    m.num_layers = len(PATTERN)
    m.layer_types = tuple(KINDS[c][0] for c in PATTERN)
    m.ffn_types = tuple(KINDS[c][1] for c in PATTERN)
    m.no_rope_layers = (0,) * len(PATTERN)  # NoPE attention
    m.num_heads = 32
    m.num_kv_heads = 8
    m.head_dim = 128
    m.d_ff = 21504
    m.mlp_activation = "relu2"
    m.mamba_num_heads = 128
    m.mamba_head_dim = 64
    m.mamba_groups = 8
    m.mamba_state_size = 128
    m.mamba_conv_kernel = 4
    m.mamba_chunk_size = 128
    m.rms_norm_eps = 1e-5
    m.tie_embeddings = False
    m.max_position_embeddings = 8192
    m.hf_family = "nemotron_h"
    m.remat = "full"
    cfg.train.seq_len = 8192
    cfg.train.global_batch_size = 16  # one 8K row per v5p chip of a 2x2x4 slice
    cfg.mesh.data = 1
    cfg.mesh.fsdp = -1
    return cfg
