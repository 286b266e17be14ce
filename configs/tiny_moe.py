"""configs/tiny.py with mixture-of-experts FFNs: trains on 2 CPU cores in a few minutes.

Layer 0 keeps its dense SwiGLU (d_ff 512); layers 1-5 route each token to 2 of 8 experts of
width 128 plus one always-on shared expert, with Trinity's router (sigmoid scores, top-k weights
normalised, a load-balancing expert bias updated from the observed load, no gradient) and a small
Switch balance loss. Active FFN params per MoE layer: (2 + 1) * 3 * 192 * 128 = 221k, against
295k of tiny's dense FFN; total params 4.3M (2.4M for tiny).
"""

import os

from nopejax.config import load_config


def get_config():
    cfg = load_config(os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny.py"))
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
    return cfg
