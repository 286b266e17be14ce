"""Llama 4 text (transformers `models/llama4/modeling_llama4.py`, `configuration_llama4.py`:
Llama4ForCausalLM, config.json `model_type` llama4_text).

Pre-norm RMSNorm; RoPE (interleaved pairs) or NoPE per layer, the weightless L2 QK-norm on the RoPE
layers, a NoPE query temperature; full or chunked attention; MoE every k-th layer with top-k sigmoid
weights on the expert inputs and one shared expert. Layer i (`model.layers.{i}.`), beside the shared
attention rows of hf/tensors.py (`feed_forward` in place of `mlp`):

| HF tensor                                         | nopejax                        | transform          |
|---------------------------------------------------|--------------------------------|--------------------|
| input_layernorm / post_attention_layernorm        | attn_norm / mlp_norm           | -                  |
| feed_forward.{gate,up,down}_proj.weight (dense)   | w_gate, w_up, w_down           | W.T                |
| feed_forward.router.weight [X, D]                 | router [D, X]                  | W.T                |
| feed_forward.experts.gate_up_proj [X, D, 2I]      | expert_gate, expert_up [X,D,I] | split the last axis|
| feed_forward.experts.down_proj [X, I, D]          | expert_down [X, I, D]          | -                  |
| feed_forward.shared_expert.{gate,up,down}_proj    | shared_{gate,up,down}          | W.T                |
| (none: Llama 4 has no expert bias)                | expert_bias [X]                | zeros (export: 0)  |
"""

from __future__ import annotations

import numpy as np

from nopejax import layers, moe
from nopejax.hf import fields, tensors
from nopejax.hf.fields import Field, HFConfigError, harmless


def read_rope(name, value, hf):
    """no_rope_layers (1 = RoPE) when non-empty, else NoPE every no_rope_layer_interval-th layer;
    RoPE layers rotate interleaved pairs (complex multiplication)."""
    out = fields.read_rope_pattern(name, value or None, hf)
    return {**out, "rope_layout": "interleaved"} if any(out["no_rope_layers"]) else out


def _rope_flags(hf) -> tuple:
    return fields.read_rope_pattern("no_rope_layers", hf["no_rope_layers"] or None, hf)["no_rope_layers"]


def read_layer_types(name, value, hf):
    """layer_types as given, else chunked on the RoPE layers when attention_chunk_size is set."""
    L, chunk = hf["num_hidden_layers"], hf["attention_chunk_size"]
    if value is None:
        value = ["chunked_attention" if r and chunk is not None else "full_attention" for r in _rope_flags(hf)]
    types = fields.kinds(name, value, L, "Llama 4", ("full_attention", "chunked_attention"))
    if "chunked_attention" not in types:
        return {"layer_types": types}
    if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1:
        raise HFConfigError("attention_chunk_size", chunk, "chunked_attention layers need a chunk size >= 1",
                            "set attention_chunk_size in config.json")  # fmt: skip
    return {"layer_types": types, "attention_chunk_size": chunk}


def read_qk_norm(name, value, hf):
    """use_qk_norm: the weightless L2 norm, on the RoPE layers only (none there: nothing to norm)."""
    if not isinstance(value, bool):
        raise HFConfigError(name, value, "expected a bool", "fix the value in config.json")
    return {"qk_norm": "l2"} if value and any(_rope_flags(hf)) else {}


def read_temperature(name, value, hf):
    """attn_temperature_tuning: q *= log1p(floor((pos + 1) / floor_scale)) * attn_scale + 1 on NoPE layers."""
    if not isinstance(value, (bool, int)):  # the hub's Scout config says 4: transformers 4 read it as true
        raise HFConfigError(name, value, "expected a bool", "fix the value in config.json")
    floor_scale, attn_scale = hf["floor_scale"], hf["attn_scale"]
    if not value or all(_rope_flags(hf)) or attn_scale == 0:  # no NoPE layer, or a scale of exactly 1
        return {}
    if not isinstance(floor_scale, int) or isinstance(floor_scale, bool) or floor_scale < 1:
        raise HFConfigError("floor_scale", floor_scale, "must be a positive integer", "fix the value")
    if isinstance(attn_scale, bool) or not isinstance(attn_scale, (int, float)) or not attn_scale > 0:
        raise HFConfigError("attn_scale", attn_scale, "nopejax takes a positive attn_scale (or 0: off)", "fix it")
    return {"nope_temperature": (float(floor_scale), float(attn_scale))}


