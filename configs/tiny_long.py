"""The tiny model's long-context stage, SmolLM3's 4k -> 32k recipe at CPU scale: 128 -> 256.

Continue a finished configs/tiny.py run (`init_from`, default runs/tiny as in the README's
quick start) at twice the length with a larger RoPE base, keeping its AdamW moments and starting
a new, lower schedule, as SmolLM3's long_context_4k_to_32k stage did (nopejax.stages):

    nopejax train --config configs/tiny.py --workdir runs/tiny
    nopejax train --config configs/tiny_long.py --workdir runs/tiny_long
    nopejax eval-length --workdir runs/tiny_long --lengths 128,256,512 --compare runs/tiny

Tokens per step stay those of tiny.py (8 x 256 = 16 x 128), as SmolLM3 kept 2.36M. Everything
else (shape, data) is configs/tiny.py.
"""

import os

from nopejax.config import load_config


def get_config():
    cfg = load_config(os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny.py"))
    cfg.init_from = "runs/tiny"
    cfg.init_from_optimizer = True  # SmolLM3 load_optimizer: true
    cfg.init_from_schedule = "reset"  # its own warmup and decay, from step 0
    cfg.model.rope_theta = 40000.0  # 4x for 2x the length (SmolLM3: 50k -> 2M for 8x)
    cfg.model.max_position_embeddings = 256
    cfg.train.seq_len = 256
    cfg.train.global_batch_size = 8
    cfg.train.steps = 100
    cfg.train.eval_every = 50
    cfg.train.sample_every = 0
    cfg.optim.lr = 3e-4  # a tenth of the stage-1 peak, as SmolLM3 (2e-4 -> 2e-5)
    cfg.optim.schedule = "cosine"
    cfg.optim.warmup_steps = 0.05
    cfg.optim.decay_steps = 0  # cosine to the end of the stage
    cfg.checkpoint.every_steps = 50
    return cfg
