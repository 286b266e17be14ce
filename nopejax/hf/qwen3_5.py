"""Qwen3.5, the text model (transformers `models/qwen3_5/modeling_qwen3_5.py`, `configuration_qwen3_5.py`:
Qwen3_5ForCausalLM, config class Qwen3_5TextConfig, model_type `qwen3_5_text`).

Qwen3-Next's layers (hf/qwen3_next.py, as transformers builds Qwen3.5 from them in modular_qwen3_5.py):
pre-norm, a Gated DeltaNet ("linear_attention") or gated attention ("full_attention", every
`full_attention_interval`-th layer by default) with partial RoPE, per-head RMS QK-norm and the sigmoid output
gate q_proj emits beside the queries; block, final and q/k RMSNorms scale by 1 + w (model.norm_unit_offset).
What differs, read off the modeling file:

- the Gated DeltaNet's input projections are unfused: `in_proj_qkv` holds q, k, v stacked in the conv's
  channel order, `in_proj_z` (our g_proj), `in_proj_b` and `in_proj_a` are apart (mixers/gated_deltanet.py
  `QWEN3_5_TENSORS`, inverse `to_qwen3_5`); the delta rule, conv, gates and gated norm are Qwen3-Next's;
- every FFN is a dense SwiGLU of `intermediate_size` (Qwen3.5 MoE is hf/qwen3_5_moe.py);
- RoPE is multimodal (mRoPE): `rope_parameters.mrope_section` assigns the rotated frequencies to time,
  height and width position streams (interleaved). For text Qwen3_5TextModel gives the three streams the
  same positions, so every frequency turns by the token's position and the rotation is ordinary partial
  RoPE (tests/hf/test_hf_qwen3_5.py checks transformers' cos / sin against the plain formula).
  `mrope_section` and `mrope_interleaved` are therefore accepted, type-checked, and not written on export.

Layer i (`model.layers.{i}.`), beside the shared k/v/o and MLP rows of hf/tensors.py and Qwen3-Next's
norm, q_proj (query and gate) and q/k-norm rows:

| HF tensor                                        | nopejax                          | transform                  |
|--------------------------------------------------|----------------------------------|----------------------------|
| linear_attn.in_proj_qkv.weight [2KE + HO, D]     | gdn_{q,k,v}_proj [D, KE / HO]    | rows split, W.T            |
| linear_attn.in_proj_{z,b,a}.weight [HO / H, D]   | gdn_{g,b,a}_proj [D, HO / H]     | W.T                        |
| linear_attn.conv1d.weight [u, 1, k]              | gdn_conv1d_weight [k, u]         | W[:, 0, :].T               |
| linear_attn.{A_log, dt_bias} [H], norm.weight [O]| gdn_{A_log, dt_bias, o_norm}     | -                          |
| linear_attn.out_proj.weight [D, HO]              | gdn_o_proj [HO, D]               | W.T                        |

The published checkpoints (Qwen/Qwen3.5-*) are the multimodal Qwen3_5ForConditionalGeneration: config.json
of model_type `qwen3_5` holds the text model's fields under `text_config` beside `vision_config`, and the
tensors are `model.language_model.*` beside the vision tower's `model.visual.*` and the MTP head's `mtp.*`.
nopejax imports the text model and never skips a weight, so that directory is refused in one line
(hf/__init__.py `MULTIMODAL`) naming the fix, `Qwen3_5ForCausalLM.from_pretrained(dir).save_pretrained(
text_dir)`: transformers reads `text_config` (Qwen3_5TextConfig.base_config_key), leaves the vision and MTP
weights behind and writes a `qwen3_5_text` config.json with the tensors still named `model.language_model.*`,
which import reads as this family's other spelling (`IMPORT_OUTERS`; export writes `model.*`, as
save_pretrained of a Qwen3_5ForCausalLM built from its config does; transformers loads both).
"""

from __future__ import annotations

