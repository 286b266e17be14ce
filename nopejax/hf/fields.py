"""config.json <-> nopejax, one row per field: accepted, translated, or refused with the reason.

Import: a family's rows (a dict of `Field`) cover every field of its transformers config class.
A row's `read(name, value, hf)` gets the field's name and value and the whole config.json laid
over the family's defaults, and returns the nopejax model fields it sets ({} for a field that
does not change what the model computes), or raises HFConfigError. A field with no row is
refused: its meaning is unknown, so nopejax cannot claim to compute what transformers does.

Export mirrors it: a family's `MIXERS` and `FFNS` (the layer kinds its format holds) refuse a
model with a layer of another kind (`layer_kinds`), then its `lacks` rows (model field, does `m`
use it, what the format lacks) refuse, in order, a nopejax model the family's config.json cannot
express.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from nopejax import config, layers, tensorfile


class HFConfigError(config.ConfigError):
    """A config.json field nopejax cannot honour exactly: names the field, its value and the fix."""

    def __init__(self, field: str, value, problem: str, fix: str):
        self.field, self.value, self.problem, self.fix = field, value, problem, fix
        ValueError.__init__(self, f"HF config.json field `{field}` = {value!r}: {problem}. Fix: {fix}.")


class Field(NamedTuple):
    default: object  # transformers' value when config.json leaves the field out
    read: Callable[[str, object, dict], dict]


# ---------------------------------------------------------------------------------------------
# Row kinds


def harmless(name, value, hf) -> dict:
    """Any value is fine: the field does not change the function the model computes."""
    return {}


def to(key: str, kind: type):
    """Honoured as nopejax `model.<key>`, after a type check (JSON is the only guard before it)."""

    def read(name, value, hf):
        widening = kind is float and isinstance(value, int)
        if isinstance(value, bool) != (kind is bool) or not (isinstance(value, kind) or widening):
            raise HFConfigError(name, value, f"expected a {kind.__name__}", "fix the value in config.json")
        return {key: kind(value)}

    return read


def positive_int(key: str):
    """Honoured as nopejax `model.<key>` when a positive integer."""

    def read(name, value, hf):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise HFConfigError(name, value, "must be a positive integer", "fix the value in config.json")
        return {key: value}

    return read


def positive_float(key: str):
    """Honoured as nopejax `model.<key>` when a positive finite number."""

    def read(name, value, hf):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
            raise HFConfigError(name, value, "must be a positive finite number", "fix the value in config.json")
        return {key: float(value)}

    return read


def only(*allowed, problem: str, fix: str):
    """Accepted at these values (the default among them) only: nopejax implements no other."""

    def read(name, value, hf):
        if value not in allowed:
            raise HFConfigError(name, value, problem, fix)
        return {}

    return read


def agrees_with(other: str, problem: str):
    """A hub field transformers ignores: accepted only where it says what transformers computes anyway."""

    def read(name, value, hf):
        if value is not None and value != hf[other]:
            raise HFConfigError(name, value, problem, f"make it agree with {other} = {hf[other]!r}")
        return {}

    return read


def architectures(causal_lm: str):
    """The causal-LM class only: a task head's weights have no place in nopejax."""

    def read(name, value, hf):
        if value is not None and (not isinstance(value, list) or any(a != causal_lm for a in value)):
            raise HFConfigError(
                name, value, f"nopejax imports the causal LM {causal_lm} only",
                "convert the causal-LM checkpoint (a task head's weights have no place in nopejax)",
            )  # fmt: skip
        return {}

    return read


def read_quantization(name, value, hf):
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


def read_kv_heads(name, value, hf):
    return to("num_kv_heads", int)(name, hf["num_attention_heads"] if value is None else value, hf)


def read_head_dim(name, value, hf):
    """HF: `head_dim`, else hidden_size // num_attention_heads; nopejax needs heads * head_dim == hidden."""
    head_dim = hf["hidden_size"] // hf["num_attention_heads"] if value is None else value
    if head_dim * hf["num_attention_heads"] != hf["hidden_size"]:
        raise HFConfigError(
            name, value, f"num_attention_heads * head_dim != hidden_size = {hf['hidden_size']}",
            "nopejax needs num_attention_heads * head_dim == hidden_size; this checkpoint cannot be imported",
        )  # fmt: skip
    return {"head_dim": int(head_dim)}


