"""A 3B-class Mamba2 hybrid at SmolLM3-3B's width, 32k context: 3 Mamba2 layers per NoPE attention layer.

configs/smollm3_3b_long.py (the 32k stage: context parallel 4, 72 rows per step) with each
period of four layers made (mamba2, mamba2, mamba2, full attention without RoPE), every layer
keeping SmolLM3's dense SwiGLU FFN. The Mamba2 layers carry order, so the attention layers are
NoPE, as in Nemotron-H. Mamba2 shape: expansion 2 (64 heads of 64 = 4096 inner), 1 group,
state 128, conv 4, SSD chunk 256 (Mamba2's own defaults at this width; not a published model).
The dry run beside configs/smollm3_3b_long.py (the all-attention model of the same width):

    nopejax train --config configs/mamba2_hybrid_3b_long.py --workdir /tmp/m --dry-run --topology v5p:2x2x4
"""

import os

from nopejax.config import load_config

PERIOD = ("mamba2", "mamba2", "mamba2", "full_attention")


def get_config():
    cfg = load_config(os.path.join(os.path.dirname(os.path.abspath(__file__)), "smollm3_3b_long.py"))
    m = cfg.model
    m.layer_types = PERIOD * (m.num_layers // len(PERIOD))
    m.no_rope_layers = (0,) * m.num_layers  # NoPE attention: the recurrence carries order
    m.mamba_num_heads = 64
    m.mamba_head_dim = 64
    m.mamba_groups = 1
    m.mamba_state_size = 128
    m.mamba_conv_kernel = 4
    m.mamba_chunk_size = 256
    cfg.init_from = ""  # a fresh model: SmolLM3's checkpoint has no Mamba2 weights
    cfg.init_from_optimizer = False
    cfg.model.hf_family = "granitemoehybrid"  # Mamba2 + NoPE attention, dense FFNs: a Granite 4.0-H export
    return cfg
