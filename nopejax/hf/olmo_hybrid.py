"""OLMo Hybrid (transformers `models/olmo_hybrid/modeling_olmo_hybrid.py`, `configuration_olmo_hybrid.py`).

Each layer is Gated DeltaNet (`linear_attention`) or attention (`full_attention`), both with a SwiGLU MLP;
by default every 4th layer is attention. The two kinds sit in different blocks: attention layers are
OLMo 2's post-norm (no input norms, the attention and MLP outputs normed before the residual add:
`model.block` post_norm), GDN layers pre-norm (`model.recurrent_block` pre_norm). The attention's
QK-norm is one RMSNorm over the whole q (k) projection, all heads together (`model.qk_norm` rms_proj).
Attention rotates with RoPE unless the resolved `rope_theta` is null (NoPE on every attention layer);
note that transformers fills a missing `rope_parameters` with rope_theta 10000, so NoPE needs the null
written out. The GDN output norm's eps is 1e-5 whatever `rms_norm_eps` says; its conv activation is
`hidden_act` (silu). transformers' chunked delta rule uses 64-token chunks (`model.gdn_chunk_size`).

Tensor names are the checkpoint's, as `save_pretrained` writes them: transformers' conversion_mapping renames
the GDN layers' norms and concatenates the three convs on load (the table's first rows and the conv row).
`save_pretrained` splits the conv back into equal thirds, which are q, k and v only where key_dim equals
value_dim; nopejax writes and reads the q | k | v split (key_dim, key_dim, value_dim) and refuses, by shape,
files split otherwise. Layer i (`model.layers.{i}.`), beside the attention and MLP rows of hf/tensors.py:

| HF tensor                                   | nopejax                      | transform                |
|---------------------------------------------|------------------------------|--------------------------|
| attention_layer_norm.weight [D] (GDN)       | attn_norm [D]                | -                        |
| feedforward_layer_norm.weight [D] (GDN)     | mlp_norm [D]                 | -                        |
| feedforward_layer_norm.weight [D] (attn)    | attn_post_norm [D]           | -                        |
| post_feedforward_layernorm.weight [D] (attn)| mlp_post_norm [D]            | -                        |
| self_attn.q_norm.weight [H*E]               | q_norm [H, E]                | reshaped                 |
| self_attn.k_norm.weight [K*E]               | k_norm [K, E]                | reshaped                 |
| linear_attn.{q,k,v,a,b,g}_proj.weight [z, D]| gdn_{q,k,v,a,b,g}_proj [D, z]| W.T                      |
| linear_attn.{q,k,v}_conv1d.weight [., 1, k] | gdn_conv1d_weight [k, u]     | concatenated, W[:, 0, :].T |
| linear_attn.{A_log, dt_bias} [H]            | gdn_{A_log, dt_bias}         | -                        |
| linear_attn.o_norm.weight [O]               | gdn_o_norm                   | -                        |
| linear_attn.o_proj.weight [D, H*O]          | gdn_o_proj [H*O, D]          | W.T                      |
"""

from __future__ import annotations

import numpy as np

from nopejax import layers
from nopejax.hf import fields, tensors
from nopejax.hf.fields import Field, HFConfigError, harmless
from nopejax.mixers import gated_deltanet as gdn_lib
from nopejax.mixers.kinds import KINDS

GDN = KINDS["gated_deltanet"]
O_NORM_EPS = 1e-5  # OlmoHybridGatedDeltaNet's o_norm: fixed, not rms_norm_eps
HF_CHUNK = 64  # torch_chunk_gated_delta_rule's chunk_size
EXPORTS = (
    "recurrent_block", "gdn_key_heads", "gdn_value_heads", "gdn_key_head_dim", "gdn_value_head_dim",
    "gdn_conv_kernel", "gdn_allow_neg_eigval", "gdn_norm_eps",
    "gdn_chunk_size",  # the chunked form's length: how the same function is computed, not which
)  # fmt: skip
TYPES = {"linear_attention": "gated_deltanet", "full_attention": "full_attention"}  # layer_types -> nopejax
REVERSE = {"gated_deltanet": "linear_attention", "attention": "full_attention"}  # LayerSpec.mixer -> layer_types


