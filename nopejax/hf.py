"""HuggingFace transformers interop: per family an explicit name map plus documented transposes.

Families: SmolLM3 and Llama (pre-norm RMSNorm), Cohere2 (Command R7B, Tiny Aya: parallel block,
LayerNorm without bias, interleaved RoPE on the sliding layers only, logit scale) and EXAONE 4
(post-norm RMSNorm, per-head RMS QK-norm, RoPE on the sliding layers only), and the MoE families
AFMoE (Arcee Trinity) and Llama 4 text (their maps are below, beside their rows). `from_hf` picks
the family by config.json's `model_type`; `to_hf` writes `model.hf_family`.

nopejax keeps layer params stacked [L, ...] and attention projections split by head;
HF keeps one `nn.Linear` per layer with weight [out, in]. The SmolLM3 / Llama map (layer i):

| HF tensor                                   | nopejax                  | transform                |
|---------------------------------------------|--------------------------|--------------------------|
| model.embed_tokens.weight [V, D]            | embed [V, D]             | -                        |
| model.layers.i.input_layernorm.weight       | layers.attn_norm[i]      | -                        |
| model.layers.i.self_attn.q_proj.weight      | layers.wq[i] [D, H, E]   | W.T reshaped [D, H, E]   |
| model.layers.i.self_attn.{k,v}_proj.weight  | layers.w{k,v}[i] [D,K,E] | W.T reshaped [D, K, E]   |
| model.layers.i.self_attn.o_proj.weight      | layers.wo[i] [H, E, D]   | W.T reshaped [H, E, D]   |
| model.layers.i.post_attention_layernorm     | layers.mlp_norm[i]       | -                        |
| model.layers.i.mlp.{gate,up}_proj.weight    | layers.w_{gate,up}[i]    | W.T  [D, F]              |
| model.layers.i.mlp.down_proj.weight         | layers.w_down[i] [F, D]  | W.T                      |
| model.norm.weight                           | final_norm               | -                        |
| lm_head.weight [V, D] (untied only)         | lm_head [D, V]           | W.T                      |
| model.layers.i.self_attn.{q,k,v}_proj.bias  | layers.{q,k,v}_bias[i]   | reshaped [H or K, E]     |
| model.layers.i.self_attn.o_proj.bias        | layers.o_bias[i] [D]     | -                        |
| model.layers.i.mlp.{gate,up,down}_proj.bias | layers.{..}_bias[i]      | -                        |

The biases exist with `model.attention_bias` / `model.mlp_bias` (HF `attention_bias`, `mlp_bias`).
The other families differ in their norms only (all transforms are the identity):

| family  | HF tensor (layer i)                              | nopejax                |
|---------|--------------------------------------------------|------------------------|
| Cohere2 | model.layers.i.input_layernorm.weight            | layers.attn_norm[i]    |
| EXAONE 4| model.layers.i.post_attention_layernorm.weight   | layers.attn_post_norm[i] |
| EXAONE 4| model.layers.i.post_feedforward_layernorm.weight | layers.mlp_post_norm[i]  |
| EXAONE 4| model.layers.i.self_attn.{q,k}_norm.weight [E]   | layers.{q,k}_norm[i]   |

Import is exact or it refuses. Every config.json field has a row below that either maps it onto
the nopejax config, or accepts it because it does not change what the model computes, or refuses
it with a one-line error naming the field, its value and the fix; a field without a row is
refused. Every safetensors tensor must be consumed by the map, and every tensor the map needs
must be there. Export mirrors this: a nopejax config the target family cannot express is refused
before anything is written, naming the first feature the format lacks.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from nopejax import config, layers, model, moe, tensorfile


class Tensor(NamedTuple):
    suffix: str  # after `model.layers.{i}.`
    shape: Callable  # model cfg -> the HF shape
    to_hf: Callable  # our array (one layer) -> HF array
    from_hf: Callable  # (HF array, model cfg) -> our array (one layer)


def _same(suffix: str, shape: Callable) -> Tensor:
    """A tensor stored as is (norm weights)."""
    return Tensor(suffix, shape, lambda a: a, lambda w, m: w)


# nopejax layer param -> its HF tensor. HF Linear weights are [out, in]; ours are [in, out], split by head.
PROJECTIONS = {
    "wq": Tensor("self_attn.q_proj.weight", lambda m: (m.num_heads * m.head_dim, m.d_model),
                 lambda a: a.reshape(a.shape[0], -1).T, lambda w, m: w.T.reshape(m.d_model, m.num_heads, m.head_dim)),
    "wk": Tensor("self_attn.k_proj.weight", lambda m: (m.num_kv_heads * m.head_dim, m.d_model),
                 lambda a: a.reshape(a.shape[0], -1).T,
                 lambda w, m: w.T.reshape(m.d_model, m.num_kv_heads, m.head_dim)),
    "wv": Tensor("self_attn.v_proj.weight", lambda m: (m.num_kv_heads * m.head_dim, m.d_model),
                 lambda a: a.reshape(a.shape[0], -1).T,
                 lambda w, m: w.T.reshape(m.d_model, m.num_kv_heads, m.head_dim)),
    "wo": Tensor("self_attn.o_proj.weight", lambda m: (m.d_model, m.num_heads * m.head_dim),
                 lambda a: a.reshape(-1, a.shape[-1]).T, lambda w, m: w.T.reshape(m.num_heads, m.head_dim, m.d_model)),
    "w_gate": Tensor("mlp.gate_proj.weight", lambda m: (m.d_ff, m.d_model), lambda a: a.T, lambda w, m: w.T),
    "w_up": Tensor("mlp.up_proj.weight", lambda m: (m.d_ff, m.d_model), lambda a: a.T, lambda w, m: w.T),
    "w_down": Tensor("mlp.down_proj.weight", lambda m: (m.d_model, m.d_ff), lambda a: a.T, lambda w, m: w.T),
    # present with model.attention_bias / model.mlp_bias; q, k, v biases are split by head here
    "q_bias": Tensor("self_attn.q_proj.bias", lambda m: (m.num_heads * m.head_dim,), lambda a: a.reshape(-1),
                     lambda w, m: w.reshape(m.num_heads, m.head_dim)),
    "k_bias": Tensor("self_attn.k_proj.bias", lambda m: (m.num_kv_heads * m.head_dim,), lambda a: a.reshape(-1),
                     lambda w, m: w.reshape(m.num_kv_heads, m.head_dim)),
    "v_bias": Tensor("self_attn.v_proj.bias", lambda m: (m.num_kv_heads * m.head_dim,), lambda a: a.reshape(-1),
                     lambda w, m: w.reshape(m.num_kv_heads, m.head_dim)),
    "o_bias": Tensor("self_attn.o_proj.bias", lambda m: (m.d_model,), lambda a: a, lambda w, m: w),
    "gate_bias": Tensor("mlp.gate_proj.bias", lambda m: (m.d_ff,), lambda a: a, lambda w, m: w),
    "up_bias": Tensor("mlp.up_proj.bias", lambda m: (m.d_ff,), lambda a: a, lambda w, m: w),
    "down_bias": Tensor("mlp.down_proj.bias", lambda m: (m.d_model,), lambda a: a, lambda w, m: w),
}  # fmt: skip
_D = lambda m: (m.d_model,)
_E = lambda m: (m.head_dim,)
# SmolLM3 and Llama: pre-norm
LAYER_MAP = {
    "attn_norm": _same("input_layernorm.weight", _D),
    **PROJECTIONS,
    "mlp_norm": _same("post_attention_layernorm.weight", _D),
}
# Cohere2: one input norm feeds attention and MLP (model.block = "parallel")
COHERE2_LAYER_MAP = {"attn_norm": _same("input_layernorm.weight", _D), **PROJECTIONS}
# EXAONE 4: norms on the sublayer outputs (model.block = "post_norm") and the per-head QK-norm
EXAONE4_LAYER_MAP = {
    **PROJECTIONS,
    "attn_post_norm": _same("post_attention_layernorm.weight", _D),
    "mlp_post_norm": _same("post_feedforward_layernorm.weight", _D),
    "q_norm": _same("self_attn.q_norm.weight", _E),
    "k_norm": _same("self_attn.k_norm.weight", _E),
}


class Joint(NamedTuple):
    """Several nopejax params of one layer <-> several HF tensors (fused or per-expert MoE weights)."""

    shapes: Callable  # model cfg -> {suffix: HF shape}
    to_hf: Callable  # ({name: our array (one layer)}, m) -> {suffix: HF array}
    from_hf: Callable  # ({suffix: HF array}, m) -> {name: our array (one layer)}


def _as_joint(name: str, row: Tensor) -> Joint:
    return Joint(
        lambda m: {row.suffix: row.shape(m)},
        lambda a, m: {row.suffix: row.to_hf(a[name])},
        lambda w, m: {name: row.from_hf(w[row.suffix], m)},
    )


def layer_rows(m: config.ConfigDict) -> list[list[tuple[dict, Joint]]]:
    """Per layer i: the rows of the family's map that apply, each with {param name: index of layer
    i in that param's stack} (dense-FFN and MoE params stack over their own layers only).

    A map key is a param name (a `Tensor` row) or a tuple of names (a `Joint` row); a row applies
    to a layer that has all its params, and every param of the layer is in exactly one row."""
    layer_map, specs, names = FAMILIES[m.hf_family].layer_map, layers.layer_specs(m), model.layer_params(m)
    out = []
    for i, spec in enumerate(specs):
        index = {
            name: model.group_count(specs[:i], model.param_group(name))
            for name in names
            if model.param_group(name) in ("all", spec.ffn)
        }
        rows = []
        for key, row in layer_map.items():
            keys = key if isinstance(key, tuple) else (key,)
            if all(k in index for k in keys):
                rows.append(({k: index[k] for k in keys}, row if isinstance(row, Joint) else _as_joint(key, row)))
        covered = sorted(k for used, _ in rows for k in used)
        assert covered == sorted(index), f"{m.hf_family} map covers {covered}, layer {i} has {sorted(index)}"
        out.append(rows)
    return out


def hf_tensor_shapes(m: config.ConfigDict) -> dict[str, tuple[int, ...]]:
    """Every tensor of the HF checkpoint of model config `m` (its `hf_family`), with its shape, in file order."""
    shapes = {"model.embed_tokens.weight": (m.vocab_size, m.d_model)}
    for i, rows in enumerate(layer_rows(m)):
        for _, row in rows:
            shapes.update({f"model.layers.{i}.{suffix}": shape for suffix, shape in row.shapes(m).items()})
    shapes["model.norm.weight"] = (m.d_model,)
    if not m.tie_embeddings:
        shapes["lm_head.weight"] = (m.vocab_size, m.d_model)
    return shapes


class HFConfigError(config.ConfigError):
    """A config.json field nopejax cannot honour exactly: names the field, its value and the fix."""

    def __init__(self, field: str, value, problem: str, fix: str):
        self.field, self.value, self.problem, self.fix = field, value, problem, fix
        ValueError.__init__(self, f"HF config.json field `{field}` = {value!r}: {problem}. Fix: {fix}.")


class HFTensorError(config.ConfigError):
    """A safetensors tensor that is missing, unexpected, or not what the map expects."""

    def __init__(self, name: str, problem: str, fix: str):
        self.field, self.problem, self.fix = name, problem, fix
        ValueError.__init__(self, f"HF checkpoint tensor `{name}`: {problem}. Fix: {fix}.")


# ---------------------------------------------------------------------------------------------
# config.json -> nopejax: every field is a row, honoured exactly or refused
#
# A row's `read(name, value, hf)` gets the field's name and value and the whole config.json laid
# over the family's defaults, and returns the nopejax model fields it sets ({} for a field that
# does not change what the model computes), or raises HFConfigError. A field with no row is
# refused: its meaning is unknown, so nopejax cannot claim to compute what transformers does.
# Honouring a new field, or a new family, is adding rows; the tests check every field of the
# transformers config class has a row, with the class's default.


class Field(NamedTuple):
    default: object  # transformers' value when config.json leaves the field out
    read: Callable[[str, object, dict], dict]


def harmless(name, value, hf) -> dict:
    """Any value is fine: the field does not change the function the model computes."""
    return {}


def _to(key: str, kind: type):
    """Honoured as nopejax `model.<key>`, after a type check (JSON is the only guard before it)."""

    def read(name, value, hf):
        widening = kind is float and isinstance(value, int)
        if isinstance(value, bool) != (kind is bool) or not (isinstance(value, kind) or widening):
            raise HFConfigError(name, value, f"expected a {kind.__name__}", "fix the value in config.json")
        return {key: kind(value)}

    return read


def _only(*allowed, problem: str, fix: str):
    """Accepted at these values (the default among them) only: nopejax implements no other."""

    def read(name, value, hf):
        if value not in allowed:
            raise HFConfigError(name, value, problem, fix)
        return {}

    return read


def _architectures(*causal_lms: str):
    def read(name, value, hf):
        if value is not None and (not isinstance(value, list) or any(a not in causal_lms for a in value)):
            raise HFConfigError(
                name, value, f"nopejax imports the causal LM {causal_lms[0]} only",
                "convert the causal-LM checkpoint (a task head's weights have no place in nopejax)",
            )  # fmt: skip
        return {}

    return read


def _read_quantization(name, value, hf):
    """A quantized checkpoint stores packed integers (and scales) in place of the float weights: nopejax
    does not dequantize, and deleting the field would not turn the weights back into floats."""
    if value is None:
        return {}
    method = value.get("quant_method", "unknown") if isinstance(value, dict) else "unknown"
    raise HFConfigError(
        name, f"{{quant_method: {method!r}, ...}}", "a quantized checkpoint; nopejax imports float weights only "
        f"({sorted(tensorfile.FLOAT_DTYPES)}) and does not dequantize",
        "import the unquantized checkpoint this one was made from (its bf16 / fp16 / fp32 release)",
    )  # fmt: skip


def _read_kv_heads(name, value, hf):
    return _to("num_kv_heads", int)(name, hf["num_attention_heads"] if value is None else value, hf)


def _read_head_dim(name, value, hf):
    """HF: `head_dim`, else hidden_size // num_attention_heads; nopejax needs heads * head_dim == hidden."""
    head_dim = hf["hidden_size"] // hf["num_attention_heads"] if value is None else value
    if head_dim * hf["num_attention_heads"] != hf["hidden_size"]:
        raise HFConfigError(
            name, value, f"num_attention_heads * head_dim != hidden_size = {hf['hidden_size']}",
            "nopejax needs num_attention_heads * head_dim == hidden_size; this checkpoint cannot be imported",
        )  # fmt: skip
    return {"head_dim": int(head_dim)}


