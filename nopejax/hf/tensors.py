"""nopejax params <-> HF tensors: the map machinery, and the transposes every family shares.

nopejax keeps layer params stacked [L, ...] and attention projections split by head; HF keeps
one `nn.Linear` per layer with weight [out, in]. A family's map is a dict, one row per param of
a layer (`model.layers.{i}.` is implied):

  param name -> Tensor(HF suffix, HF shape, to_hf, from_hf)        one param, one tensor
  (names)    -> Joint(HF shapes, to_hf, from_hf)                   several params <-> several tensors
                                                                   (fused, or one tensor per expert)

A row applies to a layer that has all its params (dense-FFN and MoE params stack over their own
layers only), and every param of a layer is in exactly one row. Outside the layers every family
has model.embed_tokens.weight [V, D] = embed, model.norm.weight = final_norm, and (untied only)
lm_head.weight [V, D] = lm_head.T; a family that names them otherwise gives its `Outer` names
(Nemotron-H: backbone.embeddings.weight, backbone.layers.{i}., backbone.norm_f.weight).

The rows shared by the families (layer i, HF <-> nopejax):

| HF tensor                                   | nopejax                  | transform                |
|---------------------------------------------|--------------------------|--------------------------|
| self_attn.q_proj.weight [H*E, D]            | wq [D, H, E]             | W.T reshaped             |
| self_attn.{k,v}_proj.weight [K*E, D]        | w{k,v} [D, K, E]         | W.T reshaped             |
| self_attn.o_proj.weight [D, H*E]            | wo [H, E, D]             | W.T reshaped             |
| mlp.{gate,up}_proj.weight [F, D]            | w_{gate,up} [D, F]       | W.T                      |
| mlp.down_proj.weight [D, F]                 | w_down [F, D]            | W.T                      |
| self_attn.{q,k,v}_proj.bias                 | {q,k,v}_bias [H or K, E] | reshaped                 |
| self_attn.o_proj.bias, mlp.*_proj.bias      | o_bias, {gate,up,down}_bias | -                     |

The biases exist with `model.attention_bias` / `model.mlp_bias` (HF `attention_bias`, `mlp_bias`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from nopejax import config, layers, model, moe
from nopejax.mixers import mamba2 as mamba2_lib
from nopejax.mixers.kinds import KINDS


class Tensor(NamedTuple):
    suffix: str  # after `model.layers.{i}.` (the family's `Outer.layers`)
    shape: Callable  # model cfg -> the HF shape
    to_hf: Callable  # our array (one layer) -> HF array
    from_hf: Callable  # (HF array, model cfg) -> our array (one layer)


class Outer(NamedTuple):
    """Where a family's checkpoint keeps what is not a layer row, and the layers' prefix."""

    embed: str = "model.embed_tokens.weight"
    layers: str = "model.layers"  # layer i's row tensors are `{layers}.{i}.{suffix}`
    final_norm: str = "model.norm.weight"


OUTER = Outer()  # the names every family but Nemotron-H uses


class Joint(NamedTuple):
    """Several nopejax params of one layer <-> several HF tensors (fused or per-expert MoE weights)."""

    shapes: Callable  # model cfg -> {suffix: HF shape}
    to_hf: Callable  # ({name: our array (one layer)}, m) -> {suffix: HF array}
    from_hf: Callable  # ({suffix: HF array}, m) -> {name: our array (one layer)}


class HFTensorError(config.ConfigError):
    """A safetensors tensor that is missing, unexpected, or not what the map expects."""

    def __init__(self, name: str, problem: str, fix: str):
        self.field, self.problem, self.fix = name, problem, fix
        ValueError.__init__(self, f"HF checkpoint tensor `{name}`: {problem}. Fix: {fix}.")


# Shapes of one layer's HF tensors, from the model config.
def d_model(m) -> tuple:
    return (m.d_model,)


def head_dim(m) -> tuple:
    return (m.head_dim,)


def experts(m) -> tuple:
    return (m.num_experts,)


# The transforms. HF Linear weights are [out, in]; ours are [in, out], split by head where HF fuses heads.
def same(suffix: str, shape: Callable) -> Tensor:
    """A tensor stored as is (norm weights, biases, expert stacks)."""
    return Tensor(suffix, shape, lambda a: a, lambda w, m: w)


def linear(suffix: str, out: Callable, inp: Callable) -> Tensor:
    """A Linear weight [out, in] stored as ours [in, out] (W.T)."""
    return Tensor(suffix, lambda m: (out(m), inp(m)), lambda a: a.T, lambda w, m: w.T)


def heads_in(suffix: str, heads: str) -> Tensor:
    """A projection into heads: HF [heads * E, D], ours [D, heads, E] (W.T reshaped)."""
    return Tensor(
        suffix,
        lambda m: (m[heads] * m.head_dim, m.d_model),
        lambda a: a.reshape(a.shape[0], -1).T,
        lambda w, m: w.T.reshape(m.d_model, m[heads], m.head_dim),
    )


def heads_out(suffix: str) -> Tensor:
    """The output projection: HF [D, H * E], ours [H, E, D] (W.T reshaped)."""
    return Tensor(
        suffix,
        lambda m: (m.d_model, m.num_heads * m.head_dim),
        lambda a: a.reshape(-1, a.shape[-1]).T,
        lambda w, m: w.T.reshape(m.num_heads, m.head_dim, m.d_model),
    )


def head_bias(suffix: str, heads: str) -> Tensor:
    """A projection bias: HF [heads * E], ours [heads, E]."""
    return Tensor(
        suffix,
        lambda m: (m[heads] * m.head_dim,),
        lambda a: a.reshape(-1),
        lambda w, m: w.reshape(m[heads], m.head_dim),
    )


def d_ff(m) -> int:
    return m.d_ff


def width(m) -> int:
    return m.d_model


def shared_width(m) -> int:
    return m.num_shared_experts * moe.expert_width(m)


ATTENTION = {
    "wq": heads_in("self_attn.q_proj.weight", "num_heads"),
    "wk": heads_in("self_attn.k_proj.weight", "num_kv_heads"),
    "wv": heads_in("self_attn.v_proj.weight", "num_kv_heads"),
    "wo": heads_out("self_attn.o_proj.weight"),
}
ATTENTION_BIASES = {  # present with model.attention_bias; q, k, v biases are split by head here
    "q_bias": head_bias("self_attn.q_proj.bias", "num_heads"),
    "k_bias": head_bias("self_attn.k_proj.bias", "num_kv_heads"),
    "v_bias": head_bias("self_attn.v_proj.bias", "num_kv_heads"),
    "o_bias": same("self_attn.o_proj.bias", d_model),
}


def mlp(prefix: str = "mlp") -> dict:
    """The SwiGLU MLP rows under `prefix` (biases present with model.mlp_bias)."""
    return {
        "w_gate": linear(f"{prefix}.gate_proj.weight", d_ff, width),
        "w_up": linear(f"{prefix}.up_proj.weight", d_ff, width),
        "w_down": linear(f"{prefix}.down_proj.weight", width, d_ff),
    }


MLP_BIASES = {
    "gate_bias": same("mlp.gate_proj.bias", lambda m: (m.d_ff,)),
    "up_bias": same("mlp.up_proj.bias", lambda m: (m.d_ff,)),
    "down_bias": same("mlp.down_proj.bias", d_model),
}
PROJECTIONS = {**ATTENTION, **mlp(), **ATTENTION_BIASES, **MLP_BIASES}  # the Llama rows, less the norms


def shared_experts(prefix: str) -> dict:
    """The shared-expert SwiGLU rows under `prefix`, all shared experts as one wide MLP."""
    return {
        "shared_gate": linear(f"{prefix}.gate_proj.weight", shared_width, width),
        "shared_up": linear(f"{prefix}.up_proj.weight", shared_width, width),
        "shared_down": linear(f"{prefix}.down_proj.weight", width, shared_width),
    }


# A format without an expert bias: nothing on disk, zeros on import (a family's check_params refuses a
# nonzero one on export: fields.no_expert_bias)
NO_EXPERT_BIAS = Joint(lambda m: {}, lambda a, m: {}, lambda w, m: {"expert_bias": np.zeros(m.num_experts)})


def mamba2_rows(where: str) -> dict:
    """The Mamba2 mixer's rows under `where` (Nemotron-H "mixer", Granite 4.0-H "mamba"), from
    mixers/mamba2.py's HF_TENSORS (transformers' names inside the mixer): Linear weights W.T, the
    depthwise conv weight [u, 1, k] <-> ours [k, u], the rest as is."""
    kind = KINDS["mamba2"]
    params = {**mamba2_lib.MAMBA2_PARAMS, **mamba2_lib.BIAS_PARAMS, **mamba2_lib.CONV_BIAS_PARAMS}
    to_hf = {"in_proj": lambda a: a.T, "out_proj": lambda a: a.T, "conv1d_weight": lambda a: a.T[:, None, :]}
    rows = {}
    for name, (suffix, from_hf) in kind.hf_tensors.items():
        ours = params[name][0]
        hf_shape = {
            "in_proj": lambda m, f=ours: f(kind.dims(m))[::-1],
            "out_proj": lambda m, f=ours: f(kind.dims(m))[::-1],
            "conv1d_weight": lambda m, f=ours: (f(kind.dims(m))[1], 1, f(kind.dims(m))[0]),
        }.get(name, lambda m, f=ours: f(kind.dims(m)))
        rows[kind.prefix + name] = Tensor(
            f"{where}.{suffix}", hf_shape, to_hf.get(name, lambda a: a), lambda w, m, g=from_hf: g(w)
        )
    return rows


EXPERT_KINDS = ("gate", "up", "down")


def per_expert(prefix: str) -> Joint:
    """Routed experts saved one Linear per expert and kind, `{prefix}.{e}.{kind}_proj.weight` [out, in]
    (AFMoE, Qwen3-Next: transformers fuses them in memory and saves them so, as the hub checkpoints
    are) <-> expert_{kind} [X, in, out]."""

    def name(e: int, kind: str) -> str:
        return f"{prefix}.{e}.{kind}_proj.weight"

    def shape(m, kind: str) -> tuple:
        I = moe.expert_width(m)  # noqa: E741
        return (m.d_model, I) if kind == "down" else (I, m.d_model)

    return Joint(
        lambda m: {name(e, k): shape(m, k) for e in range(m.num_experts) for k in EXPERT_KINDS},
        lambda a, m: {name(e, k): a[f"expert_{k}"][e].T for e in range(m.num_experts) for k in EXPERT_KINDS},
        lambda w, m: {f"expert_{k}": np.stack([w[name(e, k)].T for e in range(m.num_experts)]) for k in EXPERT_KINDS},
    )


def _as_joint(name: str, row: Tensor) -> Joint:
    return Joint(
        lambda m: {row.suffix: row.shape(m)},
        lambda a, m: {row.suffix: row.to_hf(a[name])},
        lambda w, m: {name: row.from_hf(w[row.suffix], m)},
    )


def layer_rows(m: config.ConfigDict, layer_map: dict) -> list[list[tuple[dict, Joint]]]:
    """Per layer i: the rows of `layer_map` that apply, each with {param name: index of layer i in
    that param's stack}."""
    specs, names = layers.layer_specs(m), model.layer_params(m)
    out = []
    for i, spec in enumerate(specs):
        index = {
            name: model.group_count(specs[:i], model.param_group(name))
            for name in names
            if model.in_group(spec, model.param_group(name))
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


def tensor_shapes(m: config.ConfigDict, layer_map: dict, outer: Outer = OUTER) -> dict[str, tuple[int, ...]]:
    """Every tensor of the HF checkpoint of model config `m`, with its shape, in file order."""
    shapes = {outer.embed: (m.vocab_size, m.d_model)}
    for i, rows in enumerate(layer_rows(m, layer_map)):
        for _, row in rows:
            shapes.update({f"{outer.layers}.{i}.{suffix}": shape for suffix, shape in row.shapes(m).items()})
    shapes[outer.final_norm] = (m.d_model,)
    if not m.tie_embeddings:
        shapes["lm_head.weight"] = (m.vocab_size, m.d_model)
    return shapes


def read_layers(m: config.ConfigDict, layer_map: dict, get: Callable, dtype, outer: Outer = OUTER) -> dict:
    """The stacked nopejax layer params, each HF tensor read by `get(name)` once."""
    stacked = {
        name: np.empty((model.stack_size(m, name), *shape_fn(m)), dtype)
        for name, (shape_fn, _) in model.layer_params(m).items()
    }
    for i, rows in enumerate(layer_rows(m, layer_map)):
        for index, row in rows:
            got = row.from_hf({suffix: get(f"{outer.layers}.{i}.{suffix}") for suffix in row.shapes(m)}, m)
            for name, w in got.items():
                stacked[name][index[name]] = w
    return stacked


def layer_producers(m: config.ConfigDict, layer_map: dict, layers: dict, outer: Outer = OUTER) -> dict[str, Callable]:
    """HF tensor name -> a function returning {name: array} for its row (all the row's tensors at
    once: fused or per expert), from the stacked nopejax layer params `layers`."""
    producers = {}
    for i, rows in enumerate(layer_rows(m, layer_map)):
        for index, row in rows:

            def produce(i=i, index=index, row=row):
                ours = {name: np.asarray(layers[name][j]) for name, j in index.items()}
                return {f"{outer.layers}.{i}.{suffix}": a for suffix, a in row.to_hf(ours, m).items()}

            for suffix in row.shapes(m):
                producers[f"{outer.layers}.{i}.{suffix}"] = produce
    return producers
