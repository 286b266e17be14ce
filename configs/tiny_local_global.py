"""The tiny model as a local/global stack: RoPE on sliding-window layers, NoPE on global ones.

6 layers (sliding RoPE, sliding RoPE, sliding RoPE, full NoPE, sliding RoPE, sliding RoPE),
window 32 at seq_len 128: the recipe of Command R7B / Tiny Aya / EXAONE 4 (3 local : 1 global)
at the scale of configs/tiny.py, and like it trainable on 2 CPU cores in minutes.
"""

from nopejax.config import base_config


def get_config():
    cfg = base_config()
    m = cfg.model
    m.vocab_size = 384  # 256 bytes + specials, padded to a multiple of 128
    m.d_model = 192
    m.num_layers = 6
    m.num_heads = 6
    m.num_kv_heads = 2
    m.head_dim = 32
    m.d_ff = 512
    m.no_rope_layer_interval = 4  # layers 3, 7, ... NoPE ...
    m.global_attention_interval = 4  # ... and the same layers global; the rest see 32 keys
    m.sliding_window = 32
    m.dtype = "float32"  # CPUs have no fast bf16 matmul; set bfloat16 on GPU/TPU
    m.scan_layers = False  # 6 layers compile in seconds unrolled, which runs faster on CPU (see tiny.py)
    cfg.train.steps = 300
    cfg.train.global_batch_size = 16
    cfg.train.seq_len = 128
    cfg.train.eval_every = 100
    cfg.optim.lr = 3e-3
    cfg.optim.warmup_steps = 30
    cfg.optim.decay_steps = 60
    cfg.checkpoint.every_steps = 100
    return cfg