import numpy as np

from nopejax.hf import fields, qwen3_next, tensors
from nopejax.hf.fields import Field, HFConfigError, harmless, only
from nopejax.mixers import gated_deltanet as gdn_lib

GDN = qwen3_next.GDN
EXPORTS = (
    "ffn_types", "norm_unit_offset", "partial_rotary_factor", "gdn_key_heads", "gdn_value_heads", "gdn_key_head_dim",
    "gdn_value_head_dim", "gdn_conv_kernel", "gdn_chunk_size", "gdn_allow_neg_eigval", "gdn_norm_eps",
)  # fmt: skip
MIXERS = qwen3_next.MIXERS
FFNS = ("dense",)
# the text model's tensors as the hub's multimodal checkpoints (and a Qwen3_5ForCausalLM loaded from one) name them
IMPORT_OUTERS = (
    tensors.Outer("model.language_model.embed_tokens.weight", "model.language_model.layers",
                  "model.language_model.norm.weight"),
)  # fmt: skip


def read_layer_types(name, value, hf):
    """layer_types as given, else full attention every full_attention_interval-th layer (Qwen3_5TextConfig);
    every attention layer rotates (partial RoPE), a GDN layer takes no positions."""
    L = hf["num_hidden_layers"]
    if value is None:
        n = fields.interval("full_attention_interval", hf["full_attention_interval"], "when layer_types is absent")
        value = fields.every(n, L, "linear_attention", "full_attention")
    types = fields.kinds("layer_types", value, L, "Qwen3.5", tuple(qwen3_next.LAYER_TYPES))
    return {
        "layer_types": tuple(qwen3_next.LAYER_TYPES[t] for t in types),
        "no_rope_layers": tuple(int(t == "full_attention") for t in types),
    }


def _gdn_int(key: str):
    """A Gated DeltaNet size, read only when the model has Gated DeltaNet layers."""

    def read(name, value, hf):
        has_gdn = "gated_deltanet" in read_layer_types("layer_types", hf["layer_types"], hf)["layer_types"]
        return fields.positive_int(key)(name, value, hf) if has_gdn else {}

    return read


MROPE = ("mrope_section", "mrope_interleaved")


def _without_mrope(where: str, d):
    """rope_parameters (or rope_scaling) less the mRoPE keys, after checking them: a text model's three
    position streams are equal, so the sections cannot change the rotation (module docstring)."""
    if not isinstance(d, dict):
        return d
    section, interleaved = d.get("mrope_section"), d.get("mrope_interleaved")
    if section is not None and (
        not isinstance(section, list) or len(section) != 3 or any(not isinstance(s, int) or s < 0 for s in section)
    ):
        raise HFConfigError(f"{where}.mrope_section", section, "transformers reads three sections (time, height, "
                            "width) of non-negative frequency counts", "fix the list in config.json")  # fmt: skip
    if interleaved is not None and not isinstance(interleaved, bool):
        raise HFConfigError(f"{where}.mrope_interleaved", interleaved, "must be true or false",
                            "fix the value in config.json")  # fmt: skip
    return {k: v for k, v in d.items() if k not in MROPE}


def read_rope(name, value, hf):
    """Qwen3-Next's rope row (partial_rotary_factor inside rope_parameters, else top-level, else 0.25), with
    mrope_section / mrope_interleaved accepted: for text they compute ordinary partial RoPE."""
    plain = {**hf, "rope_scaling": _without_mrope("rope_scaling", hf["rope_scaling"])}
    return qwen3_next.read_rope(name, _without_mrope(name, value), plain)


GUIDE_ROW = (
    "pre_norm, RMSNorm scaling by 1 + w, per-head RMS QK-norm, gated attention output",
    "Gated DeltaNet (unfused projections) or full attention (partial RoPE; text mRoPE); dense SwiGLU",
    "untied or tied head; the multimodal checkpoint's text model saved alone",
)