def read_moe_layers(name, value, hf):
    """moe_layers as given, else every interleave_moe_layer_step-th layer; nopejax's MoE layers are
    those with (i + 1) % moe_layer_interval == 0, so an explicit list must be such a pattern."""
    L, step = hf["num_hidden_layers"], hf["interleave_moe_layer_step"]
    if value is None:
        step = fields.interval("interleave_moe_layer_step", step, "when moe_layers is absent")
        value = list(range(step - 1, L, step))
    patterns = {tuple(range(s - 1, L, s)): s for s in range(1, L + 1)}
    if not isinstance(value, list) or tuple(value) not in patterns:
        raise HFConfigError(
            name, value, "nopejax places MoE layers every k-th layer ((i + 1) % k == 0), at least one",
            "import a checkpoint whose moe_layers is such a pattern",
        )  # fmt: skip
    return {"moe_layer_interval": patterns[tuple(value)]}


# the HF guide's table row (nopejax/reference.py): block and norms, per layer, the rest
GUIDE_ROW = (
    "pre_norm, RMSNorm; L2 QK-norm on RoPE layers",
    "full or chunked; RoPE (interleaved pairs) or NoPE per layer, NoPE query temperature",
    "MoE every k-th layer (`moe_layers` periodic), top-k sigmoid weights on the expert inputs, one shared "
    "expert; q/k/v/o biases",
)

FIELDS = {
    **fields.common(without=("mlp_bias",), vocab_size=202048, hidden_size=5120, num_hidden_layers=48,
                    num_attention_heads=40, num_key_value_heads=8, max_position_embeddings=4096 * 32,
                    rms_norm_eps=1e-5, tie_word_embeddings=False, rope_theta=500_000.0, bos_token_id=1,
                    eos_token_id=2),  # Llama 4's MLPs have no biases: refused
    "head_dim": Field(128, fields.read_head_dim_free),
    "intermediate_size": Field(8192, fields.positive_int("expert_d_ff")),  # routed and shared experts
    "intermediate_size_mlp": Field(16384, fields.positive_int("d_ff")),  # the dense layers
    "num_local_experts": Field(16, fields.positive_int("num_experts")),
    "num_experts_per_tok": Field(1, fields.positive_int("experts_per_token")),
    "moe_layers": Field(None, read_moe_layers),
    "interleave_moe_layer_step": Field(1, harmless),  # read by the moe_layers row
    "no_rope_layers": Field(None, read_rope),
    "no_rope_layer_interval": Field(4, harmless),  # read by the no_rope_layers row
    "layer_types": Field(None, read_layer_types),
    "attention_chunk_size": Field(8192, harmless),  # read by the layer_types row
    "use_qk_norm": Field(True, read_qk_norm),
    "attn_temperature_tuning": Field(True, read_temperature),
    "floor_scale": Field(8192, harmless),  # read by the attn_temperature_tuning row
    "attn_scale": Field(0.1, harmless),  # read by the attn_temperature_tuning row
    "output_router_logits": Field(False, harmless),
    "router_aux_loss_coef": Field(0.001, harmless),  # a training loss weight, not in the forward
    "router_jitter_noise": Field(0.0, harmless),  # not read by Llama4TextMoe
    # the hub's Llama 4 text configs carry these; transformers' Llama 4 does not read them
    "for_llm_compressor": Field(None, harmless),
    "cache_implementation": Field(None, harmless),  # generation only
}  # fmt: skip
BASE = {"block": "pre_norm", "router": "sigmoid", "router_scale_input": True, "num_shared_experts": 1}

