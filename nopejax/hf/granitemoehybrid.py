"""Granite 4.0-H (transformers `models/granitemoehybrid/`: `modeling_granitemoehybrid.py`, its configuration).

Every layer is a pre-norm mixer, chosen per layer by `layer_types` ("mamba" / linear_attention a
Mamba2 mixer, "attention" / full_attention softmax attention; RoPE on every attention layer when
`position_embedding_type` is "rope", none otherwise), then a pre-norm FFN: with `num_local_experts`
> 0 a softmax top-k router over SwiGLU experts of width `intermediate_size` plus an always-on shared
SwiGLU of width `shared_intermediate_size` (nopejax: `num_shared_experts` experts of the routed
width, so it must be a multiple of it); with none, the shared SwiGLU alone (a dense FFN of width
`shared_intermediate_size`). The muP multipliers: embeddings times `embedding_multiplier`
(model.embed_scale), the softmax scale is `attention_multiplier` (model.attention_scale), each
sublayer's output times `residual_multiplier` before its residual add (model.residual_scale), the
logits divided by `logits_scaling` (model.logit_scale = 1 / logits_scaling).

Layer i (`model.layers.{i}.`), beside the attention rows of hf/tensors.py (`self_attn.`):

| HF tensor                                              | nopejax                           | transform          |
|--------------------------------------------------------|-----------------------------------|--------------------|
| input_layernorm / post_attention_layernorm             | attn_norm / mlp_norm              | -                  |
| mamba.in_proj.weight [Z, D] (+ .bias)                  | mamba_in_proj [D, Z]              | W.T                |
| mamba.conv1d.weight [u, 1, k] (+ .bias)                | mamba_conv1d_weight [k, u]        | W[:, 0, :].T       |
| mamba.{dt_bias, A_log, D} [H], mamba.norm.weight [I]   | mamba_{dt_bias, A_log, D, norm}   | -                  |
| mamba.out_proj.weight [D, I] (+ .bias)                 | mamba_out_proj [I, D]             | W.T                |
| shared_mlp.input_linear.weight [2F, D]                 | shared_{gate,up} / w_{gate,up}    | W.T, gate then up  |
| shared_mlp.output_linear.weight [D, F]                 | shared_down / w_down [F, D]       | W.T                |
| block_sparse_moe.router.layer.weight [X, D]            | router [D, X]                     | W.T                |
| block_sparse_moe.input_linear.weight [X, 2G, D]        | expert_{gate,up} [X, D, G]        | per expert W.T     |
| block_sparse_moe.output_linear.weight [X, D, G]        | expert_down [X, G, D]             | per expert W.T     |
| (none: Granite has no expert bias)                     | expert_bias [X]                   | zeros (export: 0)  |

(transformers renames the expert tensors in memory, `experts.gate_up_proj`, `router.weight`, and
saves them under these names, as the hub checkpoints are.) The Mamba2 mixer's gated norm and the
block norms share `rms_norm_eps`; its conv activation is `hidden_act`.
"""

from __future__ import annotations

import math

import numpy as np

from nopejax import layers, moe
from nopejax.hf import fields, tensors
from nopejax.hf.fields import Field, HFConfigError, harmless, only
from nopejax.mixers.kinds import KINDS

MAMBA2 = KINDS["mamba2"]
EXPORTS = (
    "attention_scale", "residual_scale", "mamba_num_heads", "mamba_head_dim", "mamba_groups", "mamba_state_size",
    "mamba_conv_kernel", "mamba_chunk_size", "mamba_conv_bias", "mamba_proj_bias", "mamba_time_step_limit",
)  # fmt: skip
# layer_types (the hub's names and transformers >= 5's, which it remaps them to) -> nopejax layer type
LAYER_KINDS = {
    "mamba": "mamba2",
    "linear_attention": "mamba2",
    "attention": "full_attention",
    "full_attention": "full_attention",
}


def _types(hf: dict) -> list:
    """layer_types as GraniteMoeHybridConfig resolves it: absent, every layer Mamba2."""
    value = hf["layer_types"]
    return ["mamba"] * hf["num_hidden_layers"] if value is None else value


