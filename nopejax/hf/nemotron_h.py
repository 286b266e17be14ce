"""Nemotron-H (transformers `models/nemotron_h/modeling_nemotron_h.py`, `configuration_nemotron_h.py`).

Every layer is one pre-norm sublayer, chosen per layer by `layers_block_type` (or the older
`hybrid_override_pattern` string): "M" / linear_attention a Mamba2 mixer, "*" / full_attention
attention without RoPE, "-" / mlp a non-gated squared-ReLU MLP (model.mlp_activation "relu2"). In
nopejax terms an M layer is mixer mamba2 + FFN none, a * layer attention + FFN none, a - layer no
mixer + a dense FFN. "E" / moe layers (non-gated relu2 experts, a grouped sigmoid router with a
score-correction bias, an optional latent projection) are refused: nopejax's experts are SwiGLU.

Tensors live under `backbone.` (`Outer` below); layer i (`backbone.layers.{i}.`):

| HF tensor                                  | nopejax                          | transform                |
|--------------------------------------------|----------------------------------|--------------------------|
| norm.weight [D]                            | attn_norm (M, *) / mlp_norm (-)  | -                        |
| mixer.{q,k,v}_proj.weight [heads*E, D]     | w{q,k,v} [D, heads, E]           | W.T reshaped             |
| mixer.o_proj.weight [D, H*E]               | wo [H, E, D]                     | W.T reshaped             |
| mixer.up_proj.weight [F, D]                | w_up [D, F]                      | W.T                      |
| mixer.down_proj.weight [D, F]              | w_down [F, D]                    | W.T                      |
| mixer.{up,down}_proj.bias (mlp_bias)       | {up,down}_bias                   | -                        |
| mixer.in_proj.weight [Z, D] (+ .bias)      | mamba_in_proj [D, Z]             | W.T                      |
| mixer.conv1d.weight [E, 1, K] (+ .bias)    | mamba_conv1d_weight [K, E]       | W[:, 0, :].T             |
| mixer.{dt_bias, A_log, D} [H]              | mamba_{dt_bias, A_log, D}        | -                        |
| mixer.norm.weight [I]                      | mamba_norm                       | -                        |
| mixer.out_proj.weight [D, I] (+ .bias)     | mamba_out_proj [I, D]            | W.T                      |

The Mamba2 mixer's gated norm and the block norms share `layer_norm_epsilon` (model.rms_norm_eps).
"""

from __future__ import annotations

import math

from nopejax import layers
from nopejax.hf import fields, tensors
from nopejax.hf.fields import Field, HFConfigError, agrees_with, harmless, only
from nopejax.mixers.kinds import KINDS

MAMBA2 = KINDS["mamba2"]
OUTER = tensors.Outer(embed="backbone.embeddings.weight", layers="backbone.layers", final_norm="backbone.norm_f.weight")
EXPORTS = (
    "ffn_types", "mlp_activation", "mamba_num_heads", "mamba_head_dim", "mamba_groups", "mamba_state_size",
    "mamba_conv_kernel", "mamba_chunk_size", "mamba_conv_bias", "mamba_proj_bias", "mamba_time_step_limit",
)  # fmt: skip

# layers_block_type (transformers >= 5 names, and the legacy ones it remaps) -> (nopejax layer type, FFN)
KINDS = {
    "linear_attention": ("mamba2", "none"),
    "mamba": ("mamba2", "none"),
    "full_attention": ("full_attention", "none"),
    "attention": ("full_attention", "none"),
    "mlp": ("mlp", "dense"),
}
PATTERN = {"M": "linear_attention", "*": "full_attention", "-": "mlp", "E": "moe"}  # hybrid_override_pattern
# transformers' NemotronHConfig pops these older names and lets them win over the current ones
LEGACY = {
    "n_groups": "mamba_n_groups", "conv_kernel": "mamba_d_conv", "expand": "mamba_expand",
    "time_step_min": "mamba_dt_min", "time_step_max": "mamba_dt_max", "time_step_limit": "mamba_dt_limit",
    "time_step_floor": "mamba_dt_init_floor", "use_conv_bias": "mamba_conv_bias", "chunk_size": "mamba_chunk_size",
}  # fmt: skip


def _value(name: str, hf: dict):
    """The field as transformers resolves it: its legacy name, when given, wins."""
    legacy = LEGACY.get(name)
    return hf[legacy] if legacy and hf.get(legacy) is not None else hf[name]


