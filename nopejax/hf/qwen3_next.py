"""Qwen3-Next (transformers `models/qwen3_next/modeling_qwen3_next.py`, `configuration_qwen3_next.py`).

Pre-norm layers, each a token mixer and an FFN. The mixer is a Gated DeltaNet ("linear_attention")
or gated attention ("full_attention"; by default every `full_attention_interval`-th layer): GQA with
partial RoPE (`partial_rotary_factor`, 0.25 by default), a per-head RMS QK-norm and a sigmoid output
gate that q_proj emits beside the queries. The FFN is a softmax top-k MoE with one gated shared
expert, or a dense SwiGLU on `mlp_only_layers` and off the `decoder_sparse_step` pattern. The block,
final and q/k RMSNorms scale by 1 + w (model.norm_unit_offset: the weights are stored as offsets and
read as they are); the Gated DeltaNet's gated output norm scales by its plain weight.

Layer i (`model.layers.{i}.`), beside the shared k/v/o and MLP rows of hf/tensors.py:

| HF tensor                                        | nopejax                          | transform                  |
|--------------------------------------------------|----------------------------------|----------------------------|
| input_layernorm / post_attention_layernorm       | attn_norm / mlp_norm             | - (1 + w in the forward)   |
| self_attn.q_proj.weight [H*2E, D]                | wq, attn_gate [D, H, E]          | W.T as [D, H, 2E], split   |
| self_attn.{q,k}_norm.weight [E]                  | {q,k}_norm [E]                   | -                          |
| linear_attn.in_proj_qkvz.weight [K(2E+2GO), D]   | gdn_{q,k,v,g}_proj               | per key head split / fused |
| linear_attn.in_proj_ba.weight [2H, D]            | gdn_{b,a}_proj [D, H]            | per key head split / fused |
| linear_attn.conv1d.weight [u, 1, k]              | gdn_conv1d_weight [k, u]         | W[:, 0, :].T               |
| linear_attn.{A_log, dt_bias} [H], norm.weight [O]| gdn_{A_log, dt_bias, o_norm}     | -                          |
| linear_attn.out_proj.weight [D, HO]              | gdn_o_proj [HO, D]               | W.T                        |
| mlp.gate.weight [X, D]                           | router [D, X]                    | W.T                        |
| mlp.experts.e.{gate,up,down}_proj.weight         | expert_{gate,up,down}[e]         | W.T, one per expert        |
| mlp.shared_expert.{gate,up,down}_proj.weight     | shared_{gate,up,down}            | W.T                        |
| mlp.shared_expert_gate.weight [1, D]             | shared_out_gate [D, 1]           | W.T                        |
| (none: Qwen3-Next has no expert bias)            | expert_bias [X]                  | zeros (export: must be 0)  |

q_proj lays each head's query and gate side by side (`view(..., H, 2E)`, then `chunk(2)`); the
fused GDN projections are grouped per key head (mixers/gated_deltanet.py `QWEN3_NEXT_TENSORS` and
its inverse `to_qwen3_next`).
"""

from __future__ import annotations

import numpy as np

from nopejax import config, layers, moe
from nopejax.hf import fields, tensors
from nopejax.hf.fields import Field, HFConfigError, harmless, only
from nopejax.mixers import gated_deltanet as gdn_lib
from nopejax.mixers.kinds import KINDS

GDN = KINDS["gated_deltanet"]
EXPORTS = (
    "ffn_types", "norm_unit_offset", "shared_expert_gate", "partial_rotary_factor", "gdn_key_heads",
    "gdn_value_heads", "gdn_key_head_dim", "gdn_value_head_dim", "gdn_conv_kernel", "gdn_chunk_size",
    "gdn_allow_neg_eigval", "gdn_norm_eps",
)  # fmt: skip
LAYER_TYPES = {"linear_attention": "gated_deltanet", "full_attention": "full_attention"}  # layer_types -> nopejax
# the layer kinds the format holds (fields.layer_kinds refuses the others on export)
MIXERS = ("attention", "gated_deltanet")
FFNS = ("dense", "moe")