GATE_UP = "feed_forward.experts.gate_up_proj"
LAYER_MAP = {
    **tensors.ATTENTION,
    **tensors.ATTENTION_BIASES,
    "attn_norm": tensors.same("input_layernorm.weight", tensors.d_model),
    "mlp_norm": tensors.same("post_attention_layernorm.weight", tensors.d_model),
    **tensors.mlp("feed_forward"),
    **tensors.shared_experts("feed_forward.shared_expert"),
    "router": tensors.linear("feed_forward.router.weight", lambda m: m.num_experts, tensors.width),
    ("expert_gate", "expert_up"): tensors.Joint(  # one fused tensor, gate then up on the last axis
        lambda m: {GATE_UP: (m.num_experts, m.d_model, 2 * moe.expert_width(m))},
        lambda a, m: {GATE_UP: np.concatenate([a["expert_gate"], a["expert_up"]], -1)},
        lambda w, m: dict(zip(("expert_gate", "expert_up"), np.split(w[GATE_UP], 2, -1))),
    ),
    "expert_down": tensors.same("feed_forward.experts.down_proj",
                                lambda m: (m.num_experts, moe.expert_width(m), m.d_model)),
    "expert_bias": tensors.NO_EXPERT_BIAS,
}  # fmt: skip

# the layer kinds the format holds (LayerSpec.mixer, .ffn): fields.layer_kinds refuses any other
MIXERS = ("attention",)
FFNS = ("dense", "moe")

LACKS = (
    *fields.MOE_LACKS,
    ("layer_types", lambda m: any(spec.attention == "sliding" for spec in layers.layer_specs(m)),
     "sliding-window layers"),
    ("block", lambda m: m.block != "pre_norm", "block other than pre_norm"),
    ("qk_norm", lambda m: m.qk_norm not in ("none", "l2"), "learned RMS QK-norm (its QK-norm is the weightless L2)"),
    ("attention_gate", lambda m: m.attention_gate, "gated attention output"),
    ("embed_scale", lambda m: m.embed_scale != 1.0, "embedding scale"),
    ("rope_layout", lambda m: m.rope_layout != "interleaved" and fields.any_rope(m), "the half-split RoPE layout"),
    ("nope_temperature", lambda m: m.nope_temperature is not None and not float(m.nope_temperature[0]).is_integer(),
     "non-integer floor_scale"),
    ("num_dense_layers", lambda m: m.num_dense_layers != 0, "dense first layers (moe_layers is periodic here)"),
    ("router_scale_input", lambda m: not m.router_scale_input, "router weights on the expert outputs"),
    ("num_shared_experts", lambda m: m.num_shared_experts != 1, "shared experts other than exactly one"),
    ("expert_bias_rate", lambda m: m.expert_bias_rate != 0, "expert bias (the update would make one)"),
)  # fmt: skip


def config_json(m) -> dict:
    t = m.nope_temperature
    return {
        "intermediate_size": moe.expert_width(m),
        "intermediate_size_mlp": m.d_ff,
        "num_local_experts": m.num_experts,
        "num_experts_per_tok": m.experts_per_token,
        "moe_layers": [i for i, spec in enumerate(layers.layer_specs(m)) if spec.ffn == "moe"],
        "interleave_moe_layer_step": m.moe_layer_interval,
        "no_rope_layers": [int(x) for x in layers.rope_pattern(m)],
        "no_rope_layer_interval": m.no_rope_layer_interval or 4,  # read only when no_rope_layers is empty
        "layer_types": fields.layer_types(m),
        "attention_chunk_size": m.attention_chunk_size,
        "use_qk_norm": m.qk_norm == "l2",
        "attn_temperature_tuning": t is not None,
        "floor_scale": int(t[0]) if t else 8192,
        "attn_scale": float(t[1]) if t else 0.1,
        "rms_norm_eps": m.rms_norm_eps,
        "attention_bias": bool(m.attention_bias),
    }


check_params = fields.no_expert_bias("Llama4", "export to afmoe, or train Llama 4 models with expert_bias_rate = 0")