def block_types(hf: dict) -> list:
    """layers_block_type, else hybrid_override_pattern spelled out, as NemotronHConfig resolves them."""
    if hf["layers_block_type"] is not None:
        return hf["layers_block_type"]
    pattern = hf["hybrid_override_pattern"]
    if pattern is None:  # NemotronHConfig's default layers
        return ["linear_attention", "moe", "full_attention", "mlp"]
    if not isinstance(pattern, str) or any(c not in PATTERN for c in pattern):
        raise HFConfigError("hybrid_override_pattern", pattern, f"one of {sorted(PATTERN)} per layer",
                            "fix the pattern")  # fmt: skip
    return [PATTERN[c] for c in pattern]


def _has_mamba(hf: dict) -> bool:
    return any(KINDS.get(t, ("",))[0] == "mamba2" for t in block_types(hf))


def read_layers(name, value, hf):
    """The per-layer kinds: Mamba2 / attention (NoPE) / MLP layers, each one sublayer; MoE refused."""
    where = "layers_block_type" if hf["layers_block_type"] is not None else "hybrid_override_pattern"
    types = block_types(hf)
    if not isinstance(types, list) or not types:
        raise HFConfigError(where, types, "needs a non-empty list of layer kinds", "fix the list")
    if "moe" in types:
        raise HFConfigError(
            where, hf[where], "MoE ('E' / moe) layers: Nemotron-H's experts are non-gated relu2 MLPs behind a "
            "grouped sigmoid router, nopejax's experts are SwiGLU", "import a Nemotron-H model without MoE layers",
        )  # fmt: skip
    unknown = sorted({t for t in types if t not in KINDS})
    if unknown:
        raise HFConfigError(where, types, f"unknown layer kind(s) {unknown}", f"use {sorted(KINDS)}")
    layer_types, ffn_types = zip(*(KINDS[t] for t in types))
    return {
        "num_layers": len(types), "layer_types": layer_types, "ffn_types": ffn_types,
        "no_rope_layers": (0,) * len(types),  # NemotronHAttention applies no rotary embedding
    }  # fmt: skip


def read_mlp_act(name, value, hf):
    if value != "relu2":
        raise HFConfigError(name, value, "nopejax's non-gated MLP is relu2 (squared ReLU) only",
                            "import a relu2 model")  # fmt: skip
    return {"mlp_activation": "relu2"}


def read_tie(name, value, hf):
    """NemotronHForCausalLM never ties its head (its _tied_weights_keys is empty): lm_head.weight is read."""
    if not isinstance(value, bool):
        raise HFConfigError(name, value, "expected a bool", "fix the value in config.json")
    return {"tie_embeddings": False}


def _mamba_int(key: str):
    """A Mamba2 size, read (by its current or legacy name) only when the model has Mamba2 layers."""

    def read(name, value, hf):
        return fields.positive_int(key)(name, _value(name, hf), hf) if _has_mamba(hf) else {}

    return read


def _mamba_bool(key: str):
    def read(name, value, hf):
        return fields.to(key, bool)(name, _value(name, hf), hf) if _has_mamba(hf) else {}

    return read


def _float(x):
    """transformers 5 writes inf as {"__float__": "Infinity"}."""
    if isinstance(x, dict) and set(x) == {"__float__"}:
        return float(x["__float__"].replace("Infinity", "inf"))
    return x


def read_time_step_limit(name, value, hf):
    """The (min, max) clamp of dt in the chunked scan; (0, inf) is no clamp (model.mamba_time_step_limit unset)."""
    value = _value(name, hf)
    limit = [_float(x) for x in value] if isinstance(value, (list, tuple)) else value
    if not isinstance(limit, list) or len(limit) != 2 or not all(isinstance(x, (int, float)) for x in limit):
        raise HFConfigError(name, value, "must be [min, max]", "fix the value in config.json")
    if tuple(float(x) for x in limit) == (0.0, math.inf):
        return {}
    return {"mamba_time_step_limit": tuple(float(x) for x in limit)}


# the HF guide's table row (nopejax/reference.py): block and norms, per layer, the rest
GUIDE_ROW = (
    "pre_norm, RMSNorm; one sublayer per layer",
    "Mamba2, NoPE full attention or a relu2 MLP, any order (no MoE layers)",
    "Mamba2 conv / projection biases, MLP biases; untied head",
)