def block_types(hf: dict) -> tuple[str, ...]:
    """layer_types as given, else full attention every full_attention_interval-th layer (Qwen3NextConfig)."""
    L, value = hf["num_hidden_layers"], hf["layer_types"]
    if value is None:
        n = fields.interval("full_attention_interval", hf["full_attention_interval"], "when layer_types is absent")
        value = fields.every(n, L, "linear_attention", "full_attention")
    return fields.kinds("layer_types", value, L, "Qwen3-Next", tuple(LAYER_TYPES))


def _has_gdn(hf: dict) -> bool:
    return "linear_attention" in block_types(hf)


def read_layer_types(name, value, hf):
    """The mixer per layer; every attention layer rotates (partial RoPE), a GDN layer takes no positions."""
    types = block_types(hf)
    return {
        "layer_types": tuple(LAYER_TYPES[t] for t in types),
        "no_rope_layers": tuple(int(t == "full_attention") for t in types),
    }


def _sparse(hf: dict) -> list[bool]:
    """Per layer: MoE (True) or dense, as Qwen3NextDecoderLayer decides it."""
    step, only_mlp = hf["decoder_sparse_step"], hf["mlp_only_layers"] or []
    step = fields.interval("decoder_sparse_step", step, "(the MoE layers are every step-th)")
    if not isinstance(only_mlp, list) or any(not isinstance(i, int) or isinstance(i, bool) for i in only_mlp):
        raise HFConfigError("mlp_only_layers", only_mlp, "must be a list of layer indices", "fix the list")
    experts = hf["num_experts"]
    if not isinstance(experts, int) or isinstance(experts, bool) or experts < 0:
        raise HFConfigError("num_experts", experts, "must be an integer >= 0", "fix the value in config.json")
    L = hf["num_hidden_layers"]
    return [i not in only_mlp and experts > 0 and (i + 1) % step == 0 for i in range(L)]


def read_experts(name, value, hf):
    """num_experts with decoder_sparse_step and mlp_only_layers: which layers are MoE; there, softmax top-k
    (renormalised when norm_topk_prob) over `num_experts`, and the shared expert of
    shared_expert_intermediate_size (a multiple of moe_intermediate_size in nopejax) behind its sigmoid gate."""
    sparse = _sparse(hf)
    ffn_types = tuple("moe" if s else "dense" for s in sparse)
    if not any(sparse):  # no layer is MoE: the expert fields are read by nothing
        return {"ffn_types": ffn_types}
    width = fields.positive_int("expert_d_ff")("moe_intermediate_size", hf["moe_intermediate_size"], hf)
    shared = hf["shared_expert_intermediate_size"]
    if not isinstance(shared, int) or isinstance(shared, bool) or shared < 1 or shared % width["expert_d_ff"]:
        raise HFConfigError(
            "shared_expert_intermediate_size", shared, "nopejax's shared expert is a whole number of routed "
            f"experts wide (moe_intermediate_size = {width['expert_d_ff']})",
            "import a checkpoint whose shared expert width is a positive multiple of moe_intermediate_size",
        )  # fmt: skip
    top_k = fields.positive_int("experts_per_token")("num_experts_per_tok", hf["num_experts_per_tok"], hf)
    normalize = fields.to("router_normalize", bool)("norm_topk_prob", hf["norm_topk_prob"], hf)
    return {
        "ffn_types": ffn_types, "num_experts": value, **width, **top_k, **normalize, "router": "softmax",
        "num_shared_experts": shared // width["expert_d_ff"], "shared_expert_gate": True,
    }  # fmt: skip


def _gdn_int(key: str):
    """A Gated DeltaNet size, read only when the model has Gated DeltaNet layers."""

    def read(name, value, hf):
        return fields.positive_int(key)(name, value, hf) if _has_gdn(hf) else {}

    return read


def _without_partial(d):
    return {k: v for k, v in d.items() if k != "partial_rotary_factor"} if isinstance(d, dict) else d


