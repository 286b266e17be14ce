"""IBM Granite 4.0-H-Tiny (GraniteMoeHybridForCausalLM; 7B total, ~1B active): the published shape.

Source: the config.json of ibm-granite/granite-4.0-h-tiny (https://huggingface.co/ibm-granite/granite-4.0-h-tiny)
and its model card ("7B total, 1B active"), written here from knowledge of that file, not copied verbatim
from the hub (this machine has no network): hidden_size 1536, num_hidden_layers 40, layer_types
"mamba" x5, "attention", then period 10 (attention at layers 5, 15, 25, 35: 36 Mamba2 + 4 attention),
num_attention_heads 12 / num_key_value_heads 4 (head_dim 1536 / 12 = 128), position_embedding_type
"nope", num_local_experts 64 of intermediate_size 512, num_experts_per_tok 6, shared_intermediate_size
1024, mamba_n_heads 48 of mamba_d_head 64 (mamba_expand 2), mamba_n_groups 1, mamba_d_state 128,
mamba_d_conv 4, mamba_chunk_size 256, mamba_conv_bias true, mamba_proj_bias false, the muP multipliers
embedding_multiplier 12, attention_multiplier 0.0078125, residual_multiplier 0.22, logits_scaling 6,
rms_norm_eps 1e-5, vocab_size 100352, tied embeddings, max_position_embeddings 131072. The field names
and their meaning are transformers' GraniteMoeHybridConfig (models/granitemoehybrid/).

As transformers' GraniteMoeHybridForCausalLM computes it: every layer is a pre-norm mixer (Mamba2 or
NoPE attention with softmax scale attention_multiplier) and a pre-norm FFN (a softmax top-6 router over
64 SwiGLU experts plus an always-on shared SwiGLU of width 1024 = 2 x 512, model.num_shared_experts 2),
each sublayer's output times residual_multiplier before its residual add; the embeddings times 12, the
logits divided by 6 (model.logit_scale 1 / 6). `nopejax export` writes a GraniteMoeHybridForCausalLM
checkpoint (model.hf_family = "granitemoehybrid").

The pattern has period 10 from layer 0, so the block plan scans one 10-layer block 4 times.
`nopejax train --config configs/granite_4_h_tiny.py --workdir /tmp/g --dry-run --topology v5p:2x2x4`
(2026-12-06, JAX 0.10.2, libtpu 0.0.42.1, compiled on 2 CPU cores shared at load 35-76):
6,939,039,808 params, 13.47 GiB per chip, 37.7 TFLOP per chip per step, compile 2828 s wall (312 s of
CPU: the machine was starved); docs/results/tpu-aot.md.
"""

from nopejax.config import base_config

PERIOD = ("mamba2",) * 5 + ("full_attention",) + ("mamba2",) * 4


def get_config():
    cfg = base_config()
    m = cfg.model
    m.vocab_size = 100352
    m.d_model = 1536
    m.num_layers = 40
    m.layer_types = PERIOD * 4
    m.no_rope_layers = (0,) * 40  # position_embedding_type "nope"
    m.num_heads = 12
    m.num_kv_heads = 4
    m.head_dim = 128
    m.attention_scale = 0.0078125  # attention_multiplier
    m.d_ff = 512
    m.num_experts = 64
    m.experts_per_token = 6
    m.expert_d_ff = 512  # intermediate_size
    m.num_shared_experts = 2  # shared_intermediate_size 1024 = 2 x 512
    m.router = "softmax"
    m.router_normalize = True  # softmax over the top-6 logits
    m.mamba_num_heads = 48
    m.mamba_head_dim = 64
    m.mamba_groups = 1
    m.mamba_state_size = 128
    m.mamba_conv_kernel = 4
    m.mamba_chunk_size = 256
    m.embed_scale = 12.0  # embedding_multiplier
    m.residual_scale = 0.22  # residual_multiplier
    m.logit_scale = 1 / 6  # logits_scaling 6
    m.rms_norm_eps = 1e-5
    m.tie_embeddings = True
    m.max_position_embeddings = 131072
    m.hf_family = "granitemoehybrid"
    m.remat = "full"
    cfg.train.seq_len = 4096
    cfg.train.global_batch_size = 16  # one 4K row per v5p chip of a 2x2x4 slice
    cfg.mesh.data = 1
    cfg.mesh.fsdp = -1
    return cfg
