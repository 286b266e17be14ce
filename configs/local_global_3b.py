"""SmolLM3-3B's shape as a local/global stack: 3 sliding RoPE layers (window 4096) : 1 global NoPE.

The placement of Command R7B / Tiny Aya / EXAONE 4: position comes from RoPE in the local layers,
the global layers see the whole context without it. Everything else (shape, optimizer, batch,
sharding) is configs/smollm3_3b.py. At seq_len 4096 the window covers the whole sequence; the
local layers start to save compute and memory at longer sequences (--config.train.seq_len=32768).
"""

import os

from nopejax.config import load_config


def get_config():
    cfg = load_config(os.path.join(os.path.dirname(os.path.abspath(__file__)), "smollm3_3b.py"))
    m = cfg.model
    m.no_rope_layer_interval = 4  # layers 3, 7, ..., 35: NoPE ...
    m.global_attention_interval = 4  # ... and global; the other 27 layers slide over 4096 keys
    m.sliding_window = 4096
    return cfg
