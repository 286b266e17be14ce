"""AFMoE: Arcee Trinity (transformers `models/afmoe/modeling_afmoe.py`, `configuration_afmoe.py`).

Sandwich block, gated attention output, per-head RMS QK-norm, RoPE on the sliding layers only;
dense first `num_dense_layers`, then MoE (sigmoid router over score + expert_bias, shared experts).
Layer i (`model.layers.{i}.`), beside the shared attention and MLP rows of hf/tensors.py:

| HF tensor                                         | nopejax                        | transform          |
|---------------------------------------------------|--------------------------------|--------------------|
| input_layernorm / post_attention_layernorm        | attn_norm / attn_post_norm     | -                  |
| pre_mlp_layernorm / post_mlp_layernorm            | mlp_norm / mlp_post_norm       | -                  |
| self_attn.{q,k}_norm.weight [E]                   | {q,k}_norm [E]                 | -                  |
| self_attn.gate_proj.weight [H*E, D]               | attn_gate [D, H, E]            | W.T reshaped       |
| mlp.router.gate.weight [X, D]                     | router [D, X]                  | W.T                |
| mlp.expert_bias [X] (fp32 on disk)                | expert_bias [X]                | -                  |
| mlp.experts.e.{gate,up}_proj.weight [I, D]        | expert_{gate,up}[e] [D, I]     | W.T, one per expert|
| mlp.experts.e.down_proj.weight [D, I]             | expert_down[e] [I, D]          | W.T, one per expert|
| mlp.shared_experts.{gate,up,down}_proj.weight     | shared_{gate,up,down}          | W.T                |

(transformers fuses the experts in memory, gate_up_proj [X, 2I, D], and saves them per expert, as
the hub checkpoints are.)
"""

from __future__ import annotations

import math

from nopejax import moe
from nopejax.hf import fields, tensors
from nopejax.hf.fields import Field, HFConfigError, harmless, only

KEEP_FP32 = ("mlp.expert_bias",)  # transformers keeps AFMoE's expert bias in fp32 whatever the dtype


def read_head_dim(name, value, hf):
    if value is None:  # AfmoeAttention reads config.head_dim as is
        raise HFConfigError(name, value, "transformers' AFMoE attention needs an explicit head_dim",
                            "set head_dim in config.json")  # fmt: skip
    return fields.read_head_dim_free(name, value, hf)


def read_shared(name, value, hf):
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise HFConfigError(name, value, "nopejax maps AFMoE with at least one shared expert",
                            "import a checkpoint with num_shared_experts >= 1")  # fmt: skip
    return {"num_shared_experts": value}


def read_layer_types(name, value, hf):
    """layer_types as given, else sliding except every global_attn_every_n_layers-th layer. RoPE on
    exactly the sliding layers (AfmoeAttention rotates only `is_local_attention` layers)."""
    types = fields.sliding_every(name, value, hf, "global_attn_every_n_layers", "AFMoE")
    return fields.rope_on_sliding(types, fields.window("sliding_window", hf["sliding_window"]))


def read_mup(name, value, hf):
    """mup_enabled: the embeddings times sqrt(hidden_size), as AfmoeModel computes it."""
    if not isinstance(value, bool):
        raise HFConfigError(name, value, "expected a bool", "fix the value in config.json")
    return {"embed_scale": float(hf["hidden_size"] ** 0.5)} if value else {}


# the HF guide's table row (nopejax/reference.py): block and norms, per layer, the rest
GUIDE_ROW = (
    "sandwich, RMSNorm + per-head RMS QK-norm, gated attention output",
    "full or sliding; RoPE exactly on the sliding layers; dense first `num_dense_layers`, then MoE",
    "sigmoid top-k over `score + expert_bias`, normalised, times `route_scale`; shared experts; muP embedding "
    "scale; q/k/v/o biases",
)

FIELDS = {
    **fields.common(without=("mlp_bias",), vocab_size=200192, hidden_size=2048, intermediate_size=6144,
                    num_hidden_layers=32, num_attention_heads=16, max_position_embeddings=16384, rms_norm_eps=1e-5,
                    tie_word_embeddings=False, rope_theta=10_000.0),  # AFMoE's MLPs have no biases: refused
    "head_dim": Field(128, read_head_dim),
    "moe_intermediate_size": Field(1408, fields.positive_int("expert_d_ff")),
    "num_dense_layers": Field(1, fields.to("num_dense_layers", int)),
    "num_experts": Field(64, fields.positive_int("num_experts")),
    "num_experts_per_tok": Field(6, fields.positive_int("experts_per_token")),
    "num_shared_experts": Field(2, read_shared),
    "route_scale": Field(1.0, fields.positive_float("routed_scale")),
    "output_router_logits": Field(False, harmless),
    "layer_types": Field(None, read_layer_types),
    "global_attn_every_n_layers": Field(4, harmless),  # read by the layer_types row
    "sliding_window": Field(1024, harmless),  # read by the layer_types row
    "mup_enabled": Field(False, read_mup),
    # the hub checkpoints' config.json carries these (Arcee's remote code); transformers' AFMoE
    # ignores them, so they are accepted only where they say what transformers computes anyway
    "auto_map": Field(None, harmless),  # remote-code class names; nopejax computes transformers' own
    "use_grouped_mm": Field(None, harmless),  # a kernel choice
    "load_balance_coeff": Field(None, harmless),  # a training loss weight
    "score_func": Field(None, only(None, "sigmoid", problem="transformers' AFMoE router is sigmoid", fix="remove it")),
    "route_norm": Field(None, only(None, True, problem="transformers' AFMoE normalises the top-k weights",
                                   fix="remove it")),
    **{name: Field(None, only(None, 1, problem="transformers' AFMoE routes without expert groups", fix="remove it"))
       for name in ("n_group", "topk_group", "num_expert_groups", "num_limited_groups")},
}  # fmt: skip
BASE = {"block": "sandwich", "qk_norm": "rms", "attention_gate": True, "router": "sigmoid", "router_normalize": True}

