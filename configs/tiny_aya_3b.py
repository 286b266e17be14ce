"""Tiny Aya (CohereLabs/tiny-aya-*, 3.35B, Cohere2ForCausalLM): the published shape, to pretrain or continue.

36 layers: 3 sliding-window layers (window 4096, interleaved RoPE, theta 50,000) : 1 global NoPE layer;
parallel blocks from one LayerNorm without bias (eps 1e-5); GQA 16 query / 4 KV heads of 128;
d_model 2048, d_ff 11008, vocabulary 262,144, tied embeddings, logit_scale 1.0. 3,349,227,520
parameters (the embedding counted once), which is the "3.35B" of the model card.

Source of the numbers: the HF config.json of CohereLabs/tiny-aya-global as transcribed in
rasbt/LLMs-from-scratch ch05/15_tiny-aya/standalone-tiny-aya.ipynb (TINY_AYA_CONFIG, whose parameter
count 3,349,227,520 this config reproduces); the config.json itself was not reachable from here.
That transcription gives 500,000 as the context length in the HF config (max_position_embeddings
below; nothing is sized by it). Training settings (batch, optimizer, sharding) are
configs/smollm3_3b.py's; Cohere has not published its own.
"""

import os

from nopejax.config import load_config


def get_config():
    cfg = load_config(os.path.join(os.path.dirname(os.path.abspath(__file__)), "smollm3_3b.py"))
    m = cfg.model
    m.vocab_size = 262144
    m.d_model = 2048
    m.num_layers = 36
    m.num_heads = 16
    m.num_kv_heads = 4
    m.head_dim = 128
    m.d_ff = 11008
    m.tie_embeddings = True
    m.no_rope_layer_interval = 4  # layers 3, 7, ..., 35: global and NoPE
    m.global_attention_interval = 4
    m.sliding_window = 4096
    m.rope_theta = 50000.0
    m.rope_layout = "interleaved"
    m.block = "parallel"
    m.norm = "layernorm"
    m.rms_norm_eps = 1e-5
    m.logit_scale = 1.0
    m.max_position_embeddings = 500000
    m.hf_family = "cohere2"
    return cfg