def read_rope(name, value, hf):
    """rope_parameters (or rope_scaling + rope_theta) as fields.read_rope reads them, with the rotated
    fraction: rope_parameters' partial_rotary_factor, else the top-level one, else 0.25 (Qwen3NextConfig)."""
    source = hf["rope_scaling"] or value or {}
    partial = source.get("partial_rotary_factor") if isinstance(source, dict) else None
    partial = hf["partial_rotary_factor"] if partial is None else partial
    if isinstance(partial, bool) or not isinstance(partial, (int, float)) or not 0 < partial <= 1:
        raise HFConfigError("partial_rotary_factor", partial, "must be in (0, 1]", "fix the value in config.json")
    plain = {**hf, "partial_rotary_factor": None, "rope_scaling": _without_partial(hf["rope_scaling"])}
    return {**fields.read_rope(name, _without_partial(value), plain), "partial_rotary_factor": float(partial)}


# the HF guide's table row (nopejax/reference.py): block and norms, per layer, the rest
GUIDE_ROW = (
    "pre_norm, RMSNorm scaling by 1 + w, per-head RMS QK-norm, gated attention output",
    "Gated DeltaNet or full attention (partial RoPE); MoE or dense (`mlp_only_layers`, `decoder_sparse_step`)",
    "softmax top-k, optionally renormalised; a shared expert behind a sigmoid gate; untied or tied head",
)

FIELDS = {
    **fields.common(without=("mlp_bias",), vocab_size=151936, hidden_size=2048, intermediate_size=5632,
                    num_hidden_layers=48, num_attention_heads=16, num_key_value_heads=2, max_position_embeddings=32768,
                    rms_norm_eps=1e-6, tie_word_embeddings=False, rope_theta=10_000.0),  # no MLP biases: refused
    "head_dim": Field(256, fields.read_head_dim_free),  # Qwen3NextAttention reads config.head_dim as is
    # q_proj's bias would hold the gate's bias too, which nopejax's attention gate does not have
    "attention_bias": Field(False, only(False, problem="q_proj's bias would carry the output gate's bias, "
                                        "which nopejax's gate lacks", fix="import a model without attention biases")),
    "rope_parameters": Field(None, read_rope),
    "partial_rotary_factor": Field(0.25, harmless),  # read by the rope_parameters row
    "layer_types": Field(None, read_layer_types),
    "full_attention_interval": Field(4, harmless),  # read by the layer_types row
    "linear_conv_kernel_dim": Field(4, _gdn_int("gdn_conv_kernel")),
    "linear_key_head_dim": Field(128, _gdn_int("gdn_key_head_dim")),
    "linear_value_head_dim": Field(128, _gdn_int("gdn_value_head_dim")),
    "linear_num_key_heads": Field(16, _gdn_int("gdn_key_heads")),
    "linear_num_value_heads": Field(32, _gdn_int("gdn_value_heads")),
    "num_experts": Field(512, read_experts),
    # read by the num_experts row
    "decoder_sparse_step": Field(1, harmless),
    "mlp_only_layers": Field(None, harmless),  # None: no layer (Qwen3NextConfig turns it into [])
    "moe_intermediate_size": Field(512, harmless),
    "shared_expert_intermediate_size": Field(512, harmless),
    "num_experts_per_tok": Field(10, harmless),
    "norm_topk_prob": Field(True, harmless),
    "output_router_logits": Field(False, harmless),  # what the forward returns
    "router_aux_loss_coef": Field(0.001, harmless),  # a training loss weight, not in the forward
    # the hub's Qwen3 configs may carry these; Qwen3NextModel masks causally over every position
    "use_sliding_window": Field(False, harmless),
    "sliding_window": Field(None, harmless),
}  # fmt: skip
BASE = {"block": "pre_norm", "norm": "rms", "norm_unit_offset": True, "qk_norm": "rms", "attention_gate": True}


def _q_and_gate_from_hf(w, m) -> dict:
    """q_proj [H * 2E, D] -> wq, attn_gate [D, H, E]: each head's rows are its query, then its gate."""
    w_DHz = w.T.reshape(m.d_model, m.num_heads, 2 * m.head_dim)
    return {"wq": w_DHz[..., : m.head_dim], "attn_gate": w_DHz[..., m.head_dim :]}


def _q_and_gate_to_hf(a, m) -> np.ndarray:
    return np.concatenate([a["wq"], a["attn_gate"]], axis=-1).reshape(m.d_model, -1).T


