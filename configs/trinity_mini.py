"""Arcee Trinity Mini (26B total, 3B active; AfmoeForCausalLM): the published shape.

Source: config.json of arcee-ai/Trinity-Mini (https://huggingface.co/arcee-ai/Trinity-Mini,
model card: "128 total, 8 active, 1 shared" experts; the config fields as quoted in public
AFMoE loaders' tests): hidden 2048, 32 layers, 32 heads / 4 KV heads of 128 (so heads *
head_dim = 4096 != d_model), dense intermediate_size 6144 on the first num_dense_layers = 2
layers, 128 experts of moe_intermediate_size 1024, top 8, num_shared_experts 1, score_func
sigmoid, route_norm true, route_scale 2.826, sliding_window 2048 with
global_attn_every_n_layers 4 (sliding layers RoPE, global layers NoPE), mup_enabled true,
rope_theta 10000, rms_norm_eps 1e-5, vocab 200192, untied embeddings,
max_position_embeddings 131072.

Router as transformers' AfmoeTokenChoiceRouter: sigmoid scores, top 8 of score + expert_bias,
the unbiased scores of those 8 normalised and times 2.826; the expert bias (a buffer, not
trained) is nopejax's `expert_bias`, updated from the load (auxiliary-loss-free balancing).

The rest of the published layout, as transformers' AfmoeForCausalLM computes it: the four norms
per layer (model.block = "sandwich"), the sigmoid gate on the attention output
(model.attention_gate), the per-head RMS QK-norm and, with mup_enabled true, the embeddings times
sqrt(2048) (model.embed_scale). `nopejax export` writes an AfmoeForCausalLM checkpoint
(model.hf_family = "afmoe"); tests/hf/test_hf_contract.py imports this config.json and gets
this config back.
"""

from nopejax.config import base_config


def get_config():
    cfg = base_config()
    m = cfg.model
    m.vocab_size = 200192
    m.d_model = 2048
    m.num_layers = 32
    m.num_heads = 32
    m.num_kv_heads = 4
    m.head_dim = 128
    m.d_ff = 6144  # the dense first layers
    m.no_rope_layer_interval = 4  # global layers are NoPE ...
    m.global_attention_interval = 4  # ... and every 4th layer is global
    m.sliding_window = 2048
    m.rope_theta = 10000.0
    m.qk_norm = "rms"
    m.block = "sandwich"  # input / post-attention / pre-MLP / post-MLP RMSNorms
    m.attention_gate = True
    m.embed_scale = 2048**0.5  # mup_enabled
    m.hf_family = "afmoe"
    m.rms_norm_eps = 1e-5
    m.tie_embeddings = False
    m.max_position_embeddings = 131072
    m.num_experts = 128
    m.experts_per_token = 8
    m.expert_d_ff = 1024
    m.num_shared_experts = 1
    m.num_dense_layers = 2
    m.router = "sigmoid"
    m.router_normalize = True
    m.routed_scale = 2.826
    m.expert_bias_rate = 1e-3
    # the expert group's 8 x 4 rows x 4096 tokens go through the experts an eighth at a time: the MoE
    # layer's temporaries fall from 23 to 6 GiB per chip on v5p (docs/results/moe.md)
    m.moe_dispatch_chunks = 8
    m.remat = "full"
    cfg.train.seq_len = 4096
    cfg.train.loss_chunk_len = 512  # never hold [B, 4096, 200192] fp32 logits at once
    cfg.train.global_batch_size = 64
    cfg.mesh.data = 1
    cfg.mesh.fsdp = -1
    cfg.mesh.expert = 8
    return cfg
