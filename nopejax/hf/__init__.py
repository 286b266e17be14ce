"""HuggingFace transformers interop: exact import and export, or a one-line refusal with the reason.

The families are listed once, in hf/registry.py; each has a module (hf/<name>.py) holding its
config.json rows and tensor map only. The row machinery is hf/fields.py, the map machinery
(names, transposes, split/fuse) hf/tensors.py, safetensors I/O nopejax/tensorfile.py.

Import is exact or it refuses. Every config.json field has a row that either maps it onto the
nopejax config, or accepts it because it does not change what the model computes, or refuses it
with a one-line error naming the field, its value and the fix; a field without a row is refused.
Every safetensors tensor must be consumed by the map, and every tensor the map needs must be
there. Export mirrors this: a nopejax config the target family cannot express is refused before
anything is written, naming the first feature the format lacks.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from nopejax import config, layers, model, tensorfile
from nopejax.hf import fields, registry, tensors
from nopejax.hf.fields import Field, HFConfigError, harmless
from nopejax.hf.registry import Family
from nopejax.hf.tensors import HFTensorError, Joint, Tensor

__all__ = [
    "EXPORTED_FIELDS", "FAMILIES", "RUNTIME_FIELDS", "Family", "Field", "HFConfigError", "HFTensorError", "Joint",
    "Tensor", "build", "check_exportable", "check_tensors", "harmless", "hf_config", "hf_tensor_shapes",
    "layer_rows", "load_params", "model_config_from_hf", "to_hf",
]  # fmt: skip

# config.json's model_type -> family, and model.hf_family -> family where it differs (llama4 / llama4_text)
FAMILIES = {**registry.BY_MODEL_TYPE, **registry.BY_NAME}


def layer_rows(m: config.ConfigDict) -> list[list[tuple[dict, Joint]]]:
    """Per layer i: the rows of `m.hf_family`'s map that apply (see hf/tensors.py)."""
    return tensors.layer_rows(m, registry.BY_NAME[m.hf_family].layer_map)


def hf_tensor_shapes(m: config.ConfigDict, outer: tensors.Outer | None = None) -> dict[str, tuple[int, ...]]:
    """Every tensor of the HF checkpoint of model config `m` (its `hf_family`), with its shape, in file order;
    the family's names, or `outer`'s spelling of them."""
    fam = registry.BY_NAME[m.hf_family]
    return tensors.tensor_shapes(m, fam.layer_map, outer or fam.outer)


def _outer(fam: Family, reader: tensorfile.Reader) -> tensors.Outer:
    """The names the checkpoint uses: the family's, or one of its other spellings (`import_outers`)."""
    return next((outer for outer in fam.import_outers if outer.embed in reader), fam.outer)


# ---------------------------------------------------------------------------------------------
# config.json <-> nopejax


# Multimodal checkpoints of a registered text family: a vision tower beside the text model, whose weights nopejax
# would have to skip. model_type -> (label, the text model's class and model_type, how to save it alone)
MULTIMODAL = {
    "llama4": ("Llama 4", "Llama4ForCausalLM, model_type llama4_text",
               "Llama4ForConditionalGeneration.from_pretrained(dir).language_model.save_pretrained(text_dir)"),
    "qwen3_5": ("Qwen3.5", "Qwen3_5ForCausalLM, model_type qwen3_5_text",
                "Qwen3_5ForCausalLM.from_pretrained(dir).save_pretrained(text_dir)"),
    "qwen3_5_moe": ("Qwen3.5 MoE", "Qwen3_5MoeForCausalLM, model_type qwen3_5_moe_text",
                    "Qwen3_5MoeForCausalLM.from_pretrained(dir).save_pretrained(text_dir)"),
}  # fmt: skip