def read_layers(name, value, hf):
    """The mixer of each layer (one per layer, as GraniteMoeHybridConfig checks), and RoPE on every
    attention layer or on none, as position_embedding_type says."""
    L, types = hf["num_hidden_layers"], _types(hf)
    if not isinstance(types, list) or len(types) != L or any(t not in LAYER_KINDS for t in types):
        raise HFConfigError(name, value, f"needs one of {sorted(LAYER_KINDS)} per layer ({L} layers)",
                            "fix the list")  # fmt: skip
    rope = hf["position_embedding_type"]
    if rope not in (None, "nope", "rope"):
        raise HFConfigError("position_embedding_type", rope, "transformers' Granite 4.0-H knows 'rope' and "
                            "treats anything else as no RoPE", "use 'rope' or 'nope'")  # fmt: skip
    kinds = tuple(LAYER_KINDS[t] for t in types)
    return {"layer_types": kinds, "no_rope_layers": tuple(int(rope == "rope" and k != "mamba2") for k in kinds)}


def _has_mamba(hf: dict) -> bool:
    types = _types(hf)
    return isinstance(types, list) and any(LAYER_KINDS.get(t) == "mamba2" for t in types)


def _count(name, value) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise HFConfigError(name, value, "must be a non-negative integer", "fix the value in config.json")
    return value


def read_ffn(name, value, hf):
    """num_local_experts > 0: routed SwiGLU experts of width intermediate_size (softmax over the top-k
    router logits) beside the shared SwiGLU of width shared_intermediate_size; 0: the shared SwiGLU
    alone, a dense FFN (transformers then reads neither intermediate_size nor num_experts_per_tok)."""
    experts, shared = _count(name, value), hf["shared_intermediate_size"]
    fields.positive_int("d_ff")("shared_intermediate_size", shared, hf)
    if not experts:
        return {"num_experts": 0, "d_ff": shared}
    width = fields.positive_int("expert_d_ff")("intermediate_size", hf["intermediate_size"], hf)["expert_d_ff"]
    k = fields.positive_int("experts_per_token")("num_experts_per_tok", hf["num_experts_per_tok"], hf)
    if k["experts_per_token"] > experts:
        raise HFConfigError("num_experts_per_tok", k["experts_per_token"], f"more than the {experts} experts",
                            "fix the value in config.json")  # fmt: skip
    if shared % width:
        raise HFConfigError(
            "shared_intermediate_size", shared, f"nopejax's shared SwiGLU is a whole number of experts of the "
            f"routed width (intermediate_size = {width})", "import a checkpoint whose shared width is a multiple "
            "of intermediate_size",
        )  # fmt: skip
    return {"num_experts": experts, "expert_d_ff": width, "d_ff": width, "num_shared_experts": shared // width,
            "router": "softmax", "router_normalize": True, **k}  # fmt: skip


def _mamba_int(key: str):
    """A Mamba2 size, read only when some layer is a Mamba2 layer."""

    def read(name, value, hf):
        return fields.positive_int(key)(name, value, hf) if _has_mamba(hf) else {}

    return read


def _mamba_bool(key: str):
    def read(name, value, hf):
        return fields.to(key, bool)(name, value, hf) if _has_mamba(hf) else {}

    return read


def read_mamba_head(name, value, hf):
    """mamba_d_head ("auto": mamba_expand * hidden_size / mamba_n_heads); transformers checks that
    mamba_n_heads * mamba_d_head == mamba_expand * hidden_size, and so does this row."""
    if not _has_mamba(hf):
        return {}
    expand, heads = hf["mamba_expand"], hf["mamba_n_heads"]
    if not isinstance(expand, int) or isinstance(expand, bool) or expand < 1:
        raise HFConfigError("mamba_expand", expand, "must be a positive integer", "fix the value in config.json")
    head_dim = expand * hf["hidden_size"] // heads if value == "auto" else value
    out = fields.positive_int("mamba_head_dim")(name, head_dim, hf)
    if head_dim * heads != expand * hf["hidden_size"]:
        raise HFConfigError(name, value, f"mamba_n_heads * mamba_d_head != mamba_expand * hidden_size = "
                            f"{expand * hf['hidden_size']}", "fix the Mamba2 sizes in config.json")  # fmt: skip
    return out


