"""SmolLM3 (transformers `models/smollm3/modeling_smollm3.py`, `configuration_smollm3.py`).

Pre-norm RMSNorm Llama with NoPE layers (`no_rope_layers`, 1 = RoPE) and optional sliding layers.
Layer i (`model.layers.{i}.`), beside the shared attention and MLP rows of hf/tensors.py:

| HF tensor                           | nopejax        |
|-------------------------------------|----------------|
| input_layernorm.weight [D]          | attn_norm [D]  |
| post_attention_layernorm.weight [D] | mlp_norm [D]   |
"""

from __future__ import annotations

from nopejax import layers
from nopejax.hf import fields, tensors
from nopejax.hf.fields import Field, HFConfigError, harmless


def read_layer_types(name, value, hf):
    """layer_types as given, `full_attention` or `sliding_attention` (window `sliding_window`). Absent,
    SmolLM3Config derives it: sliding on the NoPE layers when use_sliding_window and sliding_window
    are set, full elsewhere."""
    L, window = hf["num_hidden_layers"], hf["sliding_window"]
    if value is None:
        rope = fields.read_rope_pattern("no_rope_layers", hf["no_rope_layers"], hf)["no_rope_layers"]
        derive = bool(hf["use_sliding_window"]) and window is not None
        value = ["sliding_attention" if derive and not r else "full_attention" for r in rope]
    types = fields.kinds(name, value, L, "SmolLM3")
    if "sliding_attention" not in types:
        return {}
    if not isinstance(window, int) or isinstance(window, bool) or window < 1:
        raise HFConfigError(name, list(types), f"sliding_attention layers need sliding_window >= 1, got {window!r}",
                            "set sliding_window in config.json")  # fmt: skip
    return {"layer_types": types, "sliding_window": window}


# the HF guide's table row (nopejax/reference.py): block and norms, per layer, the rest
GUIDE_ROW = ("pre_norm, RMSNorm", "RoPE or NoPE, full or sliding (any mix)", "q/k/v/o and MLP biases")

FIELDS = {
    **fields.common(vocab_size=128256, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                    num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=32768,
                    tie_word_embeddings=True, rope_theta=2_000_000.0),
    "no_rope_layers": Field(None, fields.read_rope_pattern),
    "no_rope_layer_interval": Field(4, harmless),  # read by the no_rope_layers row
    "layer_types": Field(None, read_layer_types),
    "use_sliding_window": Field(False, harmless),  # read by the layer_types row
    "sliding_window": Field(None, harmless),  # read by the layer_types row
}  # fmt: skip
BASE = {}

LAYER_MAP = {
    "attn_norm": tensors.same("input_layernorm.weight", tensors.d_model),
    **tensors.PROJECTIONS,
    "mlp_norm": tensors.same("post_attention_layernorm.weight", tensors.d_model),
}

# the layer kinds the format holds (LayerSpec.mixer, .ffn): fields.layer_kinds refuses any other
MIXERS = ("attention",)
FFNS = ("dense",)

LACKS = fields.PRE_NORM_LACKS


def config_json(m) -> dict:
    sliding = "sliding_attention" in fields.layer_types(m)
    return {
        "rms_norm_eps": m.rms_norm_eps,
        "no_rope_layers": [int(x) for x in layers.rope_pattern(m)],
        "no_rope_layer_interval": m.no_rope_layer_interval or m.num_layers + 1,
        # HF masks by layer_types; use_sliding_window also sets each layer's window for flash kernels
        "use_sliding_window": sliding,
        "sliding_window": m.sliding_window if sliding else None,
        "layer_types": fields.layer_types(m),
        "attention_bias": bool(m.attention_bias),
        "mlp_bias": bool(m.mlp_bias),
    }