def model_config_from_hf(hf: dict) -> config.ConfigDict:
    """The nopejax model config of a transformers config.json, exact or refused (HFConfigError)."""
    family = registry.BY_MODEL_TYPE.get(hf.get("model_type"))
    if hf.get("model_type") in MULTIMODAL:
        label, text_model, save = MULTIMODAL[hf["model_type"]]
        raise HFConfigError(
            "model_type", hf["model_type"], f"a multimodal {label} checkpoint; nopejax imports the text model only "
            f"({text_model}), and never skips a weight (the vision tower's)",
            f"save its language model alone: {save}, then import text_dir",
        )  # fmt: skip
    if family is None:
        raise HFConfigError("model_type", hf.get("model_type"), f"nopejax imports {sorted(registry.BY_MODEL_TYPE)} "
                            f"only ({registry.labels()})", "convert a checkpoint of a supported family")  # fmt: skip
    unknown = [name for name in hf if name not in family.fields]
    if unknown:
        raise HFConfigError(
            unknown[0], hf[unknown[0]],
            f"nopejax has no row for this {family.model_type} field, so it cannot tell whether the model depends on it",
            f"add one to nopejax/hf/{family.name}.py (or delete the field if transformers ignores it)",
        )  # fmt: skip
    full = {name: field.default for name, field in family.fields.items()} | hf
    m = config.base_config().model
    m.update(family.base)
    for name, field in family.fields.items():
        m.update(field.read(name, full[name], full))
    return m


# nopejax model fields the families' config.json express (each family's `lacks` refuses what its own cannot) ...
EXPORTED_FIELDS = {
    "vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim", "d_ff",
    "no_rope_layer_interval", "no_rope_layers", "rope_theta", "rope_scaling", "max_position_embeddings",
    "tie_embeddings", "rms_norm_eps", "attention_bias", "mlp_bias", "layer_types", "global_attention_interval",
    "sliding_window", "rope_layout", "qk_norm", "norm", "block", "logit_scale",
    *(field for field, _, _ in fields.NOBODY_HAS),
    # MoE: each family's lacks refuses what it cannot hold
    "experts_per_token", "expert_d_ff", "num_shared_experts", "router", "router_normalize", "routed_scale",
    "router_scale_input", "num_dense_layers", "moe_layer_interval", "capacity_factor",
}  # fmt: skip
# ... and those that only say how nopejax trains or runs it, not what it computes.
RUNTIME_FIELDS = {"init_std", "dtype", "param_dtype", "attention_impl", "mamba_impl", "gdn_impl", "scan_layers",
                  "remat", "hf_family", "balance_loss_weight", "router_z_loss_weight", "expert_bias_rate",
                  "moe_dispatch", "moe_dispatch_chunks"}  # fmt: skip


def check_exportable(m: config.ConfigDict, family: str | None = None) -> None:
    """Refuse, before anything is written, a model the family's config.json cannot express (default:
    `m.hf_family`): the first layer of a mixer or FFN kind its format has no place for, then the first
    feature it has no field for, then any other field away from its default."""
    key = family or m.hf_family
    if key not in registry.BY_NAME:
        raise config.ConfigError("model.hf_family", f"is {key!r}, a family nopejax does not export",
                                 f"use one of {list(registry.NAMES)} ({registry.labels()})")  # fmt: skip
    fam = registry.BY_NAME[key]
    name = fam.architecture.removesuffix("ForCausalLM")
    fields.layer_kinds(m, name, fam.mixers, fam.ffns, lambda what, kind: [
        f.name for f in registry.REGISTERED if kind in (f.mixers if what == "mixer" else f.ffns)
    ])  # fmt: skip
    derived = {"no_rope_layers": [int(x) for x in layers.rope_pattern(m)], "layer_types": fields.layer_types(m)}
    for field, in_use, lacks in fam.lacks:
        if in_use(m):
            value = derived[field] if field in derived else m[field]  # the per-layer lists as resolved
            raise config.ConfigError(
                f"model.{field}", f"is {value!r}, but the {name} format has no {lacks}, so transformers "
                "would run a different model", f"export to a family that has it (model.hf_family, one of "
                f"{list(registry.NAMES)}), or use the params directly with nopejax",
            )  # fmt: skip
    defaults = config.to_dict(config.base_config())["model"]
    given = json.loads(m.to_json_best_effort())  # plain JSON both sides: frozen configs hold tuples
    for key in given:
        if key in EXPORTED_FIELDS or key in RUNTIME_FIELDS or key in fam.exports:
            continue
        if key not in defaults or given[key] != defaults[key]:
            raise config.ConfigError(
                f"model.{key}", f"{m[key]!r} has no counterpart in transformers' {name} config",
                f"export only models {name} can express exactly (keep this field at its default)",
            )  # fmt: skip


