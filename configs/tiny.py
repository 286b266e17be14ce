"""A 2.4M-parameter hybrid model that trains on 2 CPU cores in a few minutes.

6 layers, NoPE every 4th (SmolLM3's pattern: RoPE, RoPE, RoPE, NoPE, RoPE, RoPE), byte tokens,
on the offline default corpus (CPython's own documentation; see README).
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
    m.no_rope_layer_interval = 4
    m.dtype = "float32"  # CPUs have no fast bf16 matmul; set bfloat16 on GPU/TPU
    # 6 layers compile in seconds either way, and on CPU the unrolled step is ~12% faster than
    # the scanned one (benchmarks/step_overhead.py); deep models keep the default scan.
    m.scan_layers = False
    cfg.train.steps = 300
    cfg.train.global_batch_size = 16
    cfg.train.seq_len = 128
    cfg.train.eval_every = 100
    cfg.train.sample_every = 100  # a greedy continuation in TensorBoard / metrics.jsonl as it learns
    cfg.optim.lr = 3e-3
    cfg.optim.warmup_steps = 0.1  # fractions of train.steps: 30 and 60 of the 300 steps
    cfg.optim.decay_steps = 0.2
    cfg.checkpoint.every_steps = 100
    return cfg
