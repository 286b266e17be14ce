"""A 3B-class Gated DeltaNet hybrid at SmolLM3-3B's width, 32k context: 3 GDN layers per NoPE attention layer.

configs/smollm3_3b_long.py (the 32k stage: context parallel 4, 72 rows per step) with each
period of four layers made (gated_deltanet x 3, full attention without RoPE), every layer keeping
SmolLM3's dense SwiGLU FFN, as Qwen3-Next interleaves 3 Gated DeltaNet layers per attention layer.
GDN shape: Qwen3-Next's linear-attention heads at hidden 2048 (16 key heads and 32 value heads of
128, conv 4; transformers' Qwen3NextConfig defaults, not copied from a hub config), chunk 64.
The dry run beside configs/smollm3_3b_long.py (the all-attention model of the same width):

    nopejax train --config configs/gdn_hybrid_3b_long.py --workdir /tmp/g --dry-run --topology v5p:2x2x4
"""

import os

from nopejax.config import load_config

PERIOD = ("gated_deltanet", "gated_deltanet", "gated_deltanet", "full_attention")


def get_config():
    cfg = load_config(os.path.join(os.path.dirname(os.path.abspath(__file__)), "smollm3_3b_long.py"))
    m = cfg.model
    m.layer_types = PERIOD * (m.num_layers // len(PERIOD))
    m.no_rope_layers = (0,) * m.num_layers  # NoPE attention: the recurrence carries order
    m.gdn_key_heads = 16
    m.gdn_value_heads = 32
    m.gdn_key_head_dim = 128
    m.gdn_value_head_dim = 128
    m.gdn_conv_kernel = 4
    m.gdn_chunk_size = 64
    cfg.init_from = ""  # a fresh model: SmolLM3's checkpoint has no GDN weights
    cfg.init_from_optimizer = False
    return cfg
