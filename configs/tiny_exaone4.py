"""The tiny model in EXAONE 4's form: a CPU-sized family member for tests and demos.

6 layers of configs/tiny.py's shape: sliding-window RoPE layers (window 32) with a global NoPE layer
every 4th ("LLLG", EXAONE-4.0-32B's placement), post-norm blocks (RMSNorm on each sublayer's output
before the residual add, none on its input) and a per-head RMS QK-norm before RoPE.
`nopejax export` writes an Exaone4ForCausalLM. Everything else is configs/tiny.py.
"""

import os

from nopejax.config import load_config


def get_config():
    cfg = load_config(os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny.py"))
    m = cfg.model
    m.no_rope_layer_interval = 4
    m.global_attention_interval = 4
    m.sliding_window = 32
    m.block = "post_norm"
    m.qk_norm = "rms"
    m.rms_norm_eps = 1e-5
    m.hf_family = "exaone4"
    return cfg
