"""EXAONE-4.0-1.2B (LGAI-EXAONE, Exaone4ForCausalLM): the published shape, to pretrain or continue.

30 layers, GQA 32 query / 8 KV heads of 64, d_model 2048, d_ff 4096, vocabulary 102,400, tied
embeddings, 65,536-token context; post-norm blocks (RMSNorm eps 1e-5 on each sublayer's output)
and a per-head RMS QK-norm; RoPE theta 1,000,000 with llama3 scaling (factor 16, low/high
frequency factors 1/4, original length 8192).

Sources: the model card (EXAONE-4.0-1.2B "Model Configuration": 1.07B parameters without
embeddings, 30 layers, GQA 32/8, vocabulary 102,400, context 65,536; mirrored in the GGUF card)
and transformers' EXAONE 4 docs: the hybrid 3 local : 1 global attention with NoPE global layers
is the 32B model's; the 1.2B is all-global with RoPE on every layer, which is what this config
is (`sliding_window: null` in HF terms). d_model, d_ff, head_dim and the RoPE numbers come from an
EXAONE-4.0-1.2B config.json as reproduced in a third-party loader's tests (ollama's exaone4
parser test), not from the official file, which was not reachable from here; with them the
non-embedding count is 1,069,676,288 = the card's 1.07B, and tied embeddings make the "1.2B"
(1,279,391,488). For the 32B's placement: --config.model.global_attention_interval=4
--config.model.no_rope_layer_interval=4 --config.model.sliding_window=4096.
"""

import os

from nopejax.config import load_config


def get_config():
    cfg = load_config(os.path.join(os.path.dirname(os.path.abspath(__file__)), "smollm3_3b.py"))
    m = cfg.model
    m.vocab_size = 102400
    m.d_model = 2048
    m.num_layers = 30
    m.num_heads = 32
    m.num_kv_heads = 8
    m.head_dim = 64
    m.d_ff = 4096
    m.tie_embeddings = True
    m.no_rope_layer_interval = 0  # every layer rotates (the 1.2B has no sliding layers)
    m.rope_theta = 1_000_000.0
    m.rope_scaling = {"rope_type": "llama3", "factor": 16.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192}  # fmt: skip
    m.max_position_embeddings = 65536
    m.block = "post_norm"
    m.qk_norm = "rms"
    m.rms_norm_eps = 1e-5
    m.hf_family = "exaone4"
    return cfg