# Qwen3-Next's rows for what both configs hold
_SHARED = ("head_dim", "attention_bias", "partial_rotary_factor", "full_attention_interval")
FIELDS = {
    **fields.common(without=("mlp_bias",), vocab_size=248320, hidden_size=4096, intermediate_size=12288,
                    num_hidden_layers=32, num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=32768,
                    rms_norm_eps=1e-6, tie_word_embeddings=False, rope_theta=10_000.0),  # no MLP biases: refused
    **{name: qwen3_next.FIELDS[name] for name in _SHARED},
    "rope_parameters": Field(None, read_rope),
    "layer_types": Field(None, read_layer_types),
    "linear_conv_kernel_dim": Field(4, _gdn_int("gdn_conv_kernel")),
    "linear_key_head_dim": Field(128, _gdn_int("gdn_key_head_dim")),
    "linear_value_head_dim": Field(128, _gdn_int("gdn_value_head_dim")),
    "linear_num_key_heads": Field(16, _gdn_int("gdn_key_heads")),
    "linear_num_value_heads": Field(32, _gdn_int("gdn_value_heads")),
    # fields of the hub's Qwen3.5 text_config that transformers does not read
    "attn_output_gate": Field(True, only(True, problem="transformers' Qwen3_5Attention gates its output whatever "
                                         "this says", fix="set it true (the model has the gate)")),
    "mamba_ssm_dtype": Field(None, harmless),  # the state's dtype in serving engines; transformers keeps it fp32
    "mtp_num_hidden_layers": Field(0, harmless),  # transformers builds no MTP layers (mtp.* tensors are refused)
    "mtp_use_dedicated_embeddings": Field(False, harmless),
}  # fmt: skip
BASE = qwen3_next.BASE
_MOE_LACKS = {"router", "routed_scale", "router_scale_input", "capacity_factor", "expert_bias_rate",
              "num_shared_experts", "shared_expert_gate"}  # fmt: skip
# the dense family: its FFNS refuse an MoE layer first, so the routing rows would never speak
LACKS = tuple(row for row in qwen3_next.LACKS if row[0] not in _MOE_LACKS)


def _gdn_to_hf(a, m) -> dict:
    ours = {name.removeprefix(GDN.prefix): np.asarray(x) for name, x in a.items()}
    return {f"linear_attn.{name}": x for name, x in gdn_lib.to_qwen3_5(ours, GDN.dims(m)).items()}


def _gdn_from_hf(w, m) -> dict:
    d = GDN.dims(m)
    return {
        GDN.prefix + name: to_ours(np.asarray(w[f"linear_attn.{hf_name}"]), d)
        for name, (hf_name, to_ours) in gdn_lib.QWEN3_5_TENSORS.items()
    }


GDN_ROW = tensors.Joint(
    lambda m: {f"linear_attn.{k}": v for k, v in gdn_lib.qwen3_5_shapes(GDN.dims(m)).items()}, _gdn_to_hf, _gdn_from_hf
)
# attention and norms as Qwen3-Next's; the Gated DeltaNet unfused
ATTENTION = {
    key: row
    for key, row in qwen3_next.LAYER_MAP.items()
    if key in ("attn_norm", "mlp_norm", ("wq", "attn_gate"), "wk", "wv", "wo", "q_norm", "k_norm")
}
LAYER_MAP = {**ATTENTION, qwen3_next.GDN_PARAMS: GDN_ROW, **tensors.mlp()}

# Qwen3-Next's config.json entries that the Qwen3.5 text model does not have
_MOE_KEYS = ("num_experts", "decoder_sparse_step", "mlp_only_layers", "moe_intermediate_size",
             "shared_expert_intermediate_size", "num_experts_per_tok", "norm_topk_prob")  # fmt: skip


def config_json(m) -> dict:
    return {k: v for k, v in qwen3_next.config_json(m).items() if k not in _MOE_KEYS}
