"""Llama 4 Scout (17B active, 16 experts, 109B total): the text model's published shape.

Source: config.json of meta-llama/Llama-4-Scout-17B-16E, `text_config`
(https://huggingface.co/meta-llama/Llama-4-Scout-17B-16E/blob/main/config.json): hidden 5120,
48 layers, 40 heads / 8 KV heads of 128, vocab 202048, 16 local experts of width 8192 with
top-1 routing, one shared expert (intermediate_size 8192), interleave_moe_layer_step 1 (every
layer MoE; the dense width intermediate_size_mlp 16384 goes unused), no_rope_layers [1, 1, 1, 0] * 12,
attention_chunk_size 8192 on the RoPE layers, use_qk_norm (weightless L2, RoPE layers),
floor_scale 8192 / attn_scale 0.1 query temperature on the NoPE layers, rope_theta 5e5,
rms_norm_eps 1e-5, untied embeddings.

Router as transformers' Llama4TextMoe: top-1 of the router logits, sigmoid of that logit as the
weight, which multiplies the expert's *input* (router_scale_input), plus the shared expert.

RoPE scaling as published: llama3 with factor 16, low_freq_factor = high_freq_factor = 1 (no
interpolated band: wavelengths past 8192 are divided by 16, the others kept). `nopejax export`
writes a Llama4ForCausalLM checkpoint (model.hf_family = "llama4"); tests/hf/test_hf_contract.py
imports this text config and gets this config back. Training hyperparameters are not published;
those below are nopejax's defaults at this scale.
"""

from nopejax.config import base_config


def get_config():
    cfg = base_config()
    m = cfg.model
    m.vocab_size = 202048
    m.d_model = 5120
    m.num_layers = 48
    m.num_heads = 40
    m.num_kv_heads = 8
    m.head_dim = 128
    m.d_ff = 16384  # intermediate_size_mlp: dense layers (none in Scout)
    m.no_rope_layer_interval = 4  # [1, 1, 1, 0] * 12
    m.global_attention_interval = 4  # the NoPE layers attend globally ...
    m.attention_chunk_size = 8192  # ... the RoPE layers within chunks of 8192
    m.rope_layout = "interleaved"
    m.rope_theta = 500000.0
    m.rope_scaling = {"rope_type": "llama3", "factor": 16.0, "low_freq_factor": 1.0, "high_freq_factor": 1.0,
                      "original_max_position_embeddings": 8192}  # fmt: skip
    m.qk_norm = "l2"
    m.nope_temperature = (8192.0, 0.1)
    m.rms_norm_eps = 1e-5
    m.tie_embeddings = False
    m.max_position_embeddings = 10485760
    m.num_experts = 16
    m.experts_per_token = 1
    m.expert_d_ff = 8192
    m.num_shared_experts = 1
    m.router = "sigmoid"
    m.router_scale_input = True
    m.moe_layer_interval = 1
    m.hf_family = "llama4"
    m.remat = "full"
    cfg.train.seq_len = 8192
    cfg.train.global_batch_size = 256
    cfg.mesh.fsdp = -1
    cfg.mesh.data = 1
    return cfg
