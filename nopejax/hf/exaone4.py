"""EXAONE 4 (transformers `models/exaone4/modeling_exaone4.py`, `configuration_exaone4.py`).

Post-norm RMSNorm (norms on the sublayer outputs), per-head RMS QK-norm, RoPE on the sliding layers
only (or on every layer of an all-global model, `sliding_window: null`). Layer i (`model.layers.{i}.`),
beside the shared attention and MLP rows of hf/tensors.py (no biases):

| HF tensor                             | nopejax            |
|---------------------------------------|--------------------|
| post_attention_layernorm.weight [D]   | attn_post_norm [D] |
| post_feedforward_layernorm.weight [D] | mlp_post_norm [D]  |
| self_attn.{q,k}_norm.weight [E]       | {q,k}_norm [E]     |
"""

from __future__ import annotations

from nopejax import layers
from nopejax.hf import fields, tensors
from nopejax.hf.fields import Field, HFConfigError, harmless


def read_layer_types(name, value, hf):
    """layer_types as given, else derived from an integer sliding_window_pattern (transformers cannot
    derive from the "LLLG" string form, nor without a window). With a window, RoPE on the sliding
    layers only (global layers NoPE); without one (`sliding_window: null`), every layer full and RoPE."""
    L, window = hf["num_hidden_layers"], hf["sliding_window"]
    if value is None:
        why = "when layer_types is absent and sliding_window is set (transformers derives layer_types from it)"
        p = fields.interval("sliding_window_pattern", None if window is None else hf["sliding_window_pattern"], why)
        value = fields.every(p, L, "sliding_attention", "full_attention")
    types = fields.kinds(name, value, L, "EXAONE 4")
    if window is None:
        if "sliding_attention" in types:
            raise HFConfigError("sliding_window", None, "sliding_attention layers need a window (transformers fails)",
                                "set sliding_window, or make every layer full_attention")  # fmt: skip
        return {"no_rope_layer_interval": 0}
    return fields.rope_on_sliding(types, fields.window("sliding_window", window))


# the HF guide's table row (nopejax/reference.py): block and norms, per layer, the rest
GUIDE_ROW = ("post_norm, RMSNorm + per-head RMS QK-norm", "full or sliding; RoPE exactly on the sliding "
             "layers, or on every layer when none slides (`sliding_window: null`)", "no biases")  # fmt: skip

FIELDS = {
    # EXAONE 4 has no biases, whatever config.json says: refused
    **fields.common(without=("attention_bias", "mlp_bias"), vocab_size=102400, hidden_size=4096,
                    intermediate_size=16384, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                    max_position_embeddings=2048, rms_norm_eps=1e-5, tie_word_embeddings=False,
                    rope_theta=10_000.0, bos_token_id=0, eos_token_id=2),
    "layer_types": Field(None, read_layer_types),
    "sliding_window": Field(4096, harmless),  # read by the layer_types row
    "sliding_window_pattern": Field(4, harmless),  # read by the layer_types row
}  # fmt: skip
BASE = {"block": "post_norm", "qk_norm": "rms"}

LAYER_MAP = {
    **tensors.PROJECTIONS,
    "attn_post_norm": tensors.same("post_attention_layernorm.weight", tensors.d_model),
    "mlp_post_norm": tensors.same("post_feedforward_layernorm.weight", tensors.d_model),
    "q_norm": tensors.same("self_attn.q_norm.weight", tensors.head_dim),
    "k_norm": tensors.same("self_attn.k_norm.weight", tensors.head_dim),
}


def _all_global_rope(m) -> bool:
    return all(layers.rope_pattern(m)) and not any(s.local for s in layers.layer_specs(m))


# the layer kinds the format holds (LayerSpec.mixer, .ffn): fields.layer_kinds refuses any other
MIXERS = ("attention",)
FFNS = ("dense",)

LACKS = (
    *fields.NOBODY_HAS,
    ("block", lambda m: m.block != "post_norm", "block other than post_norm"),
    ("norm", lambda m: m.norm != "rms", "LayerNorm (its norms are RMSNorm)"),
    ("qk_norm", lambda m: m.qk_norm != "rms", "layer without the per-head RMS QK-norm"),
    ("attention_bias", lambda m: m.attention_bias, "attention biases"),
    ("mlp_bias", lambda m: m.mlp_bias, "MLP biases"),
    ("logit_scale", lambda m: m.logit_scale != 1.0, "a logit scale"),
    ("rope_layout", lambda m: m.rope_layout != "half" and fields.any_rope(m), "the interleaved RoPE layout"),
    ("no_rope_layers", lambda m: not (fields.sliding_rope(m) or _all_global_rope(m)),
     "RoPE/NoPE pattern other than RoPE on exactly the sliding layers (or on every layer of an all-global model)"),
)  # fmt: skip


def config_json(m) -> dict:
    # without sliding layers the window says whether global layers rotate: null = all RoPE, set = all NoPE
    window = m.sliding_window
    if window is None and not all(layers.rope_pattern(m)):
        window = m.max_position_embeddings
    return {"rms_norm_eps": m.rms_norm_eps, "layer_types": fields.layer_types(m), "sliding_window": window}
