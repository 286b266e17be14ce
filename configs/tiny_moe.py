"""A tiny Trinity (AFMoE): configs/tiny_local_global.py with mixture-of-experts FFNs and Trinity's block;
trains on 2 CPU cores in a few minutes and exports as an AfmoeForCausalLM (model.hf_family = "afmoe").

6 layers, sliding-window RoPE layers and every 4th layer global and NoPE (window 32 at seq_len 128).
Layer 0 keeps its dense SwiGLU (d_ff 512); layers 1-5 route each token to 2 of 8 experts of width 128
plus one always-on shared expert, with Trinity's router (sigmoid scores, top-k weights normalised, a
load-balancing expert bias updated from the observed load, no gradient) and a small Switch balance
loss. The rest of the layer is Trinity's too, as transformers' AfmoeForCausalLM computes it: four
RMSNorms per layer (model.block = "sandwich"), the per-head RMS QK-norm and the sigmoid gate on the
attention output. Active FFN params per MoE layer: (2 + 1) * 3 * 192 * 128 = 221k, against 295k of
tiny's dense FFN; total params 4.5M (2.4M for tiny).
"""

import os

from nopejax.config import load_config


def get_config():
    cfg = load_config(os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny_local_global.py"))
    m = cfg.model
    m.num_experts = 8
    m.experts_per_token = 2
    m.expert_d_ff = 128
    m.num_shared_experts = 1
    m.num_dense_layers = 1
    m.router = "sigmoid"
    m.router_normalize = True
    m.expert_bias_rate = 1e-3
    m.balance_loss_weight = 1e-3
    m.block = "sandwich"
    m.qk_norm = "rms"
    m.attention_gate = True
    m.hf_family = "afmoe"
    return cfg
