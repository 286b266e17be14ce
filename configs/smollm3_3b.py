"""SmolLM3-3B's exact shape: 36 layers, NoPE every 4th, GQA 16/4, tied embeddings.

rope_theta 50000 is the 4k-context pretraining stage; the released long-context model uses 5e6.
Trained as SmolLM3 was: AdamW (0.9, 0.95), weight decay 0.1, warmup-stable-decay, clip 1.0,
bf16 compute over fp32 master weights, 4096-token sequences, FSDP.
"""

from nopejax.config import base_config


def get_config():
    cfg = base_config()
    m = cfg.model
    m.vocab_size = 128256
    m.d_model = 2048
    m.num_layers = 36
    m.num_heads = 16
    m.num_kv_heads = 4
    m.head_dim = 128
    m.d_ff = 11008
    m.rms_norm_eps = 1e-6
    m.tie_embeddings = True
    m.no_rope_layer_interval = 4
    m.rope_theta = 50000.0
    m.max_position_embeddings = 4096
    m.dtype = "bfloat16"
    m.param_dtype = "float32"
    m.remat = "full"
    m.attention_impl = "auto"
    cfg.mesh.data = 1
    cfg.mesh.fsdp = -1
    cfg.train.seq_len = 4096
    cfg.train.global_batch_size = 16  # one 4096-token sequence per chip on 16 chips
    cfg.train.loss_chunk_len = 512  # never hold [B, 4096, 128256] fp32 logits at once
    cfg.train.steps = 100_000
    cfg.train.eval_every = 1000
    cfg.optim.lr = 2e-4
    cfg.optim.schedule = "wsd"
    cfg.optim.warmup_steps = 0.02  # fractions of train.steps: 2,000 and 10,000 of 100,000
    cfg.optim.decay_steps = 0.1
    cfg.optim.weight_decay = 0.1
    cfg.checkpoint.every_steps = 1000
    # SmolLM3 uses its Llama-3-style tokenizer: --config.data.tokenizer=/path/to/tokenizer.json
    return cfg
