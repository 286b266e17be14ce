"""Qwen3-Next-80B-A3B (Qwen3NextForCausalLM): the published shape.

Source: the config.json of Qwen/Qwen3-Next-80B-A3B-Base / -Instruct
(https://huggingface.co/Qwen/Qwen3-Next-80B-A3B-Instruct) and its model card ("48 layers, hidden
2048, hybrid layout 12 * (3 * (Gated DeltaNet -> MoE) -> 1 * (Gated Attention -> MoE)), 512
experts, 10 routed + 1 shared"), written here from knowledge of that file and from transformers'
Qwen3NextConfig (its defaults are the 80B shape), not copied verbatim from the hub: hidden 2048,
48 layers with full_attention_interval 4, 16 attention heads / 2 KV heads of head_dim 256 with
partial_rotary_factor 0.25 and rope_theta 1e7, Gated DeltaNet with 16 key heads / 32 value heads
of 128 and conv kernel 4, 512 experts of moe_intermediate_size 512, top 10, norm_topk_prob true,
shared_expert_intermediate_size 512, decoder_sparse_step 1 and no mlp_only_layers (every layer
MoE; the dense intermediate_size 5120 is unused), rms_norm_eps 1e-6, vocab 151936, untied
embeddings, max_position_embeddings 262144.

As transformers' Qwen3NextForCausalLM computes it: pre-norm blocks whose RMSNorm weights (block,
final, q/k) scale by 1 + w (model.norm_unit_offset); the attention's q_proj also emits a per-head
sigmoid output gate (model.attention_gate); the shared expert's output is gated by
sigmoid(h @ w) (model.shared_expert_gate). `nopejax export` writes a Qwen3NextForCausalLM
checkpoint (model.hf_family = "qwen3_next").

The layer pattern is one 4-layer block (3 Gated DeltaNet + 1 attention, all MoE) scanned 12
times: 79,674,415,872 params (transformers' count for the same config.json, 79,674,391,296, plus
nopejax's zero expert bias). `nopejax train --config configs/qwen3_next_80b_a3b.py --workdir /tmp/q
--dry-run --topology v5p:2x2x4 --config.train.global_batch_size=16` (2026-12-06, jax 0.10.2,
libtpu 0.0.42.1, 2 shared CPU cores at load 30-50): 109.30 GiB per chip, over v5p's 95, compile
5047 s; so 32 chips (v5p:2x4x4, one 4K row each, the batch below), where the AdamW state halves to
37 GiB per chip; that compile did not finish in the session (docs/results/tpu-aot.md).
"""

from nopejax.config import base_config

LAYERS = 48
FULL_ATTENTION_INTERVAL = 4


def get_config():
    cfg = base_config()
    m = cfg.model
    m.vocab_size = 151936
    m.d_model = 2048
    m.num_layers = LAYERS
    m.layer_types = tuple(
        "full_attention" if (i + 1) % FULL_ATTENTION_INTERVAL == 0 else "gated_deltanet" for i in range(LAYERS)
    )
    m.no_rope_layers = tuple(int(t == "full_attention") for t in m.layer_types)  # every attention layer rotates
    m.num_heads = 16
    m.num_kv_heads = 2
    m.head_dim = 256
    m.partial_rotary_factor = 0.25
    m.rope_theta = 10_000_000.0
    m.qk_norm = "rms"
    m.attention_gate = True
    m.norm_unit_offset = True
    m.gdn_key_heads = 16
    m.gdn_value_heads = 32
    m.gdn_key_head_dim = 128
    m.gdn_value_head_dim = 128
    m.gdn_conv_kernel = 4
    m.d_ff = 5120  # intermediate_size: read by no layer (every layer is MoE)
    m.num_experts = 512
    m.experts_per_token = 10
    m.expert_d_ff = 512
    m.num_shared_experts = 1  # shared_expert_intermediate_size 512 = one expert's width
    m.shared_expert_gate = True
    m.router = "softmax"
    m.router_normalize = True  # norm_topk_prob
    m.rms_norm_eps = 1e-6
    m.tie_embeddings = False
    m.max_position_embeddings = 262144
    m.hf_family = "qwen3_next"
    m.remat = "full"
    cfg.train.seq_len = 4096
    cfg.train.global_batch_size = 32  # one 4K row per chip
    cfg.mesh.data = 1
    cfg.mesh.fsdp = -1
    return cfg
