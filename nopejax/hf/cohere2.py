"""Cohere2: Command R7B, Command A, Tiny Aya (transformers `models/cohere2/modeling_cohere2.py`,
`configuration_cohere2.py`).

Parallel block (attention and MLP read one input norm), LayerNorm without bias, interleaved RoPE
on the sliding layers only (the full layers are NoPE), a logit scale. Layer i (`model.layers.{i}.`),
beside the shared attention and MLP rows of hf/tensors.py (no MLP biases):

| HF tensor                  | nopejax       |
|----------------------------|---------------|
| input_layernorm.weight [D] | attn_norm [D] |
"""

from __future__ import annotations

from nopejax.hf import fields, tensors
from nopejax.hf.fields import Field, HFConfigError, harmless, only


def _pattern(hf) -> dict:
    """Cohere2Config pops sliding_window_pattern with a default of 4 (absent, it is no claim to check)."""
    return hf if hf["sliding_window_pattern"] is not None else {**hf, "sliding_window_pattern": 4}


def read_layer_types(name, value, hf):
    """layer_types as given, else derived from sliding_window_pattern (default 4: layer i is full when
    (i + 1) % 4 == 0). Sliding layers rotate interleaved pairs; full layers are NoPE."""
    types = fields.sliding_every(name, value, _pattern(hf), "sliding_window_pattern", "Cohere2")
    out = fields.rope_on_sliding(types, fields.window("sliding_window", hf["sliding_window"]))
    return {**out, "rope_layout": "interleaved"} if "sliding_attention" in types else out


def read_period(name, value, hf):
    """Cohere's layer_switch and sliding_window_pattern: one full layer every `value` layers. transformers
    derives layer_types from sliding_window_pattern when layer_types is absent and otherwise reads neither,
    so either is accepted only where it says what layer_types does."""
    if value is None:
        return {}
    n = fields.interval(name, value, "(the period of the full-attention layers)")
    L = hf["num_hidden_layers"]
    types = hf["layer_types"]
    if types is None:
        types = fields.sliding_every("layer_types", None, _pattern(hf), "sliding_window_pattern", "Cohere2")
    if list(types[:L]) != fields.every(n, L, "sliding_attention", "full_attention"):
        raise HFConfigError(
            name, value, f"it puts a full-attention layer every {n} layers, but transformers runs the layer_types "
            f"{list(types[:L])}", "make it agree with layer_types (or remove it if layer_types is what was trained)",
        )  # fmt: skip
    return {}


# the HF guide's table row (nopejax/reference.py): block and norms, per layer, the rest
GUIDE_ROW = ("parallel, LayerNorm", "full or sliding; RoPE (interleaved pairs) exactly on the sliding layers",
             "q/k/v/o biases, `logit_scale`")  # fmt: skip

FIELDS = {
    # Cohere2's MLP has no biases, whatever config.json says: refused
    **fields.common(without=("mlp_bias",), vocab_size=256000, hidden_size=8192, intermediate_size=22528,
                    num_hidden_layers=40, num_attention_heads=64, max_position_embeddings=8192,
                    tie_word_embeddings=True, rope_theta=10_000.0, pad_token_id=0, bos_token_id=5,
                    eos_token_id=255001),
    "head_dim": Field(None, fields.read_head_dim_free),  # Cohere2Attention reads config.head_dim as is
    "layer_norm_eps": Field(1e-5, fields.to("rms_norm_eps", float)),  # nopejax's one eps, for LayerNorm too
    "rms_norm_eps": Field(None, harmless),  # not read by Cohere2
    "logit_scale": Field(0.0625, fields.positive_float("logit_scale")),
    "layer_types": Field(None, read_layer_types),
    "sliding_window": Field(4096, harmless),  # read by the layer_types row
    "sliding_window_pattern": Field(None, read_period),  # also read by the layer_types row (default 4)
    # Command R7B's, Command A's and Tiny Aya's config.json carry these; transformers' Cohere2 ignores
    # them, so they are accepted only where they say what transformers computes anyway
    "cache_implementation": Field(None, harmless),  # generation only
    "_sliding_window_pattern": Field(None, harmless),  # written by transformers 5.0; Cohere2 does not read it
    "use_parallel_embedding": Field(None, harmless),  # Cohere's tensor-parallel split of the embedding table
    "layer_switch": Field(None, read_period),
    "use_parallel_block": Field(None, only(None, True, problem="transformers' Cohere2 block is parallel "
                                           "(attention and MLP read one norm's output)",
                                           fix="a sequential-block model is not a Cohere2 model; it cannot "
                                           "be imported as one")),
    "use_qk_norm": Field(None, only(None, False, problem="transformers' Cohere2 has no QK-norm (it has no "
                                    "q_norm / k_norm weights)", fix="a model trained with QK-norm is not a "
                                    "Cohere2 model; it cannot be imported as one")),
    "order_of_interleaved_layers": Field(None, only(None, "local_attn_first", problem="transformers puts the "
                                         "sliding layers first in each period", fix="remove it")),
    "position_embedding_type": Field(None, only(None, "rope_gptj", problem="transformers' Cohere2 rotates "
                                     "interleaved pairs (GPT-J style)", fix="remove it")),
    "rotary_pct": Field(None, only(None, 1, 1.0, problem="transformers' Cohere2 rotates the whole head",
                                   fix="remove it")),
    "use_gated_activation": Field(None, only(None, True, problem="transformers' Cohere2 MLP is gated (SwiGLU)",
                                             fix="remove it")),
    "use_embedding_sharing": Field(None, fields.agrees_with("tie_word_embeddings", "transformers reads "
                                                            "tie_word_embeddings, not this")),
}  # fmt: skip
BASE = {"norm": "layernorm", "block": "parallel"}

LAYER_MAP = {"attn_norm": tensors.same("input_layernorm.weight", tensors.d_model), **tensors.PROJECTIONS}

# the layer kinds the format holds (LayerSpec.mixer, .ffn): fields.layer_kinds refuses any other
MIXERS = ("attention",)
FFNS = ("dense",)

LACKS = (
    *fields.NOBODY_HAS,
    ("block", lambda m: m.block != "parallel", "block other than parallel"),
    ("norm", lambda m: m.norm != "layernorm", "RMSNorm (its norms are LayerNorm)"),
    ("qk_norm", lambda m: m.qk_norm != "none", "QK-norm"),
    ("mlp_bias", lambda m: m.mlp_bias, "MLP biases"),
    ("rope_layout", lambda m: m.rope_layout != "interleaved" and fields.any_rope(m), "the half-split RoPE layout"),
    ("no_rope_layers", lambda m: not fields.sliding_rope(m),
     "RoPE/NoPE pattern other than RoPE on exactly the sliding layers"),
)  # fmt: skip


def config_json(m) -> dict:
    return {
        "layer_norm_eps": m.rms_norm_eps,
        "logit_scale": float(m.logit_scale),
        "layer_types": fields.layer_types(m),
        # transformers needs a window even when no layer slides; it then masks nothing
        "sliding_window": m.sliding_window or m.max_position_embeddings,
        "attention_bias": bool(m.attention_bias),
    }