FIELDS = {
    **fields.common(vocab_size=131072, hidden_size=4096, intermediate_size=21504, num_attention_heads=32,
                    num_key_value_heads=8, max_position_embeddings=4096, tie_word_embeddings=False,
                    pad_token_id=0, bos_token_id=1, eos_token_id=2, rope_theta=10_000.0),
    "num_hidden_layers": Field(None, harmless),  # transformers derives the depth from the layer kinds
    "layers_block_type": Field(None, read_layers),
    "hybrid_override_pattern": Field(None, harmless),  # read by the layers_block_type row
    "head_dim": Field(128, fields.read_head_dim_free),  # NemotronHAttention reads config.head_dim as is
    "tie_word_embeddings": Field(False, read_tie),
    "mlp_hidden_act": Field("relu2", read_mlp_act),
    "layer_norm_epsilon": Field(1e-5, fields.to("rms_norm_eps", float)),
    "ssm_state_size": Field(128, _mamba_int("mamba_state_size")),
    "mamba_num_heads": Field(128, _mamba_int("mamba_num_heads")),
    "mamba_head_dim": Field(64, _mamba_int("mamba_head_dim")),
    "n_groups": Field(8, _mamba_int("mamba_groups")),
    "conv_kernel": Field(4, _mamba_int("mamba_conv_kernel")),
    "chunk_size": Field(128, _mamba_int("mamba_chunk_size")),
    "use_conv_bias": Field(True, _mamba_bool("mamba_conv_bias")),
    "use_bias": Field(False, _mamba_bool("mamba_proj_bias")),  # the mixer's in_proj / out_proj biases
    "time_step_limit": Field((0.0, math.inf), read_time_step_limit),
    "mamba_hidden_act": Field("silu", only("silu", problem="nopejax's Mamba2 conv activation and gate are silu",
                                           fix="import a silu Mamba2 model")),
    # transformers' NemotronH does not read these: accepted whatever they say
    "attention_bias": Field(False, harmless),  # NemotronHAttention builds q, k, v, o without biases
    "mamba_proj_bias": Field(False, harmless),  # the mixer's biases follow use_bias
    "expand": Field(2, harmless),  # the mixer's width is mamba_num_heads * mamba_head_dim
    "residual_in_fp32": Field(False, harmless),  # the residual stays in the weights' dtype
    "sliding_window": Field(None, harmless),  # the forward's mask is causal over every position
    "hidden_act": Field(None, harmless),  # the MLP reads mlp_hidden_act
    "rope_parameters": Field(None, harmless),  # no layer rotates
    "use_mamba_kernels": Field(True, harmless),  # deprecated, no effect
    "mamba_ssm_cache_dtype": Field("float32", harmless),  # generation cache only
    "num_logits_to_keep": Field(1, harmless),  # generation only
    "hidden_dropout": Field(0.0, harmless),
    **{key: Field(None, harmless) for key in LEGACY.values()},  # read by the rows of their current names
    "mtp_hybrid_override_pattern": Field(None, harmless),
    "num_nextn_predict_layers": Field(0, harmless),  # transformers builds no MTP layers (mtp.* tensors are refused)
    "mtp_layers_block_type": Field(None, harmless),
    # MoE fields: read by MoE layers only, which the layers row refuses
    "n_routed_experts": Field(8, harmless),
    "n_shared_experts": Field(1, harmless),
    "moe_intermediate_size": Field(7688, harmless),
    "moe_shared_expert_intermediate_size": Field(7688, harmless),
    "moe_latent_size": Field(None, harmless),
    "moe_shared_expert_overlap": Field(True, harmless),
    "num_experts_per_tok": Field(2, harmless),
    "routed_scaling_factor": Field(1.0, harmless),
    "n_group": Field(1, harmless),
    "topk_group": Field(1, harmless),
    "norm_topk_prob": Field(True, harmless),
    "output_router_logits": Field(False, harmless),
    "time_step_min": Field(0.001, harmless),  # dt's random init only
    "time_step_max": Field(0.1, harmless),
    "time_step_floor": Field(1e-4, harmless),
    "rescale_prenorm_residual": Field(True, harmless),  # init only
    # the hub checkpoints' config.json (NVIDIA's remote code) carries these; transformers' NemotronH
    # ignores them, so they are accepted only where they say what transformers computes anyway
    "auto_map": Field(None, harmless),  # remote-code class names; nopejax computes transformers' own
    "attention_head_dim": Field(None, agrees_with("head_dim", "transformers' NemotronH reads head_dim")),
    "rms_norm_eps": Field(None, agrees_with("layer_norm_epsilon", "transformers' NemotronH reads layer_norm_epsilon")),
    "norm_eps": Field(None, agrees_with("layer_norm_epsilon", "transformers' NemotronH reads layer_norm_epsilon")),
    "time_step_rank": Field(None, harmless),  # Mamba (v1) field, read by no Mamba2 layer
}  # fmt: skip

