"""HuggingFace transformers SmolLM3 interop: an explicit name map plus documented transposes.

nopejax keeps layer params stacked [L, ...] and attention projections split by head;
HF keeps one `nn.Linear` per layer with weight [out, in]. The map (layer i):

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
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from nopejax import config, model, tensorfile

# nopejax layer param -> (HF suffix, to_hf(array) -> [out, in], from_hf(array, model cfg) -> ours)
LAYER_MAP = {
    "attn_norm": ("input_layernorm.weight", lambda a: a, lambda w, m: w),
    "wq": ("self_attn.q_proj.weight", lambda a: a.reshape(a.shape[0], -1).T,
           lambda w, m: w.T.reshape(m.d_model, m.num_heads, m.head_dim)),
    "wk": ("self_attn.k_proj.weight", lambda a: a.reshape(a.shape[0], -1).T,
           lambda w, m: w.T.reshape(m.d_model, m.num_kv_heads, m.head_dim)),
    "wv": ("self_attn.v_proj.weight", lambda a: a.reshape(a.shape[0], -1).T,
           lambda w, m: w.T.reshape(m.d_model, m.num_kv_heads, m.head_dim)),
    "wo": ("self_attn.o_proj.weight", lambda a: a.reshape(-1, a.shape[-1]).T,
           lambda w, m: w.T.reshape(m.num_heads, m.head_dim, m.d_model)),
    "mlp_norm": ("post_attention_layernorm.weight", lambda a: a, lambda w, m: w),
    "w_gate": ("mlp.gate_proj.weight", lambda a: a.T, lambda w, m: w.T),
    "w_up": ("mlp.up_proj.weight", lambda a: a.T, lambda w, m: w.T),
    "w_down": ("mlp.down_proj.weight", lambda a: a.T, lambda w, m: w.T),
}  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Config


# What SmolLM3's format cannot hold: (model field, is it in use, what the format lacks)
SMOLLM3_LACKS = (
    ("attention_chunk_size", lambda m: m.attention_chunk_size is not None, "chunked attention"),
    ("partial_rotary_factor", lambda m: m.partial_rotary_factor != 1.0, "partial RoPE"),
    ("rope_layout", lambda m: m.rope_layout != "half", "the interleaved RoPE layout"),
    ("rope_theta_local", lambda m: m.rope_theta_local is not None, "a separate RoPE base for local layers"),
    ("nope_temperature", lambda m: m.nope_temperature is not None, "a NoPE query temperature"),
    ("qk_norm", lambda m: m.qk_norm != "none", "QK-norm"),
)


def check_exportable(m: config.ConfigDict) -> None:
    """Refuse, before anything is written, a layer spec that a SmolLM3 checkpoint cannot express."""
    for field, in_use, lacks in SMOLLM3_LACKS:
        if in_use(m):
            raise config.ConfigError(
                f"model.{field}", f"is {m[field]!r}, but the SmolLM3 format has no {lacks}, so transformers "
                "would run a different model", "export a model without it (SmolLM3 holds RoPE/NoPE, full and "
                "sliding layers), or use the params directly with nopejax",
            )  # fmt: skip


def hf_config(m: config.ConfigDict, token_ids: dict | None = None, dtype: str = "float32") -> dict:
    """The SmolLM3 config.json for a nopejax model config."""
    check_exportable(m)
    token_ids = token_ids or {}
    types = [f"{spec.attention}_attention" for spec in config.layer_specs(m)]
    sliding = "sliding_attention" in types
    rope_parameters = {"rope_type": "default", "rope_theta": float(m.rope_theta)}
    if m.rope_scaling:
        rope_parameters = {**dict(m.rope_scaling), "rope_theta": float(m.rope_theta)}
        rope_parameters["rope_type"] = rope_parameters.pop("type", rope_parameters.get("rope_type"))
    return {
        "architectures": ["SmolLM3ForCausalLM"],
        "model_type": "smollm3",
        "vocab_size": m.vocab_size,
        "hidden_size": m.d_model,
        "intermediate_size": m.d_ff,
        "num_hidden_layers": m.num_layers,
        "num_attention_heads": m.num_heads,
        "num_key_value_heads": m.num_kv_heads,
        "head_dim": m.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": m.max_position_embeddings,
        "rms_norm_eps": m.rms_norm_eps,
        "rope_theta": float(m.rope_theta),  # transformers < 5 reads these two
        "rope_scaling": None if not m.rope_scaling else dict(rope_parameters),
        "rope_parameters": rope_parameters,  # transformers >= 5
        "no_rope_layers": [int(x) for x in config.rope_pattern(m)],
        "no_rope_layer_interval": m.no_rope_layer_interval or m.num_layers + 1,
        # HF masks by layer_types; use_sliding_window also sets each layer's window for flash kernels
        "use_sliding_window": sliding,
        "sliding_window": m.sliding_window if sliding else None,
        "layer_types": types,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": bool(m.tie_embeddings),
        "torch_dtype": dtype,
        "bos_token_id": token_ids.get("bos"),
        "eos_token_id": token_ids.get("eos"),
        "pad_token_id": token_ids.get("pad"),
    }


def model_config_from_hf(hf: dict) -> config.ConfigDict:
    if hf.get("model_type") not in ("smollm3", "llama"):
        raise ValueError(f"model_type {hf.get('model_type')!r} is not a SmolLM3 (or Llama) checkpoint")
    m = config.base_config().model
    m.vocab_size = hf["vocab_size"]
    m.d_model = hf["hidden_size"]
    m.d_ff = hf["intermediate_size"]
    m.num_layers = hf["num_hidden_layers"]
    m.num_heads = hf["num_attention_heads"]
    m.num_kv_heads = hf.get("num_key_value_heads") or hf["num_attention_heads"]
    m.head_dim = hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]
    m.rms_norm_eps = hf.get("rms_norm_eps", 1e-6)
    m.max_position_embeddings = hf.get("max_position_embeddings", 4096)
    m.tie_embeddings = bool(hf.get("tie_word_embeddings", True))
    rope = hf.get("rope_parameters") or {}
    m.rope_theta = float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
    scaling = hf.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
    if scaling:
        m.rope_scaling = {k: v for k, v in scaling.items() if k != "rope_theta"}
    if hf.get("model_type") == "llama":
        m.no_rope_layer_interval = 0
    elif hf.get("no_rope_layers") is not None:
        m.no_rope_layers = tuple(int(x) for x in hf["no_rope_layers"])
    else:
        m.no_rope_layer_interval = hf.get("no_rope_layer_interval", 4)
    # HF masks layer i by layer_types[i] (written by SmolLM3Config, which defaults to sliding NoPE
    # layers when use_sliding_window); a sliding layer's window is sliding_window
    types = hf.get("layer_types")
    if types is None and hf.get("use_sliding_window") and hf.get("sliding_window") is not None:
        types = ["full_attention" if rope else "sliding_attention" for rope in config.rope_pattern(m)]
    if types and "sliding_attention" in types and hf.get("sliding_window") is not None:
        m.layer_types = tuple(types)
        m.sliding_window = int(hf["sliding_window"])
    return m


# ---------------------------------------------------------------------------------------------
# Weights


def from_hf(path: str, *, dtype: str = "float32", param_dtype: str = "float32") -> model.Decoder:
    """A nopejax Decoder with the weights of a transformers SmolLM3 checkpoint directory."""
    with open(os.path.join(path, "config.json")) as f:
        m = model_config_from_hf(json.load(f))
    m.dtype, m.param_dtype = dtype, param_dtype
    cfg = config.base_config()
    cfg.model = m
    config.validate(cfg)
    return build(m, load_params(path, m))


def load_params(path: str, m: config.ConfigDict) -> dict:
    """HF tensors -> nopejax pure param dict (numpy, param dtype), read one tensor at a time."""
    reader = tensorfile.Reader(path)
    pdtype = np.dtype(jnp.dtype(m.param_dtype))
    params = {"embed": reader.get("model.embed_tokens.weight").astype(pdtype)}
    layers = {}
    for name, (suffix, _, from_fn) in LAYER_MAP.items():
        stacked = None
        for i in range(m.num_layers):
            w = from_fn(reader.get(f"model.layers.{i}.{suffix}"), m)
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
    """Write a transformers SmolLM3 directory (config.json + safetensors), one tensor at a time.

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
    check_exportable(m)
    dtype = dtype or m.param_dtype
    np_dtype = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
    os.makedirs(out_dir, exist_ok=True)

    producers = {"model.embed_tokens.weight": lambda: params["embed"]}
    for i in range(m.num_layers):
        for name, (suffix, to_fn, _) in LAYER_MAP.items():
            producers[f"model.layers.{i}.{suffix}"] = lambda name=name, i=i, to_fn=to_fn: to_fn(
                np.asarray(params["layers"][name][i])
            )
    producers["model.norm.weight"] = lambda: params["final_norm"]
    if not m.tie_embeddings:
        producers["lm_head.weight"] = lambda: np.asarray(params["lm_head"]).T

    def shape_of(name):  # shapes from the config alone: nothing is materialised to plan the files
        D, F, V, HE, KE = m.d_model, m.d_ff, m.vocab_size, m.num_heads * m.head_dim, m.num_kv_heads * m.head_dim
        table = {"embed_tokens": (V, D), "lm_head": (V, D), "norm.weight": (D,), "layernorm": (D,),
                 "q_proj": (HE, D), "k_proj": (KE, D), "v_proj": (KE, D), "o_proj": (D, HE),
                 "gate_proj": (F, D), "up_proj": (F, D), "down_proj": (D, F)}  # fmt: skip
        return next(shape for key, shape in table.items() if key in name)

    specs = [(name, shape_of(name), np_dtype) for name in producers]
    tensorfile.write(out_dir, specs, lambda name: producers[name]())  # write() converts to np_dtype
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf_config(m, token_ids, dtype), f, indent=2)
    if tokenizer is not None:
        tokenizer.save_for_hf(out_dir, model_max_length=m.max_position_embeddings)
    return out_dir