def _read_head_dim_free(name, value, hf):
    """head_dim as given (heads * head_dim may differ from hidden_size: Trinity Mini), else hidden // heads."""
    head_dim = hf["hidden_size"] // hf["num_attention_heads"] if value is None else value
    return _to("head_dim", int)(name, head_dim, hf)


def _read_rope(name, value, hf):
    """rope_parameters (transformers >= 5), or rope_scaling + rope_theta (older), merged as HF's
    `convert_rope_params_to_dict` and `standardize_rope_params` do. Any key or type that rope.py
    does not compute exactly is refused."""
    if hf["rope_scaling"]:  # HF: rope_scaling wins over rope_parameters when both are set
        name, value = "rope_scaling", hf["rope_scaling"]
    params = dict(value or {})
    if any(isinstance(v, dict) for v in params.values()):
        raise HFConfigError(name, value, "per-layer-type RoPE parameters are not supported",
                            "give one flat rope_parameters dict")  # fmt: skip
    theta = params.pop("rope_theta", None)
    theta = hf["rope_theta"] if theta is None else theta  # default: the class's default_theta
    kind = params.pop("rope_type", None) or params.pop("type", None) or "default"
    params.pop("type", None)
    for where, partial in [
        ("partial_rotary_factor", hf["partial_rotary_factor"]),
        (f"{name}.partial_rotary_factor", params.pop("partial_rotary_factor", None)),
    ]:
        if partial not in (None, 1, 1.0):
            raise HFConfigError(where, partial, "nopejax rotates the whole head",
                                "import a checkpoint with partial_rotary_factor 1.0")  # fmt: skip
    if kind != "default" and kind not in config.ROPE_SCALING_TYPES:
        raise HFConfigError(
            f"{name}.rope_type", kind, "nopejax does not implement this RoPE scaling",
            f"use one of {['default', *config.ROPE_SCALING_TYPES]} (dynamic and longrope, whose frequencies "
            "change with the sequence length, are not supported)",
        )  # fmt: skip
    if kind in ("yarn", "llama3"):  # HF: the top-level field wins, else max_position_embeddings
        if hf["original_max_position_embeddings"] is not None:
            params["original_max_position_embeddings"] = hf["original_max_position_embeddings"]
        params.setdefault("original_max_position_embeddings", hf["max_position_embeddings"])
    if kind == "yarn" and params.get("factor") is None:  # HF: the ratio of the two lengths
        params["factor"] = hf["max_position_embeddings"] / params["original_max_position_embeddings"]
    required, optional = config.ROPE_SCALING_TYPES.get(kind, (set(), set()))
    unknown, missing = sorted(set(params) - required - optional), sorted(required - set(params))
    if unknown:
        raise HFConfigError(f"{name}.{unknown[0]}", params[unknown[0]], f"rope_type {kind!r} takes no such key",
                            f"use only {sorted(required | optional) or 'rope_theta'}")  # fmt: skip
    if missing:
        raise HFConfigError(f"{name}.{missing[0]}", None, f"rope_type {kind!r} needs it", "add it")
    scaling = {"rope_type": kind, **params} if kind != "default" else None
    return {"rope_theta": float(theta), "rope_scaling": scaling}


def _read_rope_pattern(name, value, hf):
    """SmolLM3: no_rope_layers (1 = RoPE) if given, else NoPE every no_rope_layer_interval-th layer."""
    L = hf["num_hidden_layers"]
    if value is None:
        interval = hf["no_rope_layer_interval"]
        if not isinstance(interval, int) or isinstance(interval, bool) or interval <= 0:
            raise HFConfigError("no_rope_layer_interval", interval, "must be a positive integer when "
                                "no_rope_layers is absent", "give no_rope_layers explicitly")  # fmt: skip
        value = [int((i + 1) % interval != 0) for i in range(L)]
    if not isinstance(value, list) or len(value) < L or any(x not in (0, 1) for x in value):
        raise HFConfigError(name, value, f"needs one 0 (NoPE) or 1 (RoPE) per layer ({L} layers)", "fix the list")
    return {"no_rope_layers": tuple(int(x) for x in value[:L])}  # HF reads the first L entries only


def _read_layer_types(name, value, hf):
    """SmolLM3: layer_types as given, `full_attention` or `sliding_attention` (window `sliding_window`).
    Absent, SmolLM3Config derives it: sliding on the NoPE layers when use_sliding_window and
    sliding_window are set, full elsewhere."""
    L, window = hf["num_hidden_layers"], hf["sliding_window"]
    if value is None:
        rope = _read_rope_pattern("no_rope_layers", hf["no_rope_layers"], hf)["no_rope_layers"]
        derive = bool(hf["use_sliding_window"]) and window is not None
        value = ["sliding_attention" if derive and not r else "full_attention" for r in rope]
    kinds = ("full_attention", "sliding_attention")
    if not isinstance(value, list) or len(value) < L or any(t not in kinds for t in value[:L]):
        raise HFConfigError(
            name, value, f"SmolLM3 layers are one of {list(kinds)}, one per layer ({L} layers)", "fix the list"
        )  # fmt: skip
    types = tuple(value[:L])  # HF reads the first L entries only
    if "sliding_attention" not in types:
        return {}
    if not isinstance(window, int) or isinstance(window, bool) or window < 1:
        raise HFConfigError(name, list(types), f"sliding_attention layers need sliding_window >= 1, got {window!r}",
                            "set sliding_window in config.json")  # fmt: skip
    return {"layer_types": types, "sliding_window": window}