def _float(x):
    """transformers 5 writes inf as {"__float__": "Infinity"}."""
    if isinstance(x, dict) and set(x) == {"__float__"}:
        return float(x["__float__"].replace("Infinity", "inf"))
    return x


def read_time_step_limit(name, value, hf):
    """The (min, max) clamp of dt in the chunked scan; (0, inf) is no clamp (model.mamba_time_step_limit unset)."""
    if not _has_mamba(hf):
        return {}
    limit = [_float(x) for x in value] if isinstance(value, (list, tuple)) else value
    if not isinstance(limit, list) or len(limit) != 2 or not all(isinstance(x, (int, float)) for x in limit):
        raise HFConfigError(name, value, "must be [min, max]", "fix the value in config.json")
    limit = tuple(float(x) for x in limit)
    return {} if limit == (0.0, math.inf) else {"mamba_time_step_limit": limit}


def read_logits_scaling(name, value, hf):
    """transformers divides the logits by it; nopejax multiplies them by model.logit_scale = 1 / it."""
    return {"logit_scale": 1.0 / fields.positive_float("logit_scale")(name, value, hf)["logit_scale"]}


def read_rope(name, value, hf):
    """rope_parameters, read only when some layer rotates (position_embedding_type "rope")."""
    return fields.read_rope(name, value, hf) if hf["position_embedding_type"] == "rope" else {}


# the HF guide's table row (nopejax/reference.py): block and norms, per layer, the rest
GUIDE_ROW = (
    "pre_norm, RMSNorm; every layer a mixer and an FFN",
    "Mamba2 or full attention, any order; RoPE on all attention layers or none; every layer MoE (softmax top-k "
    "+ shared SwiGLU) or every layer dense",
    "muP multipliers (embedding, attention, residual, logits); Mamba2 conv / projection biases, attention "
    "biases; tied or untied head",
)

FIELDS = {
    **fields.common(without=("mlp_bias",), vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                    num_hidden_layers=32, num_attention_heads=32, max_position_embeddings=2048, rms_norm_eps=1e-6,
                    tie_word_embeddings=False, pad_token_id=None, bos_token_id=1, eos_token_id=2,
                    rope_theta=10_000.0),  # transformers' Granite 4.0-H MLPs have no biases: mlp_bias refused
    "head_dim": Field(None, fields.read_head_dim_free),  # not a class field; the attention reads it if set
    "intermediate_size": Field(11008, harmless),  # the experts' width: read by the num_local_experts row
    "layer_types": Field(None, read_layers),
    "position_embedding_type": Field(None, harmless),  # read by the layer_types row
    "rope_parameters": Field(None, read_rope),
    "num_local_experts": Field(8, read_ffn),
    "num_experts_per_tok": Field(2, harmless),  # read by the num_local_experts row
    "shared_intermediate_size": Field(1024, harmless),  # read by the num_local_experts row
    "embedding_multiplier": Field(1.0, fields.positive_float("embed_scale")),
    "attention_multiplier": Field(1.0, fields.positive_float("attention_scale")),
    "residual_multiplier": Field(1.0, fields.positive_float("residual_scale")),
    "logits_scaling": Field(1.0, read_logits_scaling),
    "mamba_n_heads": Field(128, _mamba_int("mamba_num_heads")),
    "mamba_n_groups": Field(1, _mamba_int("mamba_groups")),
    "mamba_d_state": Field(256, _mamba_int("mamba_state_size")),
    "mamba_d_head": Field("auto", read_mamba_head),
    "mamba_d_conv": Field(4, _mamba_int("mamba_conv_kernel")),
    "mamba_expand": Field(2, harmless),  # read by the mamba_d_head row
    "mamba_chunk_size": Field(256, _mamba_int("mamba_chunk_size")),
    "mamba_conv_bias": Field(True, _mamba_bool("mamba_conv_bias")),
    "mamba_proj_bias": Field(False, _mamba_bool("mamba_proj_bias")),
    "time_step_limit": Field((0.0, math.inf), read_time_step_limit),
    # training-time only: the router's auxiliary loss and its outputs
    "output_router_logits": Field(False, harmless),
    "router_aux_loss_coef": Field(0.001, harmless),
    # the hub checkpoints' config.json carries these (IBM's training code); transformers' Granite 4.0-H
    # does not read them, so they are accepted only where they say what transformers computes anyway
    "init_method": Field(None, harmless),  # "mup": the random init only
    "normalization_function": Field(None, only(None, "rmsnorm", problem="transformers' Granite 4.0-H norms are "
                                               "RMSNorm", fix="remove it")),
    "layers_block_type": Field(None, harmless),  # transformers' alias of layer_types, never written
}  # fmt: skip
BASE = {"block": "pre_norm", "norm": "rms", "mamba_num_heads": 0, "no_rope_layer_interval": 0}