Q_PROJ = "self_attn.q_proj.weight"
GDN_PARAMS = tuple(GDN.prefix + name for name in gdn_lib.GATED_DELTANET_PARAMS)


def _gdn_from_hf(w, m) -> dict:
    d = GDN.dims(m)
    return {
        GDN.prefix + name: to_ours(np.asarray(w[f"linear_attn.{hf_name}"]), d)
        for name, (hf_name, to_ours) in gdn_lib.QWEN3_NEXT_TENSORS.items()
    }


def _gdn_to_hf(a, m) -> dict:
    ours = {name.removeprefix(GDN.prefix): np.asarray(x) for name, x in a.items()}
    return {f"linear_attn.{name}": x for name, x in gdn_lib.to_qwen3_next(ours, GDN.dims(m)).items()}


LAYER_MAP = {
    "attn_norm": tensors.same("input_layernorm.weight", tensors.d_model),
    "mlp_norm": tensors.same("post_attention_layernorm.weight", tensors.d_model),
    ("wq", "attn_gate"): tensors.Joint(
        lambda m: {Q_PROJ: (2 * m.num_heads * m.head_dim, m.d_model)},
        lambda a, m: {Q_PROJ: _q_and_gate_to_hf(a, m)},
        lambda w, m: _q_and_gate_from_hf(w[Q_PROJ], m),
    ),
    **{name: row for name, row in tensors.ATTENTION.items() if name != "wq"},
    "q_norm": tensors.same("self_attn.q_norm.weight", tensors.head_dim),
    "k_norm": tensors.same("self_attn.k_norm.weight", tensors.head_dim),
    GDN_PARAMS: tensors.Joint(
        lambda m: {f"linear_attn.{k}": v for k, v in gdn_lib.qwen3_next_shapes(GDN.dims(m)).items()},
        _gdn_to_hf,
        _gdn_from_hf,
    ),
    **tensors.mlp(),
    "router": tensors.linear("mlp.gate.weight", lambda m: m.num_experts, tensors.width),
    ("expert_gate", "expert_up", "expert_down"): tensors.per_expert("mlp.experts"),
    **tensors.shared_experts("mlp.shared_expert"),
    "shared_out_gate": tensors.linear("mlp.shared_expert_gate.weight", lambda m: 1, tensors.width),
    "expert_bias": tensors.Joint(lambda m: {}, lambda a, m: {}, lambda w, m: {"expert_bias": np.zeros(m.num_experts)}),
}


def _mixers_ok(m) -> bool:
    """Is every layer full attention or a Gated DeltaNet, each with an FFN?"""
    ok = {("attention", "full"), ("gated_deltanet", "full")}
    return all((s.mixer, s.attention) in ok and s.ffn != "none" for s in layers.layer_specs(m))


def _moe(m) -> bool:
    return any(s.ffn == "moe" for s in layers.layer_specs(m))