GENERATION_FIELDS = (
    "max_length", "min_length", "do_sample", "early_stopping", "num_beams", "num_beam_groups", "diversity_penalty",
    "temperature", "top_k", "top_p", "typical_p", "repetition_penalty", "length_penalty", "no_repeat_ngram_size",
    "encoder_no_repeat_ngram_size", "bad_words_ids", "num_return_sequences", "output_scores",
    "return_dict_in_generate", "forced_bos_token_id", "forced_eos_token_id", "remove_invalid_values",
    "exponential_decay_length_penalty", "suppress_tokens", "begin_suppress_tokens", "epsilon_cutoff", "eta_cutoff",
    "encoder_repetition_penalty", "num_assistant_tokens", "num_assistant_tokens_schedule",
    "assistant_confidence_threshold", "assistant_lookbehind", "target_lookbehind",
)  # fmt: skip

# The rows every Llama-like family shares; a family overrides the defaults that differ.
COMMON_FIELDS = {
    # metadata, and switches of what transformers' forward returns (not of its values)
    "transformers_version": Field(None, harmless),
    "model_type": Field(None, harmless),  # picks the family
    "_name_or_path": Field("", harmless),
    "output_hidden_states": Field(False, harmless),
    "output_attentions": Field(False, harmless),
    "return_dict": Field(True, harmless),
    "dtype": Field(None, harmless),  # storage dtype: each tensor is read with its own
    "torch_dtype": Field(None, harmless),  # transformers < 5 name of dtype
    "id2label": Field(None, harmless),  # classification heads only
    "label2id": Field(None, harmless),
    "problem_type": Field(None, harmless),
    "use_cache": Field(True, harmless),  # generation only
    "initializer_range": Field(0.02, harmless),  # random init only; the weights are loaded
    "attention_dropout": Field(0.0, harmless),  # training-time dropout (nopejax trains without)
    "chunk_size_feed_forward": Field(0, harmless),  # not read by the Llama / SmolLM3 decoder
    "pretraining_tp": Field(1, harmless),  # transformers 4: the same matmuls, split
    "max_window_layers": Field(None, harmless),  # read by Qwen2's sliding window only (SmolLM3-3B has it)
    **{key: Field(None, harmless) for key in ("pad_token_id", "bos_token_id", "eos_token_id")},  # tokenizer's
    **{key: Field(None, harmless) for key in GENERATION_FIELDS},  # transformers moves them to GenerationConfig
    "is_encoder_decoder": Field(False, _only(False, problem="nopejax is decoder-only", fix="import a decoder")),
    "quantization_config": Field(None, _read_quantization),  # packed integer weights: refused
    # the model
    "vocab_size": Field(None, _to("vocab_size", int)),
    "hidden_size": Field(None, _to("d_model", int)),
    "intermediate_size": Field(None, _to("d_ff", int)),
    "num_hidden_layers": Field(None, _to("num_layers", int)),
    "num_attention_heads": Field(None, _to("num_heads", int)),
    "num_key_value_heads": Field(None, _read_kv_heads),
    "head_dim": Field(None, _read_head_dim),
    "hidden_act": Field("silu", _only("silu", problem="nopejax's MLP is SwiGLU (silu)", fix="import a silu model")),
    "max_position_embeddings": Field(None, _to("max_position_embeddings", int)),
    "rms_norm_eps": Field(1e-6, _to("rms_norm_eps", float)),
    "tie_word_embeddings": Field(None, _to("tie_embeddings", bool)),
    "attention_bias": Field(False, _to("attention_bias", bool)),
    "mlp_bias": Field(False, _to("mlp_bias", bool)),
    "rope_parameters": Field(None, _read_rope),
    # read by the rope_parameters row
    "rope_scaling": Field(None, harmless),  # transformers < 5
    "rope_theta": Field(None, harmless),  # transformers < 5; a family's default is its class's default_theta
    "original_max_position_embeddings": Field(None, harmless),
    "partial_rotary_factor": Field(None, harmless),
}  # fmt: skip


def _positive_float(key: str):
    """Honoured as nopejax `model.<key>` when a positive finite number."""

    def read(name, value, hf):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
            raise HFConfigError(name, value, "must be a positive finite number", "fix the value in config.json")
        return {key: float(value)}

    return read


def _kinds(name, value, L: int, family: str) -> tuple[str, ...]:
    """layer_types checked: `full_attention` or `sliding_attention`, one per layer (HF reads the first L)."""
    kinds = ("full_attention", "sliding_attention")
    if not isinstance(value, list) or len(value) < L or any(t not in kinds for t in value[:L]):
        raise HFConfigError(
            name, value, f"{family} layers are one of {list(kinds)}, one per layer ({L} layers)", "fix the list"
        )  # fmt: skip
    return tuple(value[:L])


def _window(name, window) -> int:
    if not isinstance(window, int) or isinstance(window, bool) or window < 1:
        raise HFConfigError(name, window, "sliding_attention layers need sliding_window >= 1",
                            "set sliding_window in config.json")  # fmt: skip
    return window