def read_head_dim_free(name, value, hf):
    """head_dim as given (heads * head_dim may differ from hidden_size: Trinity Mini), else hidden // heads."""
    head_dim = hf["hidden_size"] // hf["num_attention_heads"] if value is None else value
    return to("head_dim", int)(name, head_dim, hf)


def read_rope(name, value, hf):
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


def read_rope_pattern(name, value, hf):
    """no_rope_layers (1 = RoPE) if given, else NoPE every no_rope_layer_interval-th layer (SmolLM3, Llama 4)."""
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


def kinds(name, value, L: int, family: str, allowed=("full_attention", "sliding_attention")) -> tuple[str, ...]:
    """layer_types checked: one of `allowed` per layer (HF reads the first L)."""
    if not isinstance(value, list) or len(value) < L or any(t not in allowed for t in value[:L]):
        raise HFConfigError(
            name, value, f"{family} layers are one of {list(allowed)}, one per layer ({L} layers)", "fix the list"
        )  # fmt: skip
    return tuple(value[:L])


def window(name, value) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise HFConfigError(name, value, "sliding_attention layers need sliding_window >= 1",
                            "set sliding_window in config.json")  # fmt: skip
    return value


def interval(name, value, why: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise HFConfigError(name, value, f"must be a positive integer {why}", "give layer_types explicitly")
    return value


def every(n: int, L: int, other: str, nth: str) -> list[str]:
    """`other` on every layer except every n-th (1-based), which is `nth`."""
    return [other if (i + 1) % n else nth for i in range(L)]


def sliding_every(name, value, hf, interval_key: str, family: str) -> tuple[str, ...]:
    """layer_types as given, else sliding except every `hf[interval_key]`-th layer, full; the family's
    transformers code builds a sliding mask for every model, so a window must be set."""
    L = hf["num_hidden_layers"]
    if value is None:
        n = interval(interval_key, hf[interval_key], "when layer_types is absent")
        value = every(n, L, "sliding_attention", "full_attention")
    types = kinds(name, value, L, family)
    if hf["sliding_window"] is None:
        raise HFConfigError("sliding_window", None, f"transformers' {family} cannot run without a window",
                            "set sliding_window in config.json")  # fmt: skip
    return types


def rope_on_sliding(types: tuple, window: int) -> dict:
    """RoPE on exactly the sliding layers, NoPE on the full ones (Cohere2, EXAONE 4, AFMoE)."""
    out = {"no_rope_layers": tuple(int(t == "sliding_attention") for t in types)}
    if "sliding_attention" in types:
        out.update(layer_types=types, sliding_window=window)
    return out


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
    "is_encoder_decoder": Field(False, only(False, problem="nopejax is decoder-only", fix="import a decoder")),
    "quantization_config": Field(None, read_quantization),  # packed integer weights: refused
    # the model
    "vocab_size": Field(None, to("vocab_size", int)),
    "hidden_size": Field(None, to("d_model", int)),
    "intermediate_size": Field(None, to("d_ff", int)),
    "num_hidden_layers": Field(None, to("num_layers", int)),
    "num_attention_heads": Field(None, to("num_heads", int)),
    "num_key_value_heads": Field(None, read_kv_heads),
    "head_dim": Field(None, read_head_dim),
    "hidden_act": Field("silu", only("silu", problem="nopejax's MLP is SwiGLU (silu)", fix="import a silu model")),
    "max_position_embeddings": Field(None, to("max_position_embeddings", int)),
    "rms_norm_eps": Field(1e-6, to("rms_norm_eps", float)),
    "tie_word_embeddings": Field(None, to("tie_embeddings", bool)),
    "attention_bias": Field(False, to("attention_bias", bool)),
    "mlp_bias": Field(False, to("mlp_bias", bool)),
    "rope_parameters": Field(None, read_rope),
    # read by the rope_parameters row
    "rope_scaling": Field(None, harmless),  # transformers < 5
    "rope_theta": Field(None, harmless),  # transformers < 5; a family's default is its class's default_theta
    "original_max_position_embeddings": Field(None, harmless),
    "partial_rotary_factor": Field(None, harmless),
}  # fmt: skip


def common(*, without=(), **defaults) -> dict[str, Field]:
    """COMMON_FIELDS less the rows `without` (refused: the family has no such thing), with the
    defaults of the family's config class."""
    rows = {k: v for k, v in COMMON_FIELDS.items() if k not in without}
    return rows | {name: COMMON_FIELDS[name]._replace(default=value) for name, value in defaults.items()}