LACKS = (
    ("layer_types", lambda m: not _mixers_ok(m),
     "layer other than full attention or Gated DeltaNet followed by an FFN"),
    ("no_rope_layers", lambda m: any(s.mixer == "attention" and not s.use_rope for s in layers.layer_specs(m)),
     "NoPE attention layer (every attention layer rotates)"),
    ("rope_layout", lambda m: m.rope_layout != "half", "the interleaved RoPE layout"),
    ("rope_theta_local", lambda m: m.rope_theta_local is not None, "a separate RoPE base for local layers"),
    ("nope_temperature", lambda m: m.nope_temperature is not None, "a NoPE query temperature"),
    ("attention_chunk_size", lambda m: m.attention_chunk_size is not None, "chunked attention"),
    ("qk_norm", lambda m: m.qk_norm != "rms", "layer without the per-head RMS QK-norm"),
    ("attention_gate", lambda m: not m.attention_gate, "attention without the output gate"),
    ("attention_bias", lambda m: m.attention_bias, "attention biases nopejax can write (q_proj's holds the gate's)"),
    ("mlp_bias", lambda m: m.mlp_bias, "MLP biases"),
    ("mlp_activation", lambda m: m.mlp_activation != "swiglu", "non-gated MLP (its MLPs are SwiGLU)"),
    ("block", lambda m: m.block != "pre_norm", "block other than pre_norm"),
    ("norm", lambda m: m.norm != "rms", "LayerNorm (its norms are RMSNorm)"),
    ("norm_unit_offset", lambda m: not m.norm_unit_offset, "norm weights scaling by w (its RMSNorms scale by 1 + w)"),
    ("embed_scale", lambda m: m.embed_scale != 1.0, "embedding scale"),
    ("logit_scale", lambda m: m.logit_scale != 1.0, "a logit scale"),
    ("gdn_allow_neg_eigval", lambda m: m.gdn_allow_neg_eigval, "negative eigenvalues (beta in (0, 2))"),
    ("gdn_norm_eps", lambda m: m.gdn_norm_eps not in (None, m.rms_norm_eps),
     "separate eps for the Gated DeltaNet norm (it reads rms_norm_eps)"),
    ("router", lambda m: _moe(m) and m.router != "softmax", "sigmoid router (its router is softmax)"),
    ("routed_scale", lambda m: _moe(m) and m.routed_scale != 1.0, "routed output scale"),
    ("router_scale_input", lambda m: _moe(m) and m.router_scale_input, "expert inputs scaled by the router weight"),
    ("capacity_factor", lambda m: m.capacity_factor != 0, "capacity-limited routing (transformers is dropless)"),
    ("expert_bias_rate", lambda m: m.expert_bias_rate != 0, "expert bias (the update would make one)"),
    ("num_shared_experts", lambda m: _moe(m) and not m.num_shared_experts, "MoE layer without a shared expert"),
    ("shared_expert_gate", lambda m: _moe(m) and not m.shared_expert_gate, "shared expert without its sigmoid gate"),
)  # fmt: skip


def config_json(m) -> dict:
    specs = layers.layer_specs(m)
    d = GDN.dims(m) if any(s.mixer == "gated_deltanet" for s in specs) else None
    width = moe.expert_width(m) if _moe(m) else 512
    rope = {"rope_type": "default", "rope_theta": float(m.rope_theta)}
    if m.rope_scaling:
        rope = {**dict(m.rope_scaling), "rope_theta": float(m.rope_theta)}
        rope["rope_type"] = rope.pop("type", rope.get("rope_type"))
    rope["partial_rotary_factor"] = float(m.partial_rotary_factor)
    return {
        "layer_types": ["full_attention" if s.mixer == "attention" else "linear_attention" for s in specs],
        "rope_parameters": rope,
        "rope_scaling": dict(rope) if m.rope_scaling else None,
        "partial_rotary_factor": float(m.partial_rotary_factor),  # transformers < 5 reads it here
        # the Gated DeltaNet sizes; Qwen3NextConfig's defaults where no layer reads them
        "linear_conv_kernel_dim": d.conv_kernel if d else 4,
        "linear_key_head_dim": d.key_head_dim if d else 128,
        "linear_value_head_dim": d.value_head_dim if d else 128,
        "linear_num_key_heads": d.key_heads if d else 16,
        "linear_num_value_heads": d.value_heads if d else 32,
        # MoE on every layer but mlp_only_layers
        "num_experts": m.num_experts if _moe(m) else 0,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [i for i, s in enumerate(specs) if s.ffn != "moe"] if _moe(m) else [],
        "moe_intermediate_size": width,
        "shared_expert_intermediate_size": m.num_shared_experts * width if _moe(m) else 512,
        "num_experts_per_tok": m.experts_per_token if _moe(m) else 10,
        "norm_topk_prob": bool(m.router_normalize) if _moe(m) else True,
        "rms_norm_eps": m.rms_norm_eps,
        "attention_bias": False,
    }


def check_params(m, params) -> None:
    """Qwen3-Next has no expert bias: a nonzero one (trained with expert_bias_rate) cannot be written."""
    bias = np.asarray(params["layers"].get("expert_bias", np.zeros(1)))
    if np.any(bias != 0):
        raise config.ConfigError(
            "model.expert_bias_rate", f"the params hold a nonzero expert bias (max |b| = {np.abs(bias).max():.3g}), "
            "but the Qwen3Next format has no expert bias, so transformers would route differently",
            "export to afmoe, or train Qwen3-Next models with expert_bias_rate = 0",
        )  # fmt: skip
