"""A checkpoint's per-token loss and greedy correctness, on the run's own mesh, for evaluation.

Every evaluation (`loss_by_length`, `tasks`, `passkey`) runs the model in fp32 with
`attention_impl`, `mamba_impl` and `gdn_impl` = "xla", whatever the run trained with, so numbers compare
across hardware. It runs on the run's own mesh (`mesh.*` of its config, `--config.mesh.KEY=VALUE` to change it):
params sharded by the logical-axis table as in training, each forward's rows spread over the data
axes (padded to a multiple of them), so a long evaluation never needs one device to hold the
model; the sums are the 1-device ones. `--rope-scaling` (HF `rope_scaling`: linear, yarn, llama3)
replaces the run's scaling; it changes the RoPE frequencies only, so NoPE layers, which never
rotate q and k, are untouched by construction (`nopejax.rope`). For yarn and llama3 the
`original_max_position_embeddings` defaults to the run's training length.

Shape letters: B rows, S (= L) sequence length, V vocab.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np

from nopejax import checkpoint, config, context, hf, model, sharding, train, validation
from nopejax.config import ConfigDict, ConfigError

FORWARD_TOKENS = 8192  # tokens per device per forward call: bounds the [B, H, S, S] attention scores


def eval_config(cfg: ConfigDict, rope_scaling: dict | None) -> ConfigDict:
    """The run's config set up for evaluation: fp32, XLA attention and SSD, optional RoPE scaling."""
    cfg = copy.deepcopy(cfg)  # the caller's config stays as trained
    cfg.model.dtype = "float32"
    cfg.model.attention_impl = "xla"
    cfg.model.mamba_impl = "xla"
    cfg.model.gdn_impl = "xla"
    cfg.model.remat = "none"
    if rope_scaling is not None:
        scaling = dict(rope_scaling)
        if scaling.get("rope_type", scaling.get("type")) in ("yarn", "llama3"):
            scaling.setdefault("original_max_position_embeddings", cfg.train.seq_len)
        cfg.model.rope_scaling = scaling
    return validation.validate(cfg)


def parse_rope_scaling(text: str | None) -> dict | None:
    if not text:
        return None
    try:
        scaling = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(
            "--rope-scaling", f"{text!r} is not JSON ({e})", 'write e.g. \'{"rope_type": "yarn", "factor": 4}\''
        ) from None
    if not isinstance(scaling, dict):
        raise ConfigError(
            "--rope-scaling", f"{text!r} is not a JSON object", 'write e.g. \'{"rope_type": "linear", "factor": 2}\''
        )
    return scaling


def read_run(workdir: str, step: int | None, rope_scaling: dict | None) -> tuple[str, int, ConfigDict]:
    """-> (checkpoint root, step, eval config): cheap, no arrays read."""
    root, step = checkpoint.find_checkpoint(workdir, step)
    return root, step, eval_config(checkpoint.read_config(root, step), rope_scaling)


def mesh_config(cfg: ConfigDict, overrides) -> ConfigDict:
    """The run's config with `--config.mesh.KEY=VALUE` overrides; the rest is the checkpoint's."""
    others = [o for o in overrides if not o.removeprefix("--config.").startswith("mesh.")]
    if others:
        raise ConfigError(
            others[0].split("=")[0], "eval-length takes only mesh overrides; the model and data are the checkpoint's",
            "pass --config.mesh.KEY=VALUE (e.g. --config.mesh.fsdp=8), or train a run with the other setting",
        )  # fmt: skip
    return validation.validate(config.apply_overrides(copy.deepcopy(cfg), overrides))


@dataclasses.dataclass
class Stats:
    """The jitted per-token stats of a checkpoint on its mesh: batch -> (loss [B, S], correct [B, S])."""

    fn: object
    mesh: jax.sharding.Mesh
    batch_sharding: jax.sharding.NamedSharding
    shards: int  # devices the batch rows are spread over: B is padded to a multiple

    def __call__(self, batch: dict) -> tuple[np.ndarray, np.ndarray]:
        B, S = batch["inputs"].shape
        C = sharding.context_size(self.mesh)
        if C > 1 and S % (2 * C):
            raise ConfigError(
                "--lengths", f"{S} is not divisible by 2 x context = {2 * C} (the mesh splits each row in zig-zag "
                "chunks)", f"use lengths that are multiples of {2 * C}, or --config.mesh.context=1",
            )  # fmt: skip
        pad = -B % self.shards  # rows copied from row 0, computed and dropped
        # under context parallelism rows go in zig-zag order, as in training (nopejax/context.py)
        rows = context.reorder({k: np.concatenate([v, np.repeat(v[:1], pad, axis=0)]) for k, v in batch.items()}, C)
        placed = {k: jax.device_put(v, self.batch_sharding) for k, v in rows.items()}
        with jax.set_mesh(self.mesh):
            loss_BS, correct_BS = self.fn(placed)
        out = context.restore({"loss": np.asarray(loss_BS), "correct": np.asarray(correct_BS)}, C)
        return out["loss"][:B], out["correct"][:B]


def stats_fn(root: str, step: int, cfg: ConfigDict, devices=None) -> Stats:
    """The checkpoint's params restored sharded on the mesh of `cfg.mesh` (over `devices`,
    default all), as training shards them; batches sharded over the data axes."""
    mesh = sharding.make_mesh(cfg.mesh, devices)
    axes = train.param_logical_axes(cfg.model)
    named = jax.tree_util.tree_flatten_with_path(axes, is_leaf=lambda x: isinstance(x, tuple))[0]
    shapes = jax.tree.leaves(jax.eval_shape(lambda: model.split(model.create(cfg.model))[1]))
    sharding.check_divisible([(jax.tree_util.keystr(p), x.shape, a) for (p, a), x in zip(named, shapes)], mesh)
    shardings = jax.tree.map(lambda a: sharding.named(mesh, a), axes, is_leaf=lambda x: isinstance(x, tuple))
    params = checkpoint.restore_params(root, step, shardings)
    graphdef, params = model.split(hf.build(cfg.model, params))
    spec = sharding.logical_to_spec(["act_batch", "act_seq"], mesh)
    rows = spec[0] or ()
    shards = int(np.prod([mesh.shape[a] for a in ((rows,) if isinstance(rows, str) else rows)]))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    fn = jax.jit(functools.partial(token_stats, graphdef), out_shardings=replicated)
    return Stats(functools.partial(fn, params), mesh, jax.sharding.NamedSharding(mesh, spec), shards)


def token_stats(graphdef, params, batch):
    """-> (loss [B, S] fp32, argmax == target [B, S] bool); unmasked, the caller masks."""
    logits_BSV = model.apply(graphdef, params, batch["inputs"], batch["positions"], batch["segment_ids"])
    log_z_BS = jax.nn.logsumexp(logits_BSV, axis=-1)
    target_logit_BS = jnp.take_along_axis(logits_BSV, batch["targets"][..., None], axis=-1)[..., 0]
    return log_z_BS - target_logit_BS, jnp.argmax(logits_BSV, axis=-1) == batch["targets"]