def _interval(name, value, why: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise HFConfigError(name, value, f"must be a positive integer {why}", "give layer_types explicitly")
    return value


def _rope_on_sliding(types: tuple, window: int) -> dict:
    """Cohere2 and EXAONE 4 with a window: RoPE on exactly the sliding layers, NoPE on the full ones."""
    out = {"no_rope_layers": tuple(int(t == "sliding_attention") for t in types)}
    if "sliding_attention" in types:
        out.update(layer_types=types, sliding_window=window)
    return out


def _sliding_every(name, value, hf, interval_key: str, family: str) -> tuple[str, ...]:
    """layer_types as given, else sliding except every `hf[interval_key]`-th layer, full; the family's
    transformers code builds a sliding mask for every model, so a window must be set."""
    L = hf["num_hidden_layers"]
    if value is None:
        n = _interval(interval_key, hf[interval_key], "when layer_types is absent")
        value = ["sliding_attention" if (i + 1) % n else "full_attention" for i in range(L)]
    types = _kinds(name, value, L, family)
    if hf["sliding_window"] is None:
        raise HFConfigError("sliding_window", None, f"transformers' {family} cannot run without a window",
                            "set sliding_window in config.json")  # fmt: skip
    return types


def _cohere2_pattern(hf) -> dict:
    """Cohere2Config pops sliding_window_pattern with a default of 4 (absent, it is no claim to check)."""
    return hf if hf["sliding_window_pattern"] is not None else {**hf, "sliding_window_pattern": 4}


def _read_cohere2_layers(name, value, hf):
    """Cohere2: layer_types as given, else derived from sliding_window_pattern (default 4: layer i is
    full when (i + 1) % 4 == 0). Sliding layers rotate interleaved pairs; full layers are NoPE."""
    types = _sliding_every(name, value, _cohere2_pattern(hf), "sliding_window_pattern", "Cohere2")
    out = _rope_on_sliding(types, _window("sliding_window", hf["sliding_window"]))
    return {**out, "rope_layout": "interleaved"} if "sliding_attention" in types else out


def _read_exaone4_layers(name, value, hf):
    """EXAONE 4: layer_types as given, else derived from an integer sliding_window_pattern (transformers
    cannot derive from the "LLLG" string form, nor without a window). With a window, RoPE on the sliding
    layers only (global layers NoPE); without one (`sliding_window: null`), every layer full and RoPE."""
    L, window = hf["num_hidden_layers"], hf["sliding_window"]
    if value is None:
        why = "when layer_types is absent and sliding_window is set (transformers derives layer_types from it)"
        p = _interval("sliding_window_pattern", None if window is None else hf["sliding_window_pattern"], why)
        value = ["sliding_attention" if (i + 1) % p else "full_attention" for i in range(L)]
    types = _kinds(name, value, L, "EXAONE 4")
    if window is None:
        if "sliding_attention" in types:
            raise HFConfigError("sliding_window", None, "sliding_attention layers need a window (transformers fails)",
                                "set sliding_window, or make every layer full_attention")  # fmt: skip
        return {"no_rope_layer_interval": 0}
    return _rope_on_sliding(types, _window("sliding_window", window))


def _read_cohere2_period(name, value, hf):
    """Cohere's layer_switch and sliding_window_pattern: one full layer every `value` layers. transformers
    derives layer_types from sliding_window_pattern when layer_types is absent and otherwise reads neither,
    so either is accepted only where it says what layer_types does."""
    if value is None:
        return {}
    n = _interval(name, value, "(the period of the full-attention layers)")
    L = hf["num_hidden_layers"]
    types = hf["layer_types"]
    if types is None:
        types = _sliding_every("layer_types", None, _cohere2_pattern(hf), "sliding_window_pattern", "Cohere2")
    period = ["sliding_attention" if (i + 1) % n else "full_attention" for i in range(L)]
    if list(types[:L]) != period:
        raise HFConfigError(
            name, value, f"it puts a full-attention layer every {n} layers, but transformers runs the layer_types "
            f"{list(types[:L])}", "make it agree with layer_types (or remove it if layer_types is what was trained)",
        )  # fmt: skip
    return {}


def _agrees_with(other: str, problem: str):
    """A hub field transformers ignores: accepted only where it says what transformers computes anyway."""

    def read(name, value, hf):
        if value is not None and value != hf[other]:
            raise HFConfigError(name, value, problem, f"make it agree with {other} = {hf[other]!r}")
        return {}

    return read


class Family(NamedTuple):
    model_type: str
    architecture: str  # the causal-LM class transformers builds
    fields: dict[str, Field]
    base: dict  # nopejax model fields the family fixes before its rows are read
    layer_map: dict[str, Tensor]
    # what the format cannot hold: (model field, does `m` use it, what the format lacks), checked in order
    lacks: tuple
    config: Callable  # model cfg -> the family's own config.json entries
    # refuses (config.ConfigError) params the format cannot hold, before anything is written
    check_params: Callable = lambda m, params: None


def _defaults(**defaults) -> dict[str, Field]:
    return {name: COMMON_FIELDS[name]._replace(default=value) for name, value in defaults.items()}


def _without(*names) -> dict[str, Field]:
    return {k: v for k, v in COMMON_FIELDS.items() if k not in names}


def _sliding_rope(m) -> bool:
    """Does every layer rotate exactly when it is sliding (Cohere2, EXAONE 4 with a window)?"""
    return all(spec.use_rope == (spec.attention == "sliding") for spec in layers.layer_specs(m))


# No family here has these (Llama 4, Gemma 3 and Qwen-style features nopejax computes).
NOBODY_HAS = (
    ("attention_chunk_size", lambda m: m.attention_chunk_size is not None, "chunked attention"),
    ("partial_rotary_factor", lambda m: m.partial_rotary_factor != 1.0, "partial RoPE"),
    ("rope_theta_local", lambda m: m.rope_theta_local is not None, "a separate RoPE base for local layers"),
    ("nope_temperature", lambda m: m.nope_temperature is not None, "a NoPE query temperature"),
    ("num_experts", lambda m: m.num_experts != 0, "mixture-of-experts layers"),
    ("attention_gate", lambda m: m.attention_gate, "gated attention output"),
    ("embed_scale", lambda m: m.embed_scale != 1.0, "embedding scale"),
)
_ROPE_LAYERS = lambda m: any(layers.rope_pattern(m))
PRE_NORM_LACKS = (
    *NOBODY_HAS,
    ("rope_layout", lambda m: m.rope_layout != "half" and _ROPE_LAYERS(m), "the interleaved RoPE layout"),
    ("qk_norm", lambda m: m.qk_norm != "none", "QK-norm"),
    ("block", lambda m: m.block != "pre_norm", "block other than pre_norm"),
    ("norm", lambda m: m.norm != "rms", "LayerNorm (its norms are RMSNorm)"),
    ("logit_scale", lambda m: m.logit_scale != 1.0, "a logit scale"),
)
LLAMA_LACKS = (
    *PRE_NORM_LACKS,
    ("no_rope_layers", lambda m: not all(layers.rope_pattern(m)), "NoPE layers (every Llama layer rotates)"),
    ("layer_types", lambda m: any(spec.local for spec in layers.layer_specs(m)), "sliding-window layers"),
)
COHERE2_LACKS = (
    *NOBODY_HAS,
    ("block", lambda m: m.block != "parallel", "block other than parallel"),
    ("norm", lambda m: m.norm != "layernorm", "RMSNorm (its norms are LayerNorm)"),
    ("qk_norm", lambda m: m.qk_norm != "none", "QK-norm"),
    ("mlp_bias", lambda m: m.mlp_bias, "MLP biases"),
    ("rope_layout", lambda m: m.rope_layout != "interleaved" and _ROPE_LAYERS(m), "the half-split RoPE layout"),
    ("no_rope_layers", lambda m: not _sliding_rope(m),
     "RoPE/NoPE pattern other than RoPE on exactly the sliding layers"),
)  # fmt: skip
EXAONE4_LACKS = (
    *NOBODY_HAS,
    ("block", lambda m: m.block != "post_norm", "block other than post_norm"),
    ("norm", lambda m: m.norm != "rms", "LayerNorm (its norms are RMSNorm)"),
    ("qk_norm", lambda m: m.qk_norm != "rms", "layer without the per-head RMS QK-norm"),
    ("attention_bias", lambda m: m.attention_bias, "attention biases"),
    ("mlp_bias", lambda m: m.mlp_bias, "MLP biases"),
    ("logit_scale", lambda m: m.logit_scale != 1.0, "a logit scale"),
    ("rope_layout", lambda m: m.rope_layout != "half" and _ROPE_LAYERS(m), "the interleaved RoPE layout"),
    ("no_rope_layers", lambda m: not (_sliding_rope(m) or (all(layers.rope_pattern(m))
                                                         and not any(s.local for s in layers.layer_specs(m)))),
     "RoPE/NoPE pattern other than RoPE on exactly the sliding layers (or on every layer of an all-global model)"),
)  # fmt: skip


def _types(m) -> list[str]:
    return [f"{spec.attention}_attention" for spec in layers.layer_specs(m)]


def _smollm3_config(m) -> dict:
    sliding = "sliding_attention" in _types(m)
    return {
        "rms_norm_eps": m.rms_norm_eps,
        "no_rope_layers": [int(x) for x in layers.rope_pattern(m)],
        "no_rope_layer_interval": m.no_rope_layer_interval or m.num_layers + 1,
        # HF masks by layer_types; use_sliding_window also sets each layer's window for flash kernels
        "use_sliding_window": sliding,
        "sliding_window": m.sliding_window if sliding else None,
        "layer_types": _types(m),
        "attention_bias": bool(m.attention_bias),
        "mlp_bias": bool(m.mlp_bias),
    }


def _llama_config(m) -> dict:
    return {"rms_norm_eps": m.rms_norm_eps, "attention_bias": bool(m.attention_bias), "mlp_bias": bool(m.mlp_bias)}


def _cohere2_config(m) -> dict:
    return {
        "layer_norm_eps": m.rms_norm_eps,
        "logit_scale": float(m.logit_scale),
        "layer_types": _types(m),
        # transformers needs a window even when no layer slides; it then masks nothing
        "sliding_window": m.sliding_window or m.max_position_embeddings,
        "attention_bias": bool(m.attention_bias),
    }


def _exaone4_config(m) -> dict:
    # without sliding layers the window says whether global layers rotate: null = all RoPE, set = all NoPE
    window = m.sliding_window
    if window is None and not all(layers.rope_pattern(m)):
        window = m.max_position_embeddings
    return {"rms_norm_eps": m.rms_norm_eps, "layer_types": _types(m), "sliding_window": window}


SMOLLM3 = Family(
    "smollm3",
    "SmolLM3ForCausalLM",
    {
        **COMMON_FIELDS,
        **_defaults(vocab_size=128256, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                    num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=32768,
                    tie_word_embeddings=True, rope_theta=2_000_000.0),
        "architectures": Field(None, _architectures("SmolLM3ForCausalLM")),
        "no_rope_layers": Field(None, _read_rope_pattern),
        "no_rope_layer_interval": Field(4, harmless),  # read by the no_rope_layers row
        "layer_types": Field(None, _read_layer_types),
        "use_sliding_window": Field(False, harmless),  # read by the layer_types row
        "sliding_window": Field(None, harmless),  # read by the layer_types row
    },
    {"hf_family": "smollm3"},
    LAYER_MAP,
    PRE_NORM_LACKS,
    _smollm3_config,
)  # fmt: skip

LLAMA = Family(
    "llama",
    "LlamaForCausalLM",
    {
        **COMMON_FIELDS,
        **_defaults(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                    num_attention_heads=32, max_position_embeddings=2048, tie_word_embeddings=False,
                    rope_theta=10_000.0),
        "architectures": Field(None, _architectures("LlamaForCausalLM")),
    },
    {"no_rope_layer_interval": 0, "hf_family": "llama"},  # every layer rotates
    LAYER_MAP,
    LLAMA_LACKS,
    _llama_config,
)  # fmt: skip

COHERE2 = Family(
    "cohere2",
    "Cohere2ForCausalLM",
    {
        **_without("mlp_bias"),  # Cohere2's MLP has no biases, whatever config.json says: refused
        **_defaults(vocab_size=256000, hidden_size=8192, intermediate_size=22528, num_hidden_layers=40,
                    num_attention_heads=64, max_position_embeddings=8192, tie_word_embeddings=True,
                    rope_theta=10_000.0, pad_token_id=0, bos_token_id=5, eos_token_id=255001),
        "architectures": Field(None, _architectures("Cohere2ForCausalLM")),
        "head_dim": Field(None, _read_head_dim_free),  # Cohere2Attention reads config.head_dim as is
        "layer_norm_eps": Field(1e-5, _to("rms_norm_eps", float)),  # nopejax's one eps, for LayerNorm too
        "rms_norm_eps": Field(None, harmless),  # not read by Cohere2
        "logit_scale": Field(0.0625, _positive_float("logit_scale")),
        "layer_types": Field(None, _read_cohere2_layers),
        "sliding_window": Field(4096, harmless),  # read by the layer_types row
        "sliding_window_pattern": Field(None, _read_cohere2_period),  # also read by the layer_types row (default 4)
        # Command R7B's, Command A's and Tiny Aya's config.json carry these; transformers' Cohere2 ignores
        # them, so they are accepted only where they say what transformers computes anyway
        "cache_implementation": Field(None, harmless),  # generation only
        "_sliding_window_pattern": Field(None, harmless),  # written by transformers 5.0; Cohere2 does not read it
        "use_parallel_embedding": Field(None, harmless),  # Cohere's tensor-parallel split of the embedding table
        "layer_switch": Field(None, _read_cohere2_period),
        "use_parallel_block": Field(None, _only(None, True, problem="transformers' Cohere2 block is parallel "
                                                "(attention and MLP read one norm's output)",
                                                fix="a sequential-block model is not a Cohere2 model; it cannot "
                                                "be imported as one")),
        "use_qk_norm": Field(None, _only(None, False, problem="transformers' Cohere2 has no QK-norm (it has no "
                                         "q_norm / k_norm weights)", fix="a model trained with QK-norm is not a "
                                         "Cohere2 model; it cannot be imported as one")),
        "order_of_interleaved_layers": Field(None, _only(None, "local_attn_first", problem="transformers puts the "
                                             "sliding layers first in each period", fix="remove it")),
        "position_embedding_type": Field(None, _only(None, "rope_gptj", problem="transformers' Cohere2 rotates "
                                         "interleaved pairs (GPT-J style)", fix="remove it")),
        "rotary_pct": Field(None, _only(None, 1, 1.0, problem="transformers' Cohere2 rotates the whole head",
                                        fix="remove it")),
        "use_gated_activation": Field(None, _only(None, True, problem="transformers' Cohere2 MLP is gated (SwiGLU)",
                                                  fix="remove it")),
        "use_embedding_sharing": Field(None, _agrees_with("tie_word_embeddings", "transformers reads "
                                                          "tie_word_embeddings, not this")),
    },
    {"norm": "layernorm", "block": "parallel", "hf_family": "cohere2"},
    COHERE2_LAYER_MAP,
    COHERE2_LACKS,
    _cohere2_config,
)  # fmt: skip

EXAONE4 = Family(
    "exaone4",
    "Exaone4ForCausalLM",
    {
        **_without("attention_bias", "mlp_bias"),  # EXAONE 4 has no biases, whatever config.json says: refused
        **_defaults(vocab_size=102400, hidden_size=4096, intermediate_size=16384, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=2048,
                    rms_norm_eps=1e-5, tie_word_embeddings=False, rope_theta=10_000.0, bos_token_id=0,
                    eos_token_id=2),
        "architectures": Field(None, _architectures("Exaone4ForCausalLM")),
        "layer_types": Field(None, _read_exaone4_layers),
        "sliding_window": Field(4096, harmless),  # read by the layer_types row
        "sliding_window_pattern": Field(4, harmless),  # read by the layer_types row
    },
    {"block": "post_norm", "qk_norm": "rms", "hf_family": "exaone4"},
    EXAONE4_LAYER_MAP,
    EXAONE4_LACKS,
    _exaone4_config,
)  # fmt: skip

# ---------------------------------------------------------------------------------------------
# The MoE families: AFMoE (Arcee Trinity) and Llama 4 text
#
# AFMoE layer i (sandwich block, gated attention, per-head RMS QK-norm; MoE from num_dense_layers on):
#
# | HF tensor (model.layers.i.)                       | nopejax                        | transform          |
# |---------------------------------------------------|--------------------------------|--------------------|
# | input_layernorm / post_attention_layernorm        | attn_norm / attn_post_norm     | -                  |
# | pre_mlp_layernorm / post_mlp_layernorm            | mlp_norm / mlp_post_norm       | -                  |
# | self_attn.{q,k,v,o}_proj.weight, q_norm, k_norm   | as the Llama / EXAONE 4 rows   |                    |
# | self_attn.gate_proj.weight [H*E, D]               | attn_gate [D, H, E]            | W.T reshaped       |
# | mlp.{gate,up,down}_proj.weight (dense layers)     | w_gate, w_up, w_down           | W.T                |
# | mlp.router.gate.weight [X, D]                     | router [D, X]                  | W.T                |
# | mlp.expert_bias [X] (fp32 on disk)                | expert_bias [X]                | -                  |
# | mlp.experts.e.{gate,up}_proj.weight [I, D]        | expert_{gate,up}[e] [D, I]     | W.T, one per expert|
# | mlp.experts.e.down_proj.weight [D, I]             | expert_down[e] [I, D]          | W.T, one per expert|
# | mlp.shared_experts.{gate,up,down}_proj.weight     | shared_{gate,up,down}          | W.T                |
#
# (transformers fuses the experts in memory, gate_up_proj [X, 2I, D], and saves them per expert, as
# the hub checkpoints are.) Llama 4 layer i (pre-norm; `feed_forward` in place of `mlp`):
#
# | HF tensor (model.layers.i.)                       | nopejax                        | transform          |
# |---------------------------------------------------|--------------------------------|--------------------|
# | input_layernorm / post_attention_layernorm        | attn_norm / mlp_norm           | -                  |
# | self_attn.{q,k,v,o}_proj.weight                   | as the Llama rows              |                    |
# | feed_forward.{gate,up,down}_proj.weight (dense)   | w_gate, w_up, w_down           | W.T                |
# | feed_forward.router.weight [X, D]                 | router [D, X]                  | W.T                |
# | feed_forward.experts.gate_up_proj [X, D, 2I]      | expert_gate, expert_up [X,D,I] | split the last axis|
# | feed_forward.experts.down_proj [X, I, D]          | expert_down [X, I, D]          | -                  |
# | feed_forward.shared_expert.{gate,up,down}_proj    | shared_{gate,up,down}          | W.T                |
# | (none: Llama 4 has no expert bias)                | expert_bias [X]                | zeros (export: 0)  |


KEEP_FP32 = ("mlp.expert_bias",)  # transformers keeps AFMoE's expert bias in fp32 whatever the dtype
_X = lambda m: m.num_experts
_I = moe.expert_width
_T = lambda a: a.T
_TT = lambda w, m: w.T


def _ffn_rows(prefix: str, shared: str) -> dict:
    """Dense MLP, router and shared-expert rows under `prefix` (mlp / feed_forward)."""
    dense = {k: PROJECTIONS[k]._replace(suffix=PROJECTIONS[k].suffix.replace("mlp.", f"{prefix}."))
             for k in ("w_gate", "w_up", "w_down")}  # fmt: skip
    S = lambda m: m.num_shared_experts * moe.expert_width(m)
    return {
        **dense,
        "shared_gate": Tensor(f"{prefix}.{shared}.gate_proj.weight", lambda m: (S(m), m.d_model), _T, _TT),
        "shared_up": Tensor(f"{prefix}.{shared}.up_proj.weight", lambda m: (S(m), m.d_model), _T, _TT),
        "shared_down": Tensor(f"{prefix}.{shared}.down_proj.weight", lambda m: (m.d_model, S(m)), _T, _TT),
    }


AFMOE_EXPERTS = Joint(
    lambda m: {
        f"mlp.experts.{e}.{kind}_proj.weight": (m.d_model, _I(m)) if kind == "down" else (_I(m), m.d_model)
        for e in range(m.num_experts)
        for kind in ("gate", "up", "down")
    },
    lambda a, m: {
        f"mlp.experts.{e}.{kind}_proj.weight": a[f"expert_{kind}"][e].T
        for e in range(m.num_experts)
        for kind in ("gate", "up", "down")
    },
    lambda w, m: {
        f"expert_{kind}": np.stack([w[f"mlp.experts.{e}.{kind}_proj.weight"].T for e in range(m.num_experts)])
        for kind in ("gate", "up", "down")
    },
)
AFMOE_LAYER_MAP = {
    **PROJECTIONS,
    "attn_gate": Tensor("self_attn.gate_proj.weight", lambda m: (m.num_heads * m.head_dim, m.d_model),
                        lambda a: a.reshape(a.shape[0], -1).T,
                        lambda w, m: w.T.reshape(m.d_model, m.num_heads, m.head_dim)),
    "q_norm": _same("self_attn.q_norm.weight", _E),
    "k_norm": _same("self_attn.k_norm.weight", _E),
    "attn_norm": _same("input_layernorm.weight", _D),
    "attn_post_norm": _same("post_attention_layernorm.weight", _D),
    "mlp_norm": _same("pre_mlp_layernorm.weight", _D),
    "mlp_post_norm": _same("post_mlp_layernorm.weight", _D),
    **_ffn_rows("mlp", "shared_experts"),
    "router": Tensor("mlp.router.gate.weight", lambda m: (m.num_experts, m.d_model), _T, _TT),
    "expert_bias": _same("mlp.expert_bias", lambda m: (m.num_experts,)),
    ("expert_gate", "expert_up", "expert_down"): AFMOE_EXPERTS,
}  # fmt: skip

LLAMA4_LAYER_MAP = {
    **{k: PROJECTIONS[k] for k in ("wq", "wk", "wv", "wo", "q_bias", "k_bias", "v_bias", "o_bias")},
    "attn_norm": _same("input_layernorm.weight", _D),
    "mlp_norm": _same("post_attention_layernorm.weight", _D),
    **_ffn_rows("feed_forward", "shared_expert"),
    "router": Tensor("feed_forward.router.weight", lambda m: (m.num_experts, m.d_model), _T, _TT),
    ("expert_gate", "expert_up"): Joint(
        lambda m: {"feed_forward.experts.gate_up_proj": (m.num_experts, m.d_model, 2 * _I(m))},
        lambda a, m: {"feed_forward.experts.gate_up_proj": np.concatenate([a["expert_gate"], a["expert_up"]], -1)},
        lambda w, m: dict(zip(("expert_gate", "expert_up"), np.split(w["feed_forward.experts.gate_up_proj"], 2, -1))),
    ),
    "expert_down": Tensor("feed_forward.experts.down_proj", lambda m: (m.num_experts, _I(m), m.d_model),
                          lambda a: a, lambda w, m: w),
    "expert_bias": Joint(lambda m: {}, lambda a, m: {}, lambda w, m: {"expert_bias": np.zeros(m.num_experts)}),
}  # fmt: skip


def _read_afmoe_head_dim(name, value, hf):
    if value is None:  # AfmoeAttention reads config.head_dim as is
        raise HFConfigError(name, value, "transformers' AFMoE attention needs an explicit head_dim",
                            "set head_dim in config.json")  # fmt: skip
    return _read_head_dim_free(name, value, hf)


def _positive_int(key: str):
    def read(name, value, hf):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise HFConfigError(name, value, "must be a positive integer", "fix the value in config.json")
        return {key: value}

    return read


def _read_afmoe_shared(name, value, hf):
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise HFConfigError(name, value, "nopejax maps AFMoE with at least one shared expert",
                            "import a checkpoint with num_shared_experts >= 1")  # fmt: skip
    return {"num_shared_experts": value}


def _read_afmoe_layers(name, value, hf):
    """AFMoE: layer_types as given, else sliding except every global_attn_every_n_layers-th layer.
    RoPE on exactly the sliding layers (AfmoeAttention rotates only `is_local_attention` layers)."""
    types = _sliding_every(name, value, hf, "global_attn_every_n_layers", "AFMoE")
    return _rope_on_sliding(types, _window("sliding_window", hf["sliding_window"]))


def _read_mup(name, value, hf):
    """AFMoE mup_enabled: the embeddings times sqrt(hidden_size), as AfmoeModel computes it."""
    if not isinstance(value, bool):
        raise HFConfigError(name, value, "expected a bool", "fix the value in config.json")
    return {"embed_scale": float(hf["hidden_size"] ** 0.5)} if value else {}


def _read_llama4_rope(name, value, hf):
    """Llama 4: no_rope_layers (1 = RoPE) when non-empty, else NoPE every no_rope_layer_interval-th layer;
    RoPE layers rotate interleaved pairs (complex multiplication)."""
    out = _read_rope_pattern(name, value or None, hf)
    return {**out, "rope_layout": "interleaved"} if any(out["no_rope_layers"]) else out


def _read_llama4_layers(name, value, hf):
    """Llama 4: layer_types as given, else chunked on the RoPE layers when attention_chunk_size is set."""
    L, chunk = hf["num_hidden_layers"], hf["attention_chunk_size"]
    if value is None:
        rope = _read_rope_pattern("no_rope_layers", hf["no_rope_layers"] or None, hf)["no_rope_layers"]
        value = ["chunked_attention" if r and chunk is not None else "full_attention" for r in rope]
    kinds = ("full_attention", "chunked_attention")
    if not isinstance(value, list) or len(value) < L or any(t not in kinds for t in value[:L]):
        raise HFConfigError(name, value, f"Llama 4 layers are one of {list(kinds)}, one per layer ({L} layers)",
                            "fix the list")  # fmt: skip
    types = tuple(value[:L])
    if "chunked_attention" not in types:
        return {"layer_types": types}
    if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1:
        raise HFConfigError("attention_chunk_size", chunk, "chunked_attention layers need a chunk size >= 1",
                            "set attention_chunk_size in config.json")  # fmt: skip
    return {"layer_types": types, "attention_chunk_size": chunk}


def _llama4_rope_flags(hf) -> tuple:
    rope = _read_rope_pattern("no_rope_layers", hf["no_rope_layers"] or None, hf)["no_rope_layers"]
    return tuple(rope[: hf["num_hidden_layers"]])


def _read_llama4_qk_norm(name, value, hf):
    """use_qk_norm: the weightless L2 norm, on the RoPE layers only (none there: nothing to norm)."""
    if not isinstance(value, bool):
        raise HFConfigError(name, value, "expected a bool", "fix the value in config.json")
    return {"qk_norm": "l2"} if value and any(_llama4_rope_flags(hf)) else {}


def _read_llama4_temperature(name, value, hf):
    """attn_temperature_tuning: q *= log1p(floor((pos + 1) / floor_scale)) * attn_scale + 1 on NoPE layers."""
    if not isinstance(value, (bool, int)):  # the hub's Scout config says 4: transformers 4 read it as true
        raise HFConfigError(name, value, "expected a bool", "fix the value in config.json")
    floor_scale, attn_scale = hf["floor_scale"], hf["attn_scale"]
    if not value or all(_llama4_rope_flags(hf)) or attn_scale == 0:  # no NoPE layer, or a scale of exactly 1
        return {}
    if not isinstance(floor_scale, int) or isinstance(floor_scale, bool) or floor_scale < 1:
        raise HFConfigError("floor_scale", floor_scale, "must be a positive integer", "fix the value")
    if isinstance(attn_scale, bool) or not isinstance(attn_scale, (int, float)) or not attn_scale > 0:
        raise HFConfigError("attn_scale", attn_scale, "nopejax takes a positive attn_scale (or 0: off)", "fix it")
    return {"nope_temperature": (float(floor_scale), float(attn_scale))}


def _read_llama4_moe_layers(name, value, hf):
    """moe_layers as given, else every interleave_moe_layer_step-th layer; nopejax's MoE layers are
    those with (i + 1) % moe_layer_interval == 0, so an explicit list must be such a pattern."""
    L, step = hf["num_hidden_layers"], hf["interleave_moe_layer_step"]
    if value is None:
        step = _interval("interleave_moe_layer_step", step, "when moe_layers is absent")
        value = list(range(step - 1, L, step))
    patterns = {tuple(range(s - 1, L, s)): s for s in range(1, L + 1)}
    if not isinstance(value, list) or tuple(value) not in patterns:
        raise HFConfigError(
            name, value, "nopejax places MoE layers every k-th layer ((i + 1) % k == 0), at least one",
            "import a checkpoint whose moe_layers is such a pattern",
        )  # fmt: skip
    return {"moe_layer_interval": patterns[tuple(value)]}


def _sliding_rope_only(m) -> bool:
    return all(spec.use_rope == (spec.attention == "sliding") for spec in layers.layer_specs(m))


MOE_LACKS = (
    ("num_experts", lambda m: m.num_experts == 0, "dense-only model (nopejax maps its MoE layers)"),
    ("capacity_factor", lambda m: m.capacity_factor != 0, "capacity-limited routing (transformers is dropless)"),
    ("partial_rotary_factor", lambda m: m.partial_rotary_factor != 1.0, "partial RoPE"),
    ("rope_theta_local", lambda m: m.rope_theta_local is not None, "a separate RoPE base for local layers"),
    ("norm", lambda m: m.norm != "rms", "LayerNorm (its norms are RMSNorm)"),
    ("logit_scale", lambda m: m.logit_scale != 1.0, "a logit scale"),
    ("mlp_bias", lambda m: m.mlp_bias, "MLP biases"),
    ("router", lambda m: m.router != "sigmoid", "softmax router (its router is sigmoid)"),
)
AFMOE_LACKS = (
    *MOE_LACKS,
    ("attention_chunk_size", lambda m: m.attention_chunk_size is not None, "chunked attention"),
    ("nope_temperature", lambda m: m.nope_temperature is not None, "a NoPE query temperature"),
    ("block", lambda m: m.block != "sandwich", "block other than sandwich"),
    ("qk_norm", lambda m: m.qk_norm != "rms", "layer without the per-head RMS QK-norm"),
    ("attention_gate", lambda m: not m.attention_gate, "attention without the output gate"),
    ("embed_scale", lambda m: not (m.embed_scale == 1.0 or math.isclose(m.embed_scale, m.d_model**0.5, rel_tol=1e-12)),
     "embedding scale other than 1 or sqrt(hidden_size) (mup_enabled)"),
    ("rope_layout", lambda m: m.rope_layout != "half" and _ROPE_LAYERS(m), "the interleaved RoPE layout"),
    ("no_rope_layers", lambda m: not _sliding_rope_only(m),
     "RoPE/NoPE pattern other than RoPE on exactly the sliding layers"),
    ("moe_layer_interval", lambda m: m.moe_layer_interval != 1, "interleaved dense layers past num_dense_layers"),
    ("router_normalize", lambda m: not m.router_normalize, "unnormalised top-k weights"),
    ("router_scale_input", lambda m: m.router_scale_input, "expert inputs scaled by the router weight"),
    ("num_shared_experts", lambda m: m.num_shared_experts == 0, "mapping without a shared expert in nopejax"),
)  # fmt: skip
LLAMA4_LACKS = (
    *MOE_LACKS,
    ("layer_types", lambda m: any(spec.attention == "sliding" for spec in layers.layer_specs(m)),
     "sliding-window layers"),
    ("block", lambda m: m.block != "pre_norm", "block other than pre_norm"),
    ("qk_norm", lambda m: m.qk_norm == "rms", "learned RMS QK-norm (its QK-norm is the weightless L2)"),
    ("attention_gate", lambda m: m.attention_gate, "gated attention output"),
    ("embed_scale", lambda m: m.embed_scale != 1.0, "embedding scale"),
    ("rope_layout", lambda m: m.rope_layout != "interleaved" and _ROPE_LAYERS(m), "the half-split RoPE layout"),
    ("nope_temperature", lambda m: m.nope_temperature is not None and not float(m.nope_temperature[0]).is_integer(),
     "non-integer floor_scale"),
    ("num_dense_layers", lambda m: m.num_dense_layers != 0, "dense first layers (moe_layers is periodic here)"),
    ("router_scale_input", lambda m: not m.router_scale_input, "router weights on the expert outputs"),
    ("num_shared_experts", lambda m: m.num_shared_experts != 1, "shared experts other than exactly one"),
    ("expert_bias_rate", lambda m: m.expert_bias_rate != 0, "expert bias (the update would make one)"),
)  # fmt: skip


def _global_every(m) -> int:
    """AFMoE's global_attn_every_n_layers giving the layer types, or its default when none does."""
    types = _types(m)
    for n in range(1, m.num_layers + 2):
        if types == ["sliding_attention" if (i + 1) % n else "full_attention" for i in range(m.num_layers)]:
            return n
    return 4


def _afmoe_config(m) -> dict:
    return {
        "intermediate_size": m.d_ff,
        "moe_intermediate_size": moe.expert_width(m),
        "num_dense_layers": m.num_dense_layers,
        "num_experts": m.num_experts,
        "num_experts_per_tok": m.experts_per_token,
        "num_shared_experts": m.num_shared_experts,
        "route_scale": float(m.routed_scale),
        "layer_types": _types(m),
        "global_attn_every_n_layers": _global_every(m),
        # transformers builds the sliding mask even when no layer slides; it then masks nothing
        "sliding_window": m.sliding_window or m.max_position_embeddings,
        "mup_enabled": m.embed_scale != 1.0,
        "rms_norm_eps": m.rms_norm_eps,
        "attention_bias": bool(m.attention_bias),
    }


def _llama4_config(m) -> dict:
    t = m.nope_temperature
    rope = [int(x) for x in layers.rope_pattern(m)]
    return {
        "intermediate_size": moe.expert_width(m),
        "intermediate_size_mlp": m.d_ff,
        "num_local_experts": m.num_experts,
        "num_experts_per_tok": m.experts_per_token,
        "moe_layers": [i for i, spec in enumerate(layers.layer_specs(m)) if spec.ffn == "moe"],
        "interleave_moe_layer_step": m.moe_layer_interval,
        "no_rope_layers": rope,
        "no_rope_layer_interval": m.no_rope_layer_interval or 4,  # read only when no_rope_layers is empty
        "layer_types": _types(m),
        "attention_chunk_size": m.attention_chunk_size,
        "use_qk_norm": m.qk_norm == "l2",
        "attn_temperature_tuning": t is not None,
        "floor_scale": int(t[0]) if t else 8192,
        "attn_scale": float(t[1]) if t else 0.1,
        "rms_norm_eps": m.rms_norm_eps,
        "attention_bias": bool(m.attention_bias),
    }


def _llama4_params(m, params) -> None:
    """Llama 4 has no expert bias: a nonzero one (trained with expert_bias_rate) cannot be written."""
    bias = np.asarray(params["layers"]["expert_bias"])
    if np.any(bias != 0):
        raise config.ConfigError(
            "model.expert_bias_rate", f"the params hold a nonzero expert bias (max |b| = {np.abs(bias).max():.3g}), "
            "but the Llama4 format has no expert bias, so transformers would route differently",
            "export to afmoe, or train Llama 4 models with expert_bias_rate = 0",
        )  # fmt: skip


AFMOE = Family(
    "afmoe",
    "AfmoeForCausalLM",
    {
        **_without("mlp_bias"),  # AFMoE's MLPs have no biases: refused
        **_defaults(vocab_size=200192, hidden_size=2048, intermediate_size=6144, num_hidden_layers=32,
                    num_attention_heads=16, max_position_embeddings=16384, rms_norm_eps=1e-5,
                    tie_word_embeddings=False, rope_theta=10_000.0),
        "architectures": Field(None, _architectures("AfmoeForCausalLM")),
        "head_dim": Field(128, _read_afmoe_head_dim),
        "moe_intermediate_size": Field(1408, _positive_int("expert_d_ff")),
        "num_dense_layers": Field(1, _to("num_dense_layers", int)),
        "num_experts": Field(64, _positive_int("num_experts")),
        "num_experts_per_tok": Field(6, _positive_int("experts_per_token")),
        "num_shared_experts": Field(2, _read_afmoe_shared),
        "route_scale": Field(1.0, _positive_float("routed_scale")),
        "output_router_logits": Field(False, harmless),
        "layer_types": Field(None, _read_afmoe_layers),
        "global_attn_every_n_layers": Field(4, harmless),  # read by the layer_types row
        "sliding_window": Field(1024, harmless),  # read by the layer_types row
        "mup_enabled": Field(False, _read_mup),
        # the hub checkpoints' config.json carries these (Arcee's remote code); transformers' AFMoE
        # ignores them, so they are accepted only where they say what transformers computes anyway
        "auto_map": Field(None, harmless),  # remote-code class names; nopejax computes transformers' own
        "use_grouped_mm": Field(None, harmless),  # a kernel choice
        "load_balance_coeff": Field(None, harmless),  # a training loss weight
        "score_func": Field(None, _only(None, "sigmoid", problem="transformers' AFMoE router is sigmoid",
                                        fix="remove it")),
        "route_norm": Field(None, _only(None, True, problem="transformers' AFMoE normalises the top-k weights",
                                        fix="remove it")),
        **{name: Field(None, _only(None, 1, problem="transformers' AFMoE routes without expert groups",
                                   fix="remove it"))
           for name in ("n_group", "topk_group", "num_expert_groups", "num_limited_groups")},
    },
    {"block": "sandwich", "qk_norm": "rms", "attention_gate": True, "router": "sigmoid", "router_normalize": True,
     "hf_family": "afmoe"},
    AFMOE_LAYER_MAP,
    AFMOE_LACKS,
    _afmoe_config,
)  # fmt: skip

LLAMA4 = Family(
    "llama4_text",
    "Llama4ForCausalLM",
    {
        **_without("mlp_bias"),  # Llama 4's MLPs have no biases: refused
        **_defaults(vocab_size=202048, hidden_size=5120, num_hidden_layers=48, num_attention_heads=40,
                    num_key_value_heads=8, max_position_embeddings=4096 * 32, rms_norm_eps=1e-5,
                    tie_word_embeddings=False, rope_theta=500_000.0, bos_token_id=1, eos_token_id=2),
        "architectures": Field(None, _architectures("Llama4ForCausalLM")),
        "head_dim": Field(128, _read_head_dim_free),
        "intermediate_size": Field(8192, _positive_int("expert_d_ff")),  # routed and shared experts
        "intermediate_size_mlp": Field(16384, _positive_int("d_ff")),  # the dense layers
        "num_local_experts": Field(16, _positive_int("num_experts")),
        "num_experts_per_tok": Field(1, _positive_int("experts_per_token")),
        "moe_layers": Field(None, _read_llama4_moe_layers),
        "interleave_moe_layer_step": Field(1, harmless),  # read by the moe_layers row
        "no_rope_layers": Field(None, _read_llama4_rope),
        "no_rope_layer_interval": Field(4, harmless),  # read by the no_rope_layers row
        "layer_types": Field(None, _read_llama4_layers),
        "attention_chunk_size": Field(8192, harmless),  # read by the layer_types row
        "use_qk_norm": Field(True, _read_llama4_qk_norm),
        "attn_temperature_tuning": Field(True, _read_llama4_temperature),
        "floor_scale": Field(8192, harmless),  # read by the attn_temperature_tuning row
        "attn_scale": Field(0.1, harmless),  # read by the attn_temperature_tuning row
        "output_router_logits": Field(False, harmless),
        "router_aux_loss_coef": Field(0.001, harmless),  # a training loss weight, not in the forward
        "router_jitter_noise": Field(0.0, harmless),  # not read by Llama4TextMoe
        # the hub's Llama 4 text configs carry these; transformers' Llama 4 does not read them
        "for_llm_compressor": Field(None, harmless),
        "cache_implementation": Field(None, harmless),  # generation only
    },
    {"block": "pre_norm", "router": "sigmoid", "router_scale_input": True, "num_shared_experts": 1,
     "hf_family": "llama4"},
    LLAMA4_LAYER_MAP,
    LLAMA4_LACKS,
    _llama4_config,
    _llama4_params,
)  # fmt: skip

FAMILIES = {family.model_type: family for family in (SMOLLM3, LLAMA, COHERE2, EXAONE4, AFMOE, LLAMA4)}
FAMILIES["llama4"] = LLAMA4  # nopejax's name for it (model.hf_family); config.json says llama4_text


def model_config_from_hf(hf: dict) -> config.ConfigDict:
    """The nopejax model config of a transformers config.json, exact or refused (HFConfigError)."""
    family = FAMILIES.get(hf.get("model_type"))
    if hf.get("model_type") == "llama4":  # Llama4ForConditionalGeneration: a vision tower beside the text model
        raise HFConfigError(
            "model_type", "llama4", "a multimodal Llama 4 checkpoint; nopejax imports the text model only "
            "(Llama4ForCausalLM, model_type llama4_text), and never skips a weight (the vision tower's)",
            "save its language model alone: Llama4ForConditionalGeneration.from_pretrained(dir)"
            ".language_model.save_pretrained(text_dir), then import text_dir",
        )  # fmt: skip
    if family is None:
        types = sorted({f.model_type for f in FAMILIES.values()})  # config.json's names, not the aliases
        raise HFConfigError("model_type", hf.get("model_type"), f"nopejax imports {types} only",
                            "convert a checkpoint of a supported family")  # fmt: skip
    unknown = [name for name in hf if name not in family.fields]
    if unknown:
        raise HFConfigError(
            unknown[0], hf[unknown[0]],
            f"nopejax has no row for this {family.model_type} field, so it cannot tell whether the model depends on it",
            f"add one to nopejax.hf.{family.model_type.upper()} (or delete the field if transformers ignores it)",
        )  # fmt: skip
    full = {name: field.default for name, field in family.fields.items()} | hf
    m = config.base_config().model
    m.update(family.base)
    for name, field in family.fields.items():
        m.update(field.read(name, full[name], full))
    return m


# ---------------------------------------------------------------------------------------------
# nopejax -> config.json: the mirror rule


# nopejax model fields the families' config.json express (each family's `lacks` refuses what its own cannot) ...
EXPORTED_FIELDS = {
    "vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim", "d_ff",
    "no_rope_layer_interval", "no_rope_layers", "rope_theta", "rope_scaling", "max_position_embeddings",
    "tie_embeddings", "rms_norm_eps", "attention_bias", "mlp_bias", "layer_types", "global_attention_interval",
    "sliding_window", "rope_layout", "qk_norm", "norm", "block", "logit_scale",
    *(field for field, _, _ in NOBODY_HAS),
    # MoE: each family's lacks refuses what it cannot hold
    "experts_per_token", "expert_d_ff", "num_shared_experts", "router", "router_normalize", "routed_scale",
    "router_scale_input", "num_dense_layers", "moe_layer_interval", "capacity_factor",
}  # fmt: skip
# ... and those that only say how nopejax trains or runs it, not what it computes.
RUNTIME_FIELDS = {"init_std", "dtype", "param_dtype", "attention_impl", "scan_layers", "remat", "hf_family",
                  "balance_loss_weight", "router_z_loss_weight", "expert_bias_rate"}  # fmt: skip


def check_exportable(m: config.ConfigDict, family: str | None = None) -> None:
    """Refuse, before anything is written, a model the family's config.json cannot express (default:
    `m.hf_family`): the first feature it has no field for, then any other field away from its default."""
    fam = FAMILIES[family or m.hf_family]
    name = fam.architecture.removesuffix("ForCausalLM")
    derived = {"no_rope_layers": [int(x) for x in layers.rope_pattern(m)], "layer_types": _types(m)}
    for field, in_use, lacks in fam.lacks:
        if in_use(m):
            value = derived[field] if field in derived else m[field]  # the per-layer lists as resolved
            raise config.ConfigError(
                f"model.{field}", f"is {value!r}, but the {name} format has no {lacks}, so transformers "
                "would run a different model", f"export to a family that has it (model.hf_family, one of "
                f"{list(config.HF_FAMILIES)}), or use the params directly with nopejax",
            )  # fmt: skip
    defaults = config.to_dict(config.base_config())["model"]
    given = json.loads(m.to_json_best_effort())  # plain JSON both sides: frozen configs hold tuples
    for key in given:
        if key in EXPORTED_FIELDS or key in RUNTIME_FIELDS:
            continue
        if key not in defaults or given[key] != defaults[key]:
            raise config.ConfigError(
                f"model.{key}", f"{m[key]!r} has no counterpart in transformers' {name} config",
                f"export only models {name} can express exactly (keep this field at its default)",
            )  # fmt: skip


def hf_config(m: config.ConfigDict, token_ids: dict | None = None, dtype: str = "float32") -> dict:
    """The config.json of `m.hf_family` for a nopejax model config."""
    check_exportable(m)
    fam = FAMILIES[m.hf_family]
    token_ids = token_ids or {}
    rope_parameters = {"rope_type": "default", "rope_theta": float(m.rope_theta)}
    if m.rope_scaling:
        rope_parameters = {**dict(m.rope_scaling), "rope_theta": float(m.rope_theta)}
        rope_parameters["rope_type"] = rope_parameters.pop("type", rope_parameters.get("rope_type"))
    return {
        "architectures": [fam.architecture],
        "model_type": fam.model_type,
        "vocab_size": m.vocab_size,
        "hidden_size": m.d_model,
        "intermediate_size": m.d_ff,
        "num_hidden_layers": m.num_layers,
        "num_attention_heads": m.num_heads,
        "num_key_value_heads": m.num_kv_heads,
        "head_dim": m.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": m.max_position_embeddings,
        "rope_theta": float(m.rope_theta),  # transformers < 5 reads these two
        "rope_scaling": None if not m.rope_scaling else dict(rope_parameters),
        "rope_parameters": rope_parameters,  # transformers >= 5
        **fam.config(m),
        "tie_word_embeddings": bool(m.tie_embeddings),
        "torch_dtype": dtype,
        "bos_token_id": token_ids.get("bos"),
        "eos_token_id": token_ids.get("eos"),
        "pad_token_id": token_ids.get("pad"),
    }


# ---------------------------------------------------------------------------------------------
# Weights


def from_hf(path: str, *, dtype: str = "float32", param_dtype: str = "float32") -> model.Decoder:
    """A nopejax Decoder with the weights of a transformers checkpoint directory (any of FAMILIES).

    Exact or refused: config.json is read field by field (HFConfigError) and the safetensors
    headers are checked against the map (HFTensorError) before any weight is read.
    """
    with open(os.path.join(path, "config.json")) as f:
        m = model_config_from_hf(json.load(f))
    m.dtype, m.param_dtype = dtype, param_dtype
    cfg = config.base_config()
    cfg.model = m
    config.validate(cfg)
    return build(m, load_params(path, m))


def check_tensors(reader: tensorfile.Reader, m: config.ConfigDict) -> None:
    """The checkpoint holds exactly the tensors `m` consumes, with their shapes: checked on the
    headers, before any weight is read. A tensor nopejax would skip means a model it would not
    compute (biases the config switches off, another architecture's extra weights)."""
    expected = hf_tensor_shapes(m)
    if m.tie_embeddings and "lm_head.weight" in reader:  # compared with the embedding by load_params
        expected["lm_head.weight"] = (m.vocab_size, m.d_model)
    extra = [name for name in reader.names() if name not in expected]
    if extra:
        raise HFTensorError(
            extra[0], f"is not consumed by nopejax's map for this config.json ({len(extra)} such tensors)",
            "make config.json describe these weights (e.g. attention_bias / mlp_bias), or import a "
            "checkpoint of a supported architecture; nopejax never skips a weight",
        )  # fmt: skip
    missing = [name for name in expected if name not in reader]
    if missing:
        raise HFTensorError(
            missing[0], f"is missing ({len(missing)} missing in all)",
            "the checkpoint is incomplete for its config.json (e.g. attention_bias true but no biases saved)",
        )  # fmt: skip
    for name, shape in expected.items():
        if reader.shape(name) != shape:
            raise HFTensorError(name, f"has shape {reader.shape(name)}, config.json implies {shape}",
                                "fix config.json or the checkpoint")  # fmt: skip
        if reader.dtype(name) not in tensorfile.FLOAT_DTYPES:
            raise HFTensorError(name, f"has dtype {reader.dtype(name)}",
                                f"import an unquantized checkpoint ({sorted(tensorfile.FLOAT_DTYPES)})")  # fmt: skip


def load_params(path: str, m: config.ConfigDict) -> dict:
    """HF tensors -> nopejax pure param dict (numpy, param dtype), read one tensor at a time."""
    reader = tensorfile.Reader(path)
    check_tensors(reader, m)
    pdtype = np.dtype(jnp.dtype(m.param_dtype))
    params = {"embed": reader.get("model.embed_tokens.weight").astype(pdtype)}
    tied_head = m.tie_embeddings and "lm_head.weight" in reader  # consumed as a check: transformers ignores it
    if tied_head and not np.array_equal(reader.get("lm_head.weight").astype(pdtype), params["embed"]):
        raise HFTensorError(
            "lm_head.weight", "differs from model.embed_tokens.weight, but tie_word_embeddings is true "
            "(transformers would use the embedding)",
            "set tie_word_embeddings false if the head was trained separately, or delete lm_head.weight",
        )  # fmt: skip
    layers = {
        name: np.empty((model.stack_size(m, name), *shape_fn(m)), pdtype)
        for name, (shape_fn, _) in model.layer_params(m).items()
    }
    for i, rows in enumerate(layer_rows(m)):
        for index, row in rows:
            got = row.from_hf({suffix: reader.get(f"model.layers.{i}.{suffix}") for suffix in row.shapes(m)}, m)
            for name, w in got.items():
                layers[name][index[name]] = w
    params["layers"] = layers
    params["final_norm"] = reader.get("model.norm.weight").astype(pdtype)
    if not m.tie_embeddings:
        params["lm_head"] = reader.get("lm_head.weight").T.astype(pdtype)
    return params


def build(m: config.ConfigDict, params: dict) -> model.Decoder:
    """A Decoder holding `params` (a pure dict), without spending time on a random init."""
    abstract = nnx.eval_shape(lambda: model.create(m))
    graphdef, state = nnx.split(abstract)
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
    return nnx.merge(graphdef, state)


def to_hf(
    module_or_params,
    out_dir: str,
    model_cfg=None,
    *,
    token_ids: dict | None = None,
    dtype: str | None = None,
    tokenizer=None,
    add_bos: bool = True,
) -> str:
    """Write a transformers directory of `model.hf_family` (config.json + safetensors), one tensor at a time.

    Accepts a Decoder, or a pure param dict (numpy or jax arrays, e.g. restored from a checkpoint
    to host memory) together with its model config. With a `tokenizer` (a `nopejax.data`
    tokenizer) it also writes tokenizer.json, tokenizer_config.json and generation_config.json,
    and the special token ids default to the tokenizer's; `add_bos` (the run's data.add_bos) makes
    the HF tokenizer prepend BOS as nopejax did in training and does in `generate`.
    """
    if tokenizer is not None and token_ids is None:
        token_ids = {"bos": tokenizer.bos_id, "eos": tokenizer.eos_id, "pad": tokenizer.pad_id}
    if isinstance(module_or_params, model.Decoder):
        m = module_or_params.cfg
        params = nnx.to_pure_dict(nnx.state(module_or_params, nnx.Param))
    else:
        m, params = model_cfg, module_or_params
    check_exportable(m)  # the mirror rule, before anything is written
    FAMILIES[m.hf_family].check_params(m, params)  # what the config cannot tell (Llama 4: no expert bias)
    dtype = dtype or m.param_dtype
    np_dtype = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
    os.makedirs(out_dir, exist_ok=True)

    producers = {"model.embed_tokens.weight": lambda: {"model.embed_tokens.weight": params["embed"]}}
    for i, rows in enumerate(layer_rows(m)):
        for index, row in rows:

            def produce(i=i, index=index, row=row):  # all the row's tensors at once (fused / per expert)
                ours = {name: np.asarray(params["layers"][name][j]) for name, j in index.items()}
                return {f"model.layers.{i}.{suffix}": a for suffix, a in row.to_hf(ours, m).items()}

            for suffix in row.shapes(m):
                producers[f"model.layers.{i}.{suffix}"] = produce
    producers["model.norm.weight"] = lambda: {"model.norm.weight": params["final_norm"]}
    if not m.tie_embeddings:
        producers["lm_head.weight"] = lambda: {"lm_head.weight": np.asarray(params["lm_head"]).T}
    pending = {}  # tensors a row produced together, handed out one by one (the file order keeps them adjacent)

    def produce_one(name):
        if name not in pending:
            pending.update(producers[name]())
        return pending.pop(name)

    # shapes from the config alone: nothing is materialised to plan the files
    specs = [
        (name, shape, np.dtype(np.float32) if name.endswith(KEEP_FP32) else np_dtype)
        for name, shape in hf_tensor_shapes(m).items()
    ]
    tensorfile.write(out_dir, specs, produce_one)  # write() converts to each spec's dtype
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf_config(m, token_ids, dtype), f, indent=2)
    if tokenizer is not None:
        tokenizer.save_for_hf(out_dir, model_max_length=m.max_position_embeddings, add_bos=add_bos)
    return out_dir
