"""The tiny model in Cohere2's form (Command R7B, Tiny Aya): a CPU-sized family member for tests and demos.

6 layers of configs/tiny.py's shape: sliding-window RoPE layers (window 32) with a global NoPE layer
every 4th, parallel blocks (attention and MLP from one LayerNorm without bias, both added to the
residual), interleaved RoPE pairs, tied embeddings. `nopejax export` writes a Cohere2ForCausalLM.
Everything else (optimizer, schedule, data) is configs/tiny.py.
"""

import os

from nopejax.config import load_config


def get_config():
    cfg = load_config(os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny.py"))
    m = cfg.model
    m.no_rope_layer_interval = 4  # layers 3, 7, ... NoPE and global; the rest slide over 32 keys
    m.global_attention_interval = 4
    m.sliding_window = 32
    m.block = "parallel"
    m.norm = "layernorm"
    m.rope_layout = "interleaved"
    m.rms_norm_eps = 1e-5  # Cohere2's layer_norm_eps
    m.logit_scale = 1.0  # Tiny Aya's; Command R7B multiplies its logits by 0.25
    m.hf_family = "cohere2"
    return cfg
