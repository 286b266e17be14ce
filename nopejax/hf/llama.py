"""Llama (transformers `models/llama/modeling_llama.py`, `configuration_llama.py`).

Pre-norm RMSNorm, RoPE and full attention on every layer. Layer i (`model.layers.{i}.`), beside the
shared attention and MLP rows of hf/tensors.py:

| HF tensor                           | nopejax        |
|-------------------------------------|----------------|
| input_layernorm.weight [D]          | attn_norm [D]  |
| post_attention_layernorm.weight [D] | mlp_norm [D]   |
"""

from __future__ import annotations

from nopejax import layers
from nopejax.hf import fields, tensors

# the HF guide's table row (nopejax/reference.py): block and norms, per layer, the rest
GUIDE_ROW = ("pre_norm, RMSNorm", "RoPE and full on every layer", "q/k/v/o and MLP biases")

FIELDS = fields.common(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, max_position_embeddings=2048, tie_word_embeddings=False,
                       rope_theta=10_000.0)  # fmt: skip
BASE = {"no_rope_layer_interval": 0}  # every layer rotates

LAYER_MAP = {
    "attn_norm": tensors.same("input_layernorm.weight", tensors.d_model),
    **tensors.PROJECTIONS,
    "mlp_norm": tensors.same("post_attention_layernorm.weight", tensors.d_model),
}

# the layer kinds the format holds (LayerSpec.mixer, .ffn): fields.layer_kinds refuses any other
MIXERS = ("attention",)
FFNS = ("dense",)

LACKS = (
    *fields.PRE_NORM_LACKS,
    ("no_rope_layers", lambda m: not all(layers.rope_pattern(m)), "NoPE layers (every Llama layer rotates)"),
    ("layer_types", lambda m: any(spec.local for spec in layers.layer_specs(m)), "sliding-window layers"),
)


def config_json(m) -> dict:
    return {"rms_norm_eps": m.rms_norm_eps, "attention_bias": bool(m.attention_bias), "mlp_bias": bool(m.mlp_bias)}