BASE = {"block": "pre_norm", "norm": "rms", "mamba_num_heads": 0}


LAYER_MAP = {
    "attn_norm": tensors.same("norm.weight", tensors.d_model),
    "mlp_norm": tensors.same("norm.weight", tensors.d_model),
    "wq": tensors.heads_in("mixer.q_proj.weight", "num_heads"),
    "wk": tensors.heads_in("mixer.k_proj.weight", "num_kv_heads"),
    "wv": tensors.heads_in("mixer.v_proj.weight", "num_kv_heads"),
    "wo": tensors.heads_out("mixer.o_proj.weight"),
    "w_up": tensors.linear("mixer.up_proj.weight", tensors.d_ff, tensors.width),
    "w_down": tensors.linear("mixer.down_proj.weight", tensors.width, tensors.d_ff),
    "up_bias": tensors.same("mixer.up_proj.bias", lambda m: (m.d_ff,)),
    "down_bias": tensors.same("mixer.down_proj.bias", tensors.d_model),
    **tensors.mamba2_rows("mixer"),
}


def _one_sublayer(m) -> bool:
    """Is every layer exactly one of Mamba2, attention or MLP?"""
    return all((spec.mixer == "none") != (spec.ffn == "none") for spec in layers.layer_specs(m))


def _kinds(m) -> list[str]:
    """layers_block_type of nopejax model `m`."""
    names = {"mamba2": "linear_attention", "attention": "full_attention", "none": "mlp"}
    return [names[spec.mixer] for spec in layers.layer_specs(m)]


# the layer kinds the format holds (LayerSpec.mixer, .ffn): fields.layer_kinds refuses any other
MIXERS = ("attention", "mamba2", "none")
FFNS = ("dense", "none")

LACKS = (
    ("num_experts", lambda m: m.num_experts != 0, "mapping of nopejax's SwiGLU experts (its experts are relu2)"),
    ("mlp_activation", lambda m: m.mlp_activation != "relu2", "gated (SwiGLU) MLP: its MLP is relu2"),
    ("ffn_types", lambda m: not _one_sublayer(m),
     "layer with both a mixer and an FFN (each of its layers is one of Mamba2, attention or MLP)"),
    ("layer_types", lambda m: any(s.mixer == "attention" and s.attention != "full" for s in layers.layer_specs(m)),
     "sliding or chunked attention"),
    ("no_rope_layers", lambda m: any(s.rope != "none" for s in layers.layer_specs(m)), "RoPE (its attention is NoPE)"),
    ("rope_scaling", lambda m: m.rope_scaling is not None, "RoPE scaling (its attention is NoPE)"),
    *fields.NOBODY_HAS,
    ("qk_norm", lambda m: m.qk_norm != "none", "QK-norm"),
    ("attention_bias", lambda m: m.attention_bias, "attention biases"),
    ("tie_embeddings", lambda m: m.tie_embeddings, "head tied to the embedding (NemotronHForCausalLM never ties)"),
    ("block", lambda m: m.block != "pre_norm", "block other than pre_norm"),
    ("norm", lambda m: m.norm != "rms", "LayerNorm (its norms are RMSNorm)"),
    ("logit_scale", lambda m: m.logit_scale != 1.0, "a logit scale"),
)  # fmt: skip


def _json_float(x: float):
    """inf as transformers 5 writes it in config.json ({"__float__": "Infinity"})."""
    return {"__float__": "Infinity"} if x == math.inf else x


def config_json(m) -> dict:
    d = MAMBA2.dims(m)
    limit = [_json_float(x) for x in d.time_step_limit]
    return {
        "layers_block_type": _kinds(m),
        "hidden_act": "relu2",  # read by nothing; says what the MLP computes
        "mlp_hidden_act": "relu2",
        "mlp_bias": bool(m.mlp_bias),
        "attention_bias": False,
        "layer_norm_epsilon": m.rms_norm_eps,
        "sliding_window": None,
        "ssm_state_size": d.state,
        "mamba_num_heads": d.heads,
        "mamba_head_dim": d.head_dim,
        "n_groups": d.groups,
        "conv_kernel": d.conv_kernel,
        "chunk_size": d.chunk,
        "use_conv_bias": d.conv_bias,
        "use_bias": d.use_bias,
        "mamba_proj_bias": d.use_bias,
        "time_step_limit": limit,
        "mamba_hidden_act": "silu",
    }