def read_layer_types(name, value, hf):
    """layer_types as given, else OlmoHybridConfig's default (linear, attention every 4th layer, the last
    attention when none is); at least one layer of each kind, as transformers' validation demands."""
    L = hf["num_hidden_layers"]
    if value is None:
        value = fields.every(4, L, "linear_attention", "full_attention")
        if "full_attention" not in value:
            value[-1] = "full_attention"
    types = fields.kinds(name, value, L, "OLMo Hybrid", allowed=tuple(TYPES))
    if len(value) != L:
        raise HFConfigError(name, value, f"transformers needs one entry per layer ({L} layers)", "fix the list")
    if set(types) != set(TYPES):
        raise HFConfigError(name, value, "OLMo Hybrid needs at least one linear_attention and one full_attention "
                            "layer (transformers refuses the config otherwise)", "fix the list")  # fmt: skip
    return {"layer_types": tuple(TYPES[t] for t in types)}


def _theta(hf: dict):
    """rope_theta as transformers resolves it: rope_scaling or rope_parameters' own (even null), else the
    top-level field (even null), else the class default (this row's default)."""
    params = hf["rope_scaling"] or hf["rope_parameters"] or {}
    return params["rope_theta"] if isinstance(params, dict) and "rope_theta" in params else hf["rope_theta"]


def read_rope(name, value, hf):
    """RoPE on every attention layer, or on none where the resolved rope_theta is null (OlmoHybridModel
    then builds no rotary embedding, whatever else rope_parameters says)."""
    rope = _theta(hf) is not None
    types = read_layer_types("layer_types", hf["layer_types"], hf)["layer_types"]
    out = {"no_rope_layers": tuple(int(rope and t == "full_attention") for t in types)}
    return {**fields.read_rope(name, value, hf), **out} if rope else out


def _gdn_size(key: str, default):
    """A linear_* size: as given, else OlmoHybridConfig's default from the other fields."""

    def read(name, value, hf):
        return fields.positive_int(key)(name, default(hf) if value is None else value, hf)

    return read


def _key_heads(hf):
    return hf["num_attention_heads"] if hf["linear_num_key_heads"] is None else hf["linear_num_key_heads"]


def _key_head_dim(hf):
    return (
        int(0.75 * hf["hidden_size"] / _key_heads(hf))
        if hf["linear_key_head_dim"] is None
        else hf["linear_key_head_dim"]
    )


def read_value_heads(name, value, hf):
    heads = hf["num_attention_heads"] if value is None else value
    if isinstance(heads, int) and heads % _key_heads(hf):
        raise HFConfigError(name, value, f"not a multiple of linear_num_key_heads = {_key_heads(hf)} (each key head "
                            "serves an equal group of value heads)", "fix the value in config.json")  # fmt: skip
    return fields.positive_int("gdn_value_heads")(name, heads, hf)


# the HF guide's table row (nopejax/reference.py): block and norms, per layer, the rest
GUIDE_ROW = (
    "post_norm attention, pre_norm Gated DeltaNet; RMSNorm + whole-projection RMS QK-norm",
    "Gated DeltaNet or full attention (RoPE on all attention layers, or NoPE when rope_theta is null)",
    "attention biases; tied or untied head",
)

