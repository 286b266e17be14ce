"""The tiny model as a local/global stack: RoPE on sliding-window layers, NoPE on global ones.

6 layers (sliding RoPE, sliding RoPE, sliding RoPE, full NoPE, sliding RoPE, sliding RoPE),
window 32 at seq_len 128: the recipe of Command R7B / Tiny Aya / EXAONE 4 (3 local : 1 global)
at the scale of configs/tiny.py, and like it trainable on 2 CPU cores in minutes. Everything
else (shape, optimizer, schedule, data) is configs/tiny.py.
"""

import os

from nopejax.config import load_config


def get_config():
    cfg = load_config(os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny.py"))
    m = cfg.model
    m.no_rope_layer_interval = 4  # layers 3, 7, ... NoPE ...
    m.global_attention_interval = 4  # ... and the same layers global; the rest see 32 keys
    m.sliding_window = 32
    return cfg
