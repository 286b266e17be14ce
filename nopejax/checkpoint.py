"""Orbax checkpoints of {train state, data iterator, config}, saved together (nanodo, MaxText).

`DIR/checkpoints/<step>/` holds three items: `state` (sharded arrays: params, optimizer state,
step, rng), `data` (grain's iterator state, one JSON per process) and `config` (the run config
plus the parameter layout). Orbax writes into a temporary directory and renames it when the
save is final, so a half-written checkpoint is never taken as the latest. Saves are async:
the arrays are copied off the device, then written while training goes on.

The layout is recorded, not implied: params are layer-stacked [L, ...] whatever `scan_layers`
says, and `config.layout` names the model fields that fix the array shapes and the pattern.
Restoring into a model that differs in one of them is an error naming that field.
"""

from __future__ import annotations

import json
import logging
import os

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp

from nopejax import config as config_lib
from nopejax.config import ConfigDict, ConfigError

log = logging.getLogger("nopejax")

# model fields a checkpoint's arrays depend on (shapes) or whose meaning they carry (pattern)
LAYOUT_FIELDS = ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim", "d_ff",
                 "tie_embeddings")  # fmt: skip
ITEMS = ("state", "data", "config")


def layout(m: ConfigDict) -> dict:
    out = {f: m[f] for f in LAYOUT_FIELDS}
    out["rope_pattern"] = [int(x) for x in config_lib.rope_pattern(m)]
    out["param_layout"] = "layer_stacked_v1"  # [L, ...] per layer param; independent of scan_layers
    return out


def check_compatible(saved: dict, m: ConfigDict, where: str) -> None:
    current = layout(m)
    for field, value in current.items():
        if saved.get(field) != value:
            name = "model.no_rope_layers" if field == "rope_pattern" else f"model.{field}"
            raise ConfigError(
                name,
                f"the checkpoint at {where} has {field}={saved.get(field)!r}, this config has {value!r}",
                "use the config the checkpoint was trained with, or start a new workdir",
            )


def _manager(
    workdir: str, cfg: ConfigDict | None = None, read_only: bool = False, partial: bool = False
) -> ocp.CheckpointManager:
    c = cfg.checkpoint if cfg is not None else None
    options = ocp.CheckpointManagerOptions(
        max_to_keep=c.keep if c else None,
        keep_period=(c.keep_period or None) if c else None,
        enable_async_checkpointing=c.async_save if c else False,
        create=not read_only,
        read_only=read_only,
    )
    return ocp.CheckpointManager(
        os.path.join(os.path.abspath(workdir), "checkpoints"),
        options=options,
        item_handlers={
            # same files either way; the PyTree handler also restores a subtree (params only)
            "state": ocp.PyTreeCheckpointHandler() if partial else ocp.StandardCheckpointHandler(),
            "data": grain.checkpoint.CheckpointHandler(),
            "config": ocp.JsonCheckpointHandler(),
        },
    )


class Checkpointer:
    """The run's checkpoint manager: save, and restore the newest readable checkpoint."""

    def __init__(self, workdir: str, cfg: ConfigDict):
        self.workdir, self.cfg = workdir, cfg
        self.manager = _manager(workdir, cfg)

    def _config_item(self) -> dict:
        return {"config": config_lib.to_dict(self.cfg), "layout": layout(self.cfg.model)}

    def save(self, step: int, state: dict, data_iter=None, *, force: bool = False) -> bool:
        args = {"state": ocp.args.StandardSave(state), "config": ocp.args.JsonSave(self._config_item())}
        if data_iter is not None:
            args["data"] = grain.checkpoint.CheckpointSave(data_iter)
        return self.manager.save(step, args=ocp.args.Composite(**args), force=force)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def restore_latest(self, abstract_state: dict, data_iter=None):
        """-> (state, step), or (None, 0) when there is no checkpoint.

        An unreadable newest checkpoint (truncated file, missing array) is reported with its
        path and skipped for the one before; only a config mismatch stops the run.
        """
        for step in reversed(self.steps()):
            path = os.path.join(self.manager.directory, str(step))
            saved = self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
            check_compatible(saved["layout"], self.cfg.model, path)
            args = {"state": ocp.args.StandardRestore(abstract_state)}
            if data_iter is not None:
                args["data"] = grain.checkpoint.CheckpointRestore(data_iter)
            try:
                restored = self.manager.restore(step, args=ocp.args.Composite(**args))
            except Exception as e:  # orbax / tensorstore raise many types for a damaged file
                log.warning("checkpoint %s is unreadable (%s: %s); falling back to the previous one",
                            path, type(e).__name__, str(e).splitlines()[0][:300])  # fmt: skip
                continue
            return restored["state"], step
        return None, 0


def find_checkpoint(path: str, step: int | None = None) -> tuple[str, int]:
    """A workdir, its checkpoints/ dir, or one step dir -> (workdir-like root, step)."""
    path = os.path.abspath(path)
    if os.path.isdir(os.path.join(path, "state")) and os.path.basename(path).isdigit():
        return os.path.dirname(os.path.dirname(path)), int(os.path.basename(path))
    if os.path.basename(path) == "checkpoints":
        path = os.path.dirname(path)
    if not os.path.isdir(os.path.join(path, "checkpoints")):
        raise ConfigError("init_from", f"{path} has no checkpoints/ directory", "pass a nopejax workdir or a step dir")
    manager = _manager(path, read_only=True)
    steps = sorted(manager.all_steps())
    manager.close()
    if not steps:
        raise ConfigError("--workdir", f"{path}/checkpoints holds no complete checkpoint", "train first, or import-hf")
    if step is None:
        return path, steps[-1]
    if step not in steps:
        raise ConfigError("--step", f"no checkpoint for step {step} in {path}; there are {steps}", "pick one of those")
    return path, step


def _saved_config_item(workdir: str, step: int) -> dict:
    manager = _manager(workdir, read_only=True)
    saved = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
    manager.close()
    return saved


def read_config(workdir: str, step: int) -> ConfigDict:
    return config_lib.from_dict(_saved_config_item(workdir, step)["config"])


def checkpoint_layout(workdir: str, step: int) -> dict:
    return _saved_config_item(workdir, step)["layout"]


def restore_params(workdir: str, step: int, shardings=None) -> dict:
    """Only the params of a checkpoint: as host numpy arrays, or placed with `shardings`."""
    manager = _manager(workdir, read_only=True, partial=True)
    meta = manager.item_metadata(step)["state"]
    params_meta = meta["params"] if isinstance(meta, dict) else meta.tree["params"]
    if shardings is None:
        restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), params_meta)
    else:
        restore_args = jax.tree.map(lambda _, s: ocp.ArrayRestoreArgs(sharding=s), params_meta, shardings)
    restored = manager.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(
                item={"params": params_meta}, restore_args={"params": restore_args}, partial_restore=True
            )
        ),
    )
    manager.close()
    return restored["state"]["params"]


def load_model(workdir: str, step: int | None = None):
    """The Decoder of a checkpoint (newest by default), with its own config (fp32 compute)."""
    from nopejax import hf

    root, step = find_checkpoint(workdir, step)
    cfg = read_config(root, step)
    return hf.build(cfg.model, restore_params(root, step))


def write_run_config(workdir: str, cfg: ConfigDict) -> None:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump(config_lib.to_dict(cfg), f, indent=2)