FIELDS = {
    **fields.common(without=("mlp_bias",), vocab_size=100352, hidden_size=3840, intermediate_size=11008,
                    num_hidden_layers=32, num_attention_heads=30, max_position_embeddings=65536,
                    rms_norm_eps=1e-6, tie_word_embeddings=False, rope_theta=10_000.0, pad_token_id=100277,
                    eos_token_id=100257),
    # OlmoHybridAttention reads config.head_dim when config.json has one (the class has no such field)
    "head_dim": Field(None, fields.read_head_dim_free),
    "rope_parameters": Field(None, read_rope),
    "layer_types": Field(None, read_layer_types),
    "linear_num_key_heads": Field(None, _gdn_size("gdn_key_heads", _key_heads)),
    "linear_num_value_heads": Field(None, read_value_heads),
    "linear_key_head_dim": Field(None, _gdn_size("gdn_key_head_dim", _key_head_dim)),
    "linear_value_head_dim": Field(None, _gdn_size("gdn_value_head_dim", lambda hf: 2 * _key_head_dim(hf))),
    "linear_conv_kernel_dim": Field(4, fields.positive_int("gdn_conv_kernel")),
    "linear_allow_neg_eigval": Field(True, fields.to("gdn_allow_neg_eigval", bool)),
    # the GDN's random init only; the weights are loaded
    "linear_a_log_min": Field(0.0, harmless),
    "linear_a_log_max": Field(16.0, harmless),
    "linear_dt_min": Field(0.001, harmless),
    "linear_dt_max": Field(0.1, harmless),
    "linear_dt_init_floor": Field(1e-4, harmless),
}  # fmt: skip
BASE = {"block": "post_norm", "recurrent_block": "pre_norm", "qk_norm": "rms_proj", "gdn_norm_eps": O_NORM_EPS,
        "gdn_chunk_size": HF_CHUNK}  # fmt: skip


def _heads_norm(suffix: str, heads: str) -> tensors.Tensor:
    """A whole-projection norm weight: HF [heads * E], ours [heads, E]."""
    shape = lambda m: (m[heads] * m.head_dim,)
    return tensors.Tensor(suffix, shape, lambda a: a.reshape(-1), lambda w, m: w.reshape(m[heads], m.head_dim))


CONVS = ("q_conv1d.weight", "k_conv1d.weight", "v_conv1d.weight")


def _conv_widths(m) -> tuple:
    d = GDN.dims(m)
    return d.key_dim, d.key_dim, d.value_dim


def _conv_row() -> tensors.Joint:
    """The checkpoint keeps the q, k and v convs apart ([key_dim | key_dim | value_dim, 1, k]); transformers'
    conversion_mapping concatenates them into the mixer's one conv1d.weight on load."""
    _, from_hf = GDN.hf_tensors["conv1d_weight"]

    def to_hf(ours, m):
        w = ours[GDN.prefix + "conv1d_weight"].T[:, None, :]  # [u, 1, k]
        cuts = np.cumsum(_conv_widths(m))[:-1]
        return {f"linear_attn.{s}": part for s, part in zip(CONVS, np.split(w, cuts, axis=0))}

    def read(ws, m):
        w = np.concatenate([ws[f"linear_attn.{s}"] for s in CONVS], axis=0)
        return {GDN.prefix + "conv1d_weight": from_hf(w, GDN.dims(m))}

    def shapes(m):
        return {f"linear_attn.{s}": (u, 1, GDN.dims(m).conv_kernel) for s, u in zip(CONVS, _conv_widths(m))}

    return tensors.Joint(shapes, to_hf, read)


def _gdn_rows() -> dict:
    """The Gated DeltaNet rows, from mixers/gated_deltanet.py's HF_TENSORS (OLMo Hybrid's names in the mixer)."""
    linear = {"q_proj", "k_proj", "v_proj", "a_proj", "b_proj", "g_proj", "o_proj"}
    rows = {(GDN.prefix + "conv1d_weight",): _conv_row()}
    for name, (suffix, from_hf) in GDN.hf_tensors.items():
        if name == "conv1d_weight":
            continue
        shape_fn = gdn_lib.GATED_DELTANET_PARAMS[name][0]
        if name in linear:
            hf_shape, to_hf = (lambda m, f=shape_fn: f(GDN.dims(m))[::-1]), (lambda a: a.T)
        else:
            hf_shape, to_hf = (lambda m, f=shape_fn: f(GDN.dims(m))), (lambda a: a)
        rows[GDN.prefix + name] = tensors.Tensor(
            f"linear_attn.{suffix}", hf_shape, to_hf, lambda w, m, f=from_hf: f(w, GDN.dims(m))
        )
    return rows