EXPERTS = tensors.per_expert("mlp.experts")

LAYER_MAP = {
    **tensors.PROJECTIONS,
    "attn_gate": tensors.heads_in("self_attn.gate_proj.weight", "num_heads"),
    "q_norm": tensors.same("self_attn.q_norm.weight", tensors.head_dim),
    "k_norm": tensors.same("self_attn.k_norm.weight", tensors.head_dim),
    "attn_norm": tensors.same("input_layernorm.weight", tensors.d_model),
    "attn_post_norm": tensors.same("post_attention_layernorm.weight", tensors.d_model),
    "mlp_norm": tensors.same("pre_mlp_layernorm.weight", tensors.d_model),
    "mlp_post_norm": tensors.same("post_mlp_layernorm.weight", tensors.d_model),
    **tensors.shared_experts("mlp.shared_experts"),
    "router": tensors.linear("mlp.router.gate.weight", lambda m: m.num_experts, tensors.width),
    "expert_bias": tensors.same("mlp.expert_bias", tensors.experts),
    ("expert_gate", "expert_up", "expert_down"): EXPERTS,
}


def _embed_scale_ok(m) -> bool:
    return m.embed_scale == 1.0 or math.isclose(m.embed_scale, m.d_model**0.5, rel_tol=1e-12)


# the layer kinds the format holds (LayerSpec.mixer, .ffn): fields.layer_kinds refuses any other
MIXERS = ("attention",)
FFNS = ("dense", "moe")

LACKS = (
    *fields.MOE_LACKS,
    ("attention_chunk_size", lambda m: m.attention_chunk_size is not None, "chunked attention"),
    ("nope_temperature", lambda m: m.nope_temperature is not None, "a NoPE query temperature"),
    ("block", lambda m: m.block != "sandwich", "block other than sandwich"),
    ("qk_norm", lambda m: m.qk_norm != "rms", "layer without the per-head RMS QK-norm"),
    ("attention_gate", lambda m: not m.attention_gate, "attention without the output gate"),
    ("embed_scale", lambda m: not _embed_scale_ok(m),
     "embedding scale other than 1 or sqrt(hidden_size) (mup_enabled)"),
    ("rope_layout", lambda m: m.rope_layout != "half" and fields.any_rope(m), "the interleaved RoPE layout"),
    ("no_rope_layers", lambda m: not fields.sliding_rope(m),
     "RoPE/NoPE pattern other than RoPE on exactly the sliding layers"),
    ("moe_layer_interval", lambda m: m.moe_layer_interval != 1, "interleaved dense layers past num_dense_layers"),
    ("router_normalize", lambda m: not m.router_normalize, "unnormalised top-k weights"),
    ("router_scale_input", lambda m: m.router_scale_input, "expert inputs scaled by the router weight"),
    ("num_shared_experts", lambda m: m.num_shared_experts == 0, "mapping without a shared expert in nopejax"),
)  # fmt: skip


def _global_every(m) -> int:
    """global_attn_every_n_layers giving the layer types, or its default when none does."""
    types = fields.layer_types(m)
    for n in range(1, m.num_layers + 2):
        if types == fields.every(n, m.num_layers, "sliding_attention", "full_attention"):
            return n
    return 4


def config_json(m) -> dict:
    return {
        "intermediate_size": m.d_ff,
        "moe_intermediate_size": moe.expert_width(m),
        "num_dense_layers": m.num_dense_layers,
        "num_experts": m.num_experts,
        "num_experts_per_tok": m.experts_per_token,
        "num_shared_experts": m.num_shared_experts,
        "route_scale": float(m.routed_scale),
        "layer_types": fields.layer_types(m),
        "global_attn_every_n_layers": _global_every(m),
        # transformers builds the sliding mask even when no layer slides; it then masks nothing
        "sliding_window": m.sliding_window or m.max_position_embeddings,
        "mup_enabled": m.embed_scale != 1.0,
        "rms_norm_eps": m.rms_norm_eps,
        "attention_bias": bool(m.attention_bias),
    }