SHARED = "shared_mlp.input_linear.weight"
EXPERTS_IN = "block_sparse_moe.input_linear.weight"


def _gate_up(names: tuple, suffix: str, down: str, width) -> dict:
    """A SwiGLU whose gate and up are one [2F, D] Linear (gate the first half), and its [D, F] down."""
    return {
        names[:2]: tensors.Joint(
            lambda m: {suffix: (2 * width(m), m.d_model)},
            lambda a, m: {suffix: np.concatenate([a[names[0]], a[names[1]]], -1).T},
            lambda w, m: dict(zip(names[:2], np.split(w[suffix].T, 2, -1))),
        ),
        names[2]: tensors.linear(down, tensors.width, width),
    }


LAYER_MAP = {
    **tensors.ATTENTION,
    **tensors.ATTENTION_BIASES,
    "attn_norm": tensors.same("input_layernorm.weight", tensors.d_model),
    "mlp_norm": tensors.same("post_attention_layernorm.weight", tensors.d_model),
    **tensors.mamba2_rows("mamba"),
    **_gate_up(("w_gate", "w_up", "w_down"), SHARED, "shared_mlp.output_linear.weight", tensors.d_ff),
    **_gate_up(("shared_gate", "shared_up", "shared_down"), SHARED, "shared_mlp.output_linear.weight",
               tensors.shared_width),
    "router": tensors.linear("block_sparse_moe.router.layer.weight", lambda m: m.num_experts, tensors.width),
    ("expert_gate", "expert_up"): tensors.Joint(  # [X, 2G, D]: per expert the Linear weight of gate then up
        lambda m: {EXPERTS_IN: (m.num_experts, 2 * moe.expert_width(m), m.d_model)},
        lambda a, m: {EXPERTS_IN: np.concatenate([a["expert_gate"], a["expert_up"]], -1).transpose(0, 2, 1)},
        lambda w, m: dict(zip(("expert_gate", "expert_up"), np.split(w[EXPERTS_IN].transpose(0, 2, 1), 2, -1))),
    ),
    "expert_down": tensors.Tensor(
        "block_sparse_moe.output_linear.weight", lambda m: (m.num_experts, m.d_model, moe.expert_width(m)),
        lambda a: a.transpose(0, 2, 1), lambda w, m: w.transpose(0, 2, 1),
    ),
    "expert_bias": tensors.NO_EXPERT_BIAS,
}  # fmt: skip

check_params = fields.no_expert_bias("GraniteMoeHybrid", "train Granite 4.0-H models with expert_bias_rate = 0")

# the layer kinds the format holds (LayerSpec.mixer, .ffn): fields.layer_kinds refuses any other
MIXERS = ("attention", "mamba2")
FFNS = ("dense", "moe")


def _attention_specs(m) -> list:
    return [spec for spec in layers.layer_specs(m) if spec.mixer == "attention"]


def _mamba_expand_whole(m) -> bool:
    return not any(s.mixer == "mamba2" for s in layers.layer_specs(m)) or (
        m.mamba_num_heads * m.mamba_head_dim % m.d_model == 0
    )


