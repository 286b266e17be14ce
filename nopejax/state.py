"""The train state and its shardings, built once before anything compiles.

The train state is a plain pytree {step, rng, params, opt_state}. Shardings come from the
params' logical axes through `sharding.LOGICAL_RULES`; the optimizer state mirrors its params.
Init follows nanodo: `eval_shape` -> shardings -> `jit(init, out_shardings)`, so no device ever
holds an unsharded copy.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from nopejax import attention, config, context, data, model, optimizer, sharding, validation
from nopejax.config import ConfigDict, ConfigError

BATCH_KEYS = ("inputs", "targets", "segment_ids", "positions", "loss_mask")


def param_logical_axes(m: ConfigDict) -> dict:
    """Pure dict mirroring the params: each leaf a tuple of logical axis names."""
    abstract = nnx.eval_shape(lambda: model.create(m))
    state = nnx.state(abstract, nnx.Param)
    axes = jax.tree.map(lambda v: v.logical_axes, state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return nnx.to_pure_dict(axes) if not isinstance(axes, dict) else axes


@dataclasses.dataclass(frozen=True)
class Setup:
    """Everything static about a run: built once, before any compile."""

    cfg: ConfigDict
    mesh: jax.sharding.Mesh
    graphdef: object
    tx: optax.GradientTransformation
    state_shardings: dict
    abstract_state: dict  # ShapeDtypeStructs carrying shardings
    batch_sharding: NamedSharding


def _init_fn(cfg: ConfigDict, tx):
    def init(seed):
        _, params = model.split(model.create(cfg.model, seed))
        return {
            "step": jnp.zeros((), jnp.int32),
            "rng": jax.random.key_data(jax.random.key(seed)),
            "params": params,
            "opt_state": tx.init(params),
        }

    return init


def setup(cfg: ConfigDict, devices=None) -> Setup:
    """Validate, build the mesh, and derive every sharding. Raises ConfigError before compiling."""
    validation.validate(cfg)
    mesh = sharding.make_mesh(cfg.mesh, devices)
    platform = mesh.devices.flat[0].platform
    cfg = cfg.copy_and_resolve_references()  # `auto` attention is decided for the target devices
    validation.check_platform(cfg, platform)
    m = cfg.model
    m.attention_impl = attention.resolve_impl(m.attention_impl, m.head_dim, platform, config.context_chunk(cfg))
    tx = optimizer.make(cfg)
    axes = param_logical_axes(cfg.model)
    graphdef = nnx.split(nnx.eval_shape(lambda: model.create(cfg.model)))[0]
    abstract = jax.eval_shape(_init_fn(cfg, tx), 0)

    flat_axes = jax.tree_util.tree_flatten_with_path(axes, is_leaf=lambda x: isinstance(x, tuple))[0]
    flat_shapes = jax.tree.leaves(abstract["params"])
    sharding.check_divisible([(jax.tree_util.keystr(p), s.shape, a) for (p, a), s in zip(flat_axes, flat_shapes)], mesh)
    batch_spec = sharding.logical_to_spec(["act_batch", None], mesh)
    batch_axes = batch_spec[0] or ()
    batch_shards = math.prod(mesh.shape[a] for a in ((batch_axes,) if isinstance(batch_axes, str) else batch_axes))
    micro = cfg.train.global_batch_size // cfg.train.grad_accum
    if micro % batch_shards:
        raise ConfigError(
            "train.global_batch_size",
            f"each microbatch has {micro} rows, not divisible by the {batch_shards} data-parallel shards",
            f"use a global batch that is a multiple of grad_accum * {batch_shards}",
        )

    replicated = NamedSharding(mesh, PartitionSpec())
    param_shardings = jax.tree.map(lambda a: sharding.named(mesh, a), axes, is_leaf=lambda x: isinstance(x, tuple))
    opt_shardings = optax.tree_map_params(
        tx,
        lambda _, s: s,
        abstract["opt_state"],
        param_shardings,
        transform_non_params=lambda _: replicated,
        is_leaf=lambda x: isinstance(x, NamedSharding),
    )
    state_shardings = {"step": replicated, "rng": replicated, "params": param_shardings, "opt_state": opt_shardings}
    abstract = jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), abstract, state_shardings
    )
    return Setup(cfg, mesh, graphdef, tx, state_shardings, abstract, NamedSharding(mesh, batch_spec))


def init_state(s: Setup) -> dict:
    init = jax.jit(_init_fn(s.cfg, s.tx), static_argnums=0, out_shardings=s.state_shardings)
    with jax.set_mesh(s.mesh):
        return init(s.cfg.train.seed)


def fresh_opt_state(s: Setup, params: dict) -> dict:
    """A new state around given params (init_from / import-hf): step 0, new optimizer state."""

    def build(params):
        return {
            "step": jnp.zeros((), jnp.int32),
            "rng": jax.random.key_data(jax.random.key(s.cfg.train.seed)),
            "params": params,
            "opt_state": s.tx.init(params),
        }

    with jax.set_mesh(s.mesh):
        return jax.jit(build, out_shardings=s.state_shardings)(params)


def abstract_batch(s: Setup) -> dict:
    shape = (s.cfg.train.global_batch_size, s.cfg.train.seq_len)
    dtypes = {"loss_mask": jnp.float32}
    return {k: jax.ShapeDtypeStruct(shape, dtypes.get(k, jnp.int32), sharding=s.batch_sharding) for k in BATCH_KEYS}


def to_device_batch(s: Setup, local_batch: dict) -> dict:
    """Host rows -> global arrays; under context parallelism each row is reordered once, here,
    into zig-zag order (causal load balancing: nopejax/context.py)."""
    rows = context.reorder({k: np.asarray(local_batch[k]) for k in BATCH_KEYS}, sharding.context_size(s.mesh))
    return data.global_batch(rows, s.mesh, sharding.BATCH_AXES)