def hf_config(m: config.ConfigDict, token_ids: dict | None = None, dtype: str = "float32") -> dict:
    """The config.json of `m.hf_family` for a nopejax model config."""
    check_exportable(m)
    fam = registry.BY_NAME[m.hf_family]
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


def check_tensors(reader: tensorfile.Reader, m: config.ConfigDict) -> None:
    """The checkpoint holds exactly the tensors `m` consumes, with their shapes: checked on the
    headers, before any weight is read. A tensor nopejax would skip means a model it would not
    compute (biases the config switches off, another architecture's extra weights)."""
    expected = hf_tensor_shapes(m, _outer(registry.BY_NAME[m.hf_family], reader))
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
    fam = registry.BY_NAME[m.hf_family]
    outer = _outer(fam, reader)
    params = {"embed": reader.get(outer.embed).astype(pdtype)}
    tied_head = m.tie_embeddings and "lm_head.weight" in reader  # consumed as a check: transformers ignores it
    if tied_head and not np.array_equal(reader.get("lm_head.weight").astype(pdtype), params["embed"]):
        raise HFTensorError(
            "lm_head.weight", f"differs from {outer.embed}, but tie_word_embeddings is true "
            "(transformers would use the embedding)",
            "set tie_word_embeddings false if the head was trained separately, or delete lm_head.weight",
        )  # fmt: skip
    params["layers"] = tensors.read_layers(m, fam.layer_map, reader.get, pdtype, outer)
    params["final_norm"] = reader.get(outer.final_norm).astype(pdtype)
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
    fam = registry.BY_NAME[m.hf_family]
    fam.check_params(m, params)  # what the config cannot tell (Llama 4: no expert bias)
    dtype = dtype or m.param_dtype
    np_dtype = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
    os.makedirs(out_dir, exist_ok=True)

    producers = {
        fam.outer.embed: lambda: {fam.outer.embed: params["embed"]},
        **tensors.layer_producers(m, fam.layer_map, params["layers"], fam.outer),
        fam.outer.final_norm: lambda: {fam.outer.final_norm: params["final_norm"]},
    }
    if not m.tie_embeddings:
        producers["lm_head.weight"] = lambda: {"lm_head.weight": np.asarray(params["lm_head"]).T}
    pending = {}  # tensors a row produced together, handed out one by one (the file order keeps them adjacent)

    def produce_one(name):
        if name not in pending:
            pending.update(producers[name]())
        return pending.pop(name)

    # shapes from the config alone: nothing is materialised to plan the files
    specs = [
        (name, shape, np.dtype(np.float32) if fam.keep_fp32 and name.endswith(fam.keep_fp32) else np_dtype)
        for name, shape in hf_tensor_shapes(m).items()
    ]
    tensorfile.write(out_dir, specs, produce_one)  # write() converts to each spec's dtype
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf_config(m, token_ids, dtype), f, indent=2)
    if tokenizer is not None:
        tokenizer.save_for_hf(out_dir, model_max_length=m.max_position_embeddings, add_bos=add_bos)
    return out_dir


def __getattr__(name: str):
    """The old spelling `nopejax.hf.from_hf` (now `nopejax.from_hf`), kept for one release."""
    if name == "from_hf":
        import warnings

        import nopejax  # only this shim: the package above, always imported before this one

        warnings.warn("nopejax.hf.from_hf is now nopejax.from_hf", FutureWarning, stacklevel=2)
        return nopejax.from_hf
    raise AttributeError(f"module 'nopejax.hf' has no attribute {name!r}")