LACKS = (
    ("ffn_types", lambda m: len({spec.ffn for spec in layers.layer_specs(m)}) > 1,
     "mix of dense and MoE layers (every layer has experts, or none has)"),
    ("layer_types", lambda m: any(s.attention != "full" for s in _attention_specs(m)), "sliding or chunked attention"),
    ("no_rope_layers", lambda m: len({s.rope for s in _attention_specs(m)}) > 1,
     "mix of RoPE and NoPE attention layers (position_embedding_type is one for every layer)"),
    ("rope_layout", lambda m: any(s.use_rope and s.rope_layout != "half" for s in _attention_specs(m)),
     "the interleaved RoPE layout"),
    ("partial_rotary_factor", lambda m: m.partial_rotary_factor != 1.0, "partial RoPE"),
    ("rope_theta_local", lambda m: m.rope_theta_local is not None, "a separate RoPE base for local layers"),
    ("attention_chunk_size", lambda m: m.attention_chunk_size is not None, "chunked attention"),
    ("nope_temperature", lambda m: m.nope_temperature is not None, "a NoPE query temperature"),
    ("attention_gate", lambda m: m.attention_gate, "gated attention output"),
    ("qk_norm", lambda m: m.qk_norm != "none", "QK-norm"),
    ("block", lambda m: m.block != "pre_norm", "block other than pre_norm"),
    ("norm", lambda m: m.norm != "rms", "LayerNorm (its norms are RMSNorm)"),
    ("mlp_activation", lambda m: m.mlp_activation != "swiglu", "relu2 MLP (its MLPs are SwiGLU)"),
    ("mlp_bias", lambda m: m.mlp_bias, "MLP biases"),
    ("mamba_head_dim", lambda m: not _mamba_expand_whole(m),
     "Mamba2 width other than a whole multiple of hidden_size (mamba_expand is an integer)"),
    ("router", lambda m: m.num_experts and m.router != "softmax", "sigmoid router (its router is softmax)"),
    ("router_normalize", lambda m: m.num_experts and not m.router_normalize,
     "unnormalised top-k weights (it takes the softmax over the top-k logits)"),
    ("routed_scale", lambda m: m.routed_scale != 1.0, "routed-output scale"),
    ("router_scale_input", lambda m: m.router_scale_input, "expert inputs scaled by the router weight"),
    ("capacity_factor", lambda m: m.capacity_factor != 0, "capacity-limited routing (transformers is dropless)"),
    ("num_shared_experts", lambda m: m.num_experts and not m.num_shared_experts,
     "MoE layer without the shared SwiGLU"),
    ("expert_bias_rate", lambda m: m.expert_bias_rate != 0, "expert bias (the update would make one)"),
)  # fmt: skip


def _json_float(x: float):
    """inf as transformers 5 writes it in config.json ({"__float__": "Infinity"})."""
    return {"__float__": "Infinity"} if x == math.inf else x


def config_json(m) -> dict:
    specs = layers.layer_specs(m)
    moe_layers = m.num_experts and specs[0].ffn == "moe"
    out = {
        "layer_types": ["mamba" if s.mixer == "mamba2" else "attention" for s in specs],
        "position_embedding_type": "rope" if any(s.use_rope for s in specs) else "nope",
        "intermediate_size": moe.expert_width(m) if moe_layers else m.d_ff,
        "num_local_experts": m.num_experts if moe_layers else 0,
        "num_experts_per_tok": m.experts_per_token,
        "shared_intermediate_size": m.num_shared_experts * moe.expert_width(m) if moe_layers else m.d_ff,
        "embedding_multiplier": float(m.embed_scale),
        "attention_multiplier": float(m.attention_scale or m.head_dim**-0.5),
        "residual_multiplier": float(m.residual_scale),
        "logits_scaling": 1.0 / m.logit_scale,
        "rms_norm_eps": m.rms_norm_eps,
        "attention_bias": bool(m.attention_bias),
    }
    if not any(s.mixer == "mamba2" for s in specs):  # read by no layer, but GraniteMoeHybridConfig checks
        return {**out, "mamba_n_heads": 1, "mamba_d_head": m.d_model, "mamba_expand": 1}  # heads * head == width
    d = MAMBA2.dims(m)
    out.update(
        mamba_n_heads=d.heads, mamba_n_groups=d.groups, mamba_d_state=d.state, mamba_d_head=d.head_dim,
        mamba_d_conv=d.conv_kernel, mamba_expand=d.inner // m.d_model, mamba_chunk_size=d.chunk,
        mamba_conv_bias=d.conv_bias, mamba_proj_bias=d.use_bias,
        time_step_limit=[_json_float(x) for x in d.time_step_limit],
    )  # fmt: skip
    return out