LAYER_MAP = {
    **tensors.ATTENTION,
    **tensors.ATTENTION_BIASES,
    **tensors.mlp(),
    # the checkpoint's names (transformers renames them on load: attention_layer_norm -> input_layernorm,
    # feedforward_layer_norm -> post_attention_layernorm); GDN layers are pre_norm, attention layers post_norm
    "attn_norm": tensors.same("attention_layer_norm.weight", tensors.d_model),
    "mlp_norm": tensors.same("feedforward_layer_norm.weight", tensors.d_model),
    "attn_post_norm": tensors.same("feedforward_layer_norm.weight", tensors.d_model),
    "mlp_post_norm": tensors.same("post_feedforward_layernorm.weight", tensors.d_model),
    "q_norm": _heads_norm("self_attn.q_norm.weight", "num_heads"),
    "k_norm": _heads_norm("self_attn.k_norm.weight", "num_kv_heads"),
    **_gdn_rows(),
}


def _attention_specs(m) -> list:
    return [s for s in layers.layer_specs(m) if s.mixer == "attention"]


def _kinds_held(m) -> bool:
    """Is every layer full attention or GDN, each with a dense FFN, and both kinds present?"""
    specs = layers.layer_specs(m)
    ok = all((s.mixer == "gated_deltanet" or (s.mixer == "attention" and s.attention == "full")) for s in specs)
    return ok and {s.mixer for s in specs} == {"attention", "gated_deltanet"}


def _rope_everywhere_or_nowhere(m) -> bool:
    return len({s.use_rope for s in _attention_specs(m)}) <= 1


def _nope(m) -> bool:
    return not any(s.use_rope for s in _attention_specs(m))


# the layer kinds the format holds (fields.layer_kinds refuses the others on export)
MIXERS = ("attention", "gated_deltanet")
FFNS = ("dense",)

LACKS = (
    *fields.NOBODY_HAS,
    ("layer_types", lambda m: not _kinds_held(m),
     "layer other than Gated DeltaNet or full attention, nor a model without both kinds"),
    ("ffn_types", lambda m: any(s.ffn != "dense" for s in layers.layer_specs(m)), "layer without a dense MLP"),
    ("mlp_activation", lambda m: m.mlp_activation != "swiglu", "non-gated MLP (its MLP is SwiGLU)"),
    ("mlp_bias", lambda m: m.mlp_bias, "MLP biases"),
    ("no_rope_layers", lambda m: not _rope_everywhere_or_nowhere(m),
     "RoPE on some attention layers only (it rotates on all of them or, rope_theta null, on none)"),
    ("rope_scaling", lambda m: m.rope_scaling is not None and _nope(m), "RoPE scaling without RoPE"),
    ("rope_layout", lambda m: m.rope_layout != "half" and not _nope(m), "the interleaved RoPE layout"),
    ("qk_norm", lambda m: m.qk_norm != "rms_proj", "attention without the whole-projection RMS QK-norm"),
    ("block", lambda m: m.block != "post_norm", "attention block other than post_norm"),
    ("recurrent_block", lambda m: m.recurrent_block != "pre_norm", "Gated DeltaNet block other than pre_norm"),
    ("norm", lambda m: m.norm != "rms", "LayerNorm (its norms are RMSNorm)"),
    ("logit_scale", lambda m: m.logit_scale != 1.0, "a logit scale"),
    ("gdn_norm_eps", lambda m: m.gdn_norm_eps != O_NORM_EPS, f"GDN output-norm eps other than {O_NORM_EPS}"),
)  # fmt: skip


def config_json(m) -> dict:
    d = GDN.dims(m)
    out = {
        "layer_types": [REVERSE[s.mixer] for s in layers.layer_specs(m)],
        "rms_norm_eps": m.rms_norm_eps,
        "attention_bias": bool(m.attention_bias),
        "linear_num_key_heads": d.key_heads,
        "linear_num_value_heads": d.value_heads,
        "linear_key_head_dim": d.key_head_dim,
        "linear_value_head_dim": d.value_head_dim,
        "linear_conv_kernel_dim": d.conv_kernel,
        "linear_allow_neg_eigval": bool(d.allow_neg_eigval),
    }
    if _nope(m):  # written out: transformers fills an absent rope_parameters with RoPE at 10000
        out.update(rope_theta=None, rope_scaling=None, rope_parameters=None)
    return out
