"""The tiny model as a Granite 4.0-H-style hybrid: Mamba2 x3 : NoPE global attention x1.

8 layers (Mamba2, Mamba2, Mamba2, full NoPE attention, twice): the Mamba2 layers carry order, so the
attention layers need no RoPE (Granite 4.0-H's position_embedding_type "nope"), and every layer
keeps its dense SwiGLU FFN. The Mamba2 mixers: 6 heads of 64 (inner width 384 = 2 x d_model),
one group of B and C, state 32, conv kernel 4, SSD chunks of 32 (4 per 128-token row). Everything
else (shape, optimizer, schedule, data) is configs/tiny.py; like it, this trains on 2 CPU cores in
minutes. `nopejax export` writes a GraniteMoeHybridForCausalLM checkpoint (model.hf_family =
"granitemoehybrid"; its dense variant, num_local_experts 0: each FFN is the shared SwiGLU).
"""

import os

from nopejax.config import load_config


def get_config():
    cfg = load_config(os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny.py"))
    m = cfg.model
    m.num_layers = 8
    m.layer_types = ("mamba2", "mamba2", "mamba2", "full_attention") * 2
    m.no_rope_layers = (0,) * 8  # NoPE attention; Mamba2 layers take no positions
    m.mamba_num_heads = 6
    m.mamba_head_dim = 64
    m.mamba_groups = 1
    m.mamba_state_size = 32
    m.mamba_conv_kernel = 4
    m.mamba_chunk_size = 32
    m.hf_family = "granitemoehybrid"
    return cfg