# ---------------------------------------------------------------------------------------------
# Export: what a format cannot hold


def layer_types(m) -> list[str]:
    """config.json's layer_types of nopejax model `m`."""
    return [f"{spec.attention}_attention" for spec in layers.layer_specs(m)]


def sliding_rope(m) -> bool:
    """Does every layer rotate exactly when it is sliding?"""
    return all(spec.use_rope == (spec.attention == "sliding") for spec in layers.layer_specs(m))


def any_rope(m) -> bool:
    return any(layers.rope_pattern(m))


_MIXER_NAMES = {"attention": "attention", "mamba2": "Mamba2", "gated_deltanet": "Gated DeltaNet",
                "none": "no mixer (an FFN-only layer)"}  # fmt: skip
_FFN_NAMES = {"dense": "a dense FFN", "moe": "an MoE FFN", "none": "no FFN (a mixer-only layer)"}


def layer_kinds(m, fmt: str, mixers: tuple, ffns: tuple, holders: Callable[[str, str], list]) -> None:
    """Refuse (config.ConfigError), naming the first layer, a model with a mixer or FFN kind (LayerSpec.mixer,
    .ffn) that the `fmt` format cannot hold; `holders("mixer" | "ffn", kind)` names the families that can."""
    for i, spec in enumerate(layers.layer_specs(m)):
        if spec.mixer not in mixers:
            what, kind, field, names, held = "mixer", spec.mixer, "layer_types", _MIXER_NAMES, mixers
        elif spec.ffn not in ffns:
            field = "ffn_types" if m.ffn_types is not None else "num_experts"
            what, kind, names, held = "ffn", spec.ffn, _FFN_NAMES, ffns
        else:
            continue
        others = holders(what, kind)
        raise config.ConfigError(
            f"model.{field}", f"layer {i} has {names[kind]}, but the {fmt} format has no such layer (its layers "
            f"have {' or '.join(names[k] for k in held)}), so transformers cannot run this model",
            f"export to a family that holds it (model.hf_family, one of {others}), or use the params directly with "
            "nopejax" if others else "no family nopejax exports holds it: use the params directly with nopejax",
        )  # fmt: skip


def no_expert_bias(fmt: str, fix: str):
    """check_params of a format without an expert bias: a nonzero one (trained with expert_bias_rate)
    cannot be written."""

    def check(m, params) -> None:
        bias = np.asarray(params["layers"]["expert_bias"]) if m.num_experts else np.zeros(1)
        if np.any(bias != 0):
            raise config.ConfigError(
                "model.expert_bias_rate", f"the params hold a nonzero expert bias (max |b| = "
                f"{np.abs(bias).max():.3g}), but the {fmt} format has no expert bias, so transformers would "
                "route differently", fix,
            )  # fmt: skip

    return check


# No dense family here has these (Llama 4, Gemma 3 and Qwen-style features nopejax computes).
NOBODY_HAS = (
    ("attention_chunk_size", lambda m: m.attention_chunk_size is not None, "chunked attention"),
    ("partial_rotary_factor", lambda m: m.partial_rotary_factor != 1.0, "partial RoPE"),
    ("rope_theta_local", lambda m: m.rope_theta_local is not None, "a separate RoPE base for local layers"),
    ("nope_temperature", lambda m: m.nope_temperature is not None, "a NoPE query temperature"),
    ("num_experts", lambda m: m.num_experts != 0, "mixture-of-experts layers"),
    ("attention_gate", lambda m: m.attention_gate, "gated attention output"),
    ("embed_scale", lambda m: m.embed_scale != 1.0, "embedding scale"),
)
PRE_NORM_LACKS = (
    *NOBODY_HAS,
    ("rope_layout", lambda m: m.rope_layout != "half" and any_rope(m), "the interleaved RoPE layout"),
    ("qk_norm", lambda m: m.qk_norm != "none", "QK-norm"),
    ("block", lambda m: m.block != "pre_norm", "block other than pre_norm"),
    ("norm", lambda m: m.norm != "rms", "LayerNorm (its norms are RMSNorm)"),
    ("logit_scale", lambda m: m.logit_scale != 1.0, "a logit scale"),
)
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
