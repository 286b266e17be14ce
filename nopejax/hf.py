"""HuggingFace transformers interop: per family an explicit name map plus documented transposes.

Families: SmolLM3 and Llama (pre-norm RMSNorm), Cohere2 (Command R7B, Tiny Aya: parallel block,
LayerNorm without bias, interleaved RoPE on the sliding layers only, logit scale) and EXAONE 4
(post-norm RMSNorm, per-head RMS QK-norm, RoPE on the sliding layers only). `from_hf` picks the
family by config.json's `model_type`; `to_hf` writes `model.hf_family`.

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
import os
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from nopejax import config, model, tensorfile


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


def hf_tensor_shapes(m: config.ConfigDict) -> dict[str, tuple[int, ...]]:
    """Every tensor of the HF checkpoint of model config `m` (its `hf_family`), with its shape, in file order."""
    layer_map = FAMILIES[m.hf_family].layer_map
    shapes = {"model.embed_tokens.weight": (m.vocab_size, m.d_model)}
    for i in range(m.num_layers):
        for name in model.layer_params(m):
            shapes[f"model.layers.{i}.{layer_map[name].suffix}"] = layer_map[name].shape(m)
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


def _read_cohere2_layers(name, value, hf):
    """Cohere2: layer_types as given, else derived from sliding_window_pattern (default 4: layer i is
    full when (i + 1) % 4 == 0). Sliding layers rotate interleaved pairs; full layers are NoPE."""
    L = hf["num_hidden_layers"]
    if value is None:
        p = _interval("sliding_window_pattern", hf["sliding_window_pattern"], "when layer_types is absent")
        value = ["sliding_attention" if (i + 1) % p else "full_attention" for i in range(L)]
    types = _kinds(name, value, L, "Cohere2")
    if hf["sliding_window"] is None:  # transformers builds the sliding mask for every Cohere2 model
        raise HFConfigError("sliding_window", None, "transformers' Cohere2 cannot run without a window",
                            "set sliding_window in config.json")  # fmt: skip
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


def _defaults(**defaults) -> dict[str, Field]:
    return {name: COMMON_FIELDS[name]._replace(default=value) for name, value in defaults.items()}


def _without(*names) -> dict[str, Field]:
    return {k: v for k, v in COMMON_FIELDS.items() if k not in names}


def _sliding_rope(m) -> bool:
    """Does every layer rotate exactly when it is sliding (Cohere2, EXAONE 4 with a window)?"""
    return all(spec.use_rope == (spec.attention == "sliding") for spec in config.layer_specs(m))


# No family here has these (Llama 4, Gemma 3 and Qwen-style features nopejax computes).
NOBODY_HAS = (
    ("attention_chunk_size", lambda m: m.attention_chunk_size is not None, "chunked attention"),
    ("partial_rotary_factor", lambda m: m.partial_rotary_factor != 1.0, "partial RoPE"),
    ("rope_theta_local", lambda m: m.rope_theta_local is not None, "a separate RoPE base for local layers"),
    ("nope_temperature", lambda m: m.nope_temperature is not None, "a NoPE query temperature"),
)
_ROPE_LAYERS = lambda m: any(config.rope_pattern(m))
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
    ("no_rope_layers", lambda m: not all(config.rope_pattern(m)), "NoPE layers (every Llama layer rotates)"),
    ("layer_types", lambda m: any(spec.local for spec in config.layer_specs(m)), "sliding-window layers"),
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
    ("no_rope_layers", lambda m: not (_sliding_rope(m) or (all(config.rope_pattern(m))
                                                         and not any(s.local for s in config.layer_specs(m)))),
     "RoPE/NoPE pattern other than RoPE on exactly the sliding layers (or on every layer of an all-global model)"),
)  # fmt: skip


def _types(m) -> list[str]:
    return [f"{spec.attention}_attention" for spec in config.layer_specs(m)]


def _smollm3_config(m) -> dict:
    sliding = "sliding_attention" in _types(m)
    return {
        "rms_norm_eps": m.rms_norm_eps,
        "no_rope_layers": [int(x) for x in config.rope_pattern(m)],
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
    if window is None and not all(config.rope_pattern(m)):
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
        "layer_norm_eps": Field(1e-5, _to("rms_norm_eps", float)),  # nopejax's one eps, for LayerNorm too
        "rms_norm_eps": Field(None, harmless),  # not read by Cohere2
        "logit_scale": Field(0.0625, _positive_float("logit_scale")),
        "layer_types": Field(None, _read_cohere2_layers),
        "sliding_window": Field(4096, harmless),  # read by the layer_types row
        "sliding_window_pattern": Field(4, harmless),  # read by the layer_types row (hub configs carry it)
        # Command R7B's config.json carries these; transformers' Cohere2 ignores them, so they are
        # accepted only where they say what transformers computes anyway
        "cache_implementation": Field(None, harmless),  # generation only
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

FAMILIES = {family.model_type: family for family in (SMOLLM3, LLAMA, COHERE2, EXAONE4)}


def model_config_from_hf(hf: dict) -> config.ConfigDict:
    """The nopejax model config of a transformers config.json, exact or refused (HFConfigError)."""
    family = FAMILIES.get(hf.get("model_type"))
    if family is None:
        raise HFConfigError("model_type", hf.get("model_type"), f"nopejax imports {sorted(FAMILIES)} only",
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
}  # fmt: skip
# ... and those that only say how nopejax trains or runs it, not what it computes.
RUNTIME_FIELDS = {"init_std", "dtype", "param_dtype", "attention_impl", "scan_layers", "remat", "hf_family"}


def check_exportable(m: config.ConfigDict, family: str | None = None) -> None:
    """Refuse, before anything is written, a model the family's config.json cannot express (default:
    `m.hf_family`): the first feature it has no field for, then any other field away from its default."""
    fam = FAMILIES[family or m.hf_family]
    name = fam.architecture.removesuffix("ForCausalLM")
    derived = {"no_rope_layers": [int(x) for x in config.rope_pattern(m)], "layer_types": _types(m)}
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
    layers, layer_map = {}, FAMILIES[m.hf_family].layer_map
    for name in model.layer_params(m):
        stacked = None
        for i in range(m.num_layers):
            w = layer_map[name].from_hf(reader.get(f"model.layers.{i}.{layer_map[name].suffix}"), m)
            if stacked is None:
                stacked = np.empty((m.num_layers, *w.shape), pdtype)
            stacked[i] = w
        layers[name] = stacked
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
) -> str:
    """Write a transformers directory of `model.hf_family` (config.json + safetensors), one tensor at a time.

    Accepts a Decoder, or a pure param dict (numpy or jax arrays, e.g. restored from a checkpoint
    to host memory) together with its model config. With a `tokenizer` (a `nopejax.data`
    tokenizer) it also writes tokenizer.json, tokenizer_config.json and generation_config.json,
    and the special token ids default to the tokenizer's.
    """
    if tokenizer is not None and token_ids is None:
        token_ids = {"bos": tokenizer.bos_id, "eos": tokenizer.eos_id, "pad": tokenizer.pad_id}
    if isinstance(module_or_params, model.Decoder):
        m = module_or_params.cfg
        params = nnx.to_pure_dict(nnx.state(module_or_params, nnx.Param))
    else:
        m, params = model_cfg, module_or_params
    check_exportable(m)  # the mirror rule, before anything is written
    dtype = dtype or m.param_dtype
    np_dtype = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
    os.makedirs(out_dir, exist_ok=True)

    producers, layer_map = {"model.embed_tokens.weight": lambda: params["embed"]}, FAMILIES[m.hf_family].layer_map
    for i in range(m.num_layers):
        for name in model.layer_params(m):
            producers[f"model.layers.{i}.{layer_map[name].suffix}"] = lambda name=name, i=i: layer_map[name].to_hf(
                np.asarray(params["layers"][name][i])
            )
    producers["model.norm.weight"] = lambda: params["final_norm"]
    if not m.tie_embeddings:
        producers["lm_head.weight"] = lambda: np.asarray(params["lm_head"]).T

    # shapes from the config alone: nothing is materialised to plan the files
    specs = [(name, shape, np_dtype) for name, shape in hf_tensor_shapes(m).items()]
    tensorfile.write(out_dir, specs, lambda name: producers[name]())  # write() converts to np_dtype
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf_config(m, token_ids, dtype), f, indent=2)
    if tokenizer is not None:
        tokenizer.save_for_hf(out_dir, model_max_length=m.max_position_embeddings)
    return out_dir
