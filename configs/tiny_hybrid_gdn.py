"""The tiny model in OLMo Hybrid's form: Gated DeltaNet x3 then one global NoPE attention layer.

8 layers of configs/tiny.py's width (two periods of GDN, GDN, GDN, attention): the GDN layers carry
order (no RoPE anywhere: the attention layers are NoPE), pre-norm; the attention layers are OLMo 2's
post-norm blocks with the whole-projection RMS QK-norm. GDN: 2 key heads of 48, 4 value heads of 48,
a 4-wide conv, 64-token chunks (transformers' own), beta in (0, 2) (linear_allow_neg_eigval).
`nopejax export` writes an OlmoHybridForCausalLM (rope_theta null: NoPE). Everything else is
configs/tiny.py (byte tokens, the offline default corpus, 300 steps of 16 x 128 tokens).

A short run learns: `nopejax train --config configs/tiny_hybrid_gdn.py --workdir /tmp/t --config.train.steps=12
--config.train.global_batch_size=4 --config.train.seq_len=80 --config.train.log_every=3
--config.train.eval_every=0 --config.train.sample_every=0` (2026-12-06, JAX 0.10.2, 2 shared CPU cores):
loss 5.45, 3.83, 3.40, 3.40 at steps 3, 6, 9, 12.
"""

import os

from nopejax.config import load_config


def get_config():
    cfg = load_config(os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny.py"))
    m = cfg.model
    m.num_layers = 8
    m.layer_types = tuple("full_attention" if (i + 1) % 4 == 0 else "gated_deltanet" for i in range(8))
    m.no_rope_layers = (0,) * 8  # NoPE attention; the GDN layers take no positions
    m.block = "post_norm"
    m.recurrent_block = "pre_norm"
    m.qk_norm = "rms_proj"
    m.gdn_key_heads = 2
    m.gdn_value_heads = 4
    m.gdn_key_head_dim = 48
    m.gdn_value_head_dim = 48
    m.gdn_conv_kernel = 4
    m.gdn_chunk_size = 64
    m.gdn_allow_neg_eigval = True
    m.gdn_norm_eps = 1e-5
    m.tie_embeddings = False
    m.hf_family = "olmo_hybrid"
    return cfg
