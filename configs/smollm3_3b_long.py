"""SmolLM3-3B's first long-context stage: 4k -> 32k tokens, rope_theta 2M, context parallel 4.

After 11T tokens at 4096, SmolLM3 extended the context in two stages of ~50B tokens each
(blog "SmolLM3: smol, multilingual, long-context reasoner", huggingface.co/blog/smollm3,
section "Long Context extension"; the nanotron configs in github.com/huggingface/smollm,
text/pretraining/smollm3, also HF dataset HuggingFaceTB/smollm3-configs). This is the first,
as its released `long_context_4k_to_32k.yaml` sets it:

  sequence_length 32768, rope_theta 2000000.0 (the blog says 1.5M; the config is what ran),
  NoPE every 4th layer as before, load_optimizer: true (the AdamW moments are kept),
  learning_rate 2e-5 with 1000 warmup steps and a cosine decay to 0 over the other 19000,
  train_steps 20000, context_parallel_size 4, dp 12 x 6 accumulation x micro batch 1
  = 72 sequences = 2,359,296 tokens per step (the pretraining's 2.36M), ~47B tokens in all.

The second stage (32k -> 64k, rope_theta 5M, load_optimizer: false, 22000 steps, 36 sequences
per step) is this file with train.seq_len=65536, model.rope_theta=5e6, init_from_optimizer=False,
train.global_batch_size=36, train.grad_accum=3, train.steps=22000. Both stages upsampled math,
code and reasoning data: set data.path (comma-separated globs) and data.mixture_weights.

    nopejax train --config configs/smollm3_3b_long.py --workdir runs/smollm3_3b_32k \\
        --config.init_from=runs/smollm3_3b --config.data.tokenizer=/path/to/tokenizer.json
"""

import os

from nopejax.config import load_config


def get_config():
    cfg = load_config(os.path.join(os.path.dirname(os.path.abspath(__file__)), "smollm3_3b.py"))
    cfg.init_from = "runs/smollm3_3b"  # the 4k run (its newest checkpoint, or a checkpoints/STEP dir)
    cfg.init_from_optimizer = True
    cfg.init_from_schedule = "reset"  # a new warmup + cosine from step 0, peak 2e-5
    cfg.model.rope_theta = 2e6
    cfg.model.max_position_embeddings = 32768
    cfg.train.seq_len = 32768
    cfg.train.global_batch_size = 72
    cfg.train.grad_accum = 6  # 12 sequences per microbatch: one per data-parallel group of 4 chips
    cfg.train.steps = 20_000
    cfg.optim.lr = 2e-5
    cfg.optim.schedule = "cosine"
    cfg.optim.warmup_steps = 0.05  # 1000 of 20000
    cfg.optim.decay_steps = 0  # cosine over the rest, to min_lr_ratio 0
    cfg.optim.min_lr_ratio = 0.0
    cfg.mesh.data = 1
    cfg.mesh.fsdp = -1
    cfg.mesh.context = 4  # each 32k row split over 4 chips (zig-zag); fsdp takes the rest
    cfg.checkpoint.every_steps = 1000
    return cfg
